"""
How a run stops on a signal as clusters send it, to the whole process group (torchrun, Slurm, Ctrl-C): the DataLoader
workers leave it to the training process (ignore_interrupts), which saves the step reached (runlog.stop_on_signals),
and a batch that does not come (a stalled source, a dead worker) ends with Stopped (next_batch, plumbing/sources.py).
"""

import atexit
import multiprocessing
import os
import signal
import threading
from contextlib import suppress

from plumbing.runlog import fail, signals

TICK = 0.5  # s: how often a wait for data looks at the stop signals
STOP_WAIT = 3  # s: how long a run that received a stop signal waits for data that does not come
children = set()  # process groups this process started (pipe: commands), killed when it ends


class Stopped(Exception):
    """A stop signal came while the data it waits for does not (train.py saves the steps done, with one rank)."""


def kill_children():
    for pid in list(children):
        with suppress(OSError):  # ended already
            os.killpg(pid, signal.SIGKILL)
        children.discard(pid)


atexit.register(kill_children)


def ignore_interrupts(worker_id):
    """A DataLoader worker's worker_init_fn: Ctrl-C and SIGTERM are the training process's to act on, not the
    worker's (which would die before the training process saves). SIGINT is ignored; SIGTERM is taken by a thread
    that ends the worker only when its parent sent it (the DataLoader ending it): torch's own handler dies of any."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    children.clear()  # the parent's commands (forked with it), not this worker's to kill
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # this thread's, and so every thread's started later
    # the process that started the worker: its OS parent when forked, not when started by a forkserver (Python 3.14's
    # default on Linux), whose worker's parent is the server
    parent = multiprocessing.parent_process()

    def wait_for_parent():
        while signal.sigwaitinfo({signal.SIGTERM}).si_pid != parent.pid and parent.is_alive():
            pass  # another's SIGTERM (torchrun, Slurm), while the parent lives
        kill_children()
        os._exit(0)
    threading.Thread(target=wait_for_parent, daemon=True).start()


def found_when_read():
    """torch raises a dead worker's error from a SIGCHLD handler, wherever the main thread is (within a save, say): a
    dead worker is found instead where the batch it owes is waited for (next_batch), within 5 s."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)


def next_batch(batches):
    """next() of a DataLoader's iterator (with workers: timeout=TICK, so that a stop signal is heard while the batch
    does not come). Raises Stopped once a stop signal has waited STOP_WAIT s for it, or at once if a worker died; a
    worker that died without a stop signal (the OOM killer) stops the run with one line."""
    waited = 0
    while True:
        try:
            return next(batches)
        except (OSError, EOFError, RuntimeError) as e:  # a worker's own error is re-raised as "Caught ... in worker"
            if str(e).startswith("Caught ") or isinstance(e, RuntimeError) and not str(e).startswith("DataLoader "):
                raise
            # DataLoader's (timed out, a worker exited), or a batch whose shared memory a dead worker was to hand over
            error, died = e, "timed out" not in str(e)
        if signals and (died or waited >= STOP_WAIT):
            raise Stopped("a DataLoader worker died" if died else "the data did not come") from None
        if died:
            fail(f"a DataLoader worker died ({error or type(error).__name__}; killed: out of memory? see dmesg); "
                 f"--resume continues from the last checkpoint")
        waited += TICK
