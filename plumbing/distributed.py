"""
Everything that involves several ranks: torchrun's set-up and DDP (train.py), and the one place where features cross
ranks (every method's loss gathers through all_gather; SLIP's and DeCLIP's heads normalise with GlobalBatchNorm).
W ranks each hold B samples of the global batch of N = W·B. A loss that gathers the other ranks' rows WITH gradient
and takes the mean over its own rows, summed over ranks by DDP's averaging of gradients, gives the gradients of one
process holding all N (tested for every method: 2 gloo ranks against one process).
"""

import inspect
import os
import warnings

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP


def rank_and_world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def setup(device=None):
    """torchrun sets RANK, LOCAL_RANK and WORLD_SIZE: then join the process group (NCCL on CUDA, gloo on the CPU).
    -> (rank, world, device), the device this rank trains on ("cuda:LOCAL_RANK", "cpu")."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device is available to this process; use --device cpu")
    if "RANK" in os.environ:
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
        if device == "cuda":
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(device)
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return *rank_and_world(), device


def default_workers(ranks_per_node=1):
    """DataLoader workers per rank: the cores this process may run on (its CPU affinity, as torch's "too many
    workers" warning counts them), less one for the training or evaluation loop, at least 1, at most 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 2
    return min(8, max(1, cores // ranks_per_node - 1))


def wrap_ddp(method, device, buffers=None):
    """DistributedDataParallel around the method. Its buffers stay per rank: DeCLIP's queue holds the rank's own
    captions and must not be overwritten with rank 0's at every forward (torch 2.14 renamed broadcast_buffers to
    forward_sync_buffers). buffers: this rank's own, from a checkpoint, loaded after DDP has copied rank 0's."""
    buffer_flag = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters else \
        "broadcast_buffers"
    ddp = DDP(method, device_ids=[device] if device.startswith("cuda") else None,
              find_unused_parameters=method.find_unused_parameters, **{buffer_flag: False})
    if buffers:
        method.load_state_dict(buffers, strict=False)
    return ddp


def average(x):
    """x averaged over the ranks, in place (x itself without ranks): the logged losses, the rank means of the batch."""
    _, world = rank_and_world()
    if world > 1:
        dist.all_reduce(x)
        x /= world
    return x


def all_ranks(flag):
    """A 0-d bool tensor -> whether it is True on every rank: so that every rank stops, or none."""
    flag = flag.float()
    if rank_and_world()[1] > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def gather_objects(obj):
    """[obj of rank 0, obj of rank 1, ...] on every rank; [obj] without ranks."""
    _, world = rank_and_world()
    if world == 1:
        return [obj]
    objects = [None] * world
    dist.all_gather_object(objects, obj)
    return objects


def rank_state(method, lanes):
    """What differs between ranks, gathered on rank 0 for its checkpoint (a collective): each rank's buffers (DeCLIP's
    queue, a ResNet's BatchNorm statistics) when there are several, and where every reader of a shard stream stands,
    in lane order -> (buffers of each rank or None, positions) on rank 0, (None, None) on the others."""
    rank, world = rank_and_world()
    names = dict(method.named_buffers())
    mine = ({k: v.cpu() for k, v in method.state_dict().items() if k in names}, lanes)
    ranks = [mine]
    if world > 1:
        ranks = [None] * world if rank == 0 else None
        dist.gather_object(mine, ranks)
    if ranks is None:
        return None, None
    positions = [position for _, lanes in ranks for _, position in sorted(lanes.items())]
    return ([buffers for buffers, _ in ranks] if world > 1 else None), positions


# ---------------------------------------------------------------------------------------------------------------------
# Features across ranks

# torch 2.14 renamed the single-tensor collectives (the old names warn); older releases have only the old names
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class AllGather(torch.autograd.Function):
    """(B, ...) on each rank -> (W·B, ...) in rank order. The backward is a reduce-scatter: this rank's slice of the
    gradient summed over all W ranks, since every rank's loss used this rank's rows."""

    @staticmethod
    def forward(ctx, x):
        out = x.new_empty((dist.get_world_size() * x.shape[0], *x.shape[1:]))
        _all_gather_single(out, x.contiguous())
        return out

    @staticmethod
    def backward(ctx, grad):
        out = grad.new_empty((grad.shape[0] // dist.get_world_size(), *grad.shape[1:]))
        _reduce_scatter_single(out, grad.contiguous())  # op=SUM
        return out


@torch.compiler.disable  # the collective runs eagerly; torch.compile splits its graph here
def all_gather(x):
    """AllGather, and the identity when not distributed (torch.distributed.nn.functional.all_gather, which does the
    same, is deprecated and refuses to run under torch.compile)."""
    _, world = rank_and_world()
    return x if world == 1 else AllGather.apply(x)


class GlobalBatchNorm(nn.Module):
    """BatchNorm1d over (B, C) features whose training statistics are those of the global batch (all ranks), like
    torch's SyncBatchNorm: SLIP's SimCLR head's and DeCLIP's SimSiam heads'. It mixes the batch's samples, so it runs in
    a method's loss, never in its features: under --grad-accum it too sees the whole batch. Each rank's (count, mean,
    sum of squared deviations) per channel are gathered WITH gradient and merged exactly (Chan et al.): W ranks of B
    samples give the output and gradients of one process with W·B. Unlike nn.SyncBatchNorm it runs on CPU (gloo) and
    is no _BatchNorm (convert_sync_batchnorm leaves it be). Eval mode uses running statistics, as nn.BatchNorm1d."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, min_batch=32):
        super().__init__()
        self.eps, self.momentum, self.min_batch = eps, momentum, min_batch
        self.weight = nn.Parameter(torch.ones(num_features))  # γ
        self.bias = nn.Parameter(torch.zeros(num_features))  # β
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.warned = False

    def forward(self, x):  # (B, C) -> (B, C)
        if not self.training:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        B, C = x.shape
        rank, world = rank_and_world()
        if B * world < 2:
            raise ValueError("BatchNorm needs more than one sample in the global batch when training")
        if B * world < self.min_batch and not self.warned and rank == 0:  # once, from one rank
            self.warned = True
            warnings.warn(
                f"BatchNorm over a global batch of only {B * world} samples (< {self.min_batch}): its statistics are "
                f"noisy and each output leans on few other samples; SLIP saw chance-level accuracy at per-GPU batch 8 "
                f"(SLIP issue #7). Use a larger --batch-size (with --grad-accum if it does not fit: the heads see the "
                f"whole batch).")
        x32 = x.float()  # statistics in float32, also under bf16 autocast
        mean = x32.mean(dim=0)  # (C,) this rank's
        m2 = (x32 - mean).square().sum(dim=0)  # (C,) this rank's sum of squared deviations
        stats = all_gather(torch.cat([x32.new_full((1,), B), mean, m2])[None])  # (W, 1 + 2C), with gradient
        counts, means, m2s = stats[:, :1], stats[:, 1:C + 1], stats[:, C + 1:]  # (W, 1), (W, C), (W, C)
        N = counts.sum()
        global_mean = (counts * means).sum(dim=0) / N  # (C,)
        global_var = (m2s + counts * (means - global_mean).square()).sum(dim=0) / N  # (C,) biased, as BN normalises
        with torch.no_grad():
            self.running_mean.lerp_(global_mean, self.momentum)
            self.running_var.lerp_(global_var * N / (N - 1), self.momentum)  # unbiased, as nn.BatchNorm1d keeps
        return ((x32 - global_mean) * torch.rsqrt(global_var + self.eps) * self.weight + self.bias).to(x.dtype)
