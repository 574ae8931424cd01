"""
Reading weights: the one reader of checkpoint files (train.py --resume and --pretrained, eval_zeroshot.py,
scripts/eval_linear.py), whoever wrote them (train.py, OpenAI, open_clip), and the model a state dict describes.
train.py's OUT/ckpt.pt (written by plumbing/checkpoint.py; its layout: docs/training.md#checkpoints) holds tensors and
plain Python values only, so that torch.load(weights_only=True) reads it.
"""

import importlib
import inspect
import math
import os
import re
import warnings

import torch

from clip import METHODS
from model import CLIPModel
from plumbing import torchscript
from plumbing.runlog import fail
from plumbing.tokenizer import get_tokenizer

OPENAI_EXTRAS = ("input_resolution", "context_length", "vocab_size")  # three scalars of OpenAI's files, not weights


def read(path, trust=False):
    """What a checkpoint file holds, or one line that stops the program. A .pt file is a pickle, whose unpickling can
    call any function it names (os.system, say): torch.load runs with weights_only=True, which rebuilds only tensors
    and plain Python values; OpenAI's TorchScript archives are read as data (plumbing/torchscript.py), as torch.jit.load
    would run their code. trust=True (--trust-checkpoint): any pickle or archive, for a file whose source is trusted."""
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
    if torchscript.is_torchscript(path):
        try:
            if trust:
                warnings.filterwarnings("ignore", "`torch.jit.load` is deprecated")
                return torch.jit.load(path, map_location="cpu").state_dict()
            return torchscript.read(path)
        except torchscript.TorchScriptError as e:  # refused, or damaged
            fail(f"{path} was not loaded: it is a TorchScript archive, read as data, and {e}" + (". If you trust its "
                 "source, pass --trust-checkpoint to load it with torch.jit.load, which runs that code" if e.runs_code
                 else ""))
        except Exception as e:  # torch.jit.load: RuntimeError, UnicodeDecodeError...: whatever a damaged archive raises
            fail(f"{path} is a damaged TorchScript archive ({type(e).__name__}: {str(e).strip()[:200]})")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Detected pickle protocol")  # a bare pickle, which the line below explains
        try:
            return torch.load(path, map_location="cpu", weights_only=not trust)
        except Exception as e:  # a damaged file can make the reader raise anything; none of the file's code has run
            unsafe = re.search(r"GLOBAL (\S+)", str(e))  # torch's words for a function or class it refused to call
            if unsafe:
                fail(f"{path} was not loaded: it contains objects other than tensors and plain values ({unsafe[1]}), "
                     f"which could run code. If you trust its source, pass --trust-checkpoint to load it anyway.")
            fail(f"{path} is not a checkpoint torch can read: truncated, damaged, or not written by torch.save "
                 f"({type(e).__name__})")


def infer_config(sd):
    """CLIPModel kwargs from the shapes of an OpenAI-layout state dict (as OpenAI's loader does), all but
    quick_gelu: the activation has no parameters, so the shapes cannot tell it. ValueError names what does not fit."""
    missing = [k for k in ("token_embedding.weight", "positional_embedding", "ln_final.weight", "text_projection",
                           "visual.conv1.weight") if k not in sd]
    if missing or ("visual.proj" not in sd and "visual.attnpool.positional_embedding" not in sd):
        hint = " (keys start with 'module.': strip the DDP prefix first)" if any(k.startswith("module.") for k in sd) \
            else " (this looks like a training checkpoint: pass checkpoint['model'])" if "model" in sd else ""
        raise ValueError(f"not a CLIP state dict in OpenAI's layout: missing {missing or ['visual.proj']}; "
                         f"first keys are {list(sd)[:5]}{hint}")

    def shape(key, dims):  # the shape of sd[key], a tensor of `dims` dimensions that holds its elements (not stride 0)
        if not (torch.is_tensor(sd.get(key)) and sd[key].dim() == dims and 0 < sd[key].numel() * sd[
                key].element_size() <= sd[key].untyped_storage().nbytes()):
            found = tuple(sd[key].shape) if torch.is_tensor(sd.get(key)) else repr(sd.get(key))[:40]
            raise ValueError(f"{key} is {found}, not a {dims}-d tensor of its own elements as in OpenAI's layout")
        return sd[key].shape

    def count(prefix):  # number of distinct block indices under a prefix
        return len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})

    def grid(key, stride):  # side of the square token grid of a positional embedding (1 extra token)
        n = shape(key, 2)[0] - 1
        side = math.isqrt(n)
        if n < 1 or side * side != n:
            raise ValueError(f"{key} has {n + 1} rows, not a square grid plus one")
        return side * stride

    if "visual.proj" in sd:  # ViT
        vision_width, _, _, patch = shape("visual.conv1.weight", 4)
        vision_layers = count("visual.transformer.resblocks.")
        image_resolution = grid("visual.positional_embedding", patch)
    else:  # ModifiedResNet
        patch = None
        vision_width = shape("visual.layer1.0.conv1.weight", 4)[0]
        vision_layers = [count(f"visual.layer{i}.") for i in (1, 2, 3, 4)]
        image_resolution = grid("visual.attnpool.positional_embedding", 32)
    width = shape("ln_final.weight", 1)[0]
    if width % 64 or (patch and vision_width % 64):  # the heads are 64 wide (OpenAI's, open_clip's)
        raise ValueError(f"the transformers' widths ({width}, {vision_width}) are not multiples of 64 (a head's)")
    return dict(embed_dim=shape("text_projection", 2)[1], image_resolution=image_resolution,
                vision_layers=vision_layers, vision_width=vision_width, vision_patch_size=patch,
                context_length=shape("positional_embedding", 2)[0], vocab_size=shape("token_embedding.weight", 2)[0],
                transformer_width=width, transformer_heads=width // 64,
                transformer_layers=count("transformer.resblocks."))


def build_model(state_dict, quick_gelu=True):
    """A CLIPModel of the architecture the state dict's shapes describe, its weights loaded strictly (fp16 into fp32),
    in eval mode. quick_gelu: True for OpenAI's weights (and open_clip's -quickgelu ones), False for open_clip's GELU
    ones (LAION-2B, DataComp...): nothing in the state dict says which, and the wrong one silently degrades it."""
    sd = {k: v for k, v in state_dict.items() if k not in OPENAI_EXTRAS}
    config = infer_config(sd)
    try:
        model = CLIPModel(**config, quick_gelu=quick_gelu)
        model.load_state_dict(sd, strict=True)
    except (RuntimeError, ValueError, ZeroDivisionError, AssertionError) as e:  # odd shapes: odd errors
        raise ValueError(f"state dict does not fit the architecture inferred from its shapes {config}: "
                         f"{str(e)[:400]}") from None
    return model.eval()


def check_ours(checkpoint, path):
    """A train.py checkpoint's entries, each as train.py writes it, before anything is built from them: its method
    names the module imported (whose code runs), its model_config the model allocated (the weights' shapes' one)."""
    def expect(entry, value, ok, what):
        if not ok:
            fail(f"{path} is not a checkpoint of train.py as it writes them: its {entry} is {value!r:.60}, not {what}")

    if not (isinstance(checkpoint, dict) and "config" in checkpoint):
        fail(f"{path} is not a checkpoint of train.py (it has no config and step to resume from)")
    config = checkpoint["config"] if isinstance(checkpoint["config"], dict) else {}
    method = config.get("method")
    expect("method", method, isinstance(method, str) and method in METHODS, f"one of {', '.join(METHODS)}")
    for key, kinds in (("model", (str,)), ("batch_size", (int,)), ("seed", (int,)), ("tokenizer", (str,)),
                       ("pretrained", (str, type(None)))):  # a default where train.py once wrote none
        expect(key, config.get(key), type(config.get(key, "clip")) in kinds, f"of type {kinds[0].__name__}")
    step, model_config, kwargs = (checkpoint.get(key) for key in ("step", "model_config", "method_kwargs"))
    expect("step", step, type(step) is int and step >= 0, "a count of steps")
    for key, entry in ((key, checkpoint.get(key)) for key in ("model", "method")):
        expect(key, type(entry).__name__, isinstance(entry, dict) and all(isinstance(k, str) and torch.is_tensor(v)
                                                                         for k, v in entry.items()), "named tensors")
    keys = set(inspect.signature(CLIPModel).parameters) - {"patch_dropout"}  # a train.py run's model_config
    expect("model_config", model_config, isinstance(model_config, dict) and keys - {"quick_gelu"} <= set(model_config)
           <= keys and type(model_config.get("quick_gelu", True)) is bool, f"a dict of {', '.join(sorted(keys))}")
    expect("method_kwargs", kwargs, isinstance(kwargs, dict) and all(isinstance(k, str) for k in kwargs), "a dict")
    try:
        shapes = infer_config(checkpoint["model"])
    except ValueError as e:
        fail(f"{path}: {e}")
    for key in shapes:  # nothing bigger than the weights is ever built (repr: a tensor compares element-wise)
        expect(f"model_config's {key}", model_config[key], repr(model_config[key]) == repr(shapes[key]),
               f"{shapes[key]}, as its weights' shapes say")


def check_tensors(named, path):
    """(name, tensor) pairs: each holds the elements it claims (with stride 0, a terabyte in a few bytes, and models are
    built from shapes), only finite ones: NaN weights evaluate at chance, and train to a NaN loss blamed on the lr."""
    for name, t in named:
        if t.untyped_storage().nbytes() < t.numel() * t.element_size():
            fail(f"{path}: {name} claims more elements than its storage holds; not loaded")
        if (t.is_floating_point() or t.is_complex()) and not torch.isfinite(t).all():
            fail(f"{path}: {name} holds NaN or infinite values; not loaded (they evaluate at chance, train to NaN)")


def load_method(path, device="cpu", trust=False, quick_gelu=None):
    """A checkpoint to evaluate -> (method in eval mode, tokenizer). Our checkpoints rebuild their own method; any
    other CLIP state dict (OpenAI's, open_clip's) is evaluated as CLIP. quick_gelu: the activation, which a state dict
    cannot tell (build_model); None: our checkpoint's recorded one, QuickGELU for any other state dict."""
    checkpoint = read(path, trust)
    if isinstance(checkpoint, dict) and "config" in checkpoint:  # written by train.py
        check_ours(checkpoint, path)
        config, kwargs, state = checkpoint["config"], checkpoint["method_kwargs"], method_state(checkpoint)
        check_tensors(state.items(), path)
        act = {} if quick_gelu is None else {"quick_gelu": quick_gelu}  # an explicit choice overrides the recorded one
        model_config, name = {**checkpoint["model_config"], **act}, config.get("tokenizer")
        Method = importlib.import_module(config["method"]).Method
        try:
            with torch.device("meta"):  # shapes only: method_kwargs that ask for a huge head or queue allocate nothing
                shapes = Method(CLIPModel(**model_config), **kwargs).state_dict()
            if shapes.keys() != state.keys() or any(shapes[k].shape != v.shape for k, v in state.items()):
                raise ValueError("its tensors are other ones, or of other shapes")
            method = Method(CLIPModel(**model_config), **kwargs)
            method.load_state_dict(state)
        except (RuntimeError, TypeError, ValueError) as e:  # method_kwargs the method does not take, other heads
            fail(f"{path} does not match --method {config['method']} with its method_kwargs {kwargs}: {e}")
        try:
            tokenizer = get_tokenizer(name or "clip")  # a tiktoken encoding is downloaded on first use
        except Exception as e:  # tiktoken: an unknown name (ValueError), no network for its first download, ...
            fail(f"{path} was trained with --tokenizer {name!r:.40}, which cannot be loaded: {e}")
        if tokenizer.vocab_size != method.model.vocab_size:  # its ids would index past the token embedding
            fail(f"{path} records --tokenizer {name}, of {tokenizer.vocab_size} ids, for {method.model.vocab_size} "
                 f"token embeddings")
    else:
        state_dict = clip_state_dict(checkpoint, path)
        check_tensors(state_dict.items(), path)
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
    odd = [k for k, v in state_dict.items() if not (isinstance(k, str) and torch.is_tensor(v))]
    if odd:
        fail(f"{path} is not a state dict: its {odd[0]!r:.60} holds no tensor but {str(state_dict[odd[0]])[:40]!r}")
    # open_clip saves DDP's prefix; OpenAI's (JIT) files carry three scalars that are not parameters, a TorchScript
    # archive of open_clip's model its causal mask (a buffer it does not save in its state dicts)
    return {k.removeprefix("module."): v for k, v in state_dict.items() if k not in (*OPENAI_EXTRAS, "attn_mask")}


def method_state(checkpoint):
    """A train.py checkpoint's state dict of the whole method: the model's ("model", OpenAI's layout) and the rest."""
    return {**{"model." + k: v for k, v in checkpoint["model"].items()}, **checkpoint["method"]}
