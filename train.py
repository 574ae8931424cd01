"""
Train a language-image model with any of the five methods. One file, no framework.

    python train.py                                         # CLIP, tiny ResNet, built-in synthetic data, CPU or GPU
    python train.py --method siglip --model ViT-B-32 --data coco --data-dir /data/coco --batch-size 256
    torchrun --nproc_per_node=8 train.py --method slip --model ViT-B-16 --data coco --data-dir /data/coco
    torchrun --nproc_per_node=8 train.py --model ViT-B-32 --data '/data/cc3m/{00000..00331}.tar' --workers 6

The method (clip.py, siglip.py, slip.py, declip.py, filip.py) is chosen by module name and plugs in through the
interface documented in clip.py: its views of each sample, its loss, its extra heads, its optimiser defaults.

Batch sizes: --batch-size is the global batch of one optimiser step, and the loss is always the loss of that whole
batch. Each of the W ranks runs --grad-accum micro-batches of batch_size / (W · grad_accum) samples through the
encoders, and the loss sees them all (exact accumulation, see forward_backward): one GPU trains with the paper's
batch, e.g. SLIP's 4,096 pairs, as 32 micro-batches of 128:

    python train.py --method slip --model ViT-B-16 --batch-size 4096 --grad-accum 32 --grad-checkpointing
"""

import argparse
import ast
import importlib
import inspect
import json
import math
import os
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import eval_zeroshot
from model import CONFIGS, CLIPModel, VisionTransformer, frozen_batchnorm_statistics

METHODS = ("clip", "siglip", "slip", "declip", "filip", "defilip")


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="clip", choices=METHODS)
    p.add_argument("--method-args", default="", help="the method's constructor arguments, e.g. mlp_dim=512,queue_size=4096")
    p.add_argument("--model", default="tiny-rn", help="a config of model.py: " + ", ".join(CONFIGS))
    p.add_argument("--data", default="synthetic", help="synthetic | coco | path to a .csv/.tsv of image paths and "
                                                     "captions | tar shards: a folder, 'dir/{00000..00331}.tar', a::b")
    p.add_argument("--data-dir", default=None, help="COCO root (train2017/, val2017/, annotations/) or image root for a csv")
    p.add_argument("--csv-img-key", default=None, help="the csv's image-path column (default: filepath, image, "
                                                       "image_path or file_name)")
    p.add_argument("--csv-caption-key", default=None, help="the csv's caption column (default: title, caption or "
                                                          "text); for tar shards, the json field holding captions "
                                                          "(default: the txt member, else json's caption)")
    p.add_argument("--csv-separator", default=None, help="the csv's separator (default: a tab for .tsv, a comma "
                                                        "otherwise; \\t is a tab)")
    p.add_argument("--batch-size", type=int, default=128, help="global batch per optimiser step")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step; the loss and gradients stay "
                                                             "those of the whole batch (see the docstring)")
    p.add_argument("--grad-checkpointing", action="store_true",
                   help="keep only each transformer block's and ResNet stage's input for the backward, recompute the rest")
    p.add_argument("--patch-dropout", type=float, default=0.0,
                   help="training only: a ViT keeps a random (1 - P) of its patch tokens (FLIP); 0.5 halves its cost")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the method's)")
    p.add_argument("--weight-decay", type=float, default=None, help="(default: the method's)")
    p.add_argument("--warmup", type=int, default=None, help="linear warmup steps (default: 10%% of --steps, at most 10k)")
    p.add_argument("--grad-clip", type=float, default=0.0, help="clip the gradient norm (0: off)")
    p.add_argument("--freeze-patch-embed", action="store_true",
                   help="keep a ViT's patch-embedding conv at its random init (the DeCLIP benchmark does, for every method)")
    p.add_argument("--tokenizer", default="clip", help="clip (OpenAI's BPE) or a tiktoken encoding name")
    p.add_argument("--shuffle-buffer", type=int, default=2000, help="tar shards: each reader shuffles blocks of "
                                                                       "this many samples")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers per rank (default: the cores "
                                                          "available per rank less one, at most 8)")
    p.add_argument("--out-dir", default="out")
    p.add_argument("--resume", nargs="?", const="auto", default=None, help="continue from --out-dir/ckpt.pt or a path")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="--resume from a checkpoint that holds Python objects besides tensors (this can run its code)")
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--log-every", type=int, default=10, help="console print interval (the JSON log gets every step)")
    p.add_argument("--eval-every", type=int, default=0, help="evaluate --eval-dataset every k steps and at the end, "
                                                              "logged to log.jsonl")
    p.add_argument("--eval-dataset", default=None, help="any --dataset of eval_zeroshot.py: synthetic, "
                   "synthetic-retrieval, cifar10, cifar100, stl10, imagenet, folder, coco, coco-5k, flickr30k or a "
                   ".csv/.tsv (default: synthetic, when training on it)")
    p.add_argument("--eval-data-dir", default=None, help="the --data-dir of --eval-dataset")
    p.add_argument("--eval-size", type=int, default=1000, help="held-out images per synthetic zero-shot task")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    args = p.parse_args(argv)
    if args.steps < 1:
        fail(f"--steps must be at least 1 (got {args.steps})")

    # checked here, so that a bad value stops with one line before anything is built
    least = dict(batch_size=1, grad_accum=1, save_every=1, log_every=1, weight_decay=0, warmup=0, grad_clip=0,
                 workers=0, eval_every=0, eval_size=0, shuffle_buffer=1)
    for flag, low in least.items():
        value = getattr(args, flag)
        if value is not None and not value >= low:  # "not >=" so that NaN fails too
            fail(f"--{flag.replace('_', '-')} must be {low} or more (got {value})")
    # AdamW moves each weight by about lr per step whatever the gradient's scale, so an lr above 1 overwrites the
    # weights at every step (these methods use 5e-4 to 3e-3; 1e38 even overflows float32 inside AdamW)
    if args.lr is not None and not 0 < args.lr <= 1:
        fail(f"--lr must be above 0 and at most 1 (got {args.lr:g}); these methods train with 5e-4 to 3e-3")
    if not 0 <= args.patch_dropout < 1:
        fail(f"--patch-dropout must be at least 0 and below 1 (got {args.patch_dropout}); FLIP drops 0.5 to 0.75")
    # the loss contrasts the batch's pairs with each other: a single pair has no negatives (CLIP's loss is then
    # exactly 0 and nothing is learned) and no batch statistics for SLIP's and DeCLIP's BatchNorm
    if args.batch_size < 2:
        fail(f"--batch-size {args.batch_size}: contrastive losses need at least 2 image-text pairs per batch (each "
             f"pair's negatives are the other pairs; with 1, CLIP's loss is 0 and nothing is learned)")
    return args


def fail(message):
    sys.exit("error: " + " ".join(str(message).split()))  # one line, whatever the message


def parse_kwargs(text):
    """'a=1,b=0.5,c=name' -> {'a': 1, 'b': 0.5, 'c': 'name'}"""
    kwargs = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            fail(f"--method-args: expected key=value, got '{item}'")
        try:
            kwargs[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            kwargs[key.strip()] = value.strip()
    return kwargs


def lr_at(step, peak, warmup, total):
    """Linear warmup from 0, then cosine to 0."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def forward_backward(method, train_model, batches, seed, autocast=nullcontext(), no_sync=nullcontext):
    """The loss of the whole local batch, given as K micro-batches, with its gradients added to the parameters' .grad
    -> (loss, logs). train_model is the method, maybe compiled or wrapped in DDP (whose no_sync is `no_sync`).
    Micro-batch i draws its in-model randomness (patch dropout) after torch.manual_seed(seed + i), in every pass.

    K = 1: the plain step, loss.backward(). K > 1: GradCache (Gao et al. 2021), exact for every method:
      1. each micro-batch's features (method.features: encoders and per-sample heads), without a graph, so that
         only one micro-batch's activations are alive at a time;
      2. the loss of the whole batch on those features (method.loss: contrastive terms, BatchNorm heads, the queue,
         all see every sample, once per step), and its gradients with respect to the features, made leaves, and to
         the loss's own parameters (temperature, heads);
      3. each micro-batch's features again, now with a graph (same random draws, so the same features), and the
         backward of its rows of those gradients; the last micro-batch also hands over the loss parameters'
         gradients, so that the one backward DDP synchronises (the others run under no_sync) reaches them all.
    Step 3 repeats step 1's forward: 4/3 of the plain step's compute. open_clip's --accum-freq caches features in the
    same way, but recomputes the whole batch's loss for every micro-batch and draws new patch-dropout masks in its
    second pass. The one thing in the features that is not per sample: a ResNet encoder's own BatchNorm, which
    normalises each micro-batch with that micro-batch's statistics (as open_clip), counted once (in step 1)."""
    if len(batches) == 1:
        torch.manual_seed(seed)
        with autocast:
            loss, logs = train_model(batches[0])
        loss.backward()
        return loss.detach(), logs

    with torch.no_grad(), autocast:  # 1.
        parts = []
        for i, batch in enumerate(batches):
            torch.manual_seed(seed + i)
            parts.append(method.features(batch))
    features = {key: torch.cat([part[key] for part in parts]) for key in parts[0]}
    leaves = {key: f.requires_grad_() for key, f in features.items() if f.is_floating_point()}

    with autocast:  # 2.
        loss, logs = method.loss(features)
    params = {name: p for name, p in method.named_parameters() if p.requires_grad}
    grads = torch.autograd.grad(loss, [*leaves.values(), *params.values()], allow_unused=True)
    feature_grads = {key: g for key, g in zip(leaves, grads) if g is not None}
    param_grads = {name: g for name, g in zip(params, grads[len(leaves):]) if g is not None}

    start = 0  # 3.
    for i, (batch, part) in enumerate(zip(batches, parts)):
        rows = slice(start, start + len(next(iter(part.values()))))
        start = rows.stop
        last = i == len(batches) - 1
        torch.manual_seed(seed + i)
        # the running statistics of a ResNet's BatchNorm already counted this micro-batch in step 1
        with (nullcontext() if last else no_sync()), frozen_batchnorm_statistics(method), autocast:
            surrogate = train_model(batch, {key: g[rows] for key, g in feature_grads.items()},
                                    param_grads if last else None)
        surrogate.backward()
    return loss.detach(), logs


def wrap_ddp(method, device):
    """DistributedDataParallel around the method. Its buffers stay per rank: DeCLIP's queue holds the rank's own
    captions and must not be overwritten with rank 0's at every forward (torch 2.14 calls that forward_sync_buffers
    and warns about the older broadcast_buffers, the only name earlier releases know)."""
    buffer_flag = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters else \
        "broadcast_buffers"
    return DDP(method, device_ids=[device] if device.startswith("cuda") else None,
               find_unused_parameters=method.find_unused_parameters, **{buffer_flag: False})


def save_checkpoint(path, method, optimizer, step, meta):
    # "model" is the OpenAI layout (loadable by OpenAI's and open_clip's code); "method" holds the method's own state.
    # Tensors and plain Python values only, so that it loads with torch.load(weights_only=True).
    model_state = method.model.state_dict()
    method_state = {k: v for k, v in method.state_dict().items() if not k.startswith("model.")}
    checkpoint = dict(model=model_state, method=method_state, optimizer=optimizer.state_dict(), step=step, **meta)
    try:  # through a Python file, whose errors keep their errno (torch's own writer reports a full disk as
        # "enforce fail ... unexpected pos")
        with open(path, "wb") as f:
            torch.save(checkpoint, f)
    except OSError as e:
        if os.path.lexists(path):
            os.remove(path)
        fail(f"could not write {path}: {(e.strerror or str(e)).lower()}; removed the partial file")


def rank_state(method, lanes, distributed, world):
    """What differs between ranks, gathered on rank 0 for its checkpoint: each rank's buffers (DeCLIP's queue holds
    the rank's own captions; a ResNet's BatchNorm statistics are per rank) when there are several, and where every
    reader of a shard stream stands, in the order of the lanes: (buffers of each rank or None, positions); (None,
    None) on the other ranks."""
    names = dict(method.named_buffers())
    mine = ({k: v.cpu() for k, v in method.state_dict().items() if k in names}, lanes)
    ranks = [mine]
    if distributed:
        ranks = [None] * world if dist.get_rank() == 0 else None
        dist.gather_object(mine, ranks)
    if ranks is None:
        return None, None
    positions = [position for _, lanes in ranks for _, position in sorted(lanes.items())]
    return ([buffers for buffers, _ in ranks] if world > 1 else None), positions


def finite(method, optimizer, device):
    """Whether every parameter, buffer and optimiser state tensor is finite: a 0-d tensor on `device`, for one sync
    (AdamW keeps its step counts on the CPU unless fused)."""
    tensors = list(method.state_dict().values())
    tensors += [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    return torch.stack([torch.isfinite(t).all().to(device) for t in tensors if t.is_floating_point()]).all()


def keep_log(path, step):
    """Keep the log's lines of steps up to `step`: a resumed run logs the steps after its checkpoint again, a fresh
    run (step 0) starts a new log."""
    if not os.path.exists(path):
        return
    with open(path) as f:  # a run killed while writing leaves a last line without its newline
        lines = [line for line in f if line.endswith("\n") and json.loads(line)["step"] <= step]
    with open(path, "w") as f:
        f.writelines(lines)


def main(argv=None):
    args = get_args(argv)

    # --- distributed setup: torchrun sets RANK, LOCAL_RANK, WORLD_SIZE -------------------------------------------
    distributed = "RANK" in os.environ
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        fail(f"--device {device}: no CUDA device is available to this process; use --device cpu")
    if distributed:
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if device == "cuda":
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(device)
    else:
        rank, world = 0, 1
    master = rank == 0
    print0 = print if master else (lambda *a, **k: None)
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.batch_size % (world * args.grad_accum):
        fail(f"--batch-size {args.batch_size} must be divisible by world size × --grad-accum = {world * args.grad_accum}")
    micro = args.batch_size // (world * args.grad_accum)
    if args.workers is None:
        args.workers = data.default_workers(int(os.environ.get("LOCAL_WORLD_SIZE", 1)))

    # --- method, model, data -------------------------------------------------------------------------------------
    Method = importlib.import_module(args.method).Method
    if args.model not in CONFIGS:
        fail(f"unknown model '{args.model}'; choose one of: {', '.join(CONFIGS)}")
    try:
        tokenizer = data.get_tokenizer(args.tokenizer)
        model_config = dict(CONFIGS[args.model], vocab_size=tokenizer.vocab_size)  # other tokenizers resize the table
        shards = data.shard_list(args.data)  # None unless --data names tar shards, which are streamed
        dataset = shards or data.make_dataset(args.data, args.data_dir, "train", model_config["image_resolution"],
                                              img_key=args.csv_img_key, caption_key=args.csv_caption_key,
                                              sep=args.csv_separator)
    except (ValueError, FileNotFoundError, OSError) as e:
        fail(e)
    rank_readers = max(1, args.workers)  # a rank without workers reads in its main process
    readers = world * rank_readers if shards else None  # a shard stream's lanes (data.ShardStream)
    if shards and micro < rank_readers:
        fail(f"--workers {args.workers}: each DataLoader worker reads its own shards and adds at least one sample to "
             f"each batch of {micro} per rank; use at most {micro} workers")
    if shards and len(shards) < readers:
        fail(f"{len(shards)} shards for {readers} readers ({world} ranks × {rank_readers} workers): each reader needs "
             f"a shard of its own; use fewer --workers")
    torch.manual_seed(args.seed)
    if args.patch_dropout and not isinstance(model_config["vision_layers"], int):
        fail(f"--patch-dropout: {args.model} is a ResNet, which has no patch tokens")
    model = CLIPModel(**model_config, patch_dropout=args.patch_dropout)  # not in model_config: evaluation sees all
    if args.grad_checkpointing:
        model.set_grad_checkpointing()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(Method.defaults["logit_scale_init"]))
    if args.freeze_patch_embed:
        if not isinstance(model.visual, VisionTransformer):
            fail(f"--freeze-patch-embed: {args.model} is a ResNet, which has no patch embedding")
        model.visual.conv1.weight.requires_grad_(False)  # so no optimiser group holds it (Method.param_groups)
    method_kwargs = parse_kwargs(args.method_args)
    try:
        method = Method(model, **method_kwargs).to(device)
    except TypeError as e:
        fail(f"--method-args: {e}")
    meta = dict(config=vars(args), model_config=model_config, method_kwargs=method_kwargs)  # what eval needs to rebuild
    evals = None  # --eval-every's tasks, read now: a bad path stops here, not after hours of training
    if args.eval_every or args.eval_dataset:
        name = args.eval_dataset or ("synthetic" if args.data == "synthetic" else None)
        if name is None:
            fail(f"--eval-every: name what to evaluate with --eval-dataset (and --eval-data-dir) when training on "
                 f"{args.data}, e.g. --eval-dataset coco --eval-data-dir {args.data_dir or 'DIR'}")
        evals = eval_zeroshot.prepare(name, args.eval_data_dir, model_config["image_resolution"], size=args.eval_size)

    # --- optimiser: AdamW with the method's settings for this encoder, weight decay where the method's rule says ----
    hp = Method.optimizer_defaults(model_config)
    lr, lr_source = (args.lr, "--lr") if args.lr is not None else Method.learning_rate(args.batch_size)
    weight_decay = args.weight_decay if args.weight_decay is not None else hp["weight_decay"]
    warmup = args.warmup if args.warmup is not None else min(10_000, args.steps // 10)
    optimizer = torch.optim.AdamW(Method.param_groups(method, weight_decay), lr=lr, betas=hp["betas"], eps=hp["eps"],
                                  fused=device.startswith("cuda"))

    # --- resume ----------------------------------------------------------------------------------------------------
    os.makedirs(args.out_dir, exist_ok=True)
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    start_step = 0
    on_disk = None  # the step ckpt.pt holds, once this run has one there
    stream_start = None  # where a shard stream's readers start: [(epoch, shard, sample, taken)] (data.ShardStream)
    own_buffers = None  # this rank's buffers when the checkpoint holds every rank's
    if args.resume:
        path = ckpt_path if args.resume == "auto" else args.resume
        checkpoint = eval_zeroshot.read_checkpoint(path, args.trust_checkpoint)
        if not (isinstance(checkpoint, dict) and "config" in checkpoint and "step" in checkpoint):
            fail(f"{path} is not a checkpoint of train.py (it has no config and step to resume from)")
        if checkpoint["config"]["method"] != args.method or checkpoint["config"]["model"] != args.model:
            c = checkpoint["config"]
            fail(f"{path} was trained with --method {c['method']} --model {c['model']}; pass those to resume it")
        try:
            method.load_state_dict({**{"model." + k: v for k, v in checkpoint["model"].items()}, **checkpoint["method"]})
            decays = [group["weight_decay"] for group in optimizer.param_groups]
            optimizer.load_state_dict(checkpoint["optimizer"])
        except (RuntimeError, ValueError) as e:
            fail(f"{path} does not fit this run's --method-args, --tokenizer or --freeze-patch-embed: {e}")
        for group, decay in zip(optimizer.param_groups, decays):  # this run's flags, as for the lr schedule
            group["weight_decay"] = decay
        start_step = checkpoint["step"]
        stream = checkpoint.get("stream")
        if shards and stream:
            if (stream["readers"], stream["shards"]) != (readers, len(shards)):
                fail(f"{path} streamed {stream['shards']} shards with {stream['readers']} readers (ranks × workers), "
                     f"this run {len(shards)} with {readers}: pass the same --data and --workers on as many ranks")
            stream_start = stream["lanes"]
        if len(checkpoint.get("rank_buffers") or ()) == world:  # this rank's own, where they differ (DeCLIP's queue)
            own_buffers = checkpoint["rank_buffers"][rank]
        if start_step >= args.steps:
            fail(f"{path} already trained {start_step} steps; pass a larger --steps to train on")
        if os.path.abspath(path) == os.path.abspath(ckpt_path):
            on_disk = start_step
        print0(f"resumed from {path} at step {start_step}")

    transform = method.transform(tokenizer)
    if shards:  # this rank's readers give micro // rank_readers samples (or one more) to each micro-batch
        sizes = [micro // rank_readers + (i < micro % rank_readers) for i in range(rank_readers)]
        source = dict(batch_size=None, dataset=data.ShardStream(
            shards, transform, args.seed, readers, rank * rank_readers, sizes, args.shuffle_buffer, stream_start,
            args.csv_caption_key))
    else:
        source = dict(dataset=data.Seeded(dataset, transform, args.seed, micro * world), collate_fn=data.collate,
                      batch_sampler=data.Batches(len(dataset), micro, rank, world, args.seed, start_step * args.grad_accum))
    loader = torch.utils.data.DataLoader(
        **source,
        num_workers=args.workers,
        pin_memory=device.startswith("cuda"),
        persistent_workers=args.workers > 0,
        prefetch_factor=4 if args.workers > 0 else None,
    )
    batches = data.join(iter(loader), rank_readers, device) if shards else iter(loader)
    lanes = {}  # this rank's readers: where each stands after the batches taken so far

    train_model = method
    if distributed:
        train_model = wrap_ddp(method, device)
        if own_buffers:  # after DDP, which copies rank 0's buffers to every rank when it starts
            method.load_state_dict(own_buffers, strict=False)
    if args.compile:
        train_model = torch.compile(train_model)  # compiling DDP lets it split the graph at its gradient buckets
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else nullcontext()

    n_params = sum(p.numel() for p in method.parameters())
    print0(f"{args.method} | {args.model} ({n_params / 1e6:.1f}M params) | "
           f"{args.data}: {len(dataset)} {'shards' if shards else 'samples'} | "
           f"{world} rank(s) on {device} | batch {args.batch_size} = {world} × {args.grad_accum} × {micro} | "
           f"lr {lr:.3g} ({lr_source}) wd {weight_decay:g} warmup {warmup} | {args.steps} steps")

    # --- training loop ---------------------------------------------------------------------------------------------
    # A checkpoint on disk is always one training can continue from. Finite weights are not enough for that: one huge
    # step (--lr 1e6) leaves finite weights of ~1e6 from which every loss is NaN. So a checkpoint is written to
    # ckpt.pt.tmp, and becomes ckpt.pt once the next step's loss, computed from exactly those weights, is finite (the
    # last one of the run, with no next step, once its weights and losses are). A .tmp found at start is either a
    # killed save or one never vouched for: not a checkpoint.
    tmp_path = ckpt_path + ".tmp"
    written = None  # the step held by ckpt.pt.tmp
    log_path = os.path.join(args.out_dir, "log.jsonl")
    if master:
        if os.path.lexists(tmp_path):
            os.remove(tmp_path)
        keep_log(log_path, start_step)  # one line per step
    log_file = open(log_path, "a") if master else None

    def stop(reason):
        if master:
            log_file.close()
            if written is not None:
                os.remove(tmp_path)
        kept = f"{ckpt_path} holds step {on_disk}" if on_disk is not None else "no checkpoint was written"
        fail(f"{reason}; stopped, {kept}. Lower --lr or add --grad-clip 1.0, then "
             + ("--resume." if on_disk is not None else "start again."))

    pending = []  # per-step logs kept on device and synced once per --log-every (no per-step host sync)
    bad_files, new_bad, reads, failed = {}, {}, 0, 0  # unreadable images: all ranks' {path: reason}, this rank's new
    t_last = time.perf_counter()
    for step in range(start_step, args.steps):
        step_lr = lr_at(step, lr, warmup, args.steps)
        for group in optimizer.param_groups:
            group["lr"] = step_lr
        micro_batches = []
        for _ in range(args.grad_accum):
            try:
                batch = next(batches)
            except data.UnreadableImages as e:  # from a worker it arrives in the worker's traceback: its last line
                if log_file:
                    log_file.close()
                fail(str(e).strip().splitlines()[-1].removeprefix("data.UnreadableImages: "))
            bad = batch.pop("bad")
            lanes.update(batch.pop("lanes", ()))
            new_bad.update(bad)
            reads, failed = reads + micro + len(bad), failed + len(bad)
            # all K micro-batches stay on the device for forward_backward's two passes (as open_clip's --accum-freq)
            micro_batches.append({k: v.to(device, non_blocking=True) for k, v in batch.items()})
        # in-model randomness (patch dropout) is resumable too: seeded per (step, rank, micro-batch), distinct for up
        # to 1009 ranks and micro-batches
        seed = ((args.seed * 1_000_003 + step) * 1009 + rank) * 1009 % 2**62
        loss, logs = forward_backward(method, train_model, micro_batches, seed, autocast,
                                      train_model.no_sync if distributed else nullcontext)
        step_logs = torch.stack([loss.float()] + [v.float() for v in logs.values()])
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(method.parameters(), args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        method.post_step()
        pending.append(step_logs)

        done = step + 1
        if (done == start_step + 1 or done % args.log_every == 0 or done == args.steps or done % args.save_every == 0
                or written == step):
            values = torch.stack(pending)  # (steps, 1 + components)
            mine = (new_bad, reads, failed)
            news = [mine]
            if distributed:
                dist.all_reduce(values)
                values /= world
                news = [None] * world
                dist.all_gather_object(news, mine)  # on all ranks, so that all of them stop together
            values = values.tolist()
            had_bad = bool(bad_files)
            for rank_bad, _, _ in news:  # a file met twice, or by two ranks, counts once
                for path, reason in rank_bad.items():
                    bad_files.setdefault(path, reason)
            new_bad = {}
            all_reads, all_failed = sum(r for _, r, _ in news), sum(f for _, _, f in news)
            dt = time.perf_counter() - t_last
            t_last = time.perf_counter()
            samples_per_s = len(pending) * args.batch_size / dt
            for i, row in enumerate(values):
                s = done - len(values) + i + 1
                entry = dict(step=s, loss=row[0], **dict(zip(logs, row[1:])), lr=lr_at(s - 1, lr, warmup, args.steps),
                             samples_per_s=samples_per_s, skipped=len(bad_files))
                if log_file:
                    log_file.write(json.dumps(entry) + "\n")
            pending = []
            if bad_files and not had_bad:
                path, reason = next(iter(bad_files.items()))
                print0(f"warning: cannot read {path} ({reason}); unreadable images are replaced by others from the "
                       f"data and counted in the log as skipped")
            if all_failed > all_reads / 2:
                path, reason = next(iter(bad_files.items()))
                if log_file:
                    log_file.close()
                fail(f"{all_failed} of {all_reads} image reads failed, the first {path} ({reason}); are the paths "
                     f"right (relative to the csv's folder, or --data-dir)?")
            for i, row in enumerate(values):
                if not all(math.isfinite(v) for v in row):
                    stop(f"the loss is not finite at step {done - len(values) + i + 1}")
            if written is not None:  # its weights gave the finite losses of the steps since: training continues from it
                if master:
                    os.replace(tmp_path, ckpt_path)  # atomic: ckpt.pt is always a whole checkpoint
                on_disk, written = written, None
            if log_file:
                log_file.flush()
                if done == start_step + 1:  # later ETAs leave this step out: it also started the DataLoader workers
                    t_first, eta = time.perf_counter(), (args.steps - done) * dt
                else:
                    eta = (args.steps - done) * (time.perf_counter() - t_first) / (done - start_step - 1)
                parts = " ".join(f"{k} {v:.4g}" for k, v in zip(logs, values[-1][1:]))
                print0(f"step {done}/{args.steps} | loss {values[-1][0]:.4f} | {parts} | lr {step_lr:.3g} | "
                       f"{samples_per_s:.1f} samples/s | {1000 * dt / len(values):.0f} ms/step | eta {duration(eta)}"
                       + (f" | skipped {len(bad_files)} unreadable images" if bad_files else ""))
        if done % args.save_every == 0 or done == args.steps:
            ok = finite(method, optimizer, device).float()
            if distributed:  # every rank stops, or none
                dist.all_reduce(ok, op=dist.ReduceOp.MIN)
            if not ok.item():
                stop(f"the weights are not finite after step {done}")
            rank_buffers, positions = rank_state(method, lanes, distributed, world)  # a collective: on every rank
            if master:
                stream = dict(readers=readers, shards=len(shards), lanes=positions) if shards else None
                save_checkpoint(tmp_path, method, optimizer, done, dict(meta, rank_buffers=rank_buffers, stream=stream))
            written = done
            if done == args.steps:  # no next step to vouch for it: its weights and losses are finite
                if master:
                    os.replace(tmp_path, ckpt_path)
                on_disk, written = done, None
            t_last = time.perf_counter()  # samples/s measures training, not saving
        if master and args.eval_every and done % args.eval_every == 0 and done != args.steps:
            evaluate(method, tokenizer, evals, device, args.workers, done, log_file, print0)
            t_last = time.perf_counter()

    if master:
        print0(f"saved {ckpt_path}")
        if evals is None and args.data == "synthetic" and args.eval_size > 0:  # the quick start's check, not logged
            evals = eval_zeroshot.prepare("synthetic", image_size=model_config["image_resolution"], size=args.eval_size)
        if evals:
            evaluate(method, tokenizer, evals, device, args.workers, args.steps, log_file if args.eval_every else None,
                     print0)
        else:
            print0(f"evaluate with: python eval_zeroshot.py --checkpoint {ckpt_path} --dataset ...")
        log_file.close()
    if distributed:
        dist.destroy_process_group()


def duration(seconds):
    s = round(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def evaluate(method, tokenizer, evals, device, workers, step, log_file, print0):
    """Run eval_zeroshot's tasks, print them, and log one line per task ({"step", "task", "dataset", metrics...}).
    eval_zeroshot.evaluate restores every module's mode and the random state: the run goes on as without it."""
    results = eval_zeroshot.evaluate(method, tokenizer, evals, device, workers=workers)
    for r in results:
        name = r["dataset"].removeprefix("synthetic/")
        if r["task"] == "retrieval":
            print0(f"retrieval {name}: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in r.items() if "R@" in k))
        else:
            print0(f"zero-shot {name}: top-1 {100 * r['top1']:.1f}% (chance {100 * r['chance']:.1f}%)")
        if log_file:
            log_file.write(json.dumps(dict(step=step, **r)) + "\n")
    if log_file:
        log_file.flush()


if __name__ == "__main__":
    main()
