"""
Tar shards from a command (pipe:COMMAND, its standard output, as open_clip's and WebDataset's `pipe:`) or a URL, read
by a thread (it alone ever waits on the source) that hands the bytes over a queue, on which the reader waits in ticks
of stops.TICK: so a source that stalls ends its shard as a bad one after --shard-timeout, and a stop signal is heard
(stops.Stopped). A command runs in a session of its own (a signal to the training process's group must not end it
mid-step); its process group is killed once read, since it can outlive its output (docs/data.md#tar-shards).
"""

import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from contextlib import suppress

from plumbing import stops
from plumbing.runlog import signals

CHUNK = 1 << 16  # bytes the thread reads at a time
PROGRESS = 1 << 16  # a read that gets less than this (or what it asked for) in `timeout` seconds stalled
EXIT_WAIT = 2  # s: how long a command whose output ended may take to exit (its status says whether it failed)


class Source:
    """A shard's bytes, from a command or a URL: read(n), close(), and failure(): after close, why the command failed
    (its exit status and the last line of its standard error), or None."""

    def __init__(self, path, timeout):
        self.path, self.timeout, self.command, self.status = path, timeout, None, None
        self.chunks, self.buffer, self.ended, self.got = queue.Queue(maxsize=16), bytearray(), False, 0
        self.done = threading.Event()  # the reader is done: the thread stops
        if path.startswith("pipe:"):
            self.errors = tempfile.TemporaryFile()  # no amount of standard error can block the command
            self.command = subprocess.Popen(path[5:], shell=True, stdout=subprocess.PIPE, stderr=self.errors,
                                            start_new_session=True)
            stops.children.add(self.command.pid)  # killed with SIGKILL (in a worker, it inherits SIGTERM blocked)
        threading.Thread(target=self.pump, daemon=True).start()

    def pump(self):  # the thread: each chunk, then b"" at the end, or the exception that ended the source
        try:  # (a socket that waits twice the timeout gives up after the reader has said why)
            with self.command.stdout if self.command else urllib.request.urlopen(
                    self.path, timeout=min(2 * self.timeout, 1e6)) as f:
                while not self.done.is_set():
                    chunk = f.read1(CHUNK)
                    self.hand(chunk)
                    if not chunk:
                        return
        except Exception as e:  # a URL's HTTPError, URLError, timeout (OSErrors), http.client's HTTPException
            self.hand(e)

    def hand(self, item):
        while not self.done.is_set():
            with suppress(queue.Full):  # the reader is busy: the source waits
                return self.chunks.put(item, timeout=stops.TICK)

    def read(self, n):
        since, start = time.monotonic(), len(self.buffer)  # the last progress
        while len(self.buffer) < n and not self.ended:
            with suppress(queue.Empty):  # else nothing came in this tick
                item = self.chunks.get(timeout=stops.TICK)
                if isinstance(item, Exception):
                    raise item
                self.ended, self.got = not item, self.got + len(item)
                self.buffer += item
            if len(self.buffer) - start >= min(PROGRESS, n - start):
                since, start = time.monotonic(), len(self.buffer)
            elif signals and time.monotonic() - since >= stops.STOP_WAIT:
                raise stops.Stopped(f"waiting for {self.path}")
            elif time.monotonic() - since >= self.timeout:  # nothing, or a trickle
                raise self.stalled(len(self.buffer) - start)
        out = bytes(self.buffer[:n])
        del self.buffer[:n]
        return out

    def stalled(self, got):
        what = "the command's output" if self.command else "the server's response" if not self.got else "the rest " \
            "of the server's response"
        reason = (f"stalled: {f'{got} bytes' if got else 'no data'} in {self.timeout:g} s (--shard-timeout) "
                  f"waiting for {what}" + (f", after {self.got - got:,} bytes" if self.got > got else ""))
        print(f"warning: {self.path}: {reason}; passed over as a bad shard", file=sys.stderr, flush=True)
        return TimeoutError(reason)

    def close(self):
        self.done.set()
        if self.command is None or self.status is not None:
            return
        self.status = 0
        # the output ended: the command exits by itself, its status says whether it failed; else the reader stopped
        # early (the archive's end, a corrupt shard, a stall, a stop), and a command that failed already says so
        with suppress(subprocess.TimeoutExpired):  # it outlives its output (a trailing sleep), or still writes
            status = self.command.wait(EXIT_WAIT if self.ended else 0.2)
            # a command whose output the reader stopped reading ends on SIGPIPE (itself, or its shell with 128 + 13)
            self.status = 0 if not self.ended and status in (-signal.SIGPIPE, 128 + signal.SIGPIPE) else status
        with suppress(OSError):
            os.killpg(self.command.pid, signal.SIGKILL)  # what is left of it, its children included
        self.command.wait()
        stops.children.discard(self.command.pid)

    def failure(self):
        if not self.status:
            return None
        self.errors.seek(0)
        last = (self.errors.read().decode("utf-8", "replace").strip().splitlines() or [""])[-1]
        return f"the command exited with status {self.status}" + (f": {last}" if last else "")
