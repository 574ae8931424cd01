"""Run a function on W gloo processes (CPU) and collect what each rank returns: the harness for every test that
compares a distributed computation with one process holding the whole global batch."""

import os
import socket
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def assert_close_at_scale(actual, expected, rel=1e-5, floor=0.0):
    """Compare float32 results of different summation orders (W ranks vs one process): rounding errors scale with the
    magnitude of the summed terms, not of each sum, so a gradient entry that is ~0 next to entries of order 1 can
    differ by 100% in relative terms. Tolerance: rel × the largest |entry| of the tensor (at least `floor`), plus
    rtol 1e-3. A wrong gradient (a missing rank's term, per-rank BatchNorm statistics) is off by a fraction of that
    scale, far above. `floor` is for a tensor that is 0 but for rounding (the gradient of a bias right before a
    BatchNorm, which removes any shift): its noise scales with the terms that cancelled, other gradients' sizes."""
    atol = max(rel * expected.abs().max().item(), floor)
    torch.testing.assert_close(actual, expected, rtol=1e-3, atol=atol)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, fn, args, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
        torch.save(result, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_distributed(fn, world, *args):
    """fn(rank, world, *args) runs on each of `world` processes (fn must be a module-level function, picklable);
    returns the list of its return values, in rank order."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_worker, args=(world, _free_port(), fn, args, out_dir), nprocs=world, start_method="spawn")
        return [torch.load(os.path.join(out_dir, f"{r}.pt"), weights_only=True) for r in range(world)]
