"""
Train a language-image model with any of the five methods, on a CPU, one GPU, or many nodes with torchrun.

    python train.py                                         # CLIP, tiny ResNet, built-in synthetic data, CPU or GPU
    python train.py --method siglip --model ViT-B-32 --data coco --data-dir /data/coco --batch-size 256
    torchrun --nproc_per_node=8 train.py --method slip --model ViT-B-16 --data coco --data-dir /data/coco
    torchrun --nproc_per_node=8 train.py --model ViT-B-32 --data '/data/cc3m/{00000..00331}.tar' --workers 6

The method (clip.py, siglip.py, slip.py, declip.py, filip.py, defilip.py) is chosen by module name and plugs in
through the interface documented in clip.py: its views of each sample, its features and loss, its optimiser defaults.

--batch-size is the global batch of one optimiser step, and the loss is always that of the whole batch: each of the W
ranks runs --grad-accum micro-batches (exact, see forward_backward), so one GPU trains with SLIP's 4,096 pairs:

    python train.py --method slip --model ViT-B-16 --batch-size 4096 --grad-accum 32 --grad-checkpointing
"""

import argparse
import ast
import importlib
import math
import os
from contextlib import nullcontext

import torch

import data
import eval_zeroshot
from clip import METHODS  # the methods, by module name
from model import CONFIGS, CLIPModel, compiled, frozen_batchnorm_statistics
from plumbing import distributed, pretrained, runlog
from plumbing.checkpoint import Checkpoints, claim, resume, resume_path
from plumbing.runlog import RunLog, fail
from plumbing.samples import seed_of
from plumbing.stops import Stopped
from plumbing.tokenizer import get_tokenizer


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="clip", choices=METHODS)
    p.add_argument("--method-args", default="", help="the method's constructor arguments, e.g. mlp_dim=512")
    p.add_argument("--model", default=None, help="a config of model.py (default: tiny-rn): " + ", ".join(CONFIGS))
    p.add_argument("--data", default="synthetic", help="synthetic | coco | path to a .csv/.tsv of image paths and "
                   "captions | tar shards: a folder, 'dir/{00000..00331}.tar', 'pipe:CMD', an http(s) URL, a::b")
    p.add_argument("--data-dir", default=None, help="COCO root (train2017/, annotations/), or image root of a csv")
    p.add_argument("--csv-img-key", default=None, help="the csv's image-path column (default: filepath, image, "
                   "image_path or file_name)")
    p.add_argument("--csv-caption-key", default=None, help="the csv's caption column (default: title, caption or "
                   "text); for tar shards, the json field of captions (default: the txt member, else json's caption)")
    p.add_argument("--csv-separator", default=None, help="the csv's separator (default: a tab for .tsv, a comma "
                   "otherwise; \\t is a tab)")
    p.add_argument("--batch-size", type=int, default=128, help="global batch per optimiser step")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step; the loss and gradients stay "
                   "those of the whole batch")
    p.add_argument("--grad-checkpointing", action="store_true", help="keep only each transformer block's and ResNet "
                   "stage's input for the backward, recompute the rest")
    p.add_argument("--patch-dropout", type=float, default=0.0, help="training only: a ViT keeps a random (1 - P) of "
                   "its patch tokens (FLIP); 0.5 halves its cost")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the method's at this batch)")
    p.add_argument("--weight-decay", type=float, default=None, help="(default: the method's)")
    p.add_argument("--warmup", type=int, default=None, help="linear warmup steps (default: 10%% of --steps, ≤ 10k)")
    p.add_argument("--grad-clip", type=float, default=0.0, help="clip the gradient norm (0: off)")
    p.add_argument("--freeze-patch-embed", action="store_true", help="keep a ViT's patch-embedding conv at its random "
                   "init (the DeCLIP benchmark does, for every method)")
    p.add_argument("--tokenizer", default="clip", help="clip (OpenAI's BPE) or a tiktoken encoding name")
    p.add_argument("--shuffle-buffer", type=int, default=2000, help="tar shards: each reader shuffles blocks of this "
                   "many samples")
    p.add_argument("--shard-timeout", type=float, default=60, help="tar shards from pipe: or http(s): a read that "
                   "gets less than 64 KiB in this many seconds passes the shard over as a bad one, named")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers per rank (default: the cores "
                   "available per rank less one, at most 8)")
    p.add_argument("--gpu-decode", action="store_true", help="decode JPEGs on the GPU (nvJPEG), not in the workers: "
                   "the views that are only a crop (CLIP, SigLIP, FILIP, SLIP's CLIP view)")
    p.add_argument("--out-dir", default="out")
    p.add_argument("--resume", nargs="?", const="auto", default=None, help="continue from --out-dir/ckpt.pt or a path")
    p.add_argument("--trust-checkpoint", action="store_true", help="--resume from a checkpoint that holds Python "
                   "objects besides tensors (this can run its code)")
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--save-every-minutes", type=float, default=None, metavar="M", help="also save at the first step "
                   "M minutes after the last save (several ranks: at the first log sync after)")
    p.add_argument("--log-every", type=int, default=10, help="console print interval (the JSON log gets every step)")
    p.add_argument("--eval-every", type=int, default=0, help="evaluate --eval-dataset every k steps and at the end, "
                   "logged to log.jsonl")
    p.add_argument("--eval-dataset", default=None, help="any --dataset of eval_zeroshot.py: synthetic, "
                   "synthetic-retrieval, cifar10, cifar100, stl10, imagenet, folder, coco, coco-5k, flickr30k or a "
                   ".csv/.tsv (default: synthetic, when training on it)")
    p.add_argument("--eval-data-dir", default=None, help="the --data-dir of --eval-dataset")
    p.add_argument("--eval-size", type=int, default=1000, help="held-out images per synthetic zero-shot task")
    p.add_argument("--report-to", default="", help="also log what log.jsonl gets to tensorboard (OUT/tensorboard) "
                   "and/or wandb, comma-separated; optional packages")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    pretrained.add_args(p)  # --pretrained, --act, --lock-image, --lock-text, ...
    args = p.parse_args(argv)

    # checked here, so that a bad value stops with one line before anything is built
    if args.steps < 1:
        fail(f"--steps must be at least 1 (got {args.steps})")
    least = dict(batch_size=1, grad_accum=1, save_every=1, log_every=1, weight_decay=0, warmup=0, grad_clip=0,
                 workers=0, eval_every=0, eval_size=0, shuffle_buffer=1, shard_timeout=1)
    for flag, low in least.items():
        value = getattr(args, flag)
        if value is not None and not value >= low:  # "not >=" so that NaN fails too
            fail(f"--{flag.replace('_', '-')} must be {low} or more (got {value})")
    if args.save_every_minutes is not None and not 0 < args.save_every_minutes < math.inf:
        fail(f"--save-every-minutes must be above 0 and finite (got {args.save_every_minutes})")
    if args.eval_size > 10_000:  # synthetic-retrieval's held-out images are drawn before training, in memory
        fail(f"--eval-size must be at most 10000 (got {args.eval_size}): held-out images per synthetic task")
    # AdamW moves each weight by about lr per step whatever the gradient's scale: above 1 it overwrites the weights
    if args.lr is not None and not 0 < args.lr <= 1:
        fail(f"--lr must be above 0 and at most 1 (got {args.lr:g}); these methods train with 5e-4 to 3e-3")
    if not 0 <= args.patch_dropout < 1:
        fail(f"--patch-dropout must be at least 0 and below 1 (got {args.patch_dropout}); FLIP drops 0.5 to 0.75")
    if args.batch_size < 2:  # and SLIP's and DeCLIP's BatchNorm would have no batch statistics
        fail(f"--batch-size {args.batch_size}: contrastive losses need at least 2 image-text pairs per batch (each "
             f"pair's negatives are the other pairs; with 1, CLIP's loss is 0 and nothing is learned)")
    pretrained.check_args(args)  # its flags; --model's default, tiny-rn or the weights'
    if args.model not in (None, *CONFIGS):
        fail(f"unknown model '{args.model}'; choose one of: {', '.join(CONFIGS)}")
    for flag, on in (("--patch-dropout", args.patch_dropout), ("--freeze-patch-embed", args.freeze_patch_embed)):
        if on and args.model and not isinstance(CONFIGS[args.model]["vision_layers"], int):
            fail(f"{flag}: {args.model} is a ResNet, which has no patch tokens or patch embedding")
    return args


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


def build_method(name, model_config, method_kwargs, device, patch_dropout=0.0):
    """The method `name` around a freshly initialised model, its temperature at the method's init (train.py's and
    scripts/bench.py's one way to build one). Patch dropout is not in model_config: evaluation sees every patch."""
    Method = importlib.import_module(name).Method
    model = CLIPModel(**model_config, patch_dropout=patch_dropout)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(Method.defaults["logit_scale_init"]))
    try:
        return Method(model, **method_kwargs).to(device)
    except TypeError as e:
        fail(f"--method-args: {e}")


def make_optimizer(method, model_config, batch_size, lr=None, weight_decay=None, lr_source="--lr"):
    """AdamW with the method's settings for this encoder, weight decay where the method's rule says, and the peak lr
    of the method's rule at this batch unless given -> (optimizer, peak lr, what it was given, for the log)."""
    hp = type(method).optimizer_defaults(model_config)
    lr, lr_source = (lr, lr_source) if lr is not None else type(method).learning_rate(batch_size)
    weight_decay = hp["weight_decay"] if weight_decay is None else weight_decay
    optimizer = torch.optim.AdamW(type(method).param_groups(method, weight_decay), lr=lr, betas=hp["betas"],
                                  eps=hp["eps"], fused=next(method.parameters()).is_cuda)
    return optimizer, lr, f"lr {lr:.3g} ({lr_source}) wd {weight_decay:g}"


def lr_at(step, peak, warmup, total):
    """Linear warmup from 0, then cosine to 0."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def forward_backward(method, train_model, batches, seed, autocast=nullcontext(), no_sync=nullcontext):
    """The loss of the whole local batch, given as K micro-batches (on the host: data.on_device moves each when a pass
    needs it), with its gradients added to the parameters' .grad -> (loss, logs). train_model is the method, maybe
    compiled or in DDP (whose no_sync is `no_sync`). Micro-batch i draws its patch dropout from seed_of(seed, i), in
    every pass. K > 1: GradCache (Gao et al. 2021), exact for every method (docs/accumulation.md), in the three passes
    below; open_clip's --accum-freq instead recomputes the loss for each micro-batch and draws new patch-dropout masks
    in its second pass. Not exact: a ResNet's own BatchNorm normalises each micro-batch by its own statistics."""
    device = next(method.parameters()).device
    if len(batches) == 1:
        torch.manual_seed(seed_of(seed, 0))
        with autocast:
            loss, logs = train_model(data.to_device(batches[0], device))
        loss.backward()
        return loss.detach(), logs

    with torch.no_grad(), autocast:  # 1. the features, without a graph: one micro-batch's activations at a time
        parts = []
        for i, batch in enumerate(data.on_device(batches, device)):
            torch.manual_seed(seed_of(seed, i))
            parts.append(method.features(batch))
    features = {key: torch.cat([part[key] for part in parts]) for key in parts[0]}
    leaves = {key: f.requires_grad_() for key, f in features.items() if f.is_floating_point()}

    with autocast:  # 2. the whole batch's loss, once, and its gradients to the features and the loss's own parameters
        loss, logs = method.loss(features)
    params = {name: p for name, p in method.named_parameters() if p.requires_grad}
    grads = torch.autograd.grad(loss, [*leaves.values(), *params.values()], allow_unused=True)
    feature_grads = {key: g for key, g in zip(leaves, grads) if g is not None}
    param_grads = {name: g for name, g in zip(params, grads[len(leaves):]) if g is not None}

    start = 0  # 3. the features again, with a graph and the same draws, and the backward of their gradients' rows
    for i, batch in enumerate(data.on_device(batches, device)):  # (zip would keep the previous micro-batch alive)
        rows = slice(start, start + len(next(iter(parts[i].values()))))
        start = rows.stop
        last = i == len(batches) - 1  # also hands over the loss parameters' gradients, in the one backward DDP syncs
        torch.manual_seed(seed_of(seed, i))
        # the running statistics of a ResNet's BatchNorm already counted this micro-batch in step 1
        with (nullcontext() if last else no_sync()), frozen_batchnorm_statistics(method), autocast:
            surrogate = train_model(batch, {key: g[rows] for key, g in feature_grads.items()},
                                    param_grads if last else None)
        surrogate.backward()
    return loss.detach(), logs


def main(argv=None):
    args = get_args(argv)
    try:
        rank, world, device = distributed.setup(args.device)  # torchrun's ranks, or one process
    except ValueError as e:
        fail(e)
    if args.batch_size % (world * args.grad_accum):
        fail(f"--batch-size {args.batch_size} must be divisible by world size × --grad-accum = "
             f"{world * args.grad_accum}")
    micro = args.batch_size // (world * args.grad_accum)
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", 1))  # share the node's cores
    workers = distributed.default_workers(local_ranks) if args.workers is None else args.workers

    # --- the data, the method around its model, its optimiser ---------------------------------------------------------
    try:
        tokenizer = get_tokenizer(args.tokenizer)
        model_config, weights = pretrained.model_config(args, tokenizer.vocab_size)  # and --pretrained's weights
        dataset = data.make_dataset(args.data, args.data_dir, "train", model_config["image_resolution"],
                                    img_key=args.csv_img_key, caption_key=args.csv_caption_key, sep=args.csv_separator)
    except (ValueError, FileNotFoundError, OSError) as e:
        fail(e)
    if rank == 0:
        claim(args.out_dir, fresh=not args.resume)  # OUT is this run's: locked, and no older run overwritten
    tasks = eval_zeroshot.training_tasks(args, model_config["image_resolution"])
    torch.manual_seed(args.seed)
    method_kwargs = parse_kwargs(args.method_args)
    method = build_method(args.method, model_config, method_kwargs, device, args.patch_dropout)
    method.model.set_grad_checkpointing(args.grad_checkpointing)
    pretrained.start(method, weights, args)  # the file's weights, if any; --lock-image, --lock-text
    if args.freeze_patch_embed:  # then no optimiser group holds it (Method.param_groups)
        method.model.visual.conv1.weight.requires_grad_(False)
    lr, source, warmup = pretrained.lr_and_warmup(args)  # the flags', else fine-tuning's or pre-training's
    optimizer, lr, optimizer_line = make_optimizer(method, model_config, args.batch_size, lr, args.weight_decay, source)

    path = resume_path(args)
    start_step, resumed_stream, own_buffers = resume(path, method, optimizer, args) if args.resume else (0, None, None)
    meta = dict(config=vars(args), model_config=model_config, method_kwargs=method_kwargs)  # what evaluation rebuilds
    checkpoints = Checkpoints(args.out_dir, args.steps, args.save_every, meta, args.resume and (path, start_step),
                              args.save_every_minutes)
    stream = data.TrainingStream(dataset, method.transform(tokenizer), args.seed, micro, rank, world, workers, device,
                                 start_step * args.grad_accum, resumed_stream, args.shuffle_buffer,
                                 args.csv_caption_key, args.gpu_decode, args.grad_accum, args.shard_timeout)
    train_model = distributed.wrap_ddp(method, device, own_buffers) if world > 1 else method
    if args.compile:
        train_model = compiled(train_model)  # compiling DDP lets it split the graph at its gradient buckets
    no_sync = train_model.no_sync if world > 1 else nullcontext
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else nullcontext()
    log = RunLog(args.out_dir, start_step, args.steps, args.batch_size, args.log_every, checkpoints.stop,
                 checkpoints.late)
    log.report_to(args.report_to, meta)  # OUT/config.json, and the trackers of --report-to
    log.print(f"{args.method} | {args.model} ({pretrained.trainable(method)}) | "
              f"{args.data}: {len(dataset)} {'shards' if stream.shards else 'samples'} | {world} rank(s) on {device} | "
              f"batch {args.batch_size} = {world} × {args.grad_accum} × {micro} | {optimizer_line} warmup {warmup} | "
              f"{args.steps} steps")

    # --- the loop ---------------------------------------------------------------------------------------------------
    for step in range(start_step, args.steps):
        step_lr = lr_at(step, lr, warmup, args.steps)
        for group in optimizer.param_groups:
            group["lr"] = step_lr
        try:
            micro_batches = [next(stream) for _ in range(args.grad_accum)]  # uint8, on the host until their pass
        except Stopped:  # a stop signal while the data does not come (a stalled source, a worker that died with it)
            checkpoints.stopped_waiting(step, method, optimizer, stream, log)
        loss, logs = forward_backward(method, train_model, micro_batches, seed_of(args.seed, step, rank),
                                      autocast, no_sync)
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(method.parameters(), args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        method.post_step()

        done = step + 1
        # synced over the ranks every --log-every steps, and when a checkpoint needs its losses checked: stops the
        # run on a loss that is not finite, or when most images are unreadable
        log.add(done, step_lr, loss, logs, stream, sync=checkpoints.waiting is not None or checkpoints.due(done))
        checkpoints.vouch(log.synced)  # ckpt.pt.tmp becomes ckpt.pt once a loss from its weights is finite
        if checkpoints.due(done) or log.clock_save or log.stopping:  # the clock: rank 0's; stopping: SIGTERM, Ctrl-C
            checkpoints.save(done, method, optimizer, stream, last=log.stopping)
            log.restart_clock()
        if log.stopping:
            log.end(done, checkpoints.path)
        if rank == 0 and tasks and args.eval_every and done % args.eval_every == 0 and done != args.steps:
            eval_zeroshot.report(method, tokenizer, tasks, device, workers, done, log)
            log.restart_clock()

    log.print(f"saved {checkpoints.path}")
    if rank == 0 and tasks:
        eval_zeroshot.report(method, tokenizer, tasks, device, workers, args.steps, log if args.eval_every else None)
        if runlog.signals:  # it cut the final evaluation short
            log.end(args.steps, checkpoints.path, last=True)
    elif not tasks:
        log.print(f"evaluate with: python eval_zeroshot.py --checkpoint {checkpoints.path} --dataset ...")
    if world > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    runlog.stop_on_signals()
    main()
