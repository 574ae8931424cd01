"""
Starting from weights users already have: train.py --pretrained (fine-tuning, and LiT with --lock-image), and OpenAI's
model names for train.py, eval_zeroshot.py and scripts/eval_linear.py. The file is read by weights.read, the
architecture off its shapes (weights.infer_config); both encoders and their projections are loaded, for every method,
the rest keeps the method's init (what is loaded, and how a tower is locked: docs/finetune.md).
"""

import hashlib
import os
import urllib.request

import torch.nn as nn

from model import CONFIGS, VisionTransformer
from plumbing import checkpoint, weights
from plumbing.runlog import fail

# OpenAI's published weights, as openai/CLIP's clip/clip.py lists them; the SHA-256 of each file is in its URL path
_URL = "https://openaipublic.azureedge.net/clip/models/"
OPENAI = {name: _URL + path for name, path in [
    ("RN50", "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762/RN50.pt"),
    ("RN101", "8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599/RN101.pt"),
    ("RN50x4", "7e526bd135e493cef0776de27d5f42653e6b4c8bf9e0f653bb11773263205fdd/RN50x4.pt"),
    ("RN50x16", "52378b407f34354e150460fe41077663dd5b39c54cd0bfd2b27167a4a06ec9aa/RN50x16.pt"),
    ("RN50x64", "be1cfb55d75a9666199fb2206c106743da0f6468c9d327f3e0d0a543a9919d9c/RN50x64.pt"),
    ("ViT-B/32", "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt"),
    ("ViT-B/16", "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt"),
    ("ViT-L/14", "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt"),
    ("ViT-L/14@336px", "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02/ViT-L-14-336px.pt")]}

# Fine-tuning defaults (--pretrained without --lr / --warmup): ITRA's recipe for fine-tuning OpenAI's RN50 CLIP on
# MS-COCO captions (itra.readthedocs.io, "Fine-tuning CLIP for MS-COCO Retrieval": AdamW, lr 1e-5, 100 warmup steps,
# batch 256, 10 epochs). Their weight decay of 0.5 is not taken: the method's stays (--weight-decay to change it).
FINETUNE_LR, FINETUNE_WARMUP = 1e-5, 100
FINETUNE_SOURCE = "fine-tuning: ITRA's COCO recipe"


def add_args(p):
    p.add_argument("--pretrained", default=None, help="start from these weights: an OpenAI name (" + ", ".join(OPENAI)
                   + "), OpenAI's .pt, an open_clip .bin/.pt/.safetensors, or a ckpt.pt (see docs/finetune.md)")
    p.add_argument("--act", choices=("quickgelu", "gelu"), default=None, help="the transformers' activation (default: "
                   "the config's; for --pretrained, what the file records, else quickgelu as OpenAI's weights: pass "
                   "gelu for open_clip's LAION/DataComp weights)")
    p.add_argument("--lock-image", action="store_true", help="freeze the image tower (LiT); a ResNet's BatchNorm too")
    p.add_argument("--lock-image-unlocked-groups", type=int, default=0, help="with --lock-image: the last N groups of "
                   "the image tower stay trainable (docs/finetune.md)")
    p.add_argument("--lock-text", action="store_true", help="freeze the text tower")
    p.add_argument("--lock-text-unlocked-layers", type=int, default=0, help="with --lock-text: the last N text blocks "
                   "stay trainable, with ln_final and text_projection")


def check_args(args):
    """train.py's flags of this file, checked before anything is built; --model's default (None: the weights')."""
    if args.pretrained is not None and not args.pretrained.strip():  # '' is how an unset shell variable arrives
        fail("--pretrained '' names no weights (an unset variable?): pass a file or one of OpenAI's names, or leave "
             "it out to train from scratch")
    if args.pretrained and args.tokenizer != "clip":
        fail(f"--pretrained weights were trained with CLIP's BPE tokenizer; --tokenizer {args.tokenizer} would feed "
             f"their token embedding other ids")
    if args.lock_image_unlocked_groups < 0 or args.lock_text_unlocked_layers < 0:
        fail("--lock-image-unlocked-groups and --lock-text-unlocked-layers must be 0 or more")
    if args.lock_image_unlocked_groups and not args.lock_image or args.lock_text_unlocked_layers and not args.lock_text:
        fail("--lock-image-unlocked-groups needs --lock-image, --lock-text-unlocked-layers needs --lock-text")
    args.model = args.model or (None if args.pretrained or args.resume else "tiny-rn")  # None: the file's


def lr_and_warmup(args):
    """-> (peak lr or None for the method's rule, how it was chosen, warmup steps): the flags'; with --pretrained and
    no --lr, FINETUNE_LR and FINETUNE_WARMUP; a default warmup is at most 10% of --steps (10k at most otherwise)."""
    finetune = bool(args.pretrained) and args.lr is None
    lr, source = (FINETUNE_LR, FINETUNE_SOURCE) if finetune else (args.lr, "--lr")
    warmup = min(FINETUNE_WARMUP if finetune else 10_000, args.steps // 10) if args.warmup is None else args.warmup
    return lr, source, warmup


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve(source):
    """An OpenAI model name -> the path of its file in the cache folder ($CLIP_CACHE, default ~/.cache/clip, as
    OpenAI's loader), downloaded if absent; a file whose SHA-256 is not the one in its URL is never used. Anything
    else is a path, returned as is."""
    if source not in OPENAI:
        if not os.path.exists(source):
            fail(f"no checkpoint at {source}, nor is it one of OpenAI's model names ({', '.join(OPENAI)})")
        return source
    url = OPENAI[source]
    folder = os.path.expanduser(os.environ.get("CLIP_CACHE", os.path.join("~", ".cache", "clip")))
    path, expected = os.path.join(folder, os.path.basename(url)), url.split("/")[-2]
    if not os.path.isfile(path):
        part = f"{path}.{os.getpid()}.part"  # one per process: ranks that download at once do not mix their bytes
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            print(f"downloading {url} to {path}", flush=True)
            with urllib.request.urlopen(url, timeout=60) as response, open(part, "wb") as f:
                f.writelines(iter(lambda: response.read(1 << 20), b""))
        except OSError as e:  # no network (urllib's URLError is an OSError), a full disk, a read-only folder
            if os.path.exists(part):
                os.remove(part)
            fail(f"could not download {source} from {url} ({getattr(e, 'reason', None) or e}); download it elsewhere "
                 f"and place it at {path} (or set CLIP_CACHE to the folder that holds {os.path.basename(path)})")
        if sha256(part) != expected:
            os.remove(part)
            fail(f"the download of {url} does not have the SHA-256 in its URL; removed it, not loaded")
        os.replace(part, path)
    found = sha256(path)
    if found != expected:
        fail(f"{path} has SHA-256 {found[:16]}..., not {expected} as {url} says: a damaged or other file, not loaded; "
             f"delete it to download it again")
    return path


def model_config(args, vocab_size):
    """train.py's model config and the weights to start from -> (config, state dict or None), the lock flags checked
    against them: --model's; --pretrained's architecture and activation (QuickGELU, or what our checkpoint records;
    --act overrides), args.model its CONFIGS name; --resume's architecture, --model and --pretrained (fine-tuning's lr
    kept: docs/finetune.md), the weights loaded later (checkpoint.resume)."""
    if args.resume:
        path = checkpoint.resume_path(args)
        recorded, config = checkpoint.recorded(path, args.trust_checkpoint)
        source = recorded.get("pretrained")
        if args.pretrained is not None and args.pretrained != source:  # as given: "the same command with --resume"
            fail(f"{path} was {f'fine-tuned from {source}' if source else 'trained from scratch'}, not from "
                 f"{args.pretrained}, which --resume would record but never load: resume without --pretrained, or "
                 f"start a new run from it in another --out-dir")
        args.model, args.pretrained = args.model or recorded["model"], source  # its fine-tuning lr and warmup
        return check_locks(args, config), None
    if not args.pretrained:
        act = {} if args.act is None else {"quick_gelu": args.act == "quickgelu"}
        return check_locks(args, dict(CONFIGS[args.model], vocab_size=vocab_size, **act)), None
    path = resolve(args.pretrained)
    loaded = weights.read(path, args.trust_checkpoint)
    if isinstance(loaded, dict) and "config" in loaded:  # our ckpt.pt
        weights.check_ours(loaded, path)
        if loaded["config"].get("tokenizer", "clip") != "clip":
            fail(f"{path} was trained with --tokenizer {loaded['config']['tokenizer']}; --pretrained needs CLIP's BPE")
        state_dict, quick_gelu = loaded["model"], loaded["model_config"].get("quick_gelu", True)
    else:  # OpenAI's and open_clip's files do not record the activation: OpenAI's is QuickGELU
        state_dict, quick_gelu = weights.clip_state_dict(loaded, path), True
    weights.check_tensors(state_dict.items(), path)
    try:
        config = dict(weights.infer_config(state_dict), quick_gelu=quick_gelu if args.act is None
                      else args.act == "quickgelu")
    except ValueError as e:
        fail(f"{path}: {e}")
    shape = {k: v for k, v in config.items() if k != "quick_gelu"}
    same = [name for name, c in CONFIGS.items() if {k: v for k, v in c.items() if k != "quick_gelu"} == shape]
    if args.model is not None and args.model not in same:
        fail(f"--model {args.model} is not the architecture of {args.pretrained} "
             f"({same[0] if same else 'no config of model.py'}); leave --model out, it is read from the weights")
    args.model = args.model or (same[0] if same else "pretrained")
    for flag, on in (("--patch-dropout", args.patch_dropout), ("--freeze-patch-embed", args.freeze_patch_embed)):
        if on and not isinstance(config["vision_layers"], int):  # a ResNet
            fail(f"{flag}: {args.pretrained} is a ResNet, which has no patch tokens or patch embedding")
    return check_locks(args, config), state_dict


def check_locks(args, config):
    """The lock flags against the run's weights and architecture -> config: a lock keeps a tower as it starts
    (pretrained, or it stays random), leaves something to train, and fewer groups or blocks unlocked than it has."""
    if (args.lock_image or args.lock_text) and not args.pretrained:
        fail("--lock-image and --lock-text keep a tower as it starts: without --pretrained, random; pass --pretrained")
    if args.lock_image and args.lock_text and not (args.lock_image_unlocked_groups or args.lock_text_unlocked_layers):
        fail("--lock-image with --lock-text locks both towers whole: only the temperature would train; lock one, or "
             "keep part of one trainable (--lock-image-unlocked-groups N, --lock-text-unlocked-layers N)")
    groups = config["vision_layers"] + 2 if isinstance(config["vision_layers"], int) else 6  # image_groups' count
    blocks = config["transformer_layers"]
    for on, flag, n, parts, kind in (
            (args.lock_image, "--lock-image-unlocked-groups", args.lock_image_unlocked_groups, groups, "groups"),
            (args.lock_text, "--lock-text-unlocked-layers", args.lock_text_unlocked_layers, blocks, "blocks")):
        if on and n >= parts:  # all of them unlocked: the flag would lock nothing (the text tower: its embeddings)
            fail(f"{flag} {n}: the tower has {parts} {kind}, which would all be trained; pass at most {parts - 1}, "
                 f"or leave {flag.split('-unlocked')[0]} out")
    return config


def start(method, state_dict, args):
    """Load the pretrained weights into the method's model (when there are any), then lock what the flags say."""
    if state_dict is not None:
        keep = {} if type(method).pretrained_temperature else {"logit_scale": method.model.logit_scale.detach()}
        try:
            method.model.load_state_dict({**state_dict, **keep}, strict=True)
        except RuntimeError as e:  # a key missing or unexpected, a shape that differs: not one CLIP's weights
            fail(f"{args.pretrained} does not fit the architecture its shapes describe: {str(e)[:500]}")
    lock(method.model, args.lock_image_unlocked_groups if args.lock_image else None,
         args.lock_text_unlocked_layers if args.lock_text else None)


def image_groups(visual):
    """The image tower in groups, first to last: a ViT's as open_clip groups it; a ResNet's (open_clip locks only the
    whole tower) its stem, 4 stages and attention pool (docs/finetune.md#locking-lit)."""
    if isinstance(visual, VisionTransformer):
        blocks = list(visual.transformer.resblocks)
        return [[visual.conv1, visual.class_embedding, visual.positional_embedding, visual.ln_pre],
                *[[block] for block in blocks[:-1]], [blocks[-1], visual.ln_post], [visual.proj]]
    stem = [visual.conv1, visual.bn1, visual.conv2, visual.bn2, visual.conv3, visual.bn3]
    return [stem, [visual.layer1], [visual.layer2], [visual.layer3], [visual.layer4], [visual.attnpool]]


def lock(model, image=None, text=None):
    """Freeze the image tower but its last `image` groups, the text tower but its last `text` blocks; None: no lock."""
    locked = []  # modules and parameters
    if image is not None:
        groups = image_groups(model.visual)
        locked += [item for group in groups[:max(len(groups) - image, 0)] for item in group]
    if text is not None:
        blocks = list(model.transformer.resblocks)
        locked += [model.token_embedding, model.positional_embedding, *blocks[:max(len(blocks) - text, 0)]]
        if not text:
            locked += [model.ln_final, model.text_projection]
    for item in locked:
        item.requires_grad_(False)
        for m in item.modules() if isinstance(item, nn.Module) else ():
            if isinstance(m, nn.BatchNorm2d):  # as open_clip's FrozenBatchNorm2d: the running statistics,
                m.eval()  # kept; train.py never calls .train(), evaluation restores each module's own mode


def trainable(method):
    """The log's count of what is trained: '12.2M params' or '151.3M params, 63.4M trained'."""
    total = sum(p.numel() for p in method.parameters())
    trained = sum(p.numel() for p in method.parameters() if p.requires_grad)
    return f"{total / 1e6:.1f}M params" + ("" if trained == total else f", {trained / 1e6:.1f}M trained")
