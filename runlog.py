"""
What a training run tells: OUT/log.jsonl (one JSON line per step, and one per evaluation) and the console lines with
their ETA; and when it cannot go on, one line (fail).

A step's logs stay on the device and are synced over the ranks once per --log-every steps (and whenever a checkpoint
needs its losses checked), so that the loop never waits for the device in between. At each sync the run stops, with
one line, on a loss that is not finite, or when more than half of the image reads so far have failed (data.py: the
policy for unreadable samples).
"""

import json
import math
import os
import signal
import sys
import time

import torch

import distributed


signals = []  # the stopping signals this process received (stop_on_signals)


def stop_on_signals():
    """SIGTERM (how clusters preempt a job, and torchrun's way to stop its ranks) and SIGINT (Ctrl-C) stop a training
    run at the end of its step, saved there (RunLog.stopping); the same signal again stops it at once."""
    def handler(signum, frame):
        if signum in signals:
            sys.exit(f"stopped by {signal.Signals(signum).name}, without saving")
        signals.append(signum)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, handler)


def fail(message):
    sys.exit("error: " + " ".join(str(message).split()))  # one line, whatever the message


def duration(seconds):
    s = round(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def keep_log(path, step):
    """Keep the log's lines of steps up to `step`: a resumed run logs the steps after its checkpoint again, a fresh
    run (step 0) starts a new log."""
    if not os.path.exists(path):
        return
    with open(path) as f:  # a run killed while writing leaves a last line without its newline
        lines = [line for line in f if line.endswith("\n") and json.loads(line)["step"] <= step]
    with open(path, "w") as f:
        f.writelines(lines)


class RunLog:
    """log.add(step, ...) after every optimiser step; log.synced is the last step whose losses are known finite.
    stop(reason) is called, on every rank, when a loss is not finite (train.py: Checkpoints.stop)."""

    def __init__(self, out_dir, start_step, steps, batch_size, log_every, stop):
        self.master = distributed.rank_and_world()[0] == 0
        self.start_step, self.steps, self.batch_size, self.log_every, self.stop = \
            start_step, steps, batch_size, log_every, stop
        self.path = os.path.join(out_dir, "log.jsonl")
        if self.master:
            keep_log(self.path, start_step)
        self.stopping = None  # the signal that stops the run (stop_on_signals), once every rank knows of it
        self.pending = []  # (step, lr, logs names, values on the device) of the steps not synced yet
        self.unreadable = {}  # {path: reason} of every rank's unreadable samples, each file once
        self.synced = start_step
        self.t_last = self.t_first = time.perf_counter()

    def add(self, step, lr, loss, logs, stream, sync=False):
        """Step `step` trained at `lr` with this loss and these logs (the method's components, 0-d tensors). Synced
        at the first step, every --log-every steps, at the last, and when `sync` asks."""
        self.pending.append((step, lr, list(logs), torch.stack([loss.float()] + [v.float() for v in logs.values()])))
        alone = distributed.rank_and_world()[1] == 1  # then a signal needs no other rank's word: sync at once
        if not (step == self.start_step + 1 or step % self.log_every == 0 or step == self.steps or sync
                or (alone and signals)):
            return
        values = distributed.average(torch.stack([v for *_, v in self.pending])).tolist()  # (steps, 1 + components)
        # on every rank, so that all of them stop together: what each could not read, and the signals each received
        ranks = distributed.gather_objects((*stream.take_unreadable(), signals[:1]))
        self.stopping = next((s[0] for *_, s in ranks if s), None)
        first_unreadable = not self.unreadable
        for unreadable, _, _, _ in ranks:  # a file met twice, or by two ranks, counts once
            for path, reason in unreadable.items():
                self.unreadable.setdefault(path, reason)
        dt, self.t_last = time.perf_counter() - self.t_last, time.perf_counter()
        samples_per_s = len(values) * self.batch_size / dt
        self.write([dict(step=s, loss=row[0], **dict(zip(names, row[1:])), lr=s_lr, samples_per_s=samples_per_s,
                         skipped=len(self.unreadable)) for (s, s_lr, names, _), row in zip(self.pending, values)])
        names, self.pending = self.pending[-1][2], []
        path, reason = next(iter(self.unreadable.items()), (None, None))  # the first unreadable file
        if path and first_unreadable:
            self.print(f"warning: cannot read {path} ({reason}); unreadable images are replaced by others from the "
                       f"data and counted in the log as skipped")
        reads, failed = sum(r for _, r, _, _ in ranks), sum(f for _, _, f, _ in ranks)  # since the run started
        if failed > reads / 2:
            fail(f"{failed} of {reads} image reads failed, the first {path} ({reason}); are the paths right (relative "
                 f"to the csv's folder, or --data-dir)?")
        for i, row in enumerate(values):
            if not all(math.isfinite(v) for v in row):
                self.stop(f"the loss is not finite at step {step - len(values) + i + 1}")
        self.synced = step
        if step == self.start_step + 1:  # later ETAs leave this step out: it also started the DataLoader workers
            self.t_first, eta = time.perf_counter(), (self.steps - step) * dt
        else:
            eta = (self.steps - step) * (time.perf_counter() - self.t_first) / (step - self.start_step - 1)
        parts = " ".join(f"{k} {v:.4g}" for k, v in zip(names, values[-1][1:]))
        self.print(f"step {step}/{self.steps} | loss {values[-1][0]:.4f} | {parts} | lr {lr:.3g} | "
                   f"{samples_per_s:.1f} samples/s | {1000 * dt / len(values):.0f} ms/step | eta {duration(eta)}"
                   + (f" | skipped {len(self.unreadable)} unreadable images" if self.unreadable else ""))

    def results(self, step, results):
        """An evaluation's results (eval_zeroshot.evaluate), one line per task: {"step", "task", "dataset", ...}."""
        self.write([dict(step=step, **r) for r in results])

    def write(self, entries):  # the file is opened for each write, so that no exit can leave it open or unflushed
        if self.master:
            try:
                with open(self.path, "a") as f:
                    f.writelines(json.dumps(entry) + "\n" for entry in entries)
            except OSError as e:
                reason = (e.strerror or str(e)).lower()
                self.stop(f"could not write {self.path}: {reason}", then="Free some space, then")

    def end(self, step, path):
        """The run stopped on a signal at `step`, saved to `path`: exit as killed by it (128 + its number)."""
        name = signal.Signals(self.stopping).name
        self.print(f"stopped by {name} at step {step}; {path} holds it: continue with --resume")
        sys.exit(128 + self.stopping)

    def restart_clock(self):  # after a save or an evaluation: samples/s measures training
        self.t_last = time.perf_counter()

    def print(self, line):
        if self.master:
            print(line, flush=True)
