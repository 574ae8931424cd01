"""The first hour (issue 8): the quick start offline with requirements.txt alone, every bad flag or data set stopping
with one line that names the problem, unreadable images replaced without repeating an item in a batch, and console
lines from the first step on, each with an ETA."""

import os
import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

import cli
import data
import train
from model import create_model
from plumbing import evalsets, runlog, samples

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model", "tiny-vit", "--batch-size", "8", "--workers", "0", "--eval-size", "0", "--steps", "2"]

# What a fresh `pip install -r requirements.txt` offers: neither open_clip (it also ships the BPE file) nor ftfy, no
# network (connections other than local sockets fail; DataLoader workers pass file descriptors over those).
SITECUSTOMIZE = '''
import socket, sys

class Hide:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("open_clip", "ftfy"):
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)", name=name)

sys.meta_path.insert(0, Hide())
real_connect = socket.socket.connect

def connect(self, address):
    if self.family != socket.AF_UNIX:
        raise OSError("no network (blocked by the test)")
    return real_connect(self, address)

def getaddrinfo(*args, **kwargs):
    raise socket.gaierror("no network (blocked by the test)")

socket.socket.connect, socket.getaddrinfo = connect, getaddrinfo
'''


def run(script, *args, cwd, env=None):
    return cli.run(script, *args, cwd=cwd, env=env)  # with env: a fresh interpreter, which reads it at start


def test_quick_start_offline_without_open_clip_ftfy_or_a_home(tmp_path):
    (tmp_path / "shim").mkdir()
    (tmp_path / "shim" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    (tmp_path / "home").mkdir()
    env = dict(PYTHONPATH=str(tmp_path / "shim"), HOME=str(tmp_path / "home"))
    env.update({k: "" for k in ("XDG_CACHE_HOME", "CLIP_BPE_PATH")})
    for check in ("import open_clip", "import ftfy", "import urllib.request as u; u.urlopen('https://github.com')"):
        p = run(None, "-c", check, cwd=tmp_path, env=env)
        assert p.returncode != 0 and ("blocked by the test" in p.stderr or "hidden by the test" in p.stderr), check
    p = run(None, "-c", f"import sys; sys.path.insert(0, {ROOT!r}); from plumbing import tokenizer; print(tokenizer.tokenize('a photo of a "
                        f"Dog.')[0, :8].tolist())", cwd=tmp_path, env=env)
    assert p.stdout.strip() == "[49406, 320, 1125, 539, 320, 1929, 269, 49407]", p.stderr  # OpenAI's ids
    # the README's quick start, shortened: the default model, data and workers
    p = run("train.py", "--steps", "3", "--batch-size", "16", "--eval-size", "20", "--out-dir", tmp_path / "out",
            cwd=tmp_path, env=env)
    assert p.returncode == 0, p.stderr
    assert "zero-shot shape: top-1" in p.stdout and os.listdir(tmp_path / "home") == []
    assert "ftfy" not in p.stderr  # the synthetic captions are plain ASCII
    # the first step is printed as soon as it ends, and every step line has an ETA
    steps = [line for line in p.stdout.splitlines() if line.startswith("step ")]
    assert [s.split()[1] for s in steps] == ["1/3", "3/3"]
    assert all(" | eta " in s for s in steps) and steps[-1].endswith("| eta 0s")


def test_eta_format():
    assert [runlog.duration(s) for s in (0, 4.4, 59.6, 61, 3599, 3600, 3 * 3600 + 125)] == \
        ["0s", "4s", "1m00s", "1m01s", "59m59s", "1h00m", "3h02m"]


# --- bad input: one line that names the problem, non-zero exit, no traceback ----------------------------------------

def write_csv(path, rows, header="filepath,title", sep=","):
    path.write_text(header.replace(",", sep) + "\n" + "\n".join(sep.join(r) for r in rows) + "\n")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """CSVs and folders of bad data, and a checkpoint for the evaluator."""
    d = tmp_path_factory.mktemp("bad")
    (d / "imgs").mkdir()
    for i in range(4):
        Image.new("RGB", (40, 40), (50 * i, 90, 200)).save(d / "imgs" / f"{i}.jpg")
        (d / "imgs" / f"corrupt{i}.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    write_csv(d / "missing.csv", [(f"nowhere/{i}.jpg", f"a caption {i}") for i in range(40)])
    write_csv(d / "corrupt.csv", [(f"imgs/corrupt{i % 4}.jpg", f"a caption {i}") for i in range(40)])
    # 30 of 40 rows missing: every sample finds a readable replacement, but most reads fail
    write_csv(d / "mostly.csv", [(f"imgs/{i}.jpg" if i < 4 else f"nowhere/{i}.jpg", f"caption {i}") for i in range(40)])
    write_csv(d / "columns.csv", [("imgs/0.jpg", "a caption")], header="path,text2")
    for name in ("cat", "dog"):
        (d / "broken" / name).mkdir(parents=True)
        Image.new("RGB", (40, 40), (200, 90, 20)).save(d / "broken" / name / "0.png")
    (d / "broken" / "dog" / "bad.png").write_bytes(b"\x89PNG not really")
    (d / "empty").mkdir()
    (d / "one" / "cat").mkdir(parents=True)
    Image.new("RGB", (40, 40)).save(d / "one" / "cat" / "0.png")
    torch.save(create_model("tiny-vit").state_dict(), d / "model.pt")  # an OpenAI-layout state dict
    return d


# flags that train.py refuses as it parses them: (arguments, words the error line must hold)
BAD_FLAGS = [
    ("--save-every 0", ["--save-every", "1 or more"]),
    ("--log-every 0", ["--log-every", "1 or more"]),
    ("--grad-accum 0", ["--grad-accum", "1 or more"]),
    ("--batch-size 0", ["--batch-size", "1 or more"]),
    ("--workers -1", ["--workers", "0 or more"]),
    ("--warmup -5", ["--warmup", "0 or more"]),
    ("--lr=-1e-3", ["--lr", "above 0", "-0.001"]),
    ("--lr 1e38", ["--lr", "at most 1", "1e+38"]),
    ("--lr nan", ["--lr", "nan"]),
    ("--batch-size 1", ["--batch-size 1", "at least 2", "negatives"]),
    ("--batch-size 1 --method slip", ["--batch-size 1", "at least 2"]),
    ("--batch-size 1 --method declip", ["--batch-size 1", "at least 2"]),
    ("--batch-size 8 --grad-accum 3", ["--batch-size 8", "divisible", "--grad-accum = 3"]),
    ("--patch-dropout 1", ["--patch-dropout", "below 1"]),
    ("--patch-dropout 0.5", ["--patch-dropout", "tiny-rn is a ResNet"]),  # the default model
    ("--lock-image-unlocked-groups 1", ["--lock-image-unlocked-groups needs --lock-image"]),
    ("--lock-text --lock-text-unlocked-layers -1", ["--lock-text-unlocked-layers must be 0 or more"]),
    ("--lock-image --lock-image-unlocked-groups -2", ["--lock-image-unlocked-groups", "must be 0 or more"]),
    ("--lock-text-unlocked-layers 2", ["--lock-text-unlocked-layers needs --lock-text"]),
] + ([] if torch.cuda.is_available() else [("--device cuda", ["--device cuda", "no CUDA device"])])


@pytest.mark.parametrize("args, words", BAD_FLAGS, ids=[a for a, _ in BAD_FLAGS])
def test_bad_flags_stop_with_one_line(args, words, tmp_path):
    # in this process (each would spend 4 s importing torch in a subprocess): main() exits through fail(), which
    # the subprocess table below shows printing one line and exiting with status 1. The flags before the bad ones
    # (which win) make a run that a missing check would let through short: one step, in tmp_path
    with pytest.raises(SystemExit) as e:
        train.main(["--steps", "1", "--eval-size", "0", "--workers", "0", "--out-dir", str(tmp_path), *args.split()])
    message = str(e.value.code)
    assert message.startswith("error: ") and "\n" not in message and all(w in message for w in words), message


def test_one_pair_has_no_negatives():
    # why --batch-size 1 is refused: CLIP's loss on one pair is exactly 0, with a zero gradient, whatever the features
    import clip
    image, text = torch.randn(1, 8, requires_grad=True), torch.randn(1, 8, requires_grad=True)
    loss = clip.clip_loss(image, text, torch.tensor(100.0))
    loss.backward()
    assert loss.item() == 0 and image.grad.abs().max() == 0 and text.grad.abs().max() == 0


# bad data and evaluation input, through the real command lines: (script, arguments, words the error line must hold);
# {d} is the fixture's folder
BAD_INPUT = [
    ("train.py", "--save-every 0", ["--save-every", "1 or more"]),
    ("train.py", "--data {d}/missing.csv " + " ".join(TINY), ["64 images in a row are unreadable", "nowhere/",
                                                               "No such file"]),
    ("train.py", "--data {d}/corrupt.csv --model tiny-vit --batch-size 8 --workers 1",  # raised in a worker
     ["64 images in a row are unreadable", "corrupt"]),
    ("train.py", "--data {d}/mostly.csv " + " ".join(TINY), ["image reads failed", "nowhere/"]),
    ("train.py", "--data {d}/columns.csv " + " ".join(TINY), ["columns found", "--csv-img-key", "--csv-separator"]),
    ("train.py", "--data {d}/missing.csv --csv-separator ab " + " ".join(TINY), ["--csv-separator", "one character"]),
    ("eval_zeroshot.py", "--checkpoint {d}/model.pt --dataset folder --data-dir {d}/empty", ["{d}/empty", "class"]),
    ("eval_zeroshot.py", "--checkpoint {d}/model.pt --dataset folder --data-dir {d}/one", ["one class folder", "2"]),
    ("eval_zeroshot.py", "--checkpoint {d}/model.pt --dataset {d}/columns.csv", ["--csv-caption-key"]),
    ("eval_zeroshot.py", "--checkpoint {d}/model.pt --dataset folder --data-dir {d}/broken --workers 1",
     ["cannot read", "broken/dog/bad.png"]),  # raised in a worker
    ("eval_zeroshot.py", "--checkpoint {d}/model.pt --workers -1", ["--workers", "0 or more"]),
]


def test_bad_input_gives_one_line(files):
    def check(i, case):
        script, args, words = case
        (files / f"case{i}").mkdir()  # its own folder: two training runs in one OUT would stop at its lock
        p = run(script, *args.format(d=files).split(), cwd=files / f"case{i}")
        lines = p.stderr.strip().splitlines()
        last = lines[-1] if lines else ""
        missing = [w for w in words if w.format(d=files) not in last]
        if p.returncode != 1 or "Traceback" in p.stderr or missing or not last.startswith("error: "):
            return f"{script} {args}: exit {p.returncode}, missing {missing} in the last line of:\n{p.stderr[-2000:]}"

    with ThreadPoolExecutor(2) as pool:  # ~4 s of imports each
        failures = [f for f in pool.map(check, range(len(BAD_INPUT)), BAD_INPUT) if f]
    assert not failures, "\n\n".join(failures)


def test_csv_flags_name_the_columns_and_separator(files, tmp_path):
    write_csv(tmp_path / "pairs.txt.csv", [(f"{files}/imgs/{i % 4}.jpg", f"thing {i}") for i in range(8)],
              header="img,cap", sep="|")
    flags = ["--csv-img-key", "img", "--csv-caption-key", "cap", "--csv-separator", "|"]
    p = run("train.py", "--data", tmp_path / "pairs.txt.csv", *flags, *TINY, "--out-dir", tmp_path / "o", cwd=tmp_path)
    assert p.returncode == 0 and "8 samples" in p.stdout, p.stderr
    p = run("eval_zeroshot.py", "--checkpoint", tmp_path / "o" / "ckpt.pt", "--dataset", tmp_path / "pairs.txt.csv",
            *flags, "--workers", "0", cwd=tmp_path)
    assert p.returncode == 0 and "4 images, 8 captions" in p.stdout, p.stderr
    (tmp_path / "tabs.csv").write_text("img\tcap\n" + f"{files}/imgs/0.jpg\tthing\n")
    ds = data.make_dataset(str(tmp_path / "tabs.csv"), img_key="img", caption_key="cap", sep="\\t")  # typed \t
    assert ds.captions == ["thing"]


# --- unreadable images: replaced without repeating an item of the batch, counted once each --------------------------

class Files(torch.utils.data.Dataset):
    """n items, those in `bad` unreadable, as ImageCaptions raises for a missing or corrupt file"""

    def __init__(self, n, bad):
        self.n, self.bad = n, set(bad)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if i in self.bad:
            raise samples.UnreadableImage(f"{i}.jpg", "missing")
        return i, f"caption {i}"


def index_of(image, caption):
    return {"index": torch.tensor(image)}


def stream(dataset, batch, world, steps, start=0, seed=0):
    """The global batches of `steps` steps: each rank's batch of the sampler, collated as the DataLoader does."""
    seeded = data.Seeded(dataset, index_of, seed, group=batch)
    batches = [iter(data.Batches(len(dataset), batch // world, r, world, seed, start)) for r in range(world)]
    out = []
    for _ in range(steps):
        parts = [data.collate([seeded[item] for item in next(b)]) for b in batches]
        out.append((torch.cat([p["index"] for p in parts]).tolist(), [b for p in parts for b in p["bad"]]))
    return out


def test_replacements_never_repeat_an_item_of_the_batch():
    # the case: a block of 10 missing files in 160, batches of 16 (one epoch in 10 steps). Replacing each by
    # the next readable row, as before, made item 10 stand in for all ten, in whatever batches they fell.
    dataset = Files(160, bad=range(10))
    batches = stream(dataset, 16, 1, 30)  # 3 epochs
    for indices, bad in batches:
        assert len(set(indices)) == 16 and not set(indices) & dataset.bad
    bad_paths = [path for _, bad in batches for path, _ in bad]
    assert len(set(bad_paths)) == 10 and len(bad_paths) >= 30  # each met once per epoch at least; 10 distinct files
    drawn = np.bincount([i for indices, _ in batches for i in indices], minlength=160)
    print(f"most draws of an item in 3 epochs: {drawn.max()}")
    # 2 ranks hold the same global batches, replacements included, and a resumed stream continues exactly
    assert stream(dataset, 16, 2, 30) == batches
    assert stream(dataset, 16, 1, 10, start=20) == batches[20:]
    # most of the data unreadable: a sample gives up after 64 tries, naming the first path it tried
    with pytest.raises(samples.UnreadableImages, match=r"64 images in a row are unreadable, the first \d+\.jpg"):
        stream(Files(160, bad=range(160)), 16, 1, 1)


def test_skipped_counts_distinct_files(tmp_path):
    for i in range(30):
        if i >= 10:
            Image.new("RGB", (40, 40), (5 * i, 90, 200)).save(tmp_path / f"{i}.jpg")
    write_csv(tmp_path / "block.csv", [(f"{i}.jpg", f"a thing number {i}") for i in range(30)])
    p = run("train.py", "--data", tmp_path / "block.csv", *TINY, "--steps", "8", "--log-every", "4",
            "--out-dir", tmp_path / "o", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    lines = [line for line in p.stdout.splitlines() if line.startswith("step 8/8")]
    assert lines[0].endswith("| skipped 10 unreadable images")  # 64 draws over 2 epochs: 20 reads failed
    assert p.stdout.count("warning: cannot read") == 1


def test_folder_evaluation_decodes_as_training_with_default_workers(files, tmp_path):
    grey = np.full((40, 40), 40_000, dtype=np.uint16)  # a 16-bit PNG: PIL's convert("RGB") turned it white
    for name in ("cat", "dog"):
        (tmp_path / "grey" / name).mkdir(parents=True)
        Image.fromarray(grey).save(tmp_path / "grey" / name / "0.png")
    ds, classnames, _ = evalsets.classification_set("folder", str(tmp_path / "grey"), False, None, 64)
    image, label = ds[0]
    assert torch.equal(image, samples.load_image(tmp_path / "grey" / "cat" / "0.png")) and classnames == ["cat", "dog"]
    x = evalsets.Labelled(ds, data.eval_transform(64))[0][0]
    pixels = x * torch.tensor(data.STD)[:, None, None] + torch.tensor(data.MEAN)[:, None, None]
    torch.testing.assert_close(pixels, torch.full_like(pixels, 40_000 / 65_535), rtol=0, atol=1e-4)
    # the default workers fit the cores this process may use: no "too many workers" warning from torch
    p = run("eval_zeroshot.py", "--checkpoint", files / "model.pt", "--dataset", "folder", "--data-dir",
            tmp_path / "grey", cwd=tmp_path)
    assert p.returncode == 0 and "(2 classes, 2 images" in p.stdout, p.stderr
    assert "worker" not in p.stderr, p.stderr


def test_every_command_in_the_readme_and_docs_names_a_script_that_takes_its_flags(tmp_path):
    """The commands users copy (README.md, docs/*.md: `python PATH.py --flag ...`, `torchrun ... PATH.py`): each
    script exists where the command says, from the root, and its --help lists every flag the commands give it. A
    command of a past commit (a line naming it: 1e4b13c, "at the time") is history, not a command to run."""
    flags = {}
    for name in ["README.md", *sorted(os.listdir(os.path.join(ROOT, "docs")))]:
        if not name.endswith(".md"):
            continue
        path = os.path.join(ROOT, name if name == "README.md" else os.path.join("docs", name))
        for line in open(path, encoding="utf-8"):
            if "1e4b13c" in line or "at the time" in line:
                continue
            for m in re.finditer(r"(?:python3?|torchrun(?: --?[\w-]+(?:[= ][\w$.:]+)?)*) ((?:[\w.-]+/)*[\w-]+\.py)"
                                 r"((?: +[^`|]*)?)", line):
                flags.setdefault(m.group(1), set()).update(re.findall(r"(?<![\w-])(--[a-z][\w-]*)", m.group(2)))
    assert {"train.py", "eval_zeroshot.py", "scripts/plot.py", "scripts/bench.py"} <= set(flags)
    for script, given in flags.items():
        assert os.path.isfile(os.path.join(ROOT, script)), f"{script}: named by the docs, not in the repository"
        p = run(script, "--help", cwd=tmp_path)
        assert p.returncode == 0, p.stderr
        assert not [f for f in given if f not in p.stdout], (script, sorted(f for f in given if f not in p.stdout))
