"""
The losses' memory per rank: the peak memory of the forward and backward of the CLIP and SigLIP losses alone, on random
(B, D) features per rank, for our distributed losses, open_clip's (ClipLoss with local loss and gather with gradient;
SigLipLoss with its bidirectional exchange) and the all-gather version that computes the whole N×N logits on every
rank; and each one's global loss, which agree.

    torchrun --nproc_per_node=8 scripts/bench_loss.py --batch-size 8192       # 8 ranks (gloo on a CPU, NCCL on GPUs)

On CUDA the peak is the allocator's; on a CPU the process's peak resident memory, with every allocation above 64 KiB
mapped on its own, so that it measures live tensors (plumbing/memory.py).
"""

import argparse
import os
import shlex
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project's root, from any folder

from clip import clip_loss
from plumbing import distributed
from plumbing.distributed import all_gather
from plumbing.memory import peak_memory
from plumbing.runlog import fail
from siglip import siglip_loss


def clip_loss_all_gather(image_features, text_features, logit_scale):
    """The naive distributed CLIP loss: every rank gathers all N rows of both sides and computes the whole N×N logits
    (open_clip's ClipLoss with local_loss=False). Its value equals clip.clip_loss's mean over ranks."""
    image = all_gather(F.normalize(image_features.float(), dim=-1))  # (N, D)
    text = all_gather(F.normalize(text_features.float(), dim=-1))  # (N, D)
    logits = (logit_scale * image) @ text.T  # (N, N)
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def siglip_loss_all_gather(image_features, text_features, logit_scale, logit_bias):
    """The naive distributed SigLIP loss: N×N logits on every rank, instead of siglip.siglip_loss's B×B blocks."""
    image = all_gather(F.normalize(image_features.float(), dim=-1))  # (N, D)
    text = all_gather(F.normalize(text_features.float(), dim=-1))  # (N, D)
    logits = (logit_scale * image) @ text.T + logit_bias  # (N, N)
    return (F.softplus(logits).sum() - logits.diagonal().sum()) / logits.shape[0]  # as siglip._sigmoid_block


def open_clip_losses(rank, world):
    """open_clip's distributed ClipLoss (local loss, gather with gradient, as ours) and SigLipLoss (bidirectional
    neighbour exchange, as ours), with our calling convention; None without open_clip."""
    try:
        from open_clip.loss import ClipLoss, SigLipLoss
    except ImportError:
        return None
    clip = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)
    siglip = SigLipLoss(rank=rank, world_size=world, dist_impl="bidir")
    return (lambda i, t, s: clip(F.normalize(i, dim=-1), F.normalize(t, dim=-1), s),
            lambda i, t, s, b: siglip(F.normalize(i, dim=-1), F.normalize(t, dim=-1), s, b))


def main(argv=None):
    """Forward + backward of each loss on random (B, D) features per rank: ours, open_clip's (when installed) and the
    all-gather N×N version; prints one line per loss with the worst rank's peak and the global loss of each."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=8192, help="the global batch N (over all ranks)")
    p.add_argument("--embed-dim", type=int, default=512, help="the feature dimension D")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    args = p.parse_args(argv)
    rank, world, device = distributed.setup(args.device)  # NCCL on CUDA, gloo on the CPU, under torchrun
    device = torch.device(device)
    cuda = device.type == "cuda"
    if not cuda and not os.path.exists("/proc/self/clear_refs"):
        fail("scripts/bench_loss.py on a CPU needs Linux (/proc/self) and glibc; use a GPU elsewhere")
    if args.batch_size % world:
        fail(f"--batch-size {args.batch_size} must be divisible by the {world} ranks")
    N, B, D = args.batch_size, args.batch_size // world, args.embed_dim
    g = torch.Generator().manual_seed(rank)
    image, text = (torch.randn(B, D, generator=g).to(device).requires_grad_() for _ in range(2))
    scale = torch.tensor(10.0, device=device, requires_grad=True)
    bias = torch.tensor(-10.0, device=device, requires_grad=True)
    theirs = open_clip_losses(rank, world) or (None, None)
    logit_mib = 4 / 2 ** 20  # MiB of one float32 logit
    cases = {"clip": ({"ours": clip_loss, "open_clip": theirs[0], "all-gather N×N": clip_loss_all_gather}, (scale,),
                      f"ours keeps B×N logits ({B * N * logit_mib:.0f} MiB)"),
             "siglip": ({"ours": siglip_loss, "open_clip": theirs[1], "all-gather N×N": siglip_loss_all_gather},
                        (scale, bias), f"ours one B×B block at a time ({B * B * logit_mib:.0f} MiB)")}
    for name, (variants, extra, note) in cases.items():
        results = {}
        for variant, loss_fn in variants.items():
            if loss_fn is None:
                continue
            losses = []

            def step():
                loss = loss_fn(image, text, *extra)
                loss.backward()
                losses.append(loss.detach())

            step()  # warm-up: first-call allocations (communication buffers, kernels) are not the loss's
            image.grad = text.grad = scale.grad = bias.grad = None
            mib = torch.tensor(peak_memory(step, device), device=device)
            image.grad = text.grad = scale.grad = bias.grad = None
            loss = losses[-1].clone()
            if world > 1:
                dist.all_reduce(mib, op=dist.ReduceOp.MAX)  # the worst rank
                dist.all_reduce(loss)
                loss /= world  # a rank's loss covers its rows (ours, open_clip) or all rows (N×N): the mean is global
            results[variant] = (mib.item(), loss.item())
        if rank == 0:
            naive = results["all-gather N×N"][0]
            parts = [f"{v} {mib:.0f} MiB" + (f" ({naive / max(mib, 1e-9):.1f}× less)" if mib != naive else "")
                     for v, (mib, _) in results.items()]
            launcher = f"torchrun --nproc_per_node={world} " if world > 1 else "python "
            launcher += "scripts/bench_loss.py "
            device_name = f"{torch.cuda.get_device_name(device)} nccl" if cuda else "cpu gloo" if world > 1 else "cpu"
            print(f"loss-memory {name} | {device_name}, {world} rank{'s' * (world > 1)} | N {N} = {world} × {B}, "
                  f"D {D} | peak per rank, forward + backward: {', '.join(parts)}; {note}, "
                  f"N×N logits {N * N * logit_mib:.0f} MiB | global loss "
                  f"{', '.join(f'{v} {loss:.6f}' for v, (_, loss) in results.items())} | "
                  f"{launcher}{shlex.join(sys.argv[1:] if argv is None else argv)}", flush=True)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
