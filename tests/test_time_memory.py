"""Where a run's time and memory go: every step row's data_wait (the share of the time spent waiting for batches) and
max_memory_mb (the window's peak), the one warning about a slow input. Each on real train.py runs."""

import os
import re
import time

import numpy as np
import pytest
import torch
from PIL import Image

import eval_zeroshot
from test_train import read_log, run, weights

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
