"""
Reading weights: the one reader of checkpoint files (train.py --resume and --pretrained, eval_zeroshot.py,
scripts/eval_linear.py), whoever wrote them (train.py, OpenAI, open_clip), and the model a state dict describes.

train.py writes OUT/ckpt.pt (plumbing/checkpoint.py): {"model": the OpenAI-layout state dict (loads into OpenAI's and
open_clip's code), "method": the method's own state (heads, queue, bias), "optimizer", "step", "config" (train.py's
flags), "model_config", "method_kwargs", "rank_buffers" (every rank's buffers, when there are several), "stream"
(where the readers of tar shards stand)}: tensors and plain Python values only, so that torch.load(weights_only=True)
reads it.
"""

import importlib
import math
import os
import re
import warnings
import zipfile

import torch

from model import CLIPModel
from plumbing.runlog import fail
from plumbing.tokenizer import get_tokenizer


def is_torchscript(path):
    """OpenAI's released .pt files are TorchScript archives: zip files with a constants.pkl member (and code/), which
    torch.save never writes."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.partition("/")[2] == "constants.pkl" for name in archive.namelist())
    except zipfile.BadZipFile:  # not a zip (an older torch.save format, or not a checkpoint): torch.load says which
        return False


def read(path, trust=False):
    """What a checkpoint file holds. A .pt file is a pickle, and unpickling can call any function the file names
    (os.system, say). So torch.load runs with weights_only=True, which rebuilds tensors and plain Python values (dicts,
    lists, numbers, strings) and refuses anything else: our checkpoints and open_clip's hold nothing else. OpenAI's
    files are TorchScript archives, read by torch.jit.load (their code is TorchScript, interpreted by torch, not
    Python), of which we keep the weights. trust=True (--trust-checkpoint) reads any pickle, for a file whose source
    the user trusts. A file that cannot be read stops the program with one line."""
    if not os.path.isfile(path):
        fail(f"no checkpoint at {path}")
    if path.endswith(".safetensors"):  # open_clip's hub format: tensors only, no pickle, so safe by design
        try:
            from safetensors.torch import load_file
        except ImportError:
            fail(f"{path}: reading .safetensors files needs the safetensors package: pip install safetensors")
        try:
            return load_file(path)
        except Exception as e:  # the reader's errors for a damaged file are its own types
            fail(f"{path} is not a safetensors file that can be read ({str(e).strip().splitlines()[0]})")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`torch.jit.load` is deprecated")  # yet the only reader of these files
        warnings.filterwarnings("ignore", "Detected pickle protocol")  # a bare pickle, which the line below explains
        if is_torchscript(path):
            try:
                return torch.jit.load(path, map_location="cpu").state_dict()
            except RuntimeError as e:
                fail(f"{path} is a damaged TorchScript archive ({str(e).strip().splitlines()[0]})")
        try:
            return torch.load(path, map_location="cpu", weights_only=not trust)
        except Exception as e:  # a damaged file can make the reader raise anything; none of the file's code has run
            unsafe = re.search(r"GLOBAL (\S+)", str(e))  # torch's words for a function or class it refused to call
            if unsafe:
                fail(f"{path} was not loaded: it contains objects other than tensors and plain values ({unsafe[1]}), "
                     f"which could run code. If you trust its source, pass --trust-checkpoint to load it anyway.")
            fail(f"{path} is not a checkpoint torch can read: truncated, damaged, or not written by torch.save "
                 f"({type(e).__name__})")


def infer_config(state_dict):
    """CLIPModel kwargs from the shapes of an OpenAI-layout state dict (as OpenAI's loader does), all but
    quick_gelu: the activation has no parameters, so the shapes cannot tell it."""
    sd = state_dict
    required = ["token_embedding.weight", "positional_embedding", "ln_final.weight", "text_projection",
                "visual.conv1.weight"]
    missing = [k for k in required if k not in sd]
    if missing or ("visual.proj" not in sd and "visual.attnpool.positional_embedding" not in sd):
        hint = ""
        if any(k.startswith("module.") for k in sd):
            hint = " (keys start with 'module.': strip the DDP prefix first)"
        elif "model" in sd:
            hint = " (this looks like a training checkpoint: pass checkpoint['model'])"
        raise ValueError(f"not a CLIP state dict in OpenAI's layout: missing {missing or ['visual.proj']}; "
                         f"first keys are {list(sd)[:5]}{hint}")

    def count(prefix):  # number of distinct block indices under a prefix
        return len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})

    def grid(key, stride):  # side of the square token grid of a positional embedding (1 extra token)
        n = sd[key].shape[0] - 1
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"{key} has {n + 1} rows, not a square grid plus one")
        return side * stride

    if "visual.proj" in sd:  # ViT
        vision_width, patch = sd["visual.conv1.weight"].shape[0], sd["visual.conv1.weight"].shape[-1]
        vision_layers = count("visual.transformer.resblocks.")
        image_resolution = grid("visual.positional_embedding", patch)
    else:  # ModifiedResNet
        patch = None
        vision_width = sd["visual.layer1.0.conv1.weight"].shape[0]
        vision_layers = [count(f"visual.layer{i}.") for i in (1, 2, 3, 4)]
        image_resolution = grid("visual.attnpool.positional_embedding", 32)
    width = sd["ln_final.weight"].shape[0]
    return dict(embed_dim=sd["text_projection"].shape[1], image_resolution=image_resolution,
                vision_layers=vision_layers, vision_width=vision_width, vision_patch_size=patch,
                context_length=sd["positional_embedding"].shape[0], vocab_size=sd["token_embedding.weight"].shape[0],
                transformer_width=width, transformer_heads=width // 64,
                transformer_layers=count("transformer.resblocks."))


def build_model(state_dict, quick_gelu=True):
    """A CLIPModel whose architecture is read off the state dict's shapes, with the weights loaded strictly;
    returned in eval mode (BatchNorm statistics of ResNets). OpenAI's fp16 weights are loaded into fp32.
    quick_gelu: True for OpenAI's weights (and open_clip's -quickgelu ones), False for open_clip's nn.GELU models
    (LAION-2B, DataComp, ...): nothing in the state dict says which, and the wrong one silently degrades the model."""
    # OpenAI's (JIT) checkpoints carry three scalars that are not parameters
    sd = {k: v for k, v in state_dict.items() if k not in ("input_resolution", "context_length", "vocab_size")}
    config = infer_config(sd)
    model = CLIPModel(**config, quick_gelu=quick_gelu)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise ValueError(f"state dict does not fit the architecture inferred from its shapes {config}:\n{e}") from None
    return model.eval()


def load_method(path, device="cpu", trust=False, quick_gelu=None):
    """A checkpoint to evaluate -> (method in eval mode, tokenizer). Our checkpoints rebuild their own method; any
    other CLIP state dict (OpenAI's, open_clip's) is evaluated as CLIP. quick_gelu: the activation, which a state dict
    cannot tell (build_model); None: our checkpoint's recorded one, QuickGELU for any other state dict."""
    checkpoint = read(path, trust)
    if isinstance(checkpoint, dict) and "config" in checkpoint and "method" in checkpoint:  # written by train.py
        config = checkpoint["config"]
        act = {} if quick_gelu is None else {"quick_gelu": quick_gelu}  # an explicit choice overrides the recorded one
        model = CLIPModel(**{**checkpoint["model_config"], **act})
        method = importlib.import_module(config["method"]).Method(model, **checkpoint["method_kwargs"])
        try:
            method.load_state_dict(method_state(checkpoint))
        except RuntimeError as e:
            fail(f"{path} does not match --model {config['model']} / --method {config['method']}: "
                 f"{str(e).splitlines()[0]}")
        tokenizer = get_tokenizer(config.get("tokenizer", "clip"))
    else:
        state_dict = clip_state_dict(checkpoint, path)
        try:
            method = importlib.import_module("clip").Method(build_model(state_dict, quick_gelu is not False))
        except ValueError as e:
            fail(f"{path}: {e}")
        tokenizer = get_tokenizer("clip")
    return method.to(device).eval(), tokenizer


def clip_state_dict(checkpoint, path):
    """The CLIP state dict in what read() returned for a file that is not ours: OpenAI's or open_clip's state dict,
    or open_clip's epoch_N.pt (its "state_dict", with DDP's "module." prefix)."""
    state_dict = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state_dict, dict):
        fail(f"{path} holds neither a train.py checkpoint nor a CLIP state dict")
    # open_clip saves DDP's prefix; OpenAI's (JIT) files carry three scalars that are not parameters, a TorchScript
    # archive of open_clip's model its causal mask (a buffer it does not save in its state dicts)
    return {k.removeprefix("module."): v for k, v in state_dict.items()
            if k not in ("input_resolution", "context_length", "vocab_size", "attn_mask")}


def method_state(checkpoint):
    """A train.py checkpoint's state dict of the whole method: the model's ("model", OpenAI's layout) and the rest."""
    return {**{"model." + k: v for k, v in checkpoint["model"].items()}, **checkpoint["method"]}
