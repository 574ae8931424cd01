"""
The losses' memory per rank: the peak memory of the forward and backward of the CLIP and SigLIP losses alone, on random
(B, D) features per rank, for our distributed losses, open_clip's and the all-gather version that computes the whole
N×N logits on every rank; and each one's global loss, which agree. On CUDA the peak is the allocator's; on a CPU the
process's peak resident memory, with every allocation above 64 KiB mapped on its own (plumbing/memory.py). Figures:
docs/speed.md.

    torchrun --nproc_per_node=8 scripts/bench_loss.py --batch-size 8192       # 8 ranks (gloo on a CPU, NCCL on GPUs)

--sweep: every method's batch × batch loss in one process, plain and tiled (plumbing/tiled.py), against N: the peak
memory of each, and the time of each where both fit (the median of --repeats runs, and their spread). Plain is skipped
where its matrices would not fit (4 × their float32 bytes above 80% of the memory available).

    python scripts/bench_loss.py --sweep --losses clip,siglip --sizes 1024,4096,16384,65536
"""

import argparse
import math
import os
import shlex
import statistics
import sys
import time
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project's root, from any folder

from clip import clip_loss
from declip import DeCLIP, nn_loss
from filip import filip_loss
from plumbing import distributed, tiled
from plumbing.distributed import all_gather
from plumbing.memory import peak_memory
from plumbing.runlog import fail
from siglip import siglip_loss
from slip import simclr_loss


def all_gather_loss(image_features, text_features, logit_scale, logit_bias=None):
    """The naive distributed loss: every rank gathers all N rows of both sides and computes the whole N×N logits:
    CLIP's (open_clip's ClipLoss with local_loss=False), or SigLIP's given a logit_bias. Its value equals the mean over
    ranks of clip.clip_loss's or siglip.siglip_loss's."""
    image = all_gather(F.normalize(image_features.float(), dim=-1))  # (N, D)
    text = all_gather(F.normalize(text_features.float(), dim=-1))  # (N, D)
    logits = (logit_scale * image) @ text.T  # (N, N)
    if logit_bias is not None:  # as siglip._sigmoid_block
        logits = logits + logit_bias
        return (F.softplus(logits).sum() - logits.diagonal().sum()) / logits.shape[0]
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def open_clip_losses(rank, world):
    """open_clip's distributed ClipLoss (local loss, gather with gradient) and SigLipLoss (bidirectional neighbour
    exchange), as ours work, with our calling convention; (None, None) without open_clip."""
    try:
        from open_clip.loss import ClipLoss, SigLipLoss
    except ImportError:
        return None, None
    clip = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)
    siglip = SigLipLoss(rank=rank, world_size=world, dist_impl="bidir")
    return (lambda i, t, s: clip(F.normalize(i, dim=-1), F.normalize(t, dim=-1), s),
            lambda i, t, s, b: siglip(F.normalize(i, dim=-1), F.normalize(t, dim=-1), s, b))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=8192, help="the global batch N (over all ranks)")
    p.add_argument("--embed-dim", type=int, default=512, help="the feature dimension D")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument("--sweep", action="store_true", help="each loss plain and tiled against N, one process")
    p.add_argument("--losses", default="clip,siglip,slip,declip,filip", help="--sweep: which losses")
    p.add_argument("--sizes", default="1024,2048,4096,8192,16384", help="--sweep: the batches N")
    p.add_argument("--repeats", type=int, default=3, help="--sweep: timed runs of each")
    p.add_argument("--ssl-dim", type=int, default=256, help="--sweep: SLIP's SimCLR embedding E")
    p.add_argument("--tokens", type=int, default=4, help="--sweep: FILIP's patches and words per sample")
    p.add_argument("--queue-size", type=int, default=65536, help="--sweep: DeCLIP's queue Q (full)")
    args = p.parse_args(argv)
    command = shlex.join(sys.argv[1:] if argv is None else argv)
    if not (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda") and \
            not os.path.exists("/proc/self/clear_refs"):
        fail("scripts/bench_loss.py on a CPU needs Linux (/proc/self) and glibc; use a GPU elsewhere")
    if args.sweep:
        return sweep(args, command)
    rank, world, device = distributed.setup(args.device)  # NCCL on CUDA, gloo on the CPU, under torchrun
    device = torch.device(device)
    if args.batch_size % world:
        fail(f"--batch-size {args.batch_size} must be divisible by the {world} ranks")
    N, B, D = args.batch_size, args.batch_size // world, args.embed_dim
    g = torch.Generator().manual_seed(rank)
    image, text = (torch.randn(B, D, generator=g).to(device).requires_grad_() for _ in range(2))
    scale, bias = (torch.tensor(value, device=device, requires_grad=True) for value in (10.0, -10.0))
    theirs = open_clip_losses(rank, world)

    def mib(logits):  # of float32 logits
        return f"{4 * logits / 2 ** 20:.0f} MiB"

    cases = {"clip": ({"ours": clip_loss, "open_clip": theirs[0], "all-gather N×N": all_gather_loss}, (scale,),
                      f"ours by tiles of {tiled.TILE}² (B×N logits {mib(B * N)})" if tiled.needed(B, N) else
                      f"ours keeps B×N logits ({mib(B * N)})"),
             "siglip": ({"ours": siglip_loss, "open_clip": theirs[1], "all-gather N×N": all_gather_loss},
                        (scale, bias), f"ours one B×B block at a time ({mib(B * B)}"
                        + (f", by tiles of {tiled.TILE}²)" if tiled.needed(B, B) else ")"))}
    cuda = device.type == "cuda"
    where = f"{torch.cuda.get_device_name(device)} nccl" if cuda else "cpu gloo" if world > 1 else "cpu"
    launcher = f"torchrun --nproc_per_node={world}" if world > 1 else "python"
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
                image.grad = text.grad = scale.grad = bias.grad = None  # after the peak: each run starts without

            step()  # warm-up: first-call allocations (communication buffers, kernels) are not the loss's
            peak = torch.tensor(peak_memory(step, device), device=device)
            loss = losses[-1].clone()
            if world > 1:
                dist.all_reduce(peak, op=dist.ReduceOp.MAX)  # the worst rank
                dist.all_reduce(loss)
                loss /= world  # a rank's loss covers its rows (ours, open_clip) or all rows (N×N): the mean is global
            results[variant] = (peak.item(), loss.item())
        if rank == 0:
            naive = results["all-gather N×N"][0]
            parts = [f"{v} {peak:.0f} MiB" + (f" ({naive / max(peak, 1e-9):.1f}× less)" if peak != naive else "")
                     for v, (peak, _) in results.items()]
            print(f"loss-memory {name} | {where}, {world} rank{'s' * (world > 1)} | N {N} = {world} × {B}, D {D} | "
                  f"peak per rank, forward + backward: {', '.join(parts)}; {note}, N×N logits {mib(N * N)} | "
                  f"global loss {', '.join(f'{v} {loss:.6f}' for v, (_, loss) in results.items())} | "
                  f"{launcher} scripts/bench_loss.py {command}", flush=True)
    if world > 1:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------------------------
# --sweep: plain and tiled against N

def declip_nn_term(image, text, t, queue):
    """DeCLIP's L_NNS as its loss runs it: the captions' neighbours in a full queue (B × Q cosines), then nn_loss."""
    full = SimpleNamespace(queue=queue, queue_filled=torch.tensor(queue.shape[0], device=queue.device))
    neighbours = DeCLIP.nearest_neighbour(full, F.normalize(text.float(), dim=-1))  # (B, D)
    return nn_loss(image, neighbours, t.exp())


def sweep_cases(args):
    """loss -> (inputs of a batch N, as sweep_inputs makes them; the loss of them, through the method files' own
    functions; the float32 elements of the plain form's batch × batch matrices)."""
    D, E, T = args.embed_dim, args.ssl_dim, args.tokens
    t, b = math.log(10.0), -10.0
    return {"clip": (lambda N: ((N, D), (N, D), t), lambda i, x, s: clip_loss(i, x, s.exp()), lambda N: 2 * N * N),
            "siglip": (lambda N: ((N, D), (N, D), t, b), lambda i, x, s, b: siglip_loss(i, x, s.exp(), b),
                       lambda N: N * N),
            "slip": (lambda N: ((N, E), (N, E)), lambda a, b: simclr_loss(a, b)[0], lambda N: 2 * N * 2 * N),
            "declip": (lambda N: ((N, D), [(N, D)], t, [(args.queue_size, D)]), declip_nn_term,
                       lambda N: N * args.queue_size + N * N),
            "filip": (lambda N: ((N, T, 256), (N, T, 256), t),
                      lambda i, x, s: filip_loss(i, x, torch.ones(x.shape[:2], dtype=torch.bool, device=x.device),
                                                 s.exp()), lambda N: 2 * N * N)}


def sweep_inputs(shapes, device, g):
    """(shape): a random leaf with gradient; [shape]: random unit rows, constant; a number: a 0-d leaf."""
    def make(x):
        if isinstance(x, list):
            return F.normalize(torch.randn(*x[0], generator=g), dim=-1).to(device)
        value = torch.tensor(x) if isinstance(x, float) else torch.randn(*x, generator=g)
        return value.to(device).requires_grad_()
    return [make(x) for x in shapes]


def available_bytes(device):
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))


def sweep(args, command):
    """--sweep, plain (tiled.LIMIT_MB = inf) against tiled (0): first the times, in malloc's usual regime; then the
    peaks and losses (peak_memory maps every block of 64 KiB or more on its own from then on, which slows every
    allocation). Where plain does not fit, tiled's time is that of its peak's run."""
    if args.device not in (None, "cpu", "cuda") or args.device == "cuda" and not torch.cuda.is_available():
        fail(f"--device {args.device}: cpu, or cuda where torch sees a GPU")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    cases = sweep_cases(args)
    losses, sizes = [name.strip() for name in args.losses.split(",")], args.sizes.split(",")
    if not all(n.strip().isdigit() and int(n) > 0 for n in sizes):
        fail(f"--sizes {args.sizes!r}: batches N of 1 or more, comma-separated, e.g. 1024,4096")
    if unknown := [name for name in losses if name not in cases]:
        fail(f"--losses {args.losses!r}: unknown {', '.join(map(repr, unknown))}; choose from {', '.join(cases)}")
    if min(args.repeats, args.tokens, args.queue_size, args.ssl_dim, args.embed_dim) < 1:
        fail("--repeats, --tokens, --queue-size, --ssl-dim and --embed-dim: 1 or more each")
    runs = [(name, N) for name in losses for N in map(int, sizes)]
    where = torch.cuda.get_device_name(device) if cuda else f"cpu, {torch.get_num_threads()} threads"
    print(f"# loss-sweep | {where}, 1 process | D {args.embed_dim}, SLIP E {args.ssl_dim}, FILIP {args.tokens} + "
          f"{args.tokens} tokens of 256, DeCLIP queue {args.queue_size} | tiles of {tiled.TILE}² | time: median of "
          f"{args.repeats} runs (min-max) | python scripts/bench_loss.py {command}", flush=True)

    def step(name, N, variant, inputs, times, losses):
        tiled.LIMIT_MB = math.inf if variant == "plain" else 0.0
        start = time.perf_counter()
        loss = cases[name][1](*inputs)
        loss.backward()
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
        losses[variant] = loss.item()
        for x in inputs:
            x.grad = None

    # plain where its matrices, and their kin (softmax, gradients), fit; decided once, for both phases
    variants = {(name, N): ("plain", "tiled") if 4 * 4 * cases[name][2](N) <= 0.8 * available_bytes(device)
                else ("tiled",) for name, N in runs}
    times = {}
    for name, N in runs:
        if len(variants[name, N]) == 2:
            inputs = sweep_inputs(cases[name][0](N), device, torch.Generator().manual_seed(N))
            times[name, N] = {"plain": [], "tiled": []}
            for r in range(args.repeats + 1):  # run 0 warms up and is not counted
                for variant in ("plain", "tiled"):
                    step(name, N, variant, inputs, times[name, N][variant] if r else [], {})
    for name, N in runs:
        inputs = sweep_inputs(cases[name][0](N), device, torch.Generator().manual_seed(N))
        once, losses = {"plain": [], "tiled": []}, {}
        mib = {variant: peak_memory(lambda: step(name, N, variant, inputs, once[variant], losses), device)
               for variant in variants[name, N]}
        print(sweep_line(name, N, 4 * cases[name][2](N) / 2**20, mib, times.get((name, N), once), losses), flush=True)


def sweep_line(name, N, plain_mib, mib, times, losses):
    def measured(variant):
        t = times[variant]
        spread = f"({min(t):.3g}-{max(t):.3g})" if len(t) > 1 else "(1 run)"
        return f"{variant} {mib[variant]:,.0f} MiB {statistics.median(t):.3g} s {spread}"

    line = f"loss-sweep {name:6} N {N:6,} | plain matrices {plain_mib:,.0f} MiB | "
    if "plain" not in mib:
        return line + f"plain does not fit | {measured('tiled')} | loss {losses['tiled']:.6f}"
    ratio = statistics.median(times["tiled"]) / statistics.median(times["plain"])
    return line + (f"{measured('plain')} | {measured('tiled')} | tiled/plain time {ratio:.2f} | loss plain "
                   f"{losses['plain']:.6f} tiled {losses['tiled']:.6f}")

if __name__ == "__main__":
    main()
