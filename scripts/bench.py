"""
The training step's benchmark: samples/s, step time, peak memory and MFU of train.py's step (forward_backward, bf16
autocast on CUDA, AdamW, post_step) for any method and model, on a batch of the method's own views: alone, side by side
with open_clip, or with and without accumulation, checkpointing and patch dropout. Compared timings alternate in one
process (A B, B A, ...), so that a drift of the machine favours no side. Each configuration prints one line, which
ends with the command. Figures: docs/speed.md, docs/accumulation.md.

    python scripts/bench.py --method clip --model ViT-B-32 --batch-size 32                 # train-step throughput
    python scripts/bench.py --method clip --model ViT-B-32 --batch-size 32 --vs-open-clip  # ours vs open_clip
    python scripts/bench.py --model ViT-B-16 --batch-size 8 --grad-accum 4 --patch-dropout 0.5 \\
        --variants plain,accum,ckpt,ckpt+accum,pd                              # each feature, alternating
"""

import argparse
import math
import multiprocessing
import os
import resource
import shlex
import statistics
import sys
import time
from contextlib import nullcontext

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project's root, from any folder

import data
import train
from model import CONFIGS, compiled
from plumbing import distributed, pretrained
from plumbing.memory import peak_memory
from plumbing.runlog import fail
from plumbing.synthetic import SyntheticCaptions
from plumbing.tokenizer import get_tokenizer

# dense bf16 peak TFLOP/s (no sparsity), matched against torch.cuda.get_device_name(): first match wins
PEAK_TFLOPS = [("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0), ("A100", 312.0)]
# --variants: what each name switches on (accum: --grad-accum micro-batches, pd: --patch-dropout)
FEATURES = {"plain": (), "accum": ("accum",), "ckpt": ("ckpt",), "pd": ("pd",), "ckpt+accum": ("ckpt", "accum")}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="clip", choices=train.METHODS)
    p.add_argument("--method-args", default="", help="the method's constructor arguments, e.g. mlp_dim=512")
    p.add_argument("--model", default="tiny-vit", choices=CONFIGS, help="a config of model.py")
    p.add_argument("--batch-size", type=int, default=128, help="samples per step (the global batch of train.py)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step, as train.py's")
    p.add_argument("--grad-checkpointing", action="store_true", help="as train.py's")
    p.add_argument("--patch-dropout", type=float, default=0.0, help="as train.py's")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (per implementation or variant)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (per implementation or variant)")
    p.add_argument("--rounds", type=int, default=5, help="--vs-open-clip, --variants: rounds, alternating (A B B A)")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (both, with --vs-open-clip)")
    p.add_argument("--lock-image", action="store_true", help="as train.py's (LiT); the MFU still counts its backward")
    p.add_argument("--lock-text", action="store_true", help="as train.py's")
    p.add_argument("--vs-open-clip", action="store_true", help="against open_clip's CLIP and ClipLoss (clip only)")
    p.add_argument("--variants", default=None, help="alternate steps with these features on, comma-separated: "
                   + ", ".join(FEATURES) + " (accum uses --grad-accum, pd --patch-dropout); time and activation "
                   "memory per sample, against the first")
    args = p.parse_args(argv)
    args.command = "python scripts/bench.py " + shlex.join(sys.argv[1:] if argv is None else argv)  # ends each line
    return args


# -----------------------------------------------------------------------------
# FLOPs per sample, forward: 2 per multiply-add of the encoders' matmuls and convolutions, open_clip's convention (its
# docs/model_profile.csv). A step counts 3× the forward, not what accumulation or checkpointing recompute, nor the
# method's heads and losses.

def transformer_macs(L, width, layers):
    # per layer, L tokens of width w: q,k,v and out projections 4·L·w², MLP w→4w→w 8·L·w², scores QKᵀ and the
    # weighted sum AV 2·L²·w (all L² pairs, also under a causal mask, as open_clip's profile counts them)
    return layers * (12 * L * width ** 2 + 2 * L ** 2 * width)


def resnet_macs(layers, width, R, D):
    """OpenAI's ModifiedResNet (model.py) at R×R: its convolutions and attention pool (not BatchNorm, ReLU, pooling)."""
    def conv(h, c_in, c_out, k=1):  # a k×k conv to an h×h map
        return h * h * c_in * c_out * k * k

    h = R // 2  # the stem: three 3×3 convs at R/2, then a 2×2 avg-pool
    macs = conv(h, 3, width // 2, 3) + conv(h, width // 2, width // 2, 3) + conv(h, width // 2, width, 3)
    h, inplanes = h // 2, width
    for i, blocks in enumerate(layers):
        planes = width * 2 ** i
        for b in range(blocks):
            stride = 2 if i > 0 and b == 0 else 1
            out = h // stride  # the avg-pool sits before conv3 and before the shortcut conv
            macs += conv(h, inplanes, planes) + conv(h, planes, planes, 3) + conv(out, planes, 4 * planes)
            if stride > 1 or inplanes != 4 * planes:
                macs += conv(out, inplanes, 4 * planes)
            h, inplanes = out, 4 * planes
    C, L = inplanes, h * h + 1  # attention pool over the h×h map plus its mean token, which is the only query
    return macs + C * C + 2 * L * C * C + 2 * L * C + C * D  # q; k and v; scores and weighted sum; c_proj


def forward_flops(c, patch_dropout=0.0):
    """(image, text) forward FLOPs per sample of a model.CONFIGS entry. With patch dropout the ViT's transformer runs
    on the kept patches only (model.drop_patches keeps ⌊(1 − p)·P⌋)."""
    D, R, w = c["embed_dim"], c["image_resolution"], c["vision_width"]
    if isinstance(c["vision_layers"], (list, tuple)):
        image = resnet_macs(c["vision_layers"], w, R, D)
    else:
        p = c["vision_patch_size"]
        P = (R // p) ** 2  # patches; the transformer also carries the class token
        kept = max(1, int(P * (1 - patch_dropout))) if patch_dropout else P
        image = P * 3 * p * p * w + transformer_macs(kept + 1, w, c["vision_layers"]) + w * D
    tw = c["transformer_width"]
    text = transformer_macs(c["context_length"], tw, c["transformer_layers"]) + tw * D  # projection: EOT token only
    return 2 * image, 2 * text


def step_flops(config, batch, patch_dropout=0.0):
    """Training FLOPs per sample: 3 × forward, once per image view (4-D) and per caption view (text*) of the batch."""
    image, text = forward_flops(config, patch_dropout)
    return 3 * sum(image if v.ndim == 4 else text if key.startswith("text") else 0 for key, v in batch.items())


def throughput(flops, samples_per_s, device):  # the MFU against the dense bf16 peak of a known GPU
    achieved = flops * samples_per_s / 1e12  # TFLOP/s
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    peak = next((tflops for key, tflops in PEAK_TFLOPS if key in name), None) if name else None
    mfu = f", MFU {100 * achieved / peak:.1f}% of {peak:g}" if peak else ""
    return f"{flops / 3 / 1e9:.2f} GFLOP/sample fwd, {achieved:.3g} TFLOP/s{mfu}"


def device_label(device):
    return f"cuda bf16 {torch.cuda.get_device_name(device)}" if device.type == "cuda" else \
        f"cpu fp32 {torch.get_num_threads()} threads"


def step_memory(device):  # the peak of the whole process so far (CPU) or since the timed steps began (CUDA)
    if device.type == "cuda":
        return f"peak {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB allocated"
    return f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"  # ru_maxrss: KiB


# -----------------------------------------------------------------------------
# the training step

def synthetic_batch(method, batch_size, device, seed):
    """The method's transform on a few SyntheticCaptions samples, collated and repeated to batch_size."""
    transform = method.transform(get_tokenizer("clip"))
    dataset = SyntheticCaptions("train", image_size=method.model.image_resolution, seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        samples = [transform(*dataset[i]) for i in range(min(batch_size, 32))]
    batch = torch.utils.data.default_collate(samples)
    repeat = math.ceil(batch_size / len(samples))
    return data.to_device({k: v.repeat(repeat, *[1] * (v.ndim - 1))[:batch_size] for k, v in batch.items()}, device)


def split(batch, k):  # -> k micro-batches
    n = len(batch["text"]) // k
    return [{key: v[i * n:(i + 1) * n] for key, v in batch.items()} for i in range(k)]


def our_step(method, model, optimizer, autocast, accum=1, checkpointing=False, patch_dropout=0.0):
    """batch -> loss: train.py's step with these features, set at each step so that several variants can alternate."""
    def step(batch):
        method.model.set_grad_checkpointing(checkpointing)
        if hasattr(method.model.visual, "patch_dropout"):  # a ViT
            method.model.visual.patch_dropout = patch_dropout
        loss, _ = train.forward_backward(method, model, split(batch, accum), seed=0, autocast=autocast)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        method.post_step()
        return loss
    return step


def alternate(steps, batch, args, device):
    """{name: step}: --warmup untimed steps of each, then --steps timed steps of each in --rounds rounds, the order
    reversed every other round -> {name: step times}, [{name: the round's seconds}], {name: samples/s}, last loss."""
    def run(step, n):
        times, loss = [], None
        for _ in range(n):
            t0 = time.perf_counter()
            loss = step(batch)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
        return times, loss

    for step in steps.values():
        run(step, args.warmup)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rounds = max(1, min(args.rounds, args.steps))
    times, per_round = {name: [] for name in steps}, []
    for r in range(rounds):
        per_round.append({})
        for name in (list(steps) if r % 2 == 0 else list(steps)[::-1]):
            t, loss = run(steps[name], args.steps // rounds)
            times[name] += t
            per_round[-1][name] = sum(t)
    rates = {name: args.batch_size * len(t) / sum(t) for name, t in times.items()}
    return times, per_round, rates, loss


def setup(args):
    """-> (method in training mode, it or compiled with --compile, AdamW, batch, device, autocast), as train.py's."""
    device = torch.device(distributed.setup(args.device)[2])  # as train.py: TF32 matmuls on CUDA
    torch.manual_seed(0)
    method = train.build_method(args.method, CONFIGS[args.model], train.parse_kwargs(args.method_args), device).train()
    pretrained.lock(method.model, 0 if args.lock_image else None, 0 if args.lock_text else None)  # LiT's step
    optimizer, _, _ = train.make_optimizer(method, CONFIGS[args.model], args.batch_size)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    return (method, compiled(method) if args.compile else method, optimizer,
            synthetic_batch(method, args.batch_size, device, seed=0), device, autocast)


def variant_options(args, name):  # our_step's keyword arguments for a variant of --variants
    on = FEATURES[name]
    return dict(accum=args.grad_accum if "accum" in on else 1, checkpointing="ckpt" in on,
                patch_dropout=args.patch_dropout if "pd" in on else 0.0)


def variant_memory(args, name):
    """The activation memory of one forward and backward of a variant: its peak beyond the weights, optimiser state
    and gradients, allocated beforehand. Run in a fresh process: on a CPU the measurement changes malloc's settings
    for good, and in a heap that earlier steps fragmented the resident memory overstates the live tensors."""
    method, ours, optimizer, batch, device, autocast = setup(args)
    options = variant_options(args, name)
    our_step(method, ours, optimizer, autocast, **options)(batch)  # sets the features; first-step allocations
    for p in method.parameters():
        p.grad = torch.zeros_like(p) if p.requires_grad else None
    return peak_memory(lambda: train.forward_backward(method, ours, split(batch, options["accum"]), 0, autocast),
                       device)


def compare_variants(args, variants, method, ours, optimizer, batch, device, autocast):
    """One line per variant of --variants: its time per sample and activation memory, each against the first's."""
    steps = {name: our_step(method, ours, optimizer, autocast, **variant_options(args, name)) for name in variants}
    _, rounds, rates, _ = alternate(steps, batch, args, device)
    memory = {}
    if device.type == "cuda" or os.path.exists("/proc/self/clear_refs"):
        with multiprocessing.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
            memory = {name: pool.apply(variant_memory, (args, name)) for name in variants}
    base, B = variants[0], args.batch_size
    for name in variants:
        ratios = [r[name] / r[base] for r in rounds]
        print(f"variant {name} | {args.method} {args.model} | {device_label(device)} | batch {B}"
              + (f" = {args.grad_accum} × {B // args.grad_accum}" if "accum" in FEATURES[name] else "")
              + (f", patch dropout {args.patch_dropout:g}" if "pd" in FEATURES[name] else "")
              + f" | {rates[name]:.2f} samples/s, {1000 / rates[name]:.0f} ms/sample"
              + (f", time {statistics.median(ratios):.2f}× {base}'s (rounds {min(ratios):.2f}-{max(ratios):.2f})"
                 if name != base else "")
              + (f" | activations {memory[name]:.0f} MiB, {memory[name] / B:.1f} MiB/sample" if memory else "")
              + (f", {memory[name] / memory[base]:.2f}× {base}'s" if memory and name != base else "")
              + f" | {args.command}")
    return rates


def vs_open_clip(args, method, ours, optimizer, batch, device, autocast):
    """Ours and open_clip's CLIP (its model and ClipLoss) on the same architecture, weights, batch and optimiser, in
    alternating rounds -> ours / open_clip samples/s."""
    try:
        import open_clip
        from open_clip.loss import ClipLoss
    except ImportError:
        fail("--vs-open-clip needs open_clip: pip install open_clip_torch")
    c = CONFIGS[args.model]
    vision = open_clip.model.CLIPVisionCfg(layers=c["vision_layers"], width=c["vision_width"], head_width=64,
                                           patch_size=c["vision_patch_size"], image_size=c["image_resolution"])
    text = open_clip.model.CLIPTextCfg(context_length=c["context_length"], vocab_size=c["vocab_size"],
                                       width=c["transformer_width"], heads=c["transformer_heads"],
                                       layers=c["transformer_layers"])
    theirs_model = open_clip.model.CLIP(c["embed_dim"], vision, text, quick_gelu=c["quick_gelu"]).to(device).train()
    # same state-dict layout: a strict load proves the two architectures have the same parameters
    theirs_model.load_state_dict(method.model.state_dict(), strict=True)
    with torch.no_grad(), autocast:
        ours_loss, theirs_loss = ours(batch)[0].item(), ClipLoss()(*theirs_model(batch["image"], batch["text"])).item()
    print(f"# same weights, same batch: loss ours {ours_loss:.6f}, open_clip {theirs_loss:.6f}")
    theirs, their_loss = torch.compile(theirs_model) if args.compile else theirs_model, ClipLoss()
    # the same AdamW as ours, on the same parameter groups (the method's weight-decay rule)
    groups = type(method).param_groups(theirs_model, optimizer.param_groups[0]["weight_decay"])
    their_optimizer = torch.optim.AdamW(groups, **{k: optimizer.defaults[k] for k in ("lr", "betas", "eps", "fused")})

    def theirs_step(b):  # open_clip's train loop: loss, backward, step, then the temperature clamped, as ours
        with autocast:
            loss = their_loss(*theirs(b["image"], b["text"]))
        loss.backward()
        their_optimizer.step()
        their_optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            theirs_model.logit_scale.clamp_(0, math.log(100))
        return loss.detach()

    steps = {"ours": our_step(method, ours, optimizer, autocast), "open_clip": theirs_step}
    times, rounds, rate, _ = alternate(steps, batch, args, device)
    ratios = [r["open_clip"] / r["ours"] for r in rounds]
    ms = {name: statistics.median(1000 * x for x in t) for name, t in times.items()}
    print(f"bench {args.method} {args.model} vs open_clip | {device_label(device)} | batch {args.batch_size} | "
          f"ours {rate['ours']:.1f} samples/s ({ms['ours']:.1f} ms median), open_clip {rate['open_clip']:.1f} "
          f"samples/s ({ms['open_clip']:.1f} ms) | ours/open_clip {rate['ours'] / rate['open_clip']:.3f} "
          f"(rounds {min(ratios):.3f}-{max(ratios):.3f}) | {len(rounds)} rounds × {args.steps // len(rounds)} steps "
          f"each | {step_memory(device)} (both) | {args.command}")
    for name in ("ours", "open_clip"):
        print(f"# {name}: {throughput(step_flops(c, batch), rate[name], device)}")
    return rate["ours"] / rate["open_clip"]


def main(argv=None):
    args = get_args(argv)
    if args.vs_open_clip and args.method != "clip":
        fail(f"--vs-open-clip compares CLIP only (open_clip has no {args.method}); use --method clip")
    if args.batch_size % args.grad_accum:
        fail(f"--batch-size {args.batch_size} must be divisible by --grad-accum {args.grad_accum}")
    variants = args.variants.split(",") if args.variants else []
    if unknown := [name for name in variants if name not in FEATURES]:
        fail(f"--variants: unknown {unknown[0]}; choose among {', '.join(FEATURES)}")
    if (args.patch_dropout or "pd" in variants) and not isinstance(CONFIGS[args.model]["vision_layers"], int):
        fail(f"patch dropout: {args.model} is a ResNet, which has no patch tokens")
    method, ours, optimizer, batch, device, autocast = setup(args)
    print(f"# {args.method} {args.model} on {device_label(device)}, batch {args.batch_size}: "
          f"{', '.join(f'{k} {tuple(v.shape)}' for k, v in batch.items())} | load average {os.getloadavg()[0]:.2f}")
    if args.vs_open_clip:
        return vs_open_clip(args, method, ours, optimizer, batch, device, autocast)
    if variants:
        return compare_variants(args, variants, method, ours, optimizer, batch, device, autocast)

    step = our_step(method, ours, optimizer, autocast, args.grad_accum, args.grad_checkpointing, args.patch_dropout)
    times, _, rate, loss = alternate({"ours": step}, batch, args, device)
    if not torch.isfinite(loss):
        fail(f"the loss is not finite ({loss.item()})")
    features = ", ".join(f for f, on in ((f"{args.grad_accum} micro-batches", args.grad_accum > 1),
                                         ("checkpointing", args.grad_checkpointing),
                                         (f"patch dropout {args.patch_dropout:g}", args.patch_dropout)) if on)
    flops = step_flops(CONFIGS[args.model], batch, args.patch_dropout)
    print(f"bench {args.method} {args.model} | {device_label(device)} | batch {args.batch_size}"
          f"{f' ({features})' if features else ''} | {rate['ours']:.1f} samples/s | "
          f"step {statistics.median(1000 * t for t in times['ours']):.1f} ms median, {len(times['ours'])} steps | "
          f"{step_memory(device)} | {throughput(flops, rate['ours'], device)} | {args.command}")
    return rate["ours"]


if __name__ == "__main__":
    main()
