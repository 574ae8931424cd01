"""
Benchmarks: the training step of any method and model, alone, side by side with open_clip, or with and without
accumulation, checkpointing and patch dropout; the input pipeline; the losses' memory per rank.

    python bench.py --method clip --model ViT-B-32 --batch-size 32            # train-step throughput (CPU or GPU)
    python bench.py --method clip --model ViT-B-32 --batch-size 32 --vs-open-clip    # ours vs open_clip, alternating
    python bench.py --model ViT-B-16 --batch-size 8 --grad-accum 4 --patch-dropout 0.5 \\
        --variants plain,accum,ckpt,ckpt+accum,pd                              # each feature, alternating
    python bench.py --make-jpegs 200 /tmp/jpegs                                # a folder of COCO-sized JPEGs
    python bench.py --data-dir /tmp/jpegs --model ViT-B-32 --workers 2        # decode + augment, images/s
    python bench.py --data-dir /tmp/jpegs --vs-shards --workers 1,2           # the same JPEGs from tar shards
    torchrun --nproc_per_node=8 bench.py --loss-memory --batch-size 8192       # loss memory per rank vs N×N

A step is what train.py does: train.forward_backward (bf16 autocast on CUDA; --grad-accum micro-batches), AdamW,
post_step. The batch is synthetic but has exactly the method's views: the method's own transform applied to
SyntheticCaptions samples, so SLIP gets its three image views and DeCLIP its two images and two captions. Timings
that are compared come from one process, in alternating rounds (ABBA), so a drift of the machine favours no side.
Each configuration prints one line starting with "bench", "variant", "data" or "loss-memory", ending with the command.

FLOPs: forward_flops() counts the multiply-adds of every matmul and convolution of the two encoders (patch embedding,
attention projections, attention scores and weighted sums over all L² pairs, MLPs, final projections; a ResNet's
convolutions and attention pool) and reports 2 FLOPs per multiply-add. That is the convention of open_clip's
docs/model_profile.csv, whose figures this reproduces (ViT-B-32 14.78, ViT-B-16 41.09, RN50 18.18 GFLOPs per
image-text pair, forward). A training step costs 3× the forward (the backward computes two products per forward
product); MFU counts those, not what accumulation or checkpointing recompute, nor the method's heads and losses.
"""

import argparse
import ctypes
import gc
import importlib
import io
import math
import multiprocessing
import os
import shlex
import statistics
import sys
import tarfile
import tempfile
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image

import data
import train
from clip import all_gather, clip_loss
from model import CONFIGS, create_model
from siglip import siglip_loss

METHODS = ("clip", "siglip", "slip", "declip", "filip", "defilip")
# dense bf16 peak TFLOP/s (no sparsity), matched against torch.cuda.get_device_name(): first match wins
PEAK_TFLOPS = [("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0), ("A100", 312.0)]
CAPTIONS = ["a photo of a dog on a red sofa.", "two people walking along the beach at sunset",
            "a plate of food with rice and vegetables", "a city street with cars and a bus."]
# --variants: what each name switches on (accum: --grad-accum micro-batches, pd: --patch-dropout)
FEATURES = {"plain": (), "accum": ("accum",), "ckpt": ("ckpt",), "pd": ("pd",), "ckpt+accum": ("ckpt", "accum")}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="clip", choices=METHODS)
    p.add_argument("--method-args", default="", help="the method's constructor arguments, e.g. mlp_dim=512")
    p.add_argument("--model", default="tiny-vit", help="a config of model.py: " + ", ".join(CONFIGS))
    p.add_argument("--batch-size", type=int, default=128, help="samples per step (the global batch of train.py)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step, as train.py's")
    p.add_argument("--grad-checkpointing", action="store_true", help="as train.py's")
    p.add_argument("--patch-dropout", type=float, default=0.0, help="as train.py's")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (per implementation or variant)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (per implementation or variant)")
    p.add_argument("--rounds", type=int, default=5, help="--vs-open-clip, --variants: the timed steps are split into "
                                                          "this many alternating rounds (A B B A ...)")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (both, with --vs-open-clip)")
    p.add_argument("--vs-open-clip", action="store_true", help="alternate with open_clip's CLIP and ClipLoss (clip only)")
    p.add_argument("--variants", default=None, help="alternate steps with these features on, comma-separated: "
                   + ", ".join(FEATURES) + " (accum uses --grad-accum, pd --patch-dropout); time and activation "
                   "memory per sample, against the first")
    p.add_argument("--profile", action="store_true", help="after timing, profile 3 of our steps and print where the "
                                                          "time goes (share of the step per kernel and per kind)")
    p.add_argument("--passes", type=int, default=1, help="--vs-shards: passes over the folder per round")
    p.add_argument("--jpeg-size", default="500x375", help="--make-jpegs: WIDTHxHEIGHT")
    p.add_argument("--data-dir", default=None, help="time decoding + the method's transform on this folder of JPEGs")
    p.add_argument("--workers", default=str(os.cpu_count()), help="--data-dir: DataLoader workers: N for 1..N, or a "
                                                                 "list such as 1,4,8")
    p.add_argument("--decoders", default="pil,tvio", help="--data-dir: pil and/or tvio (data.load_image) "
                                                         "(torchvision.io.decode_jpeg)")
    p.add_argument("--vs-shards", action="store_true", help="--data-dir: train.py's reading of the JPEGs as files "
                   "(as a CSV or COCO) against the same JPEGs packed into tar shards, alternating --rounds rounds")
    p.add_argument("--shard-size", type=int, default=100, help="--vs-shards: images per tar shard")
    p.add_argument("--make-jpegs", nargs=2, metavar=("N", "DIR"), help="write N synthetic JPEGs into DIR and exit")
    p.add_argument("--loss-memory", action="store_true", help="peak memory per rank of the CLIP and SigLIP losses "
                   "(forward + backward) at global batch --batch-size, against the all-gather N×N versions; "
                   "run under torchrun for several ranks")
    p.add_argument("--embed-dim", type=int, default=512, help="--loss-memory: feature dimension D")
    return p.parse_args(argv)


def command(args):
    return "python bench.py " + shlex.join(args.argv)


# -----------------------------------------------------------------------------
# FLOPs (2 per multiply-add), per sample, forward

def transformer_macs(L, width, layers):
    # per layer, L tokens of width w: q,k,v and out projections 4·L·w², MLP w→4w→w 8·L·w², scores QKᵀ and the
    # weighted sum AV 2·L²·w (all L² pairs, also under a causal mask, as open_clip's profile counts them)
    return layers * (12 * L * width ** 2 + 2 * L ** 2 * width)


def resnet_macs(layers, width, R, D):
    """OpenAI's ModifiedResNet (model.py) at R×R: convolutions (a k×k conv to an h×h map: h²·Cin·Cout·k²) and the
    attention pool. BatchNorm, ReLU and pooling are not matmuls and are not counted."""
    def conv(h, c_in, c_out, k=1):
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


def forward_flops(config, patch_dropout=0.0):
    """(image, text) forward FLOPs per sample of a model.CONFIGS entry, 2 FLOPs per multiply-add. With patch dropout
    the ViT's transformer runs on the kept patches only (model.drop_patches keeps ⌊(1 − p)·P⌋)."""
    c = config
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
    n_image = sum(v.ndim == 4 for v in batch.values())
    n_text = sum(key.startswith("text") for key in batch)
    return 3 * (n_image * image + n_text * text)


def peak_tflops(device):  # the dense bf16 peak of a known GPU, for the MFU; None on a CPU
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return next((tflops for key, tflops in PEAK_TFLOPS if key in name), None) if name else None


def throughput(flops, samples_per_s, peak):
    achieved = flops * samples_per_s / 1e12  # TFLOP/s
    mfu = f", MFU {100 * achieved / peak:.1f}% of {peak:g}" if peak else ""
    return f"{flops / 3 / 1e9:.2f} GFLOP/sample fwd, {achieved:.3g} TFLOP/s{mfu}"


def device_label(device):
    return f"cuda bf16 {torch.cuda.get_device_name(device)}" if device.type == "cuda" else \
        f"cpu fp32 {torch.get_num_threads()} threads"


def step_memory(device):  # the peak of the whole process so far (CPU) or since the timed steps began (CUDA)
    if device.type == "cuda":
        return f"peak {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB allocated"
    import resource
    return f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"  # ru_maxrss: KiB


# -----------------------------------------------------------------------------
# the training step

def synthetic_batch(method, batch_size, device, seed):
    """The method's transform on a few SyntheticCaptions samples, collated and repeated to batch_size: every view
    the method's loss reads, with the right shapes and dtypes."""
    transform = method.transform(data.get_tokenizer("clip"))
    dataset = data.SyntheticCaptions("train", image_size=method.model.image_resolution, seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        samples = [transform(*dataset[i]) for i in range(min(batch_size, 32))]
    batch = torch.utils.data.default_collate(samples)
    repeat = math.ceil(batch_size / len(samples))
    return {k: v.repeat(repeat, *[1] * (v.ndim - 1))[:batch_size].to(device) for k, v in batch.items()}


def split(batch, k):  # -> k micro-batches
    n = len(batch["text"]) // k
    return [{key: v[i * n:(i + 1) * n] for key, v in batch.items()} for i in range(k)]


def make_optimizer(Method, module, config, device):
    # as train.py: AdamW with the method's settings for this encoder, weight decay where the method's rule says
    hp = Method.optimizer_defaults(config)
    return torch.optim.AdamW(Method.param_groups(module, hp["weight_decay"]), lr=hp["lr"], betas=hp["betas"],
                             eps=hp["eps"], fused=device.type == "cuda")


def our_step(method, model, optimizer, autocast, accum=1, checkpointing=False, patch_dropout=0.0):
    """batch -> loss: one step as train.py's, with these features on (forward_backward over `accum` micro-batches,
    AdamW, post_step). The features are set at each step, so that steps of several variants can alternate."""
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


def timed_steps(step, batch, steps, device):
    """Run `steps` steps -> the wall time of each (seconds), the last loss."""
    times, loss = [], None
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = step(batch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return times, loss


def alternate(steps, batch, args, device):
    """{name: step}: --warmup untimed steps of each, then --steps timed steps of each in --rounds rounds, the order
    reversed every other round (A B, B A, ...) -> {name: step times}, [{name: the round's seconds}], last losses."""
    for step in steps.values():
        timed_steps(step, batch, args.warmup, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rounds = max(1, min(args.rounds, args.steps))
    times, per_round, losses = {name: [] for name in steps}, [], {}
    for r in range(rounds):
        per_round.append({})
        for name in (list(steps) if r % 2 == 0 else list(steps)[::-1]):
            t, losses[name] = timed_steps(steps[name], batch, args.steps // rounds, device)
            times[name] += t
            per_round[-1][name] = sum(t)
    return times, per_round, losses


# kinds of kernel, by name (cuBLAS/CUTLASS GEMMs, flash attention, cuDNN, fused AdamW, norms; under torch.compile
# inductor's fused kernels are named triton_*): the first kind whose word appears in the lower-cased name
KERNEL_KINDS = [("matmul", ("gemm", "nvjet", "cutlass", "xmma", "matmul", "addmm", "aten::mm", "aten::bmm")),
                ("attention", ("flash", "fmha", "attention")), ("convolution", ("conv", "cudnn")),
                ("optimizer", ("adam",)), ("norm", ("layer_norm", "layernorm", "batch_norm")),
                ("compiled (triton)", ("triton",))]


def profile_steps(step, batch, steps, device):
    """Where a step's time goes: torch.profiler over `steps` steps; each kernel's (CUDA) or op's (CPU) own time as a
    share of the wall time, grouped by KERNEL_KINDS, plus the share with no kernel running (launch and host gaps)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        t0 = time.perf_counter()
        timed_steps(step, batch, steps, device)
        wall_us = 1e6 * (time.perf_counter() - t0)
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    kernels = sorted(((e.key, getattr(e, attr, 0)) for e in prof.key_averages()
                      if (e.device_type == DeviceType.CUDA) == cuda and getattr(e, attr, 0) > 0), key=lambda k: -k[1])
    kinds = {}
    for name, us in kernels:
        kind = next((k for k, words in KERNEL_KINDS if any(w in name.lower() for w in words)), "other")
        kinds[kind] = kinds.get(kind, 0) + us
    share = lambda us: f"{100 * us / wall_us:.1f}%"
    print(f"profile | {steps} steps, {wall_us / 1e3 / steps:.1f} ms/step under the profiler | "
          + " | ".join(f"{k} {share(us)}" for k, us in sorted(kinds.items(), key=lambda x: -x[1]))
          + (f" | no kernel running {share(max(0.0, wall_us - sum(us for _, us in kernels)))}" if cuda else ""))
    for name, us in kernels[:12]:
        print(f"profile |   {share(us):>6} {name[:110]}")


def setup(args):
    """-> the method (training mode), what to call (the method, compiled with --compile), its AdamW, a batch of the
    method's views, the device and the autocast context, as train.py would have them."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    Method = importlib.import_module(args.method).Method
    torch.manual_seed(0)
    model = create_model(args.model)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(Method.defaults["logit_scale_init"]))
    method = Method(model, **train.parse_kwargs(args.method_args)).to(device).train()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    return (method, torch.compile(method) if args.compile else method,
            make_optimizer(Method, method, CONFIGS[args.model], device),
            synthetic_batch(method, args.batch_size, device, seed=0), device, autocast)


def bench_step(args):
    if args.model not in CONFIGS:
        sys.exit(f"error: unknown model '{args.model}'; choose one of: {', '.join(CONFIGS)}")
    if args.vs_open_clip and args.method != "clip":
        sys.exit(f"error: --vs-open-clip compares CLIP only (open_clip has no {args.method}); use --method clip")
    if args.batch_size % args.grad_accum:
        sys.exit(f"error: --batch-size {args.batch_size} must be divisible by --grad-accum {args.grad_accum}")
    variants = args.variants.split(",") if args.variants else []
    for name in variants:
        if name not in FEATURES:
            sys.exit(f"error: --variants: unknown {name}; choose among {', '.join(FEATURES)}")
    if (args.patch_dropout or "pd" in variants) and not isinstance(CONFIGS[args.model]["vision_layers"], int):
        sys.exit(f"error: patch dropout: {args.model} is a ResNet, which has no patch tokens")
    method, ours, optimizer, batch, device, autocast = setup(args)
    print(f"# {args.method} {args.model} on {device_label(device)}, batch {args.batch_size}: "
          f"{', '.join(f'{k} {tuple(v.shape)}' for k, v in batch.items())} | load average {os.getloadavg()[0]:.2f}")
    if args.vs_open_clip:
        return vs_open_clip(args, method, ours, optimizer, batch, device, autocast)
    if variants:
        return compare_variants(args, variants, method, ours, optimizer, batch, device, autocast)

    step = our_step(method, ours, optimizer, autocast, args.grad_accum, args.grad_checkpointing, args.patch_dropout)
    times, _, losses = alternate({"ours": step}, batch, args, device)
    if not torch.isfinite(losses["ours"]):
        sys.exit(f"error: the loss is not finite ({losses['ours'].item()})")
    samples_per_s = args.batch_size * len(times["ours"]) / sum(times["ours"])
    features = ", ".join(f for f, on in ((f"{args.grad_accum} micro-batches", args.grad_accum > 1),
                                         ("checkpointing", args.grad_checkpointing),
                                         (f"patch dropout {args.patch_dropout:g}", args.patch_dropout)) if on)
    flops = step_flops(CONFIGS[args.model], batch, args.patch_dropout)
    print(f"bench {args.method} {args.model} | {device_label(device)} | batch {args.batch_size}"
          f"{f' ({features})' if features else ''} | {samples_per_s:.1f} samples/s | "
          f"step {statistics.median(1000 * t for t in times['ours']):.1f} ms median, {len(times['ours'])} steps | "
          f"{step_memory(device)} | {throughput(flops, samples_per_s, peak_tflops(device))} | {command(args)}")
    if args.profile:
        profile_steps(step, batch, 3, device)
    return samples_per_s


def variant_options(args, name):  # our_step's keyword arguments for a variant of --variants
    on = FEATURES[name]
    return dict(accum=args.grad_accum if "accum" in on else 1, checkpointing="ckpt" in on,
                patch_dropout=args.patch_dropout if "pd" in on else 0.0)


def variant_memory(args, name):
    """In a fresh process: the activation memory of one forward and backward of a variant, i.e. its peak beyond what
    was allocated before it (the weights, the optimiser state, the gradients, allocated beforehand). A fresh process,
    because on a CPU the measurement changes malloc's settings for good, and in a heap that earlier steps fragmented
    the resident memory overstates the live tensors."""
    method, ours, optimizer, batch, device, autocast = setup(args)
    options = variant_options(args, name)
    our_step(method, ours, optimizer, autocast, **options)(batch)  # sets the features; first-step allocations
    for p in method.parameters():
        p.grad = torch.zeros_like(p) if p.requires_grad else None
    return peak_memory(lambda: train.forward_backward(method, ours, split(batch, options["accum"]), 0, autocast),
                       device)


def compare_variants(args, variants, method, ours, optimizer, batch, device, autocast):
    """Steps with each variant's features on (FEATURES), on the same weights and batch, in alternating rounds, and
    each one's activation memory (variant_memory). One line per variant, each against the first."""
    steps = {name: our_step(method, ours, optimizer, autocast, **variant_options(args, name)) for name in variants}
    times, rounds, _ = alternate(steps, batch, args, device)
    memory = {}
    if device.type == "cuda" or os.path.exists("/proc/self/clear_refs"):
        with multiprocessing.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
            memory = {name: pool.apply(variant_memory, (args, name)) for name in variants}
    base, B = variants[0], args.batch_size
    for name in variants:
        rate, ratios = B * len(times[name]) / sum(times[name]), [r[name] / r[base] for r in rounds]
        print(f"variant {name} | {args.method} {args.model} | {device_label(device)} | batch {B}"
              + (f" = {args.grad_accum} × {B // args.grad_accum}" if "accum" in FEATURES[name] else "")
              + (f", patch dropout {args.patch_dropout:g}" if "pd" in FEATURES[name] else "")
              + f" | {rate:.2f} samples/s, {1000 / rate:.0f} ms/sample"
              + (f", time {statistics.median(ratios):.2f}× {base}'s (rounds {min(ratios):.2f}-{max(ratios):.2f})"
                 if name != base else "")
              + (f" | activations {memory[name]:.0f} MiB, {memory[name] / B:.1f} MiB/sample" if memory else "")
              + (f", {memory[name] / memory[base]:.2f}× {base}'s" if memory and name != base else "")
              + f" | {command(args)}")
    return {name: B * len(t) / sum(t) for name, t in times.items()}


def vs_open_clip(args, method, ours, optimizer, batch, device, autocast):
    """Ours and open_clip's CLIP (its model and ClipLoss) on the same architecture, weights, batch and optimiser, in
    alternating rounds -> ours / open_clip samples/s."""
    try:
        import open_clip
        from open_clip.loss import ClipLoss
    except ImportError:
        sys.exit("error: --vs-open-clip needs open_clip: pip install open_clip_torch")
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
    their_optimizer = make_optimizer(type(method), theirs_model, c, device)

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
    times, rounds, _ = alternate(steps, batch, args, device)
    ratios = [r["open_clip"] / r["ours"] for r in rounds]
    rate = {name: args.batch_size * len(t) / sum(t) for name, t in times.items()}
    ms = {name: statistics.median(1000 * x for x in t) for name, t in times.items()}
    print(f"bench {args.method} {args.model} vs open_clip | {device_label(device)} | batch {args.batch_size} | "
          f"ours {rate['ours']:.1f} samples/s ({ms['ours']:.1f} ms median), open_clip {rate['open_clip']:.1f} "
          f"samples/s ({ms['open_clip']:.1f} ms) | ours/open_clip {rate['ours'] / rate['open_clip']:.3f} "
          f"(rounds {min(ratios):.3f}-{max(ratios):.3f}) | {len(rounds)} rounds × {args.steps // len(rounds)} steps "
          f"each | {step_memory(device)} (both) | {command(args)}")
    for name in ("ours", "open_clip"):
        print(f"# {name}: {throughput(step_flops(c, batch), rate[name], peak_tflops(device))}")
    if args.profile:
        for name, step in steps.items():
            print(f"# profile of {name}")
            profile_steps(step, batch, 3, device)
    return rate["ours"] / rate["open_clip"]


# -----------------------------------------------------------------------------
# the input pipeline: JPEG decoding + the method's transform

def decode(path, decoder):
    if decoder == "pil":
        with Image.open(path) as img:
            return img.convert("RGB")
    return data.load_image(path)  # torchvision.io: a (3, H, W) uint8 tensor, what data.py's datasets return


class JpegFolder(torch.utils.data.Dataset):
    def __init__(self, paths, transform, decoder):
        self.paths, self.transform, self.decoder = paths, transform, decoder

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):  # the v2 transforms take a PIL image or a uint8 tensor alike
        return self.transform(decode(self.paths[i], self.decoder), CAPTIONS[i % len(CAPTIONS)])


def make_jpegs(n, folder, w=500, h=375):
    """n photo-like JPEGs of COCO's usual 500×375 (smooth colour field + shapes + sensor-like noise, quality 90): about
    the file size and decoding cost of COCO's images; flat synthetic images would decode unrealistically fast."""
    import numpy as np
    from PIL import ImageDraw

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        field = Image.fromarray(rng.integers(0, 256, (h // 32 + 2, w // 32 + 2, 3), dtype=np.uint8))
        image = field.resize((w, h), Image.BICUBIC)
        draw = ImageDraw.Draw(image)
        for _ in range(8):
            x, y, r = rng.integers(0, w), rng.integers(0, h), rng.integers(10, h // 3)
            draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, 10, (h, w, 3))
        Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(os.path.join(folder, f"{i:06d}.jpg"), quality=90)
    kb = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)) / 1024 / max(1, len(os.listdir(folder)))
    print(f"wrote {n} {w}x{h} JPEGs to {folder} ({kb:.0f} KiB each on average)")


def bench_data(args):
    paths = sorted(os.path.join(args.data_dir, f) for f in os.listdir(args.data_dir)
                   if f.lower().endswith((".jpg", ".jpeg")))
    if not paths:
        sys.exit(f"error: no .jpg files in {args.data_dir} (make some with --make-jpegs 200 {args.data_dir})")
    Method = importlib.import_module(args.method).Method
    method = Method(create_model(args.model), **train.parse_kwargs(args.method_args))
    transform = method.transform(data.get_tokenizer("clip"))
    R = method.model.image_resolution
    decoders = args.decoders.split(",")
    names = {"pil": "PIL", "tvio": "torchvision.io"}
    print(f"# {len(paths)} JPEGs in {args.data_dir}, {args.method} transform at {R} px | "
          f"load average {os.getloadavg()[0]:.2f}")

    # one thread, per image: where the time goes
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    sample = paths[:50]
    cost = {}
    for decoder in decoders:
        for p in sample[:5]:  # warm up: the first decodes and transforms pay one-off set-up costs
            transform(decode(p, decoder), CAPTIONS[0])
        t0 = time.perf_counter()
        images = [decode(p, decoder) for p in sample]
        t1 = time.perf_counter()
        for image in images:
            transform(image, CAPTIONS[0])
        t2 = time.perf_counter()
        cost[decoder] = (1000 * (t1 - t0) / len(sample), 1000 * (t2 - t1) / len(sample))
    torch.set_num_threads(threads)
    print("# per image, 1 thread: " + "; ".join(f"{names[d]} decode {a:.2f} ms + transform {b:.2f} ms"
                                                 for d, (a, b) in cost.items()))

    counts = [int(w) for w in args.workers.split(",")]
    counts = list(range(1, counts[0] + 1)) if len(counts) == 1 else counts
    for decoder in decoders:
        parts = []
        for workers in counts:
            loader = torch.utils.data.DataLoader(JpegFolder(paths, transform, decoder), batch_size=16,
                                                 num_workers=workers, persistent_workers=True, prefetch_factor=4)
            for _ in loader:  # one untimed pass: worker start-up, page cache
                pass
            t0 = time.perf_counter()
            for _ in range(2):  # timed passes
                for _ in loader:
                    pass
            rate = 2 * len(paths) / (time.perf_counter() - t0)
            parts.append(f"{workers} worker{'s' * (workers > 1)} {rate:.1f} images/s ({rate / workers:.1f} per worker)")
            del loader
        print(f"data {args.method} {R}px {names[decoder]} | {len(paths)} JPEGs × 2 passes | "
              f"{' | '.join(parts)} | {command(args)}")


def pack_shards(paths, folder, per_shard):
    """The JPEGs as tar shards in img2dataset's layout (KEY.jpg, KEY.txt), per_shard to a shard."""
    shards = []
    for first in range(0, len(paths), per_shard):
        shards.append(os.path.join(folder, f"{len(shards):05d}.tar"))
        with tarfile.open(shards[-1], "w") as tar:
            for i, path in enumerate(paths[first:first + per_shard], start=first):
                tar.add(path, arcname=f"{i:09d}.jpg")
                caption = CAPTIONS[i % len(CAPTIONS)].encode()
                info = tarfile.TarInfo(f"{i:09d}.txt")
                info.size = len(caption)
                tar.addfile(info, io.BytesIO(caption))
    return shards


def cpu_seconds(pids):
    """User + system CPU time of these processes so far (Linux)."""
    ticks = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            ticks += sum(map(int, f.read().rpartition(")")[2].split()[11:13]))  # utime, stime: fields 14 and 15
    return ticks / os.sysconf("SC_CLK_TCK")


def read_costs(paths, shards, rounds=5):
    """Median µs per image to read its bytes: as a file, from the shards with data.tar_samples, and from the shards
    with the standard library's tarfile (which webdataset uses), the reader data.py does not use."""
    def files():
        for path in paths:
            with open(path, "rb") as f:
                f.read()

    def ours():
        for shard in shards:
            for _ in data.tar_samples(shard):
                pass

    def standard():
        for shard in shards:
            with tarfile.open(shard, "r|") as tar:
                for member in tar:
                    tar.extractfile(member).read()

    readers = {"files": files, "shards (data.tar_samples)": ours, "shards (tarfile)": standard}
    times = {name: [] for name in readers}
    for _ in range(rounds):
        for name, read in readers.items():
            t0 = time.perf_counter()
            read()
            times[name].append(1e6 * (time.perf_counter() - t0) / len(paths))
    return [(name, statistics.median(t)) for name, t in times.items()]


def bench_shards(args, chunk=16):
    """Images/s of train.py's two input paths on the same JPEGs: files read by index (data.Seeded over
    data.ImageCaptions, data.Batches), and the same bytes packed into tar shards, streamed (data.ShardStream). Both
    decode with torchvision.io and apply the method's transform, seeded per sample, in the same DataLoader set-up, and
    each worker hands over `chunk` images at a time: a file worker makes whole batches and a shard reader its part of
    each batch, so this keeps equal the work that each loader's workers prefetch, part of which they do while the
    other loader is timed. Besides images/s of wall time, images per second of the workers' own CPU time (from
    /proc), which other processes on a shared machine disturb less."""
    paths = sorted(os.path.join(args.data_dir, f) for f in os.listdir(args.data_dir) if f.lower().endswith(".jpg"))
    counts = [int(w) for w in args.workers.split(",")]
    counts = list(range(1, counts[0] + 1)) if len(counts) == 1 else counts
    if len(paths) < args.shard_size * max(counts):
        sys.exit(f"error: {len(paths)} .jpg files in {args.data_dir} make fewer than one shard of {args.shard_size} "
                 f"per worker (make more with --make-jpegs, or lower --shard-size)")

    Method = importlib.import_module(args.method).Method
    method = Method(create_model(args.model), **train.parse_kwargs(args.method_args))
    transform = method.transform(data.get_tokenizer("clip"))
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(len(paths))]
    print(f"# {len(paths)} JPEGs in {args.data_dir}, {args.method} transform at {method.model.image_resolution} px, "
          f"{chunk} images per worker output | load average {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory() as folder:
        shards = pack_shards(paths, folder, args.shard_size)
        costs = read_costs(paths, shards)
        print("# reading only, per image: " + ", ".join(f"{name} {us:.0f} us" for name, us in costs))
        for workers in counts:
            sources = {
                "files": dict(dataset=data.Seeded(data.ImageCaptions(paths, captions), transform, 0, chunk),
                              collate_fn=data.collate,
                              batch_sampler=data.Batches(len(paths), chunk, 0, 1, 0, 0)),
                "shards": dict(dataset=data.ShardStream(shards, transform, 0, workers, 0, [chunk] * workers),
                               batch_size=None)}
            loaders = {name: iter(torch.utils.data.DataLoader(**source, num_workers=workers, persistent_workers=True,
                                                             prefetch_factor=4)) for name, source in sources.items()}

            def rates(loader, n):  # both streams are endless: time n images from where they stand
                pids = [worker.pid for worker in loader._workers]  # the DataLoader's worker processes
                t0, cpu0, seen = time.perf_counter(), cpu_seconds(pids), 0
                while seen < n:
                    seen += len(next(loader)["image"])
                tick = 1 / os.sysconf("SC_CLK_TCK")  # the resolution of /proc's CPU times
                return seen / (time.perf_counter() - t0), seen / max(tick, cpu_seconds(pids) - cpu0)

            for loader in loaders.values():  # untimed: worker start-up, the page cache, the shards' first blocks
                rates(loader, len(paths))
            wall, cpu = {"files": [], "shards": []}, {"files": [], "shards": []}
            for r in range(args.rounds):
                for name in (("files", "shards") if r % 2 == 0 else ("shards", "files")):  # ABBA, as --vs-open-clip
                    for into, rate in zip((wall, cpu), rates(loaders[name], args.passes * len(paths))):
                        into[name].append(rate)
            parts = []
            for what, per_worker, rate in (("images/s", workers, wall), ("images per worker CPU-second", 1, cpu)):
                ratios = [b / a for a, b in zip(rate["files"], rate["shards"])]
                a, b = (statistics.median(rate[name]) / per_worker for name in ("files", "shards"))
                parts.append(f"{what}{' per worker' * (per_worker > 1)}: files {a:.1f}, shards {b:.1f}, "
                             f"shards/files {statistics.median(ratios):.3f} (rounds {min(ratios):.3f}-"
                             f"{max(ratios):.3f})")
            print(f"data {args.method} files vs shards | {workers} worker{'s' * (workers > 1)} | {' | '.join(parts)} | "
                  f"{args.rounds} rounds × {args.passes * len(paths)} images each | {command(args)}")
            del loaders


# -----------------------------------------------------------------------------
# loss memory per rank: our distributed CLIP and SigLIP losses against the all-gather N×N versions

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


def process_memory(field):
    """MiB of this process from /proc/self/status (Linux): VmRSS now, VmHWM the peak since the last reset."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def peak_memory(fn, device):
    """MiB allocated at the peak of fn() beyond what was allocated before it. CUDA: the caching allocator's own
    counters. CPU (Linux, glibc): the process's peak resident memory, reset through /proc/self/clear_refs, with
    every allocation of 64 KiB or more mapped and unmapped on its own (mallopt M_MMAP_THRESHOLD) and malloc's free
    memory returned (malloc_trim), so that the resident peak is the peak of live tensors."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - start) / 2 ** 20
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD = 64 KiB (and no dynamic raising of it)
    libc.malloc_trim(0)  # memory freed earlier, still in malloc's heap, goes back too: reused, it counts again
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    start = process_memory("VmRSS")
    fn()
    return process_memory("VmHWM") - start


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


def bench_loss_memory(args):
    """Forward + backward of each loss on random (B, D) features per rank: ours, open_clip's (when installed) and the
    all-gather N×N version; prints one line per method with the worst rank's peak and the global loss of each."""
    distributed = "RANK" in os.environ  # under torchrun
    cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
    if distributed:
        dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    elif not os.path.exists("/proc/self/clear_refs"):
        sys.exit("error: --loss-memory on a CPU needs Linux (/proc/self) and glibc; use a GPU elsewhere")
    if args.batch_size % world:
        sys.exit(f"error: --batch-size {args.batch_size} must be divisible by the {world} ranks")
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
            if distributed:
                dist.all_reduce(mib, op=dist.ReduceOp.MAX)  # the worst rank
                dist.all_reduce(loss)
                loss /= world  # a rank's loss covers its rows (ours, open_clip) or all rows (N×N): the mean is global
            results[variant] = (mib.item(), loss.item())
        if rank == 0:
            naive = results["all-gather N×N"][0]
            parts = [f"{v} {mib:.0f} MiB" + (f" ({naive / max(mib, 1e-9):.1f}× less)" if mib != naive else "")
                     for v, (mib, _) in results.items()]
            launcher = f"torchrun --nproc_per_node={world} bench.py " if distributed else "python bench.py "
            device_name = f"{torch.cuda.get_device_name(device)} nccl" if cuda else "cpu gloo" if distributed else "cpu"
            print(f"loss-memory {name} | {device_name}, {world} rank{'s' * (world > 1)} | N {N} = {world} × {B}, "
                  f"D {D} | peak per rank, forward + backward: {', '.join(parts)}; {note}, "
                  f"N×N logits {N * N * logit_mib:.0f} MiB | global loss "
                  f"{', '.join(f'{v} {loss:.6f}' for v, (_, loss) in results.items())} | "
                  f"{launcher}{shlex.join(args.argv)}", flush=True)
    if distributed:
        dist.destroy_process_group()


def main(argv=None):
    args = get_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)  # quoted in the summary lines
    if args.make_jpegs:
        n, folder = args.make_jpegs
        make_jpegs(int(n), folder, *(int(x) for x in args.jpeg_size.lower().split("x")))
    elif args.data_dir and args.vs_shards:
        bench_shards(args)
    elif args.data_dir:
        bench_data(args)
    elif args.loss_memory:
        bench_loss_memory(args)
    else:
        return bench_step(args)


if __name__ == "__main__":
    main()
