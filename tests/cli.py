"""Run the project's scripts as a user runs them (`python train.py ARGS`: a process of its own, its exit status, its
stdout and stderr), without paying torch's and torchvision's imports (~4 s of a ~6 s tiny run) each time.

Each run is forked from one server process that imported the project's modules and ran nothing else
(multiprocessing's forkserver, started once per test session), then executes the script as `__main__` with
runpy, in its folder, with its arguments. Runs that need another environment (a hidden package, a blocked network,
another HOME: the server's environment is fixed when it starts), a launcher (torchrun) or signals sent to their
process group use a fresh interpreter: `env=...` or `fresh=True`.
"""

import multiprocessing
import os
import runpy
import subprocess
import sys
import tempfile
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "default"}  # what every run sees: one thread, every warning shown
PRELOAD = ["torch", "torchvision", "numpy", "PIL.Image", "train", "eval_zeroshot", "scripts.eval_linear",
           "scripts.bench"]
_server = multiprocessing.get_context("forkserver")


def start_server():
    """Start the forkserver (once), with the modules preloaded and ENV set."""
    from multiprocessing import forkserver

    _server.set_forkserver_preload(PRELOAD)
    saved = dict(os.environ)
    os.environ.update(ENV)  # the server's environment is every forked run's
    try:
        forkserver.ensure_running()
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _as_script(path, args, cwd, stdout, stderr):
    for fd, name in ((1, stdout), (2, stderr)):
        f = os.open(name, os.O_WRONLY)
        os.dup2(f, fd)
        os.close(f)
    os.chdir(cwd)
    sys.argv = [path, *args]
    sys.path[0] = os.path.dirname(path)  # as `python ROOT/scripts/plot.py` sets it: the script's folder
    warnings.simplefilter("default")  # PYTHONWARNINGS=default, which only a new interpreter reads
    runpy.run_path(path, run_name="__main__")


def run(script, *args, cwd, env=None, fresh=False, launcher=(), timeout=600):
    """-> subprocess.CompletedProcess of `python ROOT/script ARGS` run in cwd (script None: `python ARGS`)."""
    args = [str(a) for a in args]
    path = os.path.join(ROOT, script) if script else None
    if fresh or env or launcher or path is None:
        return subprocess.run([sys.executable, *launcher, *([path] if path else []), *args], cwd=cwd,
                              env={**os.environ, **ENV, **(env or {})}, capture_output=True, text=True,
                              timeout=timeout)
    start_server()  # a no-op once it runs
    with tempfile.TemporaryDirectory() as d:
        out, err = os.path.join(d, "stdout"), os.path.join(d, "stderr")
        open(out, "w").close(), open(err, "w").close()
        p = _server.Process(target=_as_script, args=(path, args, str(cwd), out, err))
        p.start()
        p.join(timeout)
        if p.exitcode is None:
            p.kill()
            p.join()
            raise subprocess.TimeoutExpired([script, *args], timeout)
        with open(out) as o, open(err) as e:
            return subprocess.CompletedProcess([script, *args], p.exitcode, o.read(), e.read())
