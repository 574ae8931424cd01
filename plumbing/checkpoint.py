"""
train.py's checkpoints: OUT/ckpt.pt saved (its layout: docs/training.md#checkpoints; read by plumbing/weights.py),
resumed, and OUT claimed for one run. ckpt.pt is always one that training can continue from, which finite weights do
not ensure (a weight decay of 1e30 leaves finite weights from which every loss is NaN): a checkpoint is written to
ckpt.pt.tmp, and becomes ckpt.pt once the next step's loss, from exactly its weights, is finite (the run's last one
once its weights and losses are). A .tmp found at start is a killed save or one never vouched for: not a checkpoint.
"""

import fcntl
import os
import signal
import stat
import sys
import time
import warnings

import torch

from plumbing import distributed
from plumbing.runlog import fail, signals
from plumbing.weights import check_ours, check_tensors, method_state, read


def resume_path(args):
    """--resume's file: --out-dir's ckpt.pt, or the path given"""
    return os.path.join(args.out_dir, "ckpt.pt") if args.resume == "auto" else args.resume


def recorded(path, trust=False):
    """-> (config, model_config) of a train.py checkpoint, checked, read without loading its tensors (memory-mapped)"""
    if not os.path.isfile(path):  # (a named pipe's open would wait for a writer)
        fail(f"no checkpoint at {path}" + (f": it is {kind(path)}" if os.path.lexists(path) else ""))
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "(Detected pickle protocol|'torch.load' received a zip file)")
            found = torch.load(path, map_location="cpu", weights_only=not trust, mmap=True)
    except Exception:  # not a file torch maps, or one read refuses: read says which, in one line
        found = read(path, trust)
    check_ours(found, path)
    return found["config"], found["model_config"]


def resume(path, method, optimizer, args):
    """--resume: load a train.py checkpoint into the method and its optimiser, after checking it is one of this run's
    method and model -> (its step, its record of a shard stream or None, this rank's own buffers or None). The lr
    schedule and the weight decay stay this run's flags; AdamW's moments and step counts are the checkpoint's."""
    checkpoint = read(path, args.trust_checkpoint)
    check_ours(checkpoint, path)
    saved, stream, rank_buffers = (checkpoint.get(key) for key in ("optimizer", "stream", "rank_buffers"))
    if not (isinstance(saved, dict) and isinstance(saved.get("state"), dict)
            and isinstance(saved.get("param_groups"), list) and saved["param_groups"]):
        fail(f"{path} has no optimiser state to resume from: its optimizer is {str(saved)[:40]!r}, not AdamW's")
    moments = [(f"optimizer state {k}.{name}", v) for k, state in saved["state"].items() if isinstance(state, dict)
               for name, v in state.items() if torch.is_tensor(v)]
    check_tensors([*method_state(checkpoint).items(), *moments], path)  # a NaN moment: a NaN loss blamed on the lr
    check_stream(stream, path)
    config = checkpoint["config"]
    # another batch size or seed: other samples in the stream; --gpu-decode: other pixels (a full decode, not the
    # workers' reduced one); from shards, another --shuffle-buffer: other blocks, which a reader's position counts in
    shown = lambda v: ("on" if v else "off") if isinstance(v, bool) else v  # noqa: E731
    shard_flags = ("shuffle_buffer",) if checkpoint.get("stream") else ()
    for flag in ("method", "model", "batch_size", "seed", "gpu_decode", *shard_flags):
        if config.get(flag, False) != getattr(args, flag):  # (checkpoints older than --gpu-decode: without it)
            fail(f"{path} was trained with --{flag.replace('_', '-')} {shown(config.get(flag, False))}, this run has "
                 f"{shown(getattr(args, flag))}: pass the checkpoint's to resume it")
    try:
        method.load_state_dict(method_state(checkpoint))
        decays = [group["weight_decay"] for group in optimizer.param_groups]
        optimizer.load_state_dict(saved)
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:  # torch's checks, then its indexing
        fail(f"{path} does not fit this run's --method-args, --tokenizer, --freeze-patch-embed or --lock-* flags: "
             f"{type(e).__name__}: {e}")
    for group, decay in zip(optimizer.param_groups, decays):
        group["weight_decay"] = decay
    if checkpoint["step"] >= args.steps:
        fail(f"{path} already trained {checkpoint['step']} steps; pass a larger --steps to train on")
    rank, world = distributed.rank_and_world()
    rank_buffers = rank_buffers if isinstance(rank_buffers, (list, tuple)) else ()  # each rank's own (DeCLIP's queue)
    if rank == 0:
        print(f"resumed from {path} at step {checkpoint['step']}")
    return checkpoint["step"], stream, rank_buffers[rank] if len(rank_buffers) == world else None


def check_stream(record, path):
    """A shard stream's record (Checkpoints.save; None for other data): positions (epoch, shard, sample, taken)."""
    try:
        good = record is None or type(record["readers"]) is type(record["shards"]) is int and min(
            record["readers"], record["shards"]) > 0 and len(record["lanes"]) == record["readers"] and all(
            len(p) == 4 and all(type(x) is int and x >= 0 for x in p) for p in record["lanes"])
    except (TypeError, KeyError):  # not a dict, a count or a list
        good = False
    if not good:
        fail(f"{path}: its record of the shard stream is not train.py's: {str(record)[:80]}")


def write(path, method, optimizer, step, meta):
    """The checkpoint of a step, to `path`; a failed write (a full disk) raises OSError and leaves no partial file."""
    model_state = method.model.state_dict()
    method_state = {k: v for k, v in method.state_dict().items() if not k.startswith("model.")}
    checkpoint = dict(model=model_state, method=method_state, optimizer=optimizer.state_dict(), step=step, **meta)
    with open(path, "wb") as f:
        writes = Writes(f)
        try:
            torch.save(checkpoint, writes)
        except BaseException as e:  # a full disk; a second stop signal (SystemExit), within a write or not
            os.remove(path)
            if writes.error or isinstance(e, OSError):
                raise writes.error or e from None
            raise


class Writes:
    """A file that keeps the error of its failed write, which torch.save reports only as "unexpected pos ...": an
    OSError, or the SystemExit of a second stop signal (runlog.stop_on_signals) that came during it."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, b):
        try:
            return self.f.write(b)
        except BaseException as e:
            self.error = e
            raise

    def flush(self):
        self.f.flush()


def finite(method, optimizer):
    """Whether every parameter, buffer and optimiser state tensor is finite, on every rank."""
    tensors = list(method.state_dict().values())
    tensors += [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    device = next(method.parameters()).device  # one sync: AdamW keeps its step counts on the CPU unless fused
    return distributed.all_ranks(torch.stack([torch.isfinite(t).all().to(device) for t in tensors
                                              if t.is_floating_point()]).all())


class Checkpoints:
    """train.py's OUT/ckpt.pt, saved every `save_every` steps, at the last, and where `late` says so, by the rule in the
    module docstring. Every rank calls every method (saving gathers every rank's state); rank 0 writes. resumed: (path,
    step) of the checkpoint the run resumed from; minutes: --save-every-minutes."""

    def __init__(self, out_dir, steps, save_every, meta, resumed=None, minutes=None):
        self.path = os.path.join(out_dir, "ckpt.pt")
        self.tmp = self.path + ".tmp"
        self.steps, self.save_every, self.meta = steps, save_every, meta
        here = resumed and os.path.abspath(resumed[0]) == os.path.abspath(self.path)
        self.on_disk = resumed[1] if here else None  # the step ckpt.pt holds, once this run has one there
        self.waiting = None  # the step ckpt.pt.tmp holds, until a finite loss from its weights vouches for it
        self.master = distributed.rank_and_world()[0] == 0
        self.minutes, self.t_saved = minutes, time.monotonic()  # the clock of late(), restarted by every save
        if self.master and os.path.lexists(self.tmp):  # (claim refused one that is not a file)
            os.remove(self.tmp)

    def due(self, step):
        return step % self.save_every == 0 or step == self.steps

    def late(self):
        """Whether --save-every-minutes have passed since the last save (or the start) on this rank's clock (RunLog
        takes rank 0's answer for every rank, log.clock_save, so that all save the same step)."""
        return self.minutes is not None and time.monotonic() - self.t_saved >= 60 * self.minutes

    def save(self, step, method, optimizer, stream, last=False):
        """last: the run's last step, or the step at which a signal stops it (RunLog.stopping): with no next step to
        vouch for it, it becomes ckpt.pt once its weights and losses (synced at this step) are finite."""
        if not finite(method, optimizer):
            self.stop(f"the weights are not finite after step {step}")
        rank_buffers, positions = distributed.rank_state(method, stream.lanes)  # a collective: on every rank
        if self.master:
            record = dict(readers=stream.readers, shards=stream.shards, lanes=positions) if stream.shards else None
            try:
                write(self.tmp, method, optimizer, step, dict(self.meta, rank_buffers=rank_buffers, stream=record))
            except OSError as e:
                self.stop(f"could not write {self.tmp}: {(e.strerror or str(e)).lower()}; removed the partial file",
                          then="Free some space, then")
        self.waiting, self.t_saved = step, time.monotonic()
        if last or step == self.steps:
            self.vouch(step + 1)

    def stopped_waiting(self, step, method, optimizer, stream, log):
        """A stop signal came while this rank waited for the data of step + 1 (stops.Stopped). Alone, it saves the
        steps done, as at a step's end. Several ranks cannot (saving is collective, and the others are within their
        step): this rank ends without saving, the last checkpoint kept, and torchrun stops the others."""
        rank, world = distributed.rank_and_world()
        if world == 1:
            log.flush(stream)  # the steps done: synced, logged, their losses checked
            if step and self.on_disk != step:
                self.save(step, method, optimizer, stream, last=True)
            log.end(step, self.path if step else None)
        name = signal.Signals(signals[0]).name
        kept = f"{self.path} holds step {self.on_disk}" if self.on_disk is not None else "no checkpoint was written"
        print(f"stopped by {name} at step {step}: rank {rank}'s data did not come, so the ranks could not save it "
              f"together; {kept}: continue with --resume", flush=True)
        sys.exit(128 + signals[0])

    def vouch(self, finite_through):
        """The losses up to step `finite_through` are finite: a checkpoint of an earlier step becomes ckpt.pt."""
        if self.waiting is not None and finite_through > self.waiting:
            if self.master:
                os.replace(self.tmp, self.path)  # atomic: ckpt.pt is always a whole checkpoint
            self.on_disk, self.waiting = self.waiting, None

    def stop(self, reason, then="Lower --lr or add --grad-clip 1.0, then"):
        if self.master and self.waiting is not None and os.path.lexists(self.tmp):
            os.remove(self.tmp)
        kept = f"{self.path} holds step {self.on_disk}" if self.on_disk is not None else "no checkpoint was written"
        fail(f"{reason}; stopped, {kept}. {then} " + ("--resume." if self.on_disk is not None else "start again."))


held = {}  # out_dir -> the descriptor of this process's lock there (claim), open while the process lives


def claim(out_dir, fresh):
    """Make OUT this run's, or stop with one line: OUT created if need be and locked (OUT/.lock, released when the
    process ends) against a second run there; a fresh run (no --resume) does not overwrite a run's log or checkpoint."""
    for fd in held.values():  # an earlier run of this process (tests call train.main repeatedly)
        os.close(fd)
    held.clear()
    try:
        os.makedirs(out_dir, exist_ok=True)
        for name in (".lock", "ckpt.pt", "ckpt.pt.tmp", "log.jsonl", "config.json"):  # what this run opens or removes
            path = os.path.join(out_dir, name)
            if os.path.lexists(path) and not os.path.isfile(path):  # a FIFO's open would wait, a folder's fail
                fail(f"{path} is {kind(path)}, where the run keeps a file: move it away (or pass another --out-dir)")
        fd = os.open(os.path.join(out_dir, ".lock"), os.O_RDWR | os.O_CREAT)
    except OSError as e:
        fail(f"--out-dir {out_dir}: {(e.strerror or str(e)).lower()}; pass a folder this user can write")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fail(f"another run (process {os.read(fd, 20).decode().strip() or '?'}) is training in {out_dir}; wait for it "
             f"or pass another --out-dir")
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    held[out_dir] = fd
    found = [name for name in ("ckpt.pt", "log.jsonl") if os.path.exists(os.path.join(out_dir, name))]
    if fresh and found:
        fail(f"{out_dir} holds a run ({' and '.join(found)}): pass --resume to continue it, or another --out-dir "
             f"(or remove it) to start a new one")


def kind(path):
    """what a path that is not a regular file is, in words"""
    mode = os.stat(path).st_mode if os.path.exists(path) else None
    return ("a broken link" if mode is None else "a folder" if stat.S_ISDIR(mode) else "a named pipe"
            if stat.S_ISFIFO(mode) else "not a regular file")
