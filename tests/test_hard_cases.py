"""The hard cases a real run meets (issue 24): odd but valid input works (animated GIFs, a CSV with a byte-order
mark), hostile or wrong input stops with one line (a decompression bomb, a CSV that is not UTF-8, an --out-dir that
cannot be written, a second run in the same --out-dir, a fresh run over an old one, a resume with another batch size
or seed), a disk that fills during a save leaves the last checkpoint and no partial file, and a signal (SIGTERM, how
clusters preempt; Ctrl-C) stops a run at the step it reached, saved, so that --resume continues it exactly."""

import errno
import io
import os
import resource
import signal
import struct
import subprocess
import sys
import time
import zlib

import pytest
import torch
from PIL import Image

import data
import train
from plumbing import checkpoint, runlog, samples, stops
from test_train import TINY, main_error, read_log, run, weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUIET = [*TINY, "--eval-size", "0"]


def gif(frames=3, size=(40, 30)):
    images = [Image.new("RGB", size, (80 * i, 200, 40)) for i in range(frames)]
    buffer = io.BytesIO()
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], duration=50, loop=0)
    return buffer.getvalue()


def png_header(width, height):
    """A PNG that declares width × height pixels and holds none: what a decoder reads before allocating them."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


def test_an_animated_gif_is_its_first_frame():
    image = samples.decode_image(gif())
    assert image.shape == (3, 30, 40) and image[:, 0, 0].tolist() == [0, 200, 40]  # frame 0's colour (GIF palette)


@pytest.mark.parametrize("width,height", [(10_000, 9_000), (20_000, 20_000)])  # over PIL's limit, over twice it
def test_a_decompression_bomb_is_refused_before_decoding(tmp_path, width, height):
    (tmp_path / "bomb.png").write_bytes(png_header(width, height))
    started = time.perf_counter()
    with pytest.raises(samples.UnreadableImage, match="pixels"):
        data.ImageCaptions([str(tmp_path / "bomb.png")], ["a bomb"])[0]
    assert time.perf_counter() - started < 1  # refused from the header: nothing decoded


def write_csv(folder, encoding="utf-8", bom=False, caption="a red square"):
    for i in range(8):
        Image.new("RGB", (48, 40), (30 * i, 90, 200)).save(folder / f"{i}.jpg")
    (folder / "moving.gif").write_bytes(gif())
    rows = [f"{i}.jpg,{caption} {i}" for i in range(8)] + ["moving.gif,an animated gif"]
    text = "\n".join(["filepath,title", *rows]) + "\n"
    (folder / "pairs.csv").write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode(encoding))
    return folder / "pairs.csv"


def test_a_csv_with_a_byte_order_mark_and_an_animated_gif_trains(tmp_path):
    csv = write_csv(tmp_path, bom=True)
    assert data.CsvCaptions(str(csv)).captions[-1] == "an animated gif"
    run("train.py", "--data", csv, *QUIET, "--steps", "3", "--out-dir", tmp_path / "out", cwd=tmp_path)
    assert [e["skipped"] for e in read_log(tmp_path / "out")] == [0, 0, 0]  # the GIF read like any image


def test_a_csv_that_is_not_utf8_is_one_line(tmp_path):
    csv = write_csv(tmp_path, encoding="cp1252", caption="un carré rouge")
    message = main_error("--data", csv, *QUIET, "--out-dir", tmp_path / "out")
    assert "is not UTF-8 text" in message and "save it as UTF-8" in message


def test_an_out_dir_that_cannot_be_written_is_one_line(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    for out in (tmp_path / "file", tmp_path / "file" / "out", "/proc/out"):
        assert f"--out-dir {out}: " in main_error(*QUIET, "--steps", "1", "--out-dir", out)


def test_a_second_run_in_the_same_out_dir_stops_and_a_fresh_run_keeps_an_old_one(tmp_path):
    out = tmp_path / "out"
    checkpoint.claim(str(out), fresh=True)  # this process trains there
    p = run("train.py", *QUIET, "--steps", "1", "--out-dir", out, cwd=tmp_path, check=False)
    assert p.returncode == 1 and p.stderr.strip() == (f"error: another run (process {os.getpid()}) is training in "
                                                      f"{out}; wait for it or pass another --out-dir")
    checkpoint.claim(str(tmp_path / "elsewhere"), fresh=True)  # released: a run may start there now

    run("train.py", *QUIET, "--steps", "2", "--out-dir", out, cwd=tmp_path)
    log, ckpt = (out / "log.jsonl").read_text(), (out / "ckpt.pt").read_bytes()
    message = main_error(*QUIET, "--steps", "2", "--out-dir", out)
    assert f"{out} holds a run (ckpt.pt and log.jsonl): pass --resume to continue it" in message
    assert (out / "log.jsonl").read_text() == log and (out / "ckpt.pt").read_bytes() == ckpt


@pytest.mark.parametrize("change", [("--batch-size", "4"), ("--seed", "1"), ("--gpu-decode",)])  # other pixels
def test_resuming_with_another_batch_size_seed_or_decoding_is_refused(tmp_path, change):
    out = tmp_path / "out"
    run("train.py", *QUIET, "--steps", "1", "--out-dir", out, cwd=tmp_path)
    message = main_error(*QUIET, "--steps", "2", "--out-dir", out, "--resume", *change)  # the last flag wins
    assert f"was trained with {change[0]} " in message and "pass the checkpoint's to resume it" in message


def test_a_disk_that_fills_during_a_save_keeps_the_last_checkpoint(tmp_path):
    out = tmp_path / "out"
    run("train.py", *QUIET, "--steps", "2", "--out-dir", out, cwd=tmp_path)
    ckpt = (out / "ckpt.pt").read_bytes()
    limit = len(ckpt) // 2  # files may grow to half a checkpoint: the next save fails in the middle of its write

    def small_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # then a write past the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    p = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *QUIET, "--steps", "4", "--out-dir", out,
                        "--resume"], cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                       text=True, timeout=600, preexec_fn=small_disk)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.strip().splitlines()[-1] == (
        f"error: could not write {out / 'ckpt.pt.tmp'}: file too large; removed the partial file; stopped, "
        f"{out / 'ckpt.pt'} holds step 2. Free some space, then --resume.")
    assert not os.path.lexists(out / "ckpt.pt.tmp") and (out / "ckpt.pt").read_bytes() == ckpt


def train_until(argv, cwd, steps, send, group=False, launcher=(), ready=None):
    """train.py in a subprocess, sent signal `send` once its log holds `steps` steps (or once ready() is true) ->
    the completed process, and the seconds from the signal to its end."""
    out = argv[argv.index("--out-dir") + 1]
    p = subprocess.Popen([sys.executable, *launcher, os.path.join(ROOT, "train.py"), *map(str, argv)], cwd=cwd,
                         env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=group)
    ready = ready or (lambda: os.path.exists(os.path.join(out, "log.jsonl")) and len(read_log(out)) >= steps)
    deadline = time.time() + 300
    while not ready() and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert p.poll() is None, p.communicate()
    if group:  # to the whole process group, DataLoader workers included: Ctrl-C in a terminal, torchrun's stop
        os.killpg(p.pid, send)
    else:
        p.send_signal(send)
    sent = time.time()
    stdout, stderr = p.communicate(timeout=300)
    return subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr), time.time() - sent


@pytest.mark.parametrize("send,workers,group", [(signal.SIGTERM, "0", False), (signal.SIGINT, "1", True),
                                                (signal.SIGTERM, "1", True)])  # the last: as torchrun stops a rank
def test_a_signal_saves_at_the_step_reached_and_resume_is_exact(tmp_path, send, workers, group):
    args = [*QUIET, "--workers", workers, "--patch-dropout", "0.5", "--steps", "24", "--save-every", "100"]
    stopped, _ = train_until([*args, "--out-dir", tmp_path / "out"], tmp_path, 3, send, group=group)
    assert stopped.returncode == 128 + send and "Traceback" not in stopped.stderr, stopped.stderr
    step = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)["step"]
    assert f"stopped by {signal.Signals(send).name} at step {step}; {tmp_path / 'out' / 'ckpt.pt'} holds it: " \
           f"continue with --resume" in stopped.stdout
    assert 3 <= step < 24 and not (tmp_path / "out" / "ckpt.pt.tmp").exists()

    # (workers of a run forked from tests/cli.py's server start slowly; the stream is the same with any number)
    run("train.py", *args, "--workers", "0", "--out-dir", tmp_path / "out", "--resume", cwd=tmp_path)
    run("train.py", *args, "--workers", "0", "--out-dir", tmp_path / "whole", cwd=tmp_path)
    resumed, whole = weights(tmp_path / "out"), weights(tmp_path / "whole")
    assert all(torch.equal(resumed[k], whole[k]) for k in whole)
    assert [e["loss"] for e in read_log(tmp_path / "out")] == [e["loss"] for e in read_log(tmp_path / "whole")]


def test_torchrun_stopped_by_sigterm_saves_on_every_rank_at_one_step(tmp_path):
    """A preempted torchrun job: torchrun passes SIGTERM to its ranks' process groups (their DataLoader workers
    included, which leave it to their rank), the ranks agree on the step at their next log sync, save it, and stop
    without a traceback."""
    args = [*QUIET, "--workers", "1", "--steps", "400", "--save-every", "1000", "--out-dir", tmp_path / "out"]
    launcher = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    stopped, _ = train_until(args, tmp_path, 3, signal.SIGTERM, launcher=launcher)
    step = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)["step"]
    assert f"stopped by SIGTERM at step {step}; " in stopped.stdout, stopped.stdout + stopped.stderr
    assert 3 <= step < 400 and "Traceback" not in stopped.stdout and "DataLoader worker" not in stopped.stderr
    run("train.py", *args[:-2], "--steps", step + 1, "--out-dir", tmp_path / "out", "--resume", cwd=tmp_path,
        launcher=launcher)
    assert [e["step"] for e in read_log(tmp_path / "out")] == list(range(1, step + 2))


def test_a_signal_to_the_group_during_an_evaluation_cuts_it_short_and_saves(tmp_path):
    """torchrun's stop (SIGTERM to the process group: the DataLoader workers of training and of the evaluation too)
    while --eval-every evaluates: the evaluation stops at its next batch, nothing of it printed or logged, the run
    saves the next step and exits 143, and resumed it gives the weights of an uninterrupted run."""
    args = [*QUIET, "--workers", "1", "--steps", "5", "--save-every", "100", "--eval-every", "2"]
    out = tmp_path / "out"  # 3,000 images a task: the evaluation at step 2 would take many seconds
    stopped, _ = train_until([*args, "--eval-size", "3000", "--out-dir", out], tmp_path, 2, signal.SIGTERM, group=True)
    assert stopped.returncode == 143 and "Traceback" not in stopped.stderr, stopped.stderr
    assert f"stopped by SIGTERM at step 3; {out / 'ckpt.pt'} holds it" in stopped.stdout
    assert "zero-shot" not in stopped.stdout and [e["step"] for e in read_log(out)] == [1, 2, 3]
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 3

    rest = ["--eval-size", "8", "--workers", "0"]  # (as above)
    run("train.py", *args, *rest, "--out-dir", out, "--resume", cwd=tmp_path)
    run("train.py", *args, *rest, "--out-dir", tmp_path / "whole", cwd=tmp_path)
    resumed, whole = weights(out), weights(tmp_path / "whole")
    assert all(torch.equal(resumed[k], whole[k]) for k in whole)


def test_a_signal_during_the_final_evaluation_ends_it_at_once(tmp_path, monkeypatch):
    import eval_zeroshot

    real = eval_zeroshot.classify

    def signalled(*args, **kwargs):  # Ctrl-C as the final evaluation starts
        runlog.signals.append(signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(eval_zeroshot, "classify", signalled)
    try:
        with pytest.raises(SystemExit) as stopped:
            train.main([*QUIET, "--steps", "2", "--eval-size", "3000", "--out-dir", str(tmp_path / "out")])
    finally:
        runlog.signals.clear()
    assert stopped.value.code == 130 and torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)["step"] == 2


class Slow(torch.utils.data.Dataset):
    def __len__(self):
        return 1000

    def __getitem__(self, i):
        time.sleep(0.05)
        return i


def test_a_worker_that_dies_with_a_stop_signal_is_a_stop_and_without_one_a_line():
    """Workers leave SIGTERM to the training process, but end on their parent's (the DataLoader's end). One that dies
    anyway (SIGKILL, or a SIGTERM before its worker_init_fn) is found where its batch is waited for, never raised from
    torch's SIGCHLD handler in the middle of a step or a save: with a stop signal, a stop; without, one line."""
    for signalled in (True, False):  # (a slow dataset: the worker is killed in it, not holding the DataLoader's locks)
        batches = iter(torch.utils.data.DataLoader(Slow(), batch_size=2, num_workers=1, timeout=stops.TICK,
                                                   worker_init_fn=stops.ignore_interrupts, persistent_workers=True))
        stops.found_when_read()
        stops.next_batch(batches)
        worker = batches._workers[0]
        subprocess.run(["kill", "-TERM", str(worker.pid)], check=True)  # torchrun's, Slurm's: ignored
        time.sleep(0.5)
        assert worker.is_alive() and stops.next_batch(batches).tolist() == [2, 3]
        os.kill(worker.pid, signal.SIGKILL)
        runlog.signals[:] = [signal.SIGTERM] if signalled else []
        try:
            with pytest.raises(stops.Stopped if signalled else SystemExit) as ended:
                for _ in range(20):  # the batches it made before
                    stops.next_batch(batches)
        finally:
            runlog.signals.clear()
        assert signalled or str(ended.value.code).startswith("error: a DataLoader worker died (")
    for context in ("fork", "forkserver"):  # a forkserver's worker is the server's child (Python 3.14's default)
        batches = iter(torch.utils.data.DataLoader(range(10), num_workers=1, worker_init_fn=stops.ignore_interrupts,
                                                   multiprocessing_context=context))
        next(batches)
        batches._workers[0].terminate()  # its parent's SIGTERM: it ends, as the DataLoader (or Python's exit) asks
        batches._workers[0].join(10)
        assert batches._workers[0].exitcode == 0, context


class Stalled(torch.utils.data.Dataset):
    def __len__(self):
        return 10

    def __getitem__(self, i):
        time.sleep(60)  # a source that stopped sending
        return i


def test_a_stop_signal_while_the_data_does_not_come_stops_within_stop_wait(monkeypatch):
    """A stalled worker never hands its batch over: once a stop signal came, next_batch gives up after STOP_WAIT s
    (Stopped: train.py saves the steps done), where it would otherwise wait as long as the source stalls."""
    monkeypatch.setattr(stops, "STOP_WAIT", 1)
    batches = iter(torch.utils.data.DataLoader(Stalled(), num_workers=1, timeout=stops.TICK,
                                               worker_init_fn=stops.ignore_interrupts))
    runlog.signals[:] = [signal.SIGTERM]
    start = time.monotonic()
    try:
        with pytest.raises(stops.Stopped, match="the data did not come"):
            stops.next_batch(batches)
    finally:
        runlog.signals.clear()
    assert time.monotonic() - start < 20
    del batches  # the DataLoader ends its worker: its parent's SIGTERM


class SignalledFile(io.FileIO):
    """A file whose third write sends this process SIGTERM: a second stop signal during a save."""

    writes = 0

    def write(self, b):
        SignalledFile.writes += 1
        if SignalledFile.writes == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().write(b)


def test_a_second_signal_during_a_save_abandons_it_in_one_line(tmp_path, monkeypatch):
    method = torch.nn.Module()
    method.model = torch.nn.Linear(300, 300)
    optimizer = torch.optim.SGD(method.parameters(), lr=0.1)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    runlog.stop_on_signals()
    runlog.signals[:] = [signal.SIGTERM]  # the first one: the run is saving the step reached
    monkeypatch.setattr(checkpoint, "open", SignalledFile, raising=False)
    try:
        with pytest.raises(SystemExit) as stopped:
            checkpoint.write(str(tmp_path / "ckpt.pt.tmp"), method, optimizer, 1, {})
    finally:
        runlog.signals.clear()
        for s, handler in handlers.items():
            signal.signal(s, handler)
    assert stopped.value.code == "stopped by SIGTERM, without saving" and not os.listdir(tmp_path)


class FullDisk:
    """open() of a file whose writes fail as on a full disk: what opening it for writing truncated is lost"""

    def __init__(self, path, mode="r", **kwargs):
        self.f = open(path, mode, **kwargs)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def writelines(self, lines):
        raise OSError(errno.EFBIG, "File too large")


def test_a_damaged_run_folder_resumes_or_stops_in_one_line_and_its_log_is_kept(tmp_path, monkeypatch, capsys):
    """log.jsonl's lines that are not ours (NUL bytes, {}, a list, a string or null step, an empty line, bytes that
    are not UTF-8) are dropped, counted, when a run resumes; OUT's files replaced by a folder or a named pipe stop it in
    one line naming the file (a pipe would block its open); a resume refused after it began (--report-to nope), or a
    full disk while the log is cut back to the checkpoint, leaves log.jsonl as it was."""
    import shutil

    first = tmp_path / "first"
    train.main([*QUIET, "--steps", "2", "--out-dir", str(first)])
    with open(first / "log.jsonl", "ab") as f:  # what a killed run leaves past its checkpoint, and damage
        f.write(b'{"step": 3, "loss": 1.0}\n{}\n[1, 2]\n{"step": "1"}\n\n\xff\xfe\n{"step": null}\n"step"\n'
                + b"\0" * 40 + b"\n")
    logged = (first / "log.jsonl").read_bytes()

    def damaged(name, damage=None):
        out = tmp_path / name
        shutil.copytree(first, out)
        if damage:
            os.remove(out / damage[0]) if os.path.isfile(out / damage[0]) else None
            damage[1](str(out / damage[0]))
        return out

    out = damaged("refused")
    assert "--report-to nope" in main_error(*QUIET, "--steps", "3", "--out-dir", out, "--resume", "--report-to", "nope")
    assert (out / "log.jsonl").read_bytes() == logged
    out = damaged("full")
    monkeypatch.setattr(runlog, "open", lambda path, mode="r", **kw: FullDisk(path, mode, **kw) if "log.jsonl" in
                        path and "w" in mode else open(path, mode, **kw), raising=False)
    message = main_error(*QUIET, "--steps", "3", "--out-dir", out, "--resume")
    assert message == f"error: could not write {out / 'log.jsonl'} (cut back to step 2), through " \
                      f"{out / 'log.jsonl'}.tmp: file too large; it is as it was"
    assert (out / "log.jsonl").read_bytes() == logged and not (out / "log.jsonl.tmp").exists()
    monkeypatch.undo()

    out = damaged("resumed")
    (out / "log.jsonl").write_bytes(b"\xef\xbb\xbf" + logged)  # and a byte-order mark (an editor's): no damage
    train.main([*QUIET, "--steps", "3", "--out-dir", str(out), "--resume"])
    assert f"{out / 'log.jsonl'}: dropped 8 damaged line(s)" in capsys.readouterr().out
    assert [e["step"] for e in read_log(out)] == [1, 2, 3]
    out = damaged("tmp", ("config.json.tmp", os.mkdir))  # what the rewrite of config.json writes first
    assert "through " in main_error(*QUIET, "--steps", "3", "--out-dir", out, "--resume")
    assert (out / "config.json.tmp").is_dir() and (out / "log.jsonl").read_bytes() == logged
    out = damaged("tb", ("tensorboard", lambda path: open(path, "w").close()))  # --report-to's folder a file
    assert main_error(*QUIET, "--steps", "3", "--out-dir", out, "--resume", "--report-to", "tensorboard") == \
        f"error: --report-to tensorboard: cannot write {out / 'tensorboard'}: file exists"
    out = damaged("fifo", ("ckpt.pt", os.mkfifo))  # read (for its config) before OUT is claimed: must not block
    assert main_error(*QUIET, "--out-dir", out, "--resume") == f"error: no checkpoint at {out / 'ckpt.pt'}: it is a " \
                                                               f"named pipe"
    for name, make, what in [("log.jsonl", os.mkdir, "a folder"), ("log.jsonl", os.mkfifo, "a named pipe"),
                             ("config.json", os.mkdir, "a folder"), ("ckpt.pt.tmp", os.mkdir, "a folder"),
                             (".lock", os.mkdir, "a folder")]:
        out = damaged(f"{name}-{what}", (name, make))
        message = main_error(*QUIET, "--steps", "3", "--out-dir", out, "--resume")
        assert message.startswith(f"error: {out / name} is {what}, where the run keeps a file"), message
