"""plumbing/torchscript.py: a TorchScript archive read as data, never by torch.jit.load (which runs the archive's code).

1. An archive whose __setstate__ writes into a file (torch.from_file(path, shared=True, n)): torch.jit.load writes it
   (so the fixture is real); our reader, and every program that reads checkpoints, writes nothing. One whose
   __setstate__ never returns: refused at once.
2. model.CLIPModel in OpenAI's layout, traced and scripted, fp32 and fp16 with OpenAI's three integer buffers: the keys,
   order, dtypes and bits of torch.jit.load(path).state_dict(), and weights.read gives them without torch.jit.load.
3. Damaged and hostile archives: one TorchScriptError each, and nothing called.
"""

import collections
import copyreg
import io
import os
import pickle
import subprocess
import sys
import threading
import types
import warnings
import zipfile

import pytest
import torch

import eval_zeroshot
from model import CONFIGS, CLIPModel
from plumbing import weights
from plumbing.torchscript import TorchScriptError, read
from test_train import TINY, main_error


class Evil(torch.nn.Module):
    """Its __setstate__, which torch.jit.load runs, writes b"PWNED\\n" over the first 6 bytes of the file `target`."""

    def __init__(self, target):
        super().__init__()
        self.w, self.target, self.n = torch.nn.Parameter(torch.ones(2)), target, 0

    def forward(self, x):
        return x * self.w

    @torch.jit.export
    def __getstate__(self) -> tuple[torch.Tensor, str, bool]:
        return (self.w, self.target, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, str, bool]) -> None:
        self.w = state[0]
        self.target = state[1]
        self.training = state[2]
        written = torch.from_file(state[1], True, 6, dtype=torch.uint8)
        written.copy_(torch.tensor([80, 87, 78, 69, 68, 10], dtype=torch.uint8))
        self.n = int(written.sum())  # used, so that the compiler keeps the write


class Loop(torch.nn.Module):
    """Its __setstate__ never returns."""

    def __init__(self):
        super().__init__()
        self.w, self.n = torch.nn.Parameter(torch.ones(2)), 0

    def forward(self, x):
        return x * self.w

    @torch.jit.export
    def __getstate__(self) -> tuple[torch.Tensor, bool]:
        return (self.w, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, bool]) -> None:
        self.w = state[0]
        self.training = state[1]
        i = 1
        while i > 0:
            i = i * 1
        self.n = i


class DictLoop(Loop):
    """Its state is a dict of names, as a plain module's is, and its __setstate__ never returns: refused for the
    __setstate__, not for the state's form."""

    @torch.jit.export
    def __getstate__(self) -> dict[str, torch.Tensor]:
        return {"w": self.w}

    @torch.jit.export
    def __setstate__(self, state: dict[str, torch.Tensor]) -> None:
        self.w = state["w"]
        i = 1
        while i > 0:
            i = i * 1
        self.n = i


def identity(self, x: torch.Tensor) -> torch.Tensor:
    return x


def scriptable(model):
    """model.py's modules, each given a class of the same name with a trivial forward (their own forwards do not
    script): torch.jit.script keeps the module tree, parameters, buffers and attributes, as a scripted CLIP would."""
    shells = {}
    for module in model.modules():
        cls = type(module)
        if cls.__module__ == "model":
            shells.setdefault(cls, type(cls.__name__, (torch.nn.Module,), dict(
                __module__="model", __qualname__=cls.__qualname__, forward=identity)))
            module.__class__ = shells[cls]
    return model


def openai_like(path, name, how, fp16=False):
    """model.CLIPModel as a TorchScript archive: traced or scripted; fp16 as OpenAI's files, with their three integer
    buffers (input_resolution, context_length, vocab_size) and BatchNorm statistics that are not their init."""
    torch.manual_seed(0)
    cfg = CONFIGS[name]
    model = CLIPModel(**cfg).eval()
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if "running" in k:
                v.copy_(torch.rand_like(v) + 0.5)
    if fp16:
        for key, value in (("input_resolution", cfg["image_resolution"]), ("context_length", cfg["context_length"]),
                           ("vocab_size", cfg["vocab_size"])):
            vars(model).pop(key, None)  # model.py keeps two of them as plain ints
            model.register_buffer(key, torch.tensor(value))
    if how == "trace":
        inputs = (torch.zeros(2, 3, cfg["image_resolution"], cfg["image_resolution"]),
                  torch.zeros(2, cfg["context_length"], dtype=torch.long))
        archive = torch.jit.trace(model, inputs, check_trace=False)
    else:
        archive = torch.jit.script(scriptable(model))
    (archive.half() if fp16 else archive).save(path)
    return path


@pytest.fixture(scope="module")
def archives(tmp_path_factory):
    folder = tmp_path_factory.mktemp("archives")
    with warnings.catch_warnings():  # tracing and scripting warn about their own limits and deprecation
        warnings.simplefilter("ignore")
        made = {f"{name} {how}{' fp16' * fp16}": openai_like(str(folder / f"{name}-{how}-{fp16}.pt"), name, how, fp16)
                for name, how, fp16 in [("tiny-vit", "trace", False), ("tiny-vit", "script", False),
                                        ("tiny-rn", "trace", False), ("tiny-rn", "script", False),
                                        ("tiny-vit", "trace", True), ("tiny-rn", "script", True)]}
        torch.jit.script(Loop()).save(str(folder / "loop.pt"))
        torch.jit.script(DictLoop()).save(str(folder / "dict-loop.pt"))
    return dict(made, loop=str(folder / "loop.pt"), dict_loop=str(folder / "dict-loop.pt"))


def jit_state_dict(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.load(path, map_location="cpu").state_dict()


def test_an_archive_that_writes_a_file_is_refused_and_writes_nothing(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"the user's file\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(Evil(str(victim))).save(str(tmp_path / "evil.pt"))
    evil = str(tmp_path / "evil.pt")
    with pytest.raises(TorchScriptError, match="own __setstate__") as refused:
        read(evil)
    assert refused.value.runs_code
    with pytest.raises(SystemExit) as stopped:  # every reader of a checkpoint
        eval_zeroshot.main(["--checkpoint", evil, "--workers", "0"])
    for message in (str(stopped.value), main_error("--pretrained", evil, *TINY, "--out-dir", tmp_path / "o"),
                    main_error("--resume", evil, *TINY, "--out-dir", tmp_path / "o")):
        assert "evil.pt was not loaded: it is a TorchScript archive" in message and "--trust-checkpoint" in message
    assert victim.read_bytes() == b"the user's file\n" and sorted(os.listdir(tmp_path)) == ["evil.pt", "victim.txt"]
    # the fixture is real: torch.jit.load runs the archive's __setstate__, which writes into the file
    subprocess.run([sys.executable, "-c", f"import torch; torch.jit.load({evil!r})"], check=True, capture_output=True,
                   timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert victim.read_bytes()[:6] == b"PWNED\n"


@pytest.mark.parametrize("name", ["loop", "dict_loop"])
def test_an_endless_setstate_is_refused_at_once(archives, name):
    outcome = []
    reader = threading.Thread(target=lambda: outcome.append(pytest.raises(TorchScriptError, read, archives[name])),
                              daemon=True)
    reader.start()
    reader.join(timeout=20)
    assert outcome and outcome[0].value.runs_code and "Loop is rebuilt by its own __setstate__" in str(outcome[0].value)


@pytest.mark.parametrize("name", ["tiny-vit trace", "tiny-vit script", "tiny-rn trace", "tiny-rn script",
                                  "tiny-vit trace fp16", "tiny-rn script fp16"])
def test_openai_layout_reads_bit_identically(archives, monkeypatch, name):
    theirs = jit_state_dict(archives[name])
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: pytest.fail("torch.jit.load was called"))
    ours = weights.read(archives[name])
    assert list(ours) == list(theirs)
    assert all(ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]) for k in theirs)
    if "fp16" in name:
        assert ours["visual.conv1.weight"].dtype == torch.float16 and int(ours["vocab_size"]) == 49408
    a, b = (weights.build_model(weights.clip_state_dict(sd, "x")).state_dict() for sd in (ours, theirs))
    assert all(torch.equal(a[k], b[k]) for k in a)


# damaged and hostile archives: a real one changed, and crafted ones (data.pkl pickled from stand-ins)


def rezip(source, path, replace=None, drop=()):
    """A copy of the archive `source` with members replaced ({name under the folder: bytes}) or dropped."""
    with zipfile.ZipFile(source) as a, zipfile.ZipFile(path, "w") as b:
        for item in a.infolist():
            name = item.filename.split("/", 1)[1]
            if name not in drop:
                b.writestr(item, (replace or {}).get(name, a.read(item)))
    return path


class Tensor:  # pickles as _rebuild_tensor_v2 of a storage (key, numel) with this offset, size, stride
    def __init__(self, key, numel, offset, size, stride):
        self.storage, self.args = (key, numel), (offset, size, stride)

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, (Storage(*self.storage), *self.args, False, collections.OrderedDict())


Storage = collections.namedtuple("Storage", "key numel")
sys.modules["__torch__"] = types.ModuleType("__torch__")  # so that pickle names the stand-in class __torch__.M


class M:
    def __init__(self, **attributes):
        self.attributes = attributes

    def __reduce__(self):
        return copyreg.__newobj__, (M,), dict(training=False, **self.attributes)


M.__module__, M.__qualname__, sys.modules["__torch__"].M = "__torch__", "M", M
FOUR = torch.arange(4.0).numpy().tobytes()


def craft(path, root, byteorder=b"little"):
    """An archive whose data.pkl pickles `root`, class M (code: a Module with parameter w), storage 0 = FOUR."""
    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", torch.FloatStorage, obj.key, "cpu", obj.numel) if isinstance(obj, Storage) else None
    data = io.BytesIO()
    Pickler(data, protocol=2).dump(root)
    with zipfile.ZipFile(path, "w") as z:
        for name, content in (("data.pkl", data.getvalue()), ("constants.pkl", b"\x80\x02)."), ("data/0", FOUR),
                              ("byteorder", byteorder), ("code/__torch__.py", 'class M(Module):\n  __parameters__ = '
                                                                             '["w", ]\n  __buffers__ = []\n')):
            z.writestr(f"arc/{name}", content)
    return str(path)


def test_a_crafted_archive_reads(tmp_path):
    state = read(craft(tmp_path / "ok.pt", M(w=Tensor("0", 4, 0, (2, 2), (2, 1)))))
    assert list(state) == ["w"] and torch.equal(state["w"], torch.arange(4.0).view(2, 2))
    with pytest.raises(TorchScriptError, match=r"offset 1 reaches past its storage of 4: damaged"):  # by one element
        read(craft(tmp_path / "past.pt", M(w=Tensor("0", 4, 1, (2, 2), (2, 1)))))


def hostile(tmp_path, small):
    """name -> archive: each must be refused with one TorchScriptError, nothing called."""
    marker = tmp_path / "called"
    pkl = zipfile.ZipFile(small).read(zipfile.ZipFile(small).namelist()[0].split("/")[0] + "/data.pkl")
    cycle = M(w=Tensor("0", 4, 0, (4,), (1,)))
    cycle.attributes["child"] = cycle
    bomb = M(w=Tensor("0", 4, 0, (4,), (1,)))
    for _ in range(60):  # each module holds the next twice: 2^60 paths
        bomb = M(left=bomb, right=bomb)
    return marker, {
        "cut in half": (lambda p: p.write_bytes(open(small, "rb").read()[:os.path.getsize(small) // 2]) or str(p)),
        "data.pkl cut": lambda p: rezip(small, p, replace={"data.pkl": pkl[:len(pkl) // 2]}),
        "a storage missing": lambda p: rezip(small, p, drop=("data/3",)),
        "a storage short": lambda p: rezip(small, p, replace={"data/3": b"\0" * 8}),
        **{f"data.pkl naming {name}": (lambda payload: lambda p: rezip(small, p, replace={"data.pkl": payload}))(
            f"\x80\x02c{name}\n(V{command}\ntR.".encode()) for name, command in (
            ("os\nsystem", f"touch {marker}"), ("builtins\neval", f"open({str(marker)!r}, 'w')"),
            ("subprocess\ncall", f"touch {marker}"), ("torch.jit\nload", str(small)))},
        "a C++ class": lambda p: rezip(small, p, replace={
            "data.pkl": b"\x80\x02c__torch__.torch.classes.quantized\nLinearPackedParamsBase\n)\x81."}),
        "a tensor past its storage": lambda p: craft(p, M(w=Tensor("0", 4, 3, (2, 2), (2, 1)))),
        "a negative stride": lambda p: craft(p, M(w=Tensor("0", 4, 0, (2, 2), (-1, 1)))),
        "a storage key that is a path": lambda p: craft(p, M(w=Tensor("../../x", 4, 0, (4,), (1,)))),
        "a module that holds itself": lambda p: craft(p, cycle),
        "a shared-submodule bomb": lambda p: craft(p, bomb),
        "big-endian": lambda p: craft(p, M(w=Tensor("0", 4, 0, (4,), (1,))), byteorder=b"big"),
        "not a module": lambda p: craft(p, [Tensor("0", 4, 0, (4,), (1,))]),
    }


def test_damaged_and_hostile_archives_are_refused(archives, tmp_path):
    marker, cases = hostile(tmp_path, archives["tiny-vit trace"])
    for i, (name, make) in enumerate(cases.items()):
        with pytest.raises(TorchScriptError):
            read(make(tmp_path / f"{i}.pt"))
        message = main_error("--resume", tmp_path / f"{i}.pt", *TINY, "--out-dir", tmp_path / "o")  # one line
        assert f"{i}.pt" in message, (name, message)
    assert not marker.exists()
