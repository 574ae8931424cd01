"""Where a run's time and memory go: every step row's data_wait (the share of the time spent waiting for batches) and
max_memory_mb (the window's peak), the one warning about a slow input; evaluation on several datasets while training;
saving by the clock (--save-every-minutes), agreed by every rank and resumed exactly. Each on real train.py runs."""

import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

import eval_zeroshot
from ranks import run_distributed
from test_train import ROOT, main_error, read_log, run, weights

TINY = ["--model", "tiny-vit", "--batch-size", "8", "--workers", "0", "--eval-size", "0"]
WARNING = "warning: the loop waited for its next batch"
CONSOLE = re.compile(r"^step (\d+)/\d+ \| .* \| data wait (\d+)% \| peak (\d+) MiB \| eta ")


def console_steps(stdout):
    """-> {step: (data wait in %, peak MiB)} of the console's step lines."""
    return {int(m[1]): (int(m[2]), int(m[3])) for m in map(CONSOLE.match, stdout.splitlines()) if m}


def test_a_slow_source_shows_in_the_log_and_warns_once(tmp_path):
    # 2000×2000 PNGs of noise, decoded in the training process (--workers 0): most of each step is the decoding
    rng = np.random.default_rng(0)
    for i in range(3):
        noise = rng.integers(0, 256, (2000, 2000, 3), dtype=np.uint8)
        Image.fromarray(noise).save(tmp_path / f"{i}.png", compress_level=0)
    (tmp_path / "big.csv").write_text("filepath,title\n" + "".join(f"{i % 3}.png,noise {i}\n" for i in range(16)))
    p = run("train.py", "--data", tmp_path / "big.csv", *TINY, "--steps", "3", "--log-every", "1", "--out-dir",
            tmp_path / "out", cwd=tmp_path)
    rows = read_log(tmp_path / "out")
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["data_wait"] > 0.5 for r in rows), \
        [r["data_wait"] for r in rows]
    assert {step: wait for step, (wait, _) in console_steps(p.stdout).items()} == \
        {r["step"]: round(100 * r["data_wait"]) for r in rows}
    # once, after the first window (which also starts the workers), naming what to try in order
    assert p.stdout.count(WARNING) == 1, p.stdout
    warning, = [line for line in p.stdout.splitlines() if WARNING in line]
    assert f"{round(100 * rows[1]['data_wait'])}% of the time in step 2 " in warning
    where = [warning.index(word) for word in ("--workers", "--gpu-decode", "shards", "disk")]
    assert where == sorted(where), warning


def test_the_quick_start_feed_waits_little_and_its_memory_is_plausible(tmp_path):
    # the quick start (its data, model, batch and DataLoader workers: the cores less one), shortened
    p = run("train.py", "--steps", "3", "--log-every", "2", "--eval-size", "0", "--out-dir",
            tmp_path / "out", cwd=tmp_path)
    rows = read_log(tmp_path / "out")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(isinstance(r["data_wait"], float) and 0 <= r["data_wait"] < 0.1 for r in rows), \
        [r["data_wait"] for r in rows]
    assert WARNING not in p.stdout
    model = sum(t.numel() * t.element_size() for t in weights(tmp_path / "out").values()) / 2 ** 20  # 47 MiB
    machine = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 20
    assert all(model < r["max_memory_mb"] < machine for r in rows), (model, machine, rows)
    assert {step: peak for step, (_, peak) in console_steps(p.stdout).items()} == \
        {r["step"]: round(r["max_memory_mb"]) for r in rows }


def test_the_peak_is_the_window_s(tmp_path, monkeypatch):
    """A window that allocates 1 GiB more shows it; the next window, reset, does not."""
    import train
    from plumbing import memory

    real, peaks = memory.window_peak, []

    def window_peak(device):  # the first window holds a GiB for a moment
        if not peaks:
            block = torch.ones(2 ** 28)  # 1 GiB, resident (written)
            del block
        peaks.append(real(device))
        return peaks[-1]

    monkeypatch.setattr(memory, "window_peak", window_peak)
    train.main([*TINY, "--steps", "3", "--log-every", "1", "--out-dir", str(tmp_path)])
    rows = read_log(tmp_path)
    assert [r["max_memory_mb"] for r in rows] == pytest.approx(peaks, abs=0.1)
    assert rows[0]["max_memory_mb"] > rows[1]["max_memory_mb"] + 900


def test_without_proc_the_peak_is_getrusage_s(monkeypatch):
    import resource

    from plumbing import memory

    def no_proc(field):
        raise FileNotFoundError("/proc/self/status")

    monkeypatch.setattr(memory, "process_memory", no_proc)
    peak = memory.window_peak("cpu")  # ru_maxrss: never reset there, the peak since the process started
    assert 0 < peak == pytest.approx(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, abs=10)


def test_an_evaluation_inside_a_window_is_not_training_time(tmp_path, monkeypatch):
    """Each batch takes 0.5 s to arrive, and the evaluation at step 5 3 s: the window that holds it (steps 4-6) waits
    for data the same share of its training time as the window before (steps 2-3), and trains as many samples/s."""
    import data
    import train

    real_to_device = data.to_device
    monkeypatch.setattr(data, "to_device", lambda *args: time.sleep(0.5) or real_to_device(*args))
    monkeypatch.setattr(eval_zeroshot, "report", lambda *args: time.sleep(3 if args[5] < 7 else 0))
    train.main([*TINY, "--eval-size", "8", "--steps", "7", "--log-every", "3", "--eval-every", "5", "--out-dir",
                str(tmp_path)])
    rows = read_log(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, 8))
    before, held = rows[2], rows[5]  # without the 3 s left out: about half of before's
    assert held["data_wait"] > 0.75 * before["data_wait"], [r["data_wait"] for r in rows]
    assert held["samples_per_s"] > 0.75 * before["samples_per_s"], [r["samples_per_s"] for r in rows]


@pytest.mark.cuda
def test_on_cuda_the_peak_is_max_memory_allocated_per_window(tmp_path):
    import train

    train.main([*TINY, "--steps", "3", "--log-every", "1", "--device", "cuda", "--out-dir", str(tmp_path)])
    rows = read_log(tmp_path)
    model = sum(t.numel() * t.element_size() for t in weights(tmp_path).values()) / 2 ** 20
    total = torch.cuda.get_device_properties(0).total_memory / 2 ** 20
    assert all(model < r["max_memory_mb"] < total and 0 <= r["data_wait"] <= 1 for r in rows), rows


# --- several evaluation datasets --------------------------------------------------------------------------------------


def test_two_evaluation_datasets_are_logged_at_each_evaluation(tmp_path):
    from scripts import plot

    out = tmp_path / "out"
    p = run("train.py", *TINY, "--eval-size", "24", "--steps", "10", "--log-every", "5", "--eval-dataset",
            "synthetic,synthetic-retrieval", "--eval-every", "5", "--out-dir", out, cwd=tmp_path)
    tasks = ["synthetic/shape", "synthetic/colour", "synthetic/size", "synthetic/count", "synthetic-retrieval"]
    evaluations = [e for e in read_log(out) if "task" in e]
    assert [(e["step"], e["dataset"]) for e in evaluations] == [(s, t) for s in (5, 10) for t in tasks]
    assert p.stdout.count("retrieval synthetic-retrieval: 24 images") == p.stdout.count("zero-shot shape:") == 2
    # plot.py: each dataset's panels, at the steps and values of the log
    panels = plot.curves([plot.read_run(str(out))])
    for e in evaluations:
        title = f"{e['dataset']} {'R@1' if e['task'] == 'retrieval' else 'top-1'} (%)"
        metric = "image->text R@1" if e["task"] == "retrieval" else "top1"
        xs, ys = panels[title][(0, metric)]
        assert ys[xs.index(e["step"])] == pytest.approx(100 * e[metric])


def test_a_dataset_that_fails_at_a_later_evaluation_is_left_out_and_training_goes_on(tmp_path, monkeypatch, capsys):
    import shutil

    import train

    for name in ("red", "blue"):
        (tmp_path / "val" / name).mkdir(parents=True)
        Image.new("RGB", (16, 16), name).save(tmp_path / "val" / name / "0.png")
    real_evaluate, calls = eval_zeroshot.evaluate, []

    def evaluate(*args, **kwargs):  # the folder's images go away after the first evaluation
        calls.append(real_evaluate(*args, **kwargs))
        if len(calls) == 2:
            shutil.rmtree(tmp_path / "val" / "red")
        return calls[-1]

    monkeypatch.setattr(eval_zeroshot, "evaluate", evaluate)
    train.main([*TINY, "--eval-size", "8", "--steps", "4", "--eval-every", "2", "--eval-dataset",
                "synthetic-retrieval,folder", "--eval-data-dir", f",{tmp_path / 'val'}",
                "--out-dir", str(tmp_path / "o")])
    log = read_log(tmp_path / "o")
    assert [(e["step"], e["dataset"]) for e in log if "task" in e] == \
        [(2, "synthetic-retrieval"), (2, "folder"), (4, "synthetic-retrieval")]
    assert [e["step"] for e in log if "task" not in e] == [1, 2, 3, 4]
    assert f"warning: folder not evaluated at step 4: cannot read {tmp_path / 'val' / 'red' / '0.png'}" in \
        capsys.readouterr().out
    assert torch.load(tmp_path / "o" / "ckpt.pt", weights_only=True)["step"] == 4


def test_a_second_signal_during_an_evaluation_still_stops_the_run(monkeypatch):
    def evaluate(*args, **kwargs):  # what runlog.stop_on_signals's handler raises at the second SIGTERM
        raise SystemExit("stopped by SIGTERM, without saving")

    monkeypatch.setattr(eval_zeroshot, "evaluate", evaluate)
    with pytest.raises(SystemExit, match="stopped by SIGTERM, without saving"):
        eval_zeroshot.report(None, None, [dict(dataset="folder")], "cpu", 0, 3)


@pytest.mark.parametrize("names, folders, pairs", [
    ("imagenet", "/a,b", [("imagenet", "/a,b")]),  # one dataset: its folder as given, commas and all
    ("cifar10,cifar100", "/data", [("cifar10", "/data"), ("cifar100", "/data")]),  # one folder for all
    ("imagenet, synthetic ,coco-5k", "/i,, /c", [("imagenet", "/i"), ("synthetic", None), ("coco-5k", "/c")]),
    ("synthetic,coco", None, [("synthetic", None), ("coco", None)]),
    ("synthetic,x.tsv", "~/d,", [("synthetic", os.path.expanduser("~/d")), ("x.tsv", None)]),
])
def test_eval_data_dir_pairs_with_the_datasets(names, folders, pairs):
    assert eval_zeroshot.eval_pairs(names, folders) == pairs


def test_a_name_or_folder_that_exists_is_one_item(tmp_path):
    (tmp_path / "a,b").mkdir()
    (tmp_path / "x,y.csv").write_text("filepath,title\n")
    assert eval_zeroshot.eval_pairs(str(tmp_path / "x,y.csv"), None) == [(str(tmp_path / "x,y.csv"), None)]
    assert eval_zeroshot.eval_pairs("cifar10,cifar100", str(tmp_path / "a,b")) == \
        [("cifar10", str(tmp_path / "a,b")), ("cifar100", str(tmp_path / "a,b"))]


def test_training_reads_each_dataset_from_its_folder(tmp_path):
    """folder reads the first folder, synthetic-retrieval none (the empty second), spaces around the commas aside."""
    for name in ("red", "blue"):
        (tmp_path / "val" / name).mkdir(parents=True)
        Image.new("RGB", (16, 16), name).save(tmp_path / "val" / name / "0.png")
    args = train_args(["--eval-dataset", "folder,synthetic-retrieval", "--eval-data-dir", f" {tmp_path / 'val'} , ",
                       "--eval-size", "5"])
    folder, retrieval = eval_zeroshot.training_tasks(args, 32)
    assert folder["dataset"] == "folder" and folder["images"].dataset.root == str(tmp_path / "val")
    assert folder["classnames"] == ["blue", "red"]
    assert retrieval["dataset"] == "synthetic-retrieval" and len(retrieval["images"]) == 5


def train_args(extra):
    import train
    return train.get_args([*TINY, *extra])


BAD_EVAL = [
    (["imagenet,,coco-5k"], "an empty name"),
    (["imagenet,"], "an empty name"),
    ([""], "an empty name"),
    (["coco-5k, coco-5k"], "names coco-5k twice"),
    (["synthetic,imagenett"], "--eval-dataset imagenett: unknown dataset; choose from synthetic, cifar10"),
    (["synthetic,coco-5k", "--eval-data-dir", "/a,/b,/c"], "gives 3 folders for 2 datasets"),
    (["synthetic,coco-5k,coco", "--eval-data-dir", "/a,/b"], "gives 2 folders for 3 datasets"),
    # eval_zeroshot's own checks, in train.py's flags: no --data-dir or --download here
    (["synthetic,cifar10", "--eval-data-dir", ",/nonexistent", "--eval-size", "1"],
     "cifar10 not found under /nonexistent"),
    (["synthetic", "--eval-size", "0"], "--eval-dataset synthetic needs 1 or more held-out images (--eval-size, got 0)"),
    (["synthetic-retrieval", "--eval-size", "10001"], "--eval-size must be at most 10000 (got 10001)"),
]


@pytest.mark.parametrize("extra, words", BAD_EVAL, ids=[" ".join(e) for e, _ in BAD_EVAL])
def test_bad_eval_datasets_stop_with_one_line_before_training(tmp_path, extra, words):
    message = main_error(*TINY, "--steps", "2", "--eval-every", "1", "--eval-dataset", *extra, "--out-dir", tmp_path)
    assert words in message and " --data-dir" not in message and "add --download" not in message, message
    assert not (tmp_path / "log.jsonl").exists()


# --- saving by the clock ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("minutes", ["0", "-1", "nan", "inf", "-inf", "-0"])
def test_bad_save_every_minutes_stop_with_one_line(tmp_path, minutes):
    message = main_error(*TINY, "--steps", "2", f"--save-every-minutes={minutes}", "--out-dir", tmp_path)
    assert "--save-every-minutes must be above 0 and finite" in message, message


def test_alone_the_clock_saves_at_the_step_it_strikes_and_restarts(tmp_path, monkeypatch):
    """One rank, --save-every-minutes 1 on a clock that moves 25 s at each reading (one a step, one a save): the
    minute has passed at step 3, between two log syncs, which saves it; the clock restarts at each save, so again at
    6 and 9; and at the last step, 10."""
    import types

    import train
    from plumbing import checkpoint

    clock = iter(range(0, 10 ** 6, 25))
    monkeypatch.setattr(checkpoint, "time", types.SimpleNamespace(monotonic=lambda: next(clock)))
    saved, real_write = [], checkpoint.write
    monkeypatch.setattr(checkpoint, "write", lambda path, *args: saved.append(args[2]) or real_write(path, *args))
    train.main([*TINY, "--steps", "10", "--log-every", "100", "--save-every", "1000", "--save-every-minutes", "1",
                "--out-dir", str(tmp_path)])
    assert saved == [3, 6, 9, 10]
    assert [r["step"] for r in read_log(tmp_path)] == list(range(1, 11))


def two_rank_clocks(rank, world, out_dir):
    """On each of 2 gloo ranks: train.main with clocks that disagree (rank 1's always late, rank 0's at every 3rd
    step) -> the steps this rank saved. A rank left waiting in a collective ends the process after 120 s."""
    import train
    from plumbing import checkpoint

    watchdog = threading.Timer(120, os._exit, (3,))
    watchdog.daemon = True
    watchdog.start()
    saved, real_save, steps = [], checkpoint.Checkpoints.save, []

    def late(self):
        steps.append(len(steps) + 1)  # one call a step
        return rank == 1 or steps[-1] % 3 == 0

    checkpoint.Checkpoints.late = late
    checkpoint.Checkpoints.save = lambda self, step, *a, **k: saved.append(step) or real_save(self, step, *a, **k)
    destroy, torch.distributed.destroy_process_group = torch.distributed.destroy_process_group, lambda: None
    try:
        train.main([*TINY, "--steps", "12", "--log-every", "2", "--save-every", "1000", "--save-every-minutes", "1",
                    "--out-dir", out_dir])
    finally:
        torch.distributed.destroy_process_group = destroy
    return saved


def test_on_two_ranks_rank_0_s_clock_decides_at_a_log_sync(tmp_path):
    # rank 0's clock strikes at steps 3, 6, 9, 12; the log syncs at 1, 2, 4, 6, ...: both ranks save step 6 (and the
    # last), never rank 1's
    assert run_distributed(two_rank_clocks, 2, str(tmp_path)) == [[6, 12], [6, 12]]
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 12


def worst_rank_window(rank, world, out_dir):
    """On each of 2 gloo ranks: a RunLog's first sync after 1 s, in which rank 1 waited 0.6 s for data and rank 0
    not at all, and rank r's peak was 100 (r + 1) MiB -> rank 0's log rows."""
    import types

    from plumbing import memory, runlog

    memory.window_peak = lambda device: 100.0 * (rank + 1)
    torch.distributed.barrier()  # the two windows start together
    log = runlog.RunLog(out_dir, 0, 1, 8, 1, stop=lambda *a, **k: None)
    stream = types.SimpleNamespace(waited=0.0, device=torch.device("cpu"), take_unreadable=lambda: ({}, 1, 0))
    time.sleep(1.0)
    stream.waited = 0.6 * rank
    log.add(1, 1e-3, torch.tensor(1.0), {}, stream)
    return read_log(out_dir) if rank == 0 else None


def test_the_log_shows_the_worst_rank_s_data_wait_and_peak(tmp_path):
    # the slowest feeder holds every rank back, the fullest memory runs out first: a mean or rank 0 would hide them
    row, = run_distributed(worst_rank_window, 2, str(tmp_path))[0]
    assert 0.2 < row["data_wait"] <= 0.6 and row["max_memory_mb"] == 200.0, row  # (rank 0's own: 0)


def logged(out_dir):
    """The whole lines of a log being written (its last may be half-written)."""
    try:
        with open(out_dir / "log.jsonl") as f:
            return sum(line.endswith("\n") for line in f)
    except FileNotFoundError:
        return 0


def test_a_run_killed_after_its_clock_saved_resumes_exactly(tmp_path):
    args = [*TINY, "--steps", "40", "--log-every", "10", "--save-every", "1000", "--save-every-minutes", "0.02"]
    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *args, "--out-dir", str(out)], cwd=tmp_path,
                         env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    deadline = time.time() + 300
    while p.poll() is None and time.time() < deadline and not ((out / "ckpt.pt").exists() and logged(out) >= 30):
        time.sleep(0.02)
    assert p.poll() is None, p.communicate()
    p.kill()  # SIGKILL: nothing runs after it, no save
    p.communicate()
    assert p.returncode == -signal.SIGKILL
    step = torch.load(out / "ckpt.pt", weights_only=True)["step"]
    assert 0 < step < 40, step  # the clock's: --save-every 1000 saves only at the end

    run("train.py", *args, "--out-dir", out, "--resume", cwd=tmp_path)
    run("train.py", *args, "--out-dir", tmp_path / "whole", cwd=tmp_path)
    resumed, whole = weights(out), weights(tmp_path / "whole")
    assert all(torch.equal(resumed[k], whole[k]) for k in whole)
    assert [r["loss"] for r in read_log(out)] == [r["loss"] for r in read_log(tmp_path / "whole")]
