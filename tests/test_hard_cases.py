"""The hard cases a real run meets (issue 24): odd but valid input works (animated GIFs, a CSV with a byte-order
mark), hostile or wrong input stops with one line (a decompression bomb, a CSV that is not UTF-8, an --out-dir that
cannot be written, a second run in the same --out-dir, a fresh run over an old one, a resume with another batch size
or seed), a disk that fills during a save leaves the last checkpoint and no partial file, and a signal (SIGTERM, how
clusters preempt; Ctrl-C) stops a run at the step it reached, saved, so that --resume continues it exactly."""

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
from plumbing import checkpoint, samples
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


@pytest.mark.parametrize("flag,value", [("--batch-size", "4"), ("--seed", "1")])
def test_resuming_with_another_batch_size_or_seed_is_refused(tmp_path, flag, value):
    out = tmp_path / "out"
    run("train.py", *QUIET, "--steps", "1", "--out-dir", out, cwd=tmp_path)
    message = main_error(*QUIET, "--steps", "2", "--out-dir", out, "--resume", flag, value)  # the last flag wins
    assert f"was trained with {flag} " in message and "pass the checkpoint's to resume it" in message


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


def train_until(argv, cwd, steps, send, group=False, launcher=()):
    """train.py in a subprocess, sent signal `send` once its log holds `steps` steps -> (completed process, the
    step its log reached when the signal was sent)."""
    out = argv[argv.index("--out-dir") + 1]
    p = subprocess.Popen([sys.executable, *launcher, os.path.join(ROOT, "train.py"), *map(str, argv)], cwd=cwd,
                         env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=group)
    log = os.path.join(out, "log.jsonl")
    deadline = time.time() + 300
    while not (os.path.exists(log) and len(read_log(out)) >= steps) and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert p.poll() is None, p.communicate()
    if group:  # Ctrl-C in a terminal: SIGINT to the whole foreground group, DataLoader workers included
        os.killpg(p.pid, send)
    else:
        p.send_signal(send)
    stdout, stderr = p.communicate(timeout=300)
    return subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)


@pytest.mark.parametrize("send,workers", [(signal.SIGTERM, "0"), (signal.SIGINT, "1")])
def test_a_signal_saves_at_the_step_reached_and_resume_is_exact(tmp_path, send, workers):
    args = [*QUIET, "--workers", workers, "--patch-dropout", "0.5", "--steps", "24", "--save-every", "100"]
    stopped = train_until([*args, "--out-dir", tmp_path / "out"], tmp_path, 3, send, group=send == signal.SIGINT)
    assert stopped.returncode == 128 + send and "Traceback" not in stopped.stderr, stopped.stderr
    step = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)["step"]
    assert f"stopped by {signal.Signals(send).name} at step {step}; {tmp_path / 'out' / 'ckpt.pt'} holds it: " \
           f"continue with --resume" in stopped.stdout
    assert 3 <= step < 24 and not (tmp_path / "out" / "ckpt.pt.tmp").exists()

    run("train.py", *args, "--out-dir", tmp_path / "out", "--resume", cwd=tmp_path)
    run("train.py", *args, "--out-dir", tmp_path / "whole", cwd=tmp_path)
    resumed, whole = weights(tmp_path / "out"), weights(tmp_path / "whole")
    assert all(torch.equal(resumed[k], whole[k]) for k in whole)
    assert [e["loss"] for e in read_log(tmp_path / "out")] == [e["loss"] for e in read_log(tmp_path / "whole")]


def test_torchrun_stopped_by_sigterm_saves_on_every_rank_at_one_step(tmp_path):
    """A preempted torchrun job: torchrun passes SIGTERM to its ranks, which agree on the step at their next log sync,
    save it, and stop without a traceback."""
    args = [*QUIET, "--steps", "400", "--save-every", "1000", "--out-dir", tmp_path / "out"]
    launcher = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    stopped = train_until(args, tmp_path, 3, signal.SIGTERM, launcher=launcher)
    step = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)["step"]
    assert f"stopped by SIGTERM at step {step}; " in stopped.stdout, stopped.stdout + stopped.stderr
    assert 3 <= step < 400 and "Traceback" not in stopped.stdout
    run("train.py", *args[:-2], "--steps", step + 1, "--out-dir", tmp_path / "out", "--resume", cwd=tmp_path,
        launcher=launcher)
    assert [e["step"] for e in read_log(tmp_path / "out")] == list(range(1, step + 2))
