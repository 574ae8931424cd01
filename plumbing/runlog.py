"""
What a training run tells: OUT/log.jsonl (one JSON line per step, and one per evaluation) and the console lines with
their ETA (docs/training.md, Logs); and when it cannot go on, one line (fail).

A step's logs stay on the device and are synced over the ranks once per --log-every steps (and whenever a checkpoint
needs its losses checked), so that the loop never waits for the device in between. Each sync checks the losses and the
failed image reads, and carries rank 0's word on --save-every-minutes, so that every rank saves at the same step.
"""

import atexit
import json
import math
import os
import signal
import sys
import time

import torch

from plumbing import distributed, memory

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


TRACKERS = ("tensorboard", "wandb")  # --report-to: optional sinks besides log.jsonl
WAIT = 0.1  # a window whose data_wait is above this prints the run's one warning about its input


def rewrite(path, write, what=""):
    """write(f) to path.tmp, then renamed over path: a failed write (a full disk) leaves the file as it was."""
    try:
        with open(path + ".tmp", "w") as f:
            write(f)
        os.replace(path + ".tmp", path)
    except OSError as e:
        if os.path.isfile(path + ".tmp"):
            os.remove(path + ".tmp")
        fail(f"could not write {path}{what}, through {path}.tmp: {(e.strerror or str(e)).lower()}; it is as it was")


def keep_log(path, step):
    """Keep the log's lines of steps up to `step`: a resumed run logs the steps after its checkpoint again."""
    if not os.path.lexists(path):
        return
    if not os.path.isfile(path):  # a folder, or a FIFO, whose open would wait for a writer
        fail(f"{path} is not a file; move it away to resume")
    kept, damaged = [], 0
    with open(path, encoding="utf-8-sig", errors="replace") as f:  # (an editor's byte-order mark is no damage)
        for line in f:  # a run killed while writing leaves a last line cut short, or NUL bytes where its blocks were
            try:
                entry = json.loads(line) if line.endswith("\n") else None
                if entry["step"] <= step:
                    kept.append(line)
            except (ValueError, TypeError, KeyError):  # not a line of ours: damage, dropped
                damaged += 1
    rewrite(path, lambda f: f.writelines(kept), f" (cut back to step {step})")
    if damaged:
        print(f"{path}: dropped {damaged} damaged line(s)", flush=True)


class RunLog:
    """log.add(step, ...) after every optimiser step; log.synced is the last step whose losses are known finite.
    stop(reason) is called, on every rank, when a loss is not finite (train.py: Checkpoints.stop); late() says whether
    this rank's clock calls for a save (Checkpoints.late): rank 0's, at a sync, sets log.clock_save on every rank."""

    def __init__(self, out_dir, start_step, steps, batch_size, log_every, stop, late=lambda: False):
        self.master = distributed.rank_and_world()[0] == 0
        self.start_step, self.steps, self.batch_size, self.log_every = start_step, steps, batch_size, log_every
        self.stop, self.late, self.clock_save = stop, late, False
        self.path = os.path.join(out_dir, "log.jsonl")
        self.cut = not self.master  # the log is cut back (keep_log) at its first write: a run refused before keeps it
        self.stopping = None  # the signal that stops the run (stop_on_signals), once every rank knows of it
        self.pending = []  # (step, lr, logs names, values on the device) of the steps not synced yet
        self.unreadable = {}  # {path: reason} of every rank's unreadable samples, each file once
        self.synced = start_step
        self.t_last = self.t_first = self.t_added = time.perf_counter()
        self.paused = self.waited = 0.0  # the window's pauses (restart_clock); the stream's wait at the last sync
        self.warned = False  # the data_wait warning: once a run
        self.sinks = []  # --report-to's trackers (report_to): each gets every entry that log.jsonl gets

    def report_to(self, trackers, meta):
        """Write OUT/config.json (meta: the run's config, scripts/plot.py's curve labels) and open --report-to's
        trackers (comma-separated names of TRACKERS), rank 0 only; a resumed run continues its own (docs/see.md)."""
        names = [name.strip() for name in trackers.split(",") if name.strip()]
        for name in names:
            if name not in TRACKERS:
                fail(f"--report-to {name}: choose from {', '.join(TRACKERS)} (comma-separated)")
        if not self.master:
            return
        out_dir = os.path.dirname(self.path)
        rewrite(os.path.join(out_dir, "config.json"), lambda f: json.dump(meta, f, indent=1, default=str))
        for name in names:
            try:
                self.sinks.append((tensorboard if name == "tensorboard" else wandb)(out_dir, self.start_step, meta))
            except ImportError:
                fail(f"--report-to {name} needs the {name} package: pip install {name}")
            except OSError as e:  # OUT/tensorboard a file, OUT/wandb_id a folder, ...
                fail(f"--report-to {name}: cannot write {e.filename}: {(e.strerror or str(e)).lower()}")

    def add(self, step, lr, loss, logs, stream, sync=False):
        """Step `step` trained at `lr` with this loss and these logs (the method's components, 0-d tensors). Synced
        at the first step, every --log-every steps, at the last, and when `sync` asks."""
        self.pending.append((step, lr, list(logs), torch.stack([loss.float()] + [v.float() for v in logs.values()])))
        alone = distributed.rank_and_world()[1] == 1  # then a signal or the clock needs no other rank's word
        late, self.clock_save = self.late(), False
        if not (step == self.start_step + 1 or step % self.log_every == 0 or step == self.steps or sync
                or (alone and (signals or late))):
            self.t_added = time.perf_counter()
            return
        values = distributed.average(torch.stack([v for *_, v in self.pending])).tolist()  # (steps, 1 + components)
        # on every rank, so that all of them stop and save together: what each could not read, the seconds each waited
        # for data and its peak memory in this window, its clock (rank 0's decides), and the signals each received
        wait, self.waited = stream.waited - self.waited, stream.waited
        ranks = distributed.gather_objects((*stream.take_unreadable(), wait, memory.window_peak(stream.device), late,
                                            signals[:1]))
        self.stopping = next((s[0] for *_, s in ranks if s), None)
        self.clock_save = bool(ranks[0][-2])
        first_unreadable = not self.unreadable
        for unreadable, *_ in ranks:  # a file met twice, or by two ranks, counts once
            for path, reason in unreadable.items():
                self.unreadable.setdefault(path, reason)
        now = time.perf_counter()
        dt, self.t_last, self.paused = now - self.t_last - self.paused, now, 0.0  # training time: no save, no eval
        samples_per_s = len(values) * self.batch_size / dt
        # the worst rank's: the slowest feeder holds every rank back, the fullest memory runs out first
        data_wait = round(min(1.0, max(r[3] for r in ranks) / dt), 4)
        peak = round(max(r[4] for r in ranks), 1)
        self.write([dict(step=s, loss=row[0], **dict(zip(names, row[1:])), lr=s_lr, samples_per_s=samples_per_s,
                         data_wait=data_wait, max_memory_mb=peak, skipped=len(self.unreadable))
                    for (s, s_lr, names, _), row in zip(self.pending, values)])
        names, self.pending = self.pending[-1][2], []
        path, reason = next(iter(self.unreadable.items()), (None, None))  # the first unreadable file
        if path and first_unreadable:
            self.print(f"warning: cannot read {path} ({reason}); unreadable images are replaced by others from the "
                       f"data and counted in the log as skipped")
        reads, failed = sum(r[1] for r in ranks), sum(r[2] for r in ranks)  # since the run started
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
                   f"{samples_per_s:.1f} samples/s | {1000 * dt / len(values):.0f} ms/step | data wait "
                   f"{100 * data_wait:.0f}% | peak {peak:.0f} MiB | eta {duration(eta)}"
                   + (f" | skipped {len(self.unreadable)} unreadable images" if self.unreadable else ""))
        if data_wait > WAIT and step > self.start_step + 1 and not self.warned:  # the first step also starts workers
            self.warned = True
            steps = f"steps {step - len(values) + 1}-{step}" if len(values) > 1 else f"step {step}"
            self.print(f"warning: the loop waited for its next batch {100 * data_wait:.0f}% of the time in {steps} "
                       f"(data_wait in log.jsonl); to feed it faster try, in order: more --workers, --gpu-decode "
                       f"(JPEGs decoded on the GPU), tar shards (docs/data.md), the data on a faster disk")
        self.t_added = time.perf_counter()

    def results(self, step, results):
        """An evaluation's results (eval_zeroshot.evaluate), one line per task: {"step", "task", "dataset", ...}."""
        self.write([dict(step=step, **r) for r in results])

    def write(self, entries):  # the file is opened for each write, so that no exit can leave it open or unflushed
        if not self.cut:
            keep_log(self.path, self.start_step)
            self.cut = True
        if self.master:
            try:
                with open(self.path, "a") as f:
                    f.writelines(json.dumps(entry) + "\n" for entry in entries)
            except OSError as e:
                reason = (e.strerror or str(e)).lower()
                self.stop(f"could not write {self.path}: {reason}", then="Free some space, then")
            for sink in self.sinks:
                sink(entries)

    def flush(self, stream):
        """Sync the steps not synced yet (a stop between two steps: train.py saves the last of them)."""
        if self.pending:
            step, lr, names, values = self.pending.pop()
            self.add(step, lr, values[0], dict(zip(names, values[1:])), stream, sync=True)

    def end(self, step, path, last=False):
        """The run stopped on a signal at `step` (the run's last, during the final evaluation), saved to `path` (None:
        no checkpoint written): exit as killed by it (128 + its number)."""
        self.stopping = self.stopping or signals[0]
        name = signal.Signals(self.stopping).name
        self.print(f"stopped by {name} during the final evaluation; {path} holds step {step}, the last" if last else
                   f"stopped by {name} at step {step}; {path} holds it: continue with --resume" if path else
                   f"stopped by {name} before step {step + 1}; no checkpoint was written")
        sys.exit(128 + self.stopping)

    def restart_clock(self):  # after a save or an evaluation: samples/s and data_wait measure training alone
        now = time.perf_counter()
        self.paused, self.t_added = self.paused + now - self.t_added, now

    def print(self, line):
        if self.master:
            print(line, flush=True)


def scalars(entry):
    """A log.jsonl entry -> {name: number}: a step's as train/loss, ..., an evaluation's as synthetic/shape/top1, ..."""
    prefix = f"{entry['dataset']}/" if "task" in entry else "train/"
    return {prefix + k: v for k, v in entry.items() if k != "step" and isinstance(v, (int, float))}


def tensorboard(out_dir, start_step, meta):
    """-> a sink writing OUT/tensorboard's event files; the config as text at step 0."""
    from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

    writer = SummaryWriter(os.path.join(out_dir, "tensorboard"), purge_step=start_step + 1 if start_step else None)
    if not start_step:
        writer.add_text("config", "```\n" + json.dumps(meta, indent=1, default=str) + "\n```", 0)
    atexit.register(writer.close)

    def sink(entries):
        for entry in entries:
            for name, value in scalars(entry).items():
                writer.add_scalar(name, value, entry["step"])
        writer.flush()  # once per --log-every: a run that is killed keeps what it logged
    return sink


def wandb(out_dir, start_step, meta):
    """-> a sink logging to a wandb run (project $WANDB_PROJECT, else clip; files under $WANDB_DIR, else OUT), its id
    kept in OUT/wandb_id for --resume."""
    import wandb as wb

    id_path = os.path.join(out_dir, "wandb_id")
    run_id = open(id_path).read().strip() if start_step and os.path.exists(id_path) else os.urandom(6).hex()
    with open(id_path, "w") as f:
        f.write(run_id + "\n")
    try:
        run = wb.init(project=os.environ.get("WANDB_PROJECT", "clip"), id=run_id, resume="allow", config=meta,
                      name=os.path.basename(os.path.abspath(out_dir)), dir=os.environ.get("WANDB_DIR", out_dir))
    except wb.errors.Error as e:  # not logged in, no network, ...
        fail(f"--report-to wandb: {e} (wandb login, or WANDB_MODE=offline to log locally)")
    atexit.register(run.finish)

    def sink(entries):
        for entry in entries:
            run.log(scalars(entry), step=entry["step"])
    return sink
