"""
A TorchScript archive (OpenAI's CLIP .pt files) read as data: the state dict torch.jit.load(path).state_dict() gives,
without calling anything the archive holds. torch.jit.load runs its TorchScript, such as a class's __setstate__, which
can write any file the user may write or loop forever: weights.read calls it only with --trust-checkpoint.

An archive (torch.jit.save) is a zip under one folder: data.pkl, the module tree, a pickle; data/<key>, each storage's
bytes; code/<path>.py, each class's TorchScript source, whose __parameters__ and __buffers__ name the tensors of the
state dict; constants.pkl, which torch.save never writes. In data.pkl each module is made by NEWOBJ of a class
__torch__.<path>.<Class> and given its attributes by BUILD with a dict (a class with its own __getstate__: that
method's tuple, for its __setstate__); a tensor is torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...),
a storage the persistent id ("storage", torch.<Type>Storage, key, device, numel). data.pkl goes through pickle's
pure-Python unpickler, whose every name is looked up by find_class: checked stand-ins rebuild tensors and lists (never
torch's functions), each __torch__ class an inert Record of its state; code/ is parsed with ast, never compiled.
"""

import ast
import collections
import io
import math
import pickle
import re
import zipfile

import torch


class TorchScriptError(ValueError):
    """The archive cannot be read as data; runs_code: only its own code could rebuild it (else it is damaged)."""

    def __init__(self, message, runs_code=False):
        super().__init__(message)
        self.runs_code = runs_code


MAX_BYTES = 256 << 20  # of the members read whole (data.pkl, code/): a legitimate archive holds a few MiB
MAX_MODULES = 100_000  # the walk's visits: one submodule held twice at each of 60 levels is 2^60 paths
STORAGES = {f"{name}Storage": dtype for name, dtype in [
    ("Double", torch.float64), ("Float", torch.float32), ("Half", torch.float16), ("BFloat16", torch.bfloat16),
    ("Long", torch.int64), ("Int", torch.int32), ("Short", torch.int16), ("Char", torch.int8), ("Byte", torch.uint8),
    ("Bool", torch.bool), ("ComplexFloat", torch.complex64), ("ComplexDouble", torch.complex128)]}
Storage = collections.namedtuple("Storage", "data")  # a storage of the archive: its elements, a flat tensor
ArchiveClass = collections.namedtuple("ArchiveClass", "name is_module setstate parameters buffers")


def is_torchscript(path):
    """A zip whose one folder holds constants.pkl, which torch.save never writes."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.count("/") == 1 and name.endswith("/constants.pkl") for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):  # not a zip: torch.load's formats, or not a checkpoint
        return False


class Record:
    """An object of a class of the archive, as data: its class and the state BUILD gave it; nothing calls it."""

    def __init__(self, cls):
        self.cls, self.state = cls, None


def read_code(archive, folder):
    """{qualified name: ArchiveClass} of every class in ARCHIVE/code/, parsed with ast (never compiled or run)."""
    classes = {}
    code = [i for i in archive.infolist() if i.filename.startswith(f"{folder}/code/") and i.filename.endswith(".py")]
    for info in code:
        module = info.filename[len(folder) + 6:-3].replace("/", ".")  # __torch__/model.py -> __torch__.model
        for node in ast.parse(archive.read(info).decode("utf-8")).body:
            if not isinstance(node, ast.ClassDef):
                continue
            lists = {item.targets[0].id: item.value for item in node.body if isinstance(item, ast.Assign)
                     and len(item.targets) == 1 and isinstance(item.targets[0], ast.Name)}
            names = [{e.value for e in getattr(lists.get(key), "elts", ()) if isinstance(e, ast.Constant)}
                     for key in ("__parameters__", "__buffers__")]
            classes[f"{module}.{node.name}"] = ArchiveClass(
                f"{module}.{node.name}", any(isinstance(b, ast.Name) and b.id == "Module" for b in node.bases),
                any(isinstance(f, ast.FunctionDef) and f.name == "__setstate__" for f in node.body), *names)
    return classes


def rebuild_tensor(storage, offset, size, stride, *flags):
    """torch._utils._rebuild_tensor_v2, checked: a view of a storage of the archive that stays inside it (its
    requires_grad and hooks are not kept: a state dict holds the values)."""
    if not isinstance(storage, Storage):
        raise TorchScriptError(f"a tensor's storage is a {type(storage).__name__}, not a storage of the archive")
    if not (type(offset) is int and offset >= 0 and isinstance(size, tuple) and isinstance(stride, tuple)
            and len(size) == len(stride) and all(type(n) is int and n >= 0 for n in size + stride)):
        raise TorchScriptError(f"a tensor's offset {offset!r:.20}, size {size!r:.40} or stride {stride!r:.40} is not "
                               f"integers 0 or more")
    end = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1 if math.prod(size) else offset
    if end > len(storage.data):
        raise TorchScriptError(f"a tensor of size {size}, stride {stride}, offset {offset} reaches past its storage "
                               f"of {len(storage.data)}: damaged")
    return storage.data.as_strided(size, stride, offset) if math.prod(size) else storage.data.new_empty(size)


BUILDERS = {("torch._utils", "_rebuild_tensor_v2"): rebuild_tensor,
            ("collections", "OrderedDict"): collections.OrderedDict,  # a tensor's (empty) hooks
            ("torch.jit._pickle", "restore_type_tag"): lambda value, type_name: value,  # a typed list or dict
            **{("torch.jit._pickle", f"build_{kind}list"): list for kind in ("int", "double", "bool", "tensor")}}


class Unpickler(pickle._Unpickler):
    """find_class gives BUILDERS, dtypes, ArchiveClasses; NEWOBJ and BUILD make and fill Records; persistent_load reads
    storages."""
    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, data, archive, folder, classes):
        super().__init__(io.BytesIO(data))
        self.archive, self.folder, self.classes, self.storages = archive, folder, classes, {}

    def find_class(self, module, name):
        if (module, name) in BUILDERS:
            return BUILDERS[module, name]
        if module == "torch" and name in STORAGES:
            return STORAGES[name]
        if module.startswith("__torch__.torch.classes"):  # C++ classes (quantized weights' packed parameters, ...)
            raise TorchScriptError(f"it holds a C++ class, {module}.{name}, which only its own code rebuilds",
                                   runs_code=True)
        if module.startswith("__torch__") and f"{module}.{name}" in self.classes:
            return self.classes[f"{module}.{name}"]
        raise TorchScriptError(f"data.pkl names {module}.{name}, which is neither a tensor, a container nor a class "
                               f"of the archive", runs_code=not module.startswith("__torch__"))

    def persistent_load(self, pid):
        kind, dtype, key, _, numel = pid if isinstance(pid, tuple) and len(pid) == 5 else (None,) * 5
        if not (kind == "storage" and isinstance(dtype, torch.dtype) and isinstance(key, str)
                and re.fullmatch(r"\w{1,64}", key) and type(numel) is int and numel >= 0):
            raise TorchScriptError(f"data.pkl refers to {pid!r:.80}, not to a storage of the archive")
        if key not in self.storages:
            member = self.archive.getinfo(f"{self.folder}/data/{key}")  # KeyError: a storage missing (damaged)
            size = numel * dtype.itemsize
            if member.compress_type != zipfile.ZIP_STORED or member.file_size < size:  # torch never compresses one
                raise TorchScriptError(f"storage {key} is compressed" if member.compress_type else f"storage {key} "
                                       f"holds {member.file_size} bytes, not the {size} of {numel} × {dtype}: damaged")
            data = bytearray(size)
            with self.archive.open(member) as f:
                if size and f.readinto(data) != size:
                    raise TorchScriptError(f"storage {key} ends before its {size} bytes: damaged")
            self.storages[key] = Storage(torch.frombuffer(data, dtype=dtype) if size else torch.empty(0, dtype=dtype))
        return self.storages[key]

    def load_newobj(self):
        self.stack.pop()  # the arguments: a Record takes none
        cls = self.stack.pop()
        if not isinstance(cls, ArchiveClass):
            raise TorchScriptError(f"data.pkl makes an object of {cls!r:.60}, not of a class of the archive")
        self.append(Record(cls))

    def load_build(self):
        state, record = self.stack.pop(), self.stack[-1]
        if not isinstance(record, Record) or record.state is not None:
            raise TorchScriptError(f"data.pkl sets the state of a {type(record).__name__}, or twice: damaged")
        if record.cls.setstate or not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            raise TorchScriptError(f"{record.cls.name} is rebuilt by its own __setstate__, code that torch.jit.load "
                                   f"would run", runs_code=True)
        record.state = state

    dispatch[pickle.NEWOBJ[0]] = load_newobj
    dispatch[pickle.BUILD[0]] = load_build


def state_dict(root):
    """The tree's parameters, then buffers, in attribute order, then its submodules', depth first (a module held twice,
    twice), named as torch.jit.load's state_dict() names them. A tree that holds itself: RecursionError, damaged."""
    out, visits = collections.OrderedDict(), [0]

    def visit(module, prefix):
        visits[0] += 1
        if visits[0] > MAX_MODULES or module.state is None:
            raise TorchScriptError(f"its module tree is over {MAX_MODULES} modules, or {module.cls.name} has no state")
        for kind in (module.cls.parameters, module.cls.buffers):
            for name, value in module.state.items():
                if name in kind and value is not None:
                    if not isinstance(value, torch.Tensor):
                        raise TorchScriptError(f"{prefix}{name} is a {type(value).__name__}, not a tensor: damaged")
                    out[prefix + name] = value
        for name, value in module.state.items():
            if isinstance(value, Record) and value.cls.is_module:
                visit(value, f"{prefix}{name}.")

    if not (isinstance(root, Record) and root.cls.is_module):
        raise TorchScriptError(f"data.pkl holds a {type(root).__name__}, not a module of the archive")
    visit(root, "")
    return out


def read(path):
    """-> the state dict of the TorchScript archive at `path`, read as data; TorchScriptError if it cannot be."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            pickles = [name for name in names if name.count("/") == 1 and name.endswith("/data.pkl")]
            if len(pickles) != 1 or len({name.split("/")[0] for name in names}) != 1:
                raise TorchScriptError(f"it holds {len(pickles)} data.pkl where an archive holds one, in one folder")
            folder = pickles[0].split("/")[0]
            if f"{folder}/byteorder" in names and archive.read(f"{folder}/byteorder").strip() != b"little":
                raise TorchScriptError("a big-endian archive: its tensors would be read byte-swapped")
            if sum(i.file_size for i in archive.infolist() if "/data/" not in i.filename) > MAX_BYTES:
                raise TorchScriptError(f"its data.pkl and code are over {MAX_BYTES >> 20} MiB")
            classes = read_code(archive, folder)
            return state_dict(Unpickler(archive.read(pickles[0]), archive, folder, classes).load())
    except TorchScriptError:
        raise
    except Exception as e:  # zipfile, zlib, ast and pickle raise many types for a damaged file; nothing of it has run
        raise TorchScriptError(f"damaged ({type(e).__name__}: {str(e)[:100]})") from None
