"""
Checkpoints: the one reader of checkpoint files (train.py --resume and --pretrained, eval_zeroshot.py, eval_linear.py),
and train.py's saving and resuming.

train.py writes OUT/ckpt.pt: {"model": the OpenAI-layout state dict (loads into OpenAI's and open_clip's code),
"method": the method's own state (heads, queue, bias), "optimizer", "step", "config" (train.py's flags),
"model_config", "method_kwargs", "rank_buffers" (every rank's buffers, when there are several), "stream" (where the
readers of tar shards stand)}: tensors and plain Python values only, so that torch.load(weights_only=True) reads it.

A checkpoint on disk is always one that training can continue from. Finite weights are not enough for that: one huge
step (a weight decay of 1e30, say) leaves finite weights from which every loss is NaN. So a checkpoint is written to
ckpt.pt.tmp, and becomes ckpt.pt (an atomic rename) once the next step's loss, computed from exactly those weights, is
finite; the run's last one, with no next step, once its weights and losses are. A .tmp found at start is either a
killed save or one never vouched for: not a checkpoint.
"""

import fcntl
import importlib
import math
import os
import re
import warnings
import zipfile

import torch

import distributed
from model import CLIPModel
from runlog import fail
from tokenizer import get_tokenizer


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


def resume_path(args):
    """--resume's file: --out-dir's ckpt.pt, or the path given"""
    return os.path.join(args.out_dir, "ckpt.pt") if args.resume == "auto" else args.resume


def recorded(path, trust=False):
    """-> (config, model_config) of a train.py checkpoint, read without loading its tensors (memory-mapped)"""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Detected pickle protocol")
            found = torch.load(path, map_location="cpu", weights_only=not trust, mmap=True)
    except Exception:  # not a file torch maps, or one read refuses: read says which, in one line
        found = read(path, trust)
    if not (isinstance(found, dict) and "config" in found and "model_config" in found and "step" in found):
        fail(f"{path} is not a checkpoint of train.py (it has no config and step to resume from)")
    return found["config"], found["model_config"]


def resume(path, method, optimizer, args):
    """--resume: load a train.py checkpoint into the method and its optimiser, after checking it is one of this run's
    method and model -> (its step, its record of a shard stream or None, this rank's own buffers or None). The lr
    schedule and the weight decay stay this run's flags; AdamW's moments and step counts are the checkpoint's."""
    checkpoint = read(path, args.trust_checkpoint)
    if not (isinstance(checkpoint, dict) and "config" in checkpoint and "step" in checkpoint):
        fail(f"{path} is not a checkpoint of train.py (it has no config and step to resume from)")
    config = checkpoint["config"]
    for flag in ("method", "model", "batch_size", "seed"):  # another batch size or seed: other samples in the stream
        if config[flag] != getattr(args, flag):
            fail(f"{path} was trained with --{flag.replace('_', '-')} {config[flag]}, this run has "
                 f"{getattr(args, flag)}: pass the checkpoint's to resume it")
    try:
        method.load_state_dict(method_state(checkpoint))
        decays = [group["weight_decay"] for group in optimizer.param_groups]
        optimizer.load_state_dict(checkpoint["optimizer"])
    except (RuntimeError, ValueError) as e:
        fail(f"{path} does not fit this run's --method-args, --tokenizer, --freeze-patch-embed or --lock-* flags: {e}")
    for group, decay in zip(optimizer.param_groups, decays):
        group["weight_decay"] = decay
    if checkpoint["step"] >= args.steps:
        fail(f"{path} already trained {checkpoint['step']} steps; pass a larger --steps to train on")
    rank, world = distributed.rank_and_world()
    rank_buffers = checkpoint.get("rank_buffers") or ()  # each rank's own, where they differ (DeCLIP's queue)
    if rank == 0:
        print(f"resumed from {path} at step {checkpoint['step']}")
    return checkpoint["step"], checkpoint.get("stream"), rank_buffers[rank] if len(rank_buffers) == world else None


def method_state(checkpoint):
    """A train.py checkpoint's state dict of the whole method: the model's ("model", OpenAI's layout) and the rest."""
    return {**{"model." + k: v for k, v in checkpoint["model"].items()}, **checkpoint["method"]}


def write(path, method, optimizer, step, meta):
    """The checkpoint of a step, to `path`; a failed write (a full disk) raises OSError and leaves no partial file."""
    model_state = method.model.state_dict()
    method_state = {k: v for k, v in method.state_dict().items() if not k.startswith("model.")}
    checkpoint = dict(model=model_state, method=method_state, optimizer=optimizer.state_dict(), step=step, **meta)
    with open(path, "wb") as f:
        writes = Writes(f)
        try:
            torch.save(checkpoint, writes)
        except (OSError, RuntimeError) as e:
            os.remove(path)
            if writes.error or isinstance(e, OSError):
                raise writes.error or e from None
            raise


class Writes:
    """A file that keeps the error of its failed write: torch.save reports one only as "unexpected pos ..."."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, b):
        try:
            return self.f.write(b)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        self.f.flush()


def finite(method, optimizer):
    """Whether every parameter, buffer and optimiser state tensor is finite, on every rank."""
    tensors = list(method.state_dict().values())
    tensors += [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    device = next(method.parameters()).device  # one sync: AdamW keeps its step counts on the CPU unless fused
    return distributed.all_ranks(torch.stack([torch.isfinite(t).all().to(device) for t in tensors
                                              if t.is_floating_point()]).all())


class Checkpoints:
    """train.py's OUT/ckpt.pt, saved every `save_every` steps and at the last, by the rule in the module docstring.
    Every rank calls every method (saving gathers every rank's state); rank 0 writes. resumed: (path, step) of the
    checkpoint the run resumed from."""

    def __init__(self, out_dir, steps, save_every, meta, resumed=None):
        self.path = os.path.join(out_dir, "ckpt.pt")
        self.tmp = self.path + ".tmp"
        self.steps, self.save_every, self.meta = steps, save_every, meta
        here = resumed and os.path.abspath(resumed[0]) == os.path.abspath(self.path)
        self.on_disk = resumed[1] if here else None  # the step ckpt.pt holds, once this run has one there
        self.waiting = None  # the step ckpt.pt.tmp holds, until a finite loss from its weights vouches for it
        self.master = distributed.rank_and_world()[0] == 0
        if self.master and os.path.lexists(self.tmp):
            os.remove(self.tmp)

    def due(self, step):
        return step % self.save_every == 0 or step == self.steps

    def save(self, step, method, optimizer, stream, last=False):
        """last: the run's last step, or the step at which a signal stops it (RunLog.stopping): with no next step to
        vouch for it, it becomes ckpt.pt once its weights and losses (synced at this step) are finite."""
        if not finite(method, optimizer):
            self.stop(f"the weights are not finite after step {step}")
        rank_buffers, positions = distributed.rank_state(method, stream.lanes)  # a collective: on every rank
        if self.master:
            record = dict(readers=stream.readers, shards=stream.shards, lanes=positions) if stream.shards else None
            try:
                write(self.tmp, method, optimizer, step, dict(self.meta, rank_buffers=rank_buffers, stream=record))
            except OSError as e:
                self.stop(f"could not write {self.tmp}: {(e.strerror or str(e)).lower()}; removed the partial file",
                          then="Free some space, then")
        self.waiting = step
        if last or step == self.steps:
            self.vouch(step + 1)

    def vouch(self, finite_through):
        """The losses up to step `finite_through` are finite: a checkpoint of an earlier step becomes ckpt.pt."""
        if self.waiting is not None and finite_through > self.waiting:
            if self.master:
                os.replace(self.tmp, self.path)  # atomic: ckpt.pt is always a whole checkpoint
            self.on_disk, self.waiting = self.waiting, None

    def stop(self, reason, then="Lower --lr or add --grad-clip 1.0, then"):
        if self.master and self.waiting is not None and os.path.lexists(self.tmp):
            os.remove(self.tmp)
        kept = f"{self.path} holds step {self.on_disk}" if self.on_disk is not None else "no checkpoint was written"
        fail(f"{reason}; stopped, {kept}. {then} " + ("--resume." if self.on_disk is not None else "start again."))


held = {}  # out_dir -> the descriptor of this process's lock there (claim), open while the process lives


def claim(out_dir, fresh):
    """Make OUT this run's, or stop with one line: OUT is created if need be and locked (OUT/.lock, released when the
    process ends), so that a second run there stops instead of mixing its log and checkpoints with this one's; and a
    fresh run (no --resume) does not start where a run's log or checkpoint would be overwritten."""
    for fd in held.values():  # an earlier run of this process (tests call train.main repeatedly)
        os.close(fd)
    held.clear()
    try:
        os.makedirs(out_dir, exist_ok=True)
        fd = os.open(os.path.join(out_dir, ".lock"), os.O_RDWR | os.O_CREAT)
    except OSError as e:
        fail(f"--out-dir {out_dir}: {(e.strerror or str(e)).lower()}; pass a folder this user can write")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fail(f"another run (process {os.read(fd, 20).decode().strip() or '?'}) is training in {out_dir}; wait for it "
             f"or pass another --out-dir")
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    held[out_dir] = fd
    found = [name for name in ("ckpt.pt", "log.jsonl") if os.path.exists(os.path.join(out_dir, name))]
    if fresh and found:
        fail(f"{out_dir} holds a run ({' and '.join(found)}): pass --resume to continue it, or another --out-dir "
             f"(or remove it) to start a new one")
