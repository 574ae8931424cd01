"""
Data for contrastive image-text pretraining: the CLIP tokenizer (OpenAI's BPE, run by tiktoken), image
transforms, and three (image, caption) datasets: procedurally drawn shapes (no download), COCO Captions 2017, and
any CSV/TSV of image paths and captions; the data stream that orders and seeds them (each rank's micro-batches,
exact on resume); and tar shards in WebDataset's layout, streamed.
"""
import csv
import gzip
import hashlib
import html
import io
import itertools
import json
import os
import random
import re
import warnings
from functools import lru_cache

import numpy as np
import regex  # installed with tiktoken; unlike `re` it knows \p{L} and \p{N}, which CLIP's pre-tokeniser uses
import tiktoken
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset
import torchvision.io as tvio
from torchvision.transforms import v2

try:
    import ftfy  # optional: OpenAI fixes mojibake with it before tokenising
except ImportError:
    ftfy = None

# -----------------------------------------------------------------------------
# tokenizer

# OpenAI's BPE merges, shipped next to this file (MIT licence: see NOTICE), so that the tokenizer works offline and
# needs no package beyond requirements.txt. The hash catches a truncated copy or a Git LFS pointer, which would
# otherwise load as a wrong vocabulary.
BPE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bpe_simple_vocab_16e6.txt.gz")
BPE_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
# OpenAI's pre-tokeniser minus its two special-token alternatives: a caption that literally contains
# "<|endoftext|>" is plain text here (as in open_clip), so no caption can inject an EOT and move the pooled token.
CLIP_PAT = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE)
# CLIP's BPE marks a word's last symbol with "</w>", so "dog</w>" and "dog" are different tokens. tiktoken's BPE
# works on bytes, so "</w>" becomes one extra byte appended to each word. 0x1f (unit separator) can never be in
# cleaned text: str.split() counts it as whitespace, so the whitespace clean-up removes it. Its own byte token
# (id 219) is therefore never produced by OpenAI's tokenizer either, and no merge contains it.
EOW = "\x1f"


def read_bpe_merges(path=BPE_PATH):
    """The merges file's text, after checking its sha256."""
    restore = f"restore it with `git checkout -- {os.path.basename(path)}` (it ships with this repository)"
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CLIP's BPE vocabulary {path} is missing: {restore}")
    with open(path, "rb") as f:
        raw = f.read()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != BPE_SHA256:
        raise ValueError(f"CLIP's BPE vocabulary {path} has sha256 {digest}, not {BPE_SHA256}: {restore}")
    return gzip.decompress(raw).decode("utf-8")


def bytes_to_unicode():
    """GPT-2's table of 256 printable characters standing for the 256 bytes, in the order that gives CLIP's ids."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs = bs[:]
    for b in range(256):
        if b not in bs:  # the 68 unprintable bytes get the characters 256, 257, ...
            bs.append(b)
            cs.append(256 + len(cs) - 188)  # 188 = number of printable bytes, listed first
    return dict(zip(bs, map(chr, cs)))


def clip_encoding():
    """OpenAI's 49,408-token CLIP BPE as a tiktoken Encoding whose rank of each token is its CLIP id."""
    merges = read_bpe_merges().split("\n")[1:49152 - 256 - 2 + 1]
    byte_chars = list(bytes_to_unicode().items())
    char_to_byte = {c: b for b, c in byte_chars}
    # ids: the 256 bytes, the 256 bytes ending a word, then one token per merge in merge order
    vocab = [c for _, c in byte_chars] + [c + "</w>" for _, c in byte_chars] + [m.replace(" ", "") for m in merges]
    ranks = {}
    for i, token in enumerate(vocab):
        word_end = token.endswith("</w>")
        token = token[:-4] if word_end else token
        ranks[bytes(char_to_byte[c] for c in token) + (EOW.encode() if word_end else b"")] = i
    assert len(ranks) == len(vocab) == 49406, "unexpected BPE file"
    # Merge i makes token 512 + i, so tiktoken's merge order (lowest rank of the concatenation first) is CLIP's
    # (lowest merge index first). They could still differ: tiktoken also merges an adjacent pair that is not a
    # listed merge when its concatenation is a token. That never happens on the ~250k strings checked against
    # OpenAI's tokenizer (tests/test_data.py checks every vocabulary word and thousands of captions).
    # Words arrive already split by CLIP_PAT and end-marked, so tiktoken's pattern only cuts after each marker.
    return tiktoken.Encoding("clip", pat_str=r"[^\x1f]+\x1f", mergeable_ranks=ranks,
                             special_tokens={"<|startoftext|>": 49406, "<|endoftext|>": 49407})


def clean_text(text, lower=True):
    """OpenAI's cleaning: ftfy, html.unescape twice, collapse whitespace, lower-case."""
    # ftfy costs ~15 us a caption and leaves printable ASCII without entities unchanged, so skip it there
    if ftfy is not None and not (text.isascii() and text.isprintable() and "&" not in text):
        text = ftfy.fix_text(text)
    text = " ".join(html.unescape(html.unescape(text)).split())
    return text.lower() if lower else text


# Text whose tokens ftfy.fix_text leaves unchanged: printable ASCII (tabs, line breaks and form feeds are whitespace
# either way) whose HTML entities two unescapes resolve (ftfy unescapes until none is left, unless the text has a
# "<"). Without ftfy, such text gets OpenAI's ids; other text (non-ASCII, control characters, entities escaped three
# times) may not (tests/test_data.py checks both on the parity strings).
LINE_SPACE = str.maketrans("", "", "\t\n\r\x0c")
warned_without_ftfy = False


def ftfy_may_change(text):
    if not text.isascii() or not text.translate(LINE_SPACE).isprintable():
        return True
    twice = html.unescape(html.unescape(text))
    return html.unescape(twice) != twice


def warn_without_ftfy(text):
    global warned_without_ftfy  # once per process: a dataset of accented captions would repeat it per caption
    if not warned_without_ftfy:
        warned_without_ftfy = True
        warnings.warn(f"ftfy is not installed, and text such as {text[:40]!r} may get other ids than OpenAI's "
                      f"tokenizer gives (it fixes text with ftfy first): `pip install ftfy` to get exactly its ids")


class Tokenizer:
    """texts -> (N, context_length) LongTensor: [SOT] ids [EOT] then 0-padding; EOT holds the row's largest id."""

    def __init__(self, encoding, sot_id, eot_id, clip_bpe=False):
        self.encoding, self.sot_id, self.eot_id, self.clip_bpe = encoding, sot_id, eot_id, clip_bpe
        self.pad_id = 0
        self.vocab_size = max(encoding.n_vocab, sot_id + 1, eot_id + 1)
        self.cache = {}  # text -> ids: synthetic captions and prompt templates repeat a lot

    def encode(self, text):
        ids = self.cache.get(text)
        if ids is None:
            if self.clip_bpe:
                if ftfy is None and ftfy_may_change(text):
                    warn_without_ftfy(text)
                words = CLIP_PAT.findall(clean_text(text))
                ids = self.encoding.encode_ordinary(EOW.join(words) + EOW) if words else []
            else:  # GPT-style byte BPEs keep case and spaces; special-token text stays plain text
                ids = self.encoding.encode_ordinary(clean_text(text, lower=False))
            if len(self.cache) >= 20_000:  # ~1 kB an entry, in every DataLoader worker
                self.cache.clear()
            self.cache[text] = ids
        return ids

    def decode(self, ids):
        ids = [i for i in ids if i not in (self.sot_id, self.eot_id, self.pad_id)]
        data = self.encoding.decode_bytes(ids)
        return (data.replace(EOW.encode(), b" ") if self.clip_bpe else data).decode("utf-8", errors="replace")

    def __call__(self, texts, context_length=77):
        texts = [texts] if isinstance(texts, str) else texts
        out = np.zeros((len(texts), context_length), dtype=np.int64)
        for row, text in zip(out, texts):
            ids = [self.sot_id] + self.encode(text)[:context_length - 2] + [self.eot_id]  # too long: cut, end in EOT
            row[:len(ids)] = ids
        return torch.from_numpy(out)

    def __getstate__(self):  # DataLoader workers get a copy without the cache
        return {**self.__dict__, "cache": {}}


@lru_cache(maxsize=None)
def get_tokenizer(name="clip"):
    """"clip" (OpenAI's BPE), a tiktoken encoding name ("cl100k_base", "gpt2", ...) or a tiktoken.Encoding."""
    if name == "clip":
        return Tokenizer(clip_encoding(), sot_id=49406, eot_id=49407, clip_bpe=True)
    encoding = name if isinstance(name, tiktoken.Encoding) else tiktoken.get_encoding(name)
    # the text tower pools at argmax(ids), so SOT and EOT get two new ids above the encoding's vocabulary
    return Tokenizer(encoding, sot_id=encoding.n_vocab, eot_id=encoding.n_vocab + 1)


def tokenize(texts, context_length=77):
    return get_tokenizer("clip")(texts, context_length)

# -----------------------------------------------------------------------------
# image transforms (PIL RGB -> normalised float tensor (3, R, R))

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def train_transform(image_size, scale=(0.9, 1.0)):
    return v2.Compose([
        v2.RandomResizedCrop(image_size, scale=scale, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])


def eval_transform(image_size):
    return v2.Compose([
        v2.Resize(image_size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True), v2.CenterCrop(image_size),
        v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])

# -----------------------------------------------------------------------------
# synthetic shapes: the default data, learnable by a tiny ViT on a CPU in minutes

SHAPES = ["circle", "square", "triangle", "star", "cross", "hexagon"]
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (40, 70, 235),
           "yellow": (245, 225, 30), "purple": (150, 50, 200), "orange": (250, 135, 20)}
SIZES = {"small": 0.15, "large": 0.25}  # object radius as a fraction of the image side
POSITIONS = {"center": (0.5, 0.5), "left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73)}
POSITION_WORDS = {"center": ["in the center", "in the middle"], "left": ["on the left"], "right": ["on the right"],
                  "top": ["at the top"], "bottom": ["at the bottom"]}
COUNTS = ["one", "two", "three"]
BACKGROUNDS = {"black": 20, "gray": 128, "white": 235, "striped": None, "checkered": None, "dotted": None}
SYNTHETIC_TASKS = {  # zero-shot tasks on held-out images: (classnames, templates)
    "shape": (SHAPES, ["a photo of a {}.", "a {}.", "a picture of a {}.", "a drawing of a {}."]),
    "colour": (list(COLOURS), ["a {} shape.", "a {} object.", "a picture of something {}."]),
    "size": (list(SIZES), ["a {} shape.", "a picture of a {} object."]),
    "count": (COUNTS, ["{} shapes.", "a picture of {} objects."]),
}


def sample_scene(rng, **fixed):
    """Random attributes; `fixed` pins some (the zero-shot tasks pin the label's attribute)."""
    s = dict(shape=rng.choice(SHAPES), colour=rng.choice(list(COLOURS)), background=rng.choice(list(BACKGROUNDS)),
             count=rng.choices(COUNTS, weights=(2, 1, 1))[0])  # single objects are most informative: half of them
    s.update(fixed)
    # several objects are drawn small and in a row, so size and position describe single objects only
    single = s["count"] == "one"
    s.setdefault("size", rng.choice(list(SIZES)) if single else "small")
    s.setdefault("position", rng.choice(list(POSITIONS)) if single else None)
    return s


@lru_cache(maxsize=8)
def _grid(n):
    return np.mgrid[:n, :n]  # (2, n, n) pixel coordinates for the background textures


def _outline(shape, cx, cy, r):
    """Polygon vertices (or the bounding box for a circle) of a shape of radius r centred at (cx, cy)."""
    if shape == "circle":
        return [cx - r, cy - r, cx + r, cy + r]
    if shape == "square":
        h = 0.85 * r  # a bit smaller so its area is close to the circle's
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "cross":
        a, w = r, 0.33 * r
        return [(cx + x, cy + y) for x, y in [(-w, -a), (w, -a), (w, -w), (a, -w), (a, w), (w, w), (w, a), (-w, a),
                                              (-w, w), (-a, w), (-a, -w), (-w, -w)]]
    n, radii = {"triangle": (3, [r]), "hexagon": (6, [r]), "star": (10, [r, 0.42 * r])}[shape]  # star: in and out
    points = []
    for k in range(n):  # clockwise from the top
        a, rk = 2 * np.pi * k / n, radii[k % len(radii)]
        points.append((cx + rk * np.sin(a), cy - rk * np.cos(a)))
    return points


def render_scene(s, rng, image_size=64):
    n = image_size
    grey = BACKGROUNDS[s["background"]]
    if grey is not None:
        img = Image.new("RGB", (n, n), (grey + rng.randint(-15, 15),) * 3)
    else:  # two-grey textures, so texture is not confused with an object's colour
        y, x = _grid(n)
        p = rng.randint(n // 10, n // 5)  # texture period in pixels
        if s["background"] == "striped":
            mask = ((x if rng.random() < 0.5 else y) // p) % 2 == 0
        elif s["background"] == "checkered":
            mask = (x // p + y // p) % 2 == 0
        else:  # dotted
            mask = (x % p - p // 2) ** 2 + (y % p - p // 2) ** 2 <= (p / 4) ** 2
        grey = np.where(mask, rng.randint(40, 90), rng.randint(150, 210)).astype(np.uint8)
        img = Image.fromarray(grey).convert("RGB")
    colour = tuple(min(255, max(0, c + rng.randint(-20, 20))) for c in COLOURS[s["colour"]])
    r = SIZES[s["size"]] * n * rng.uniform(0.9, 1.1)
    k = COUNTS.index(s["count"]) + 1
    if k == 1:
        cx, cy = POSITIONS[s["position"]]
        centres = [(cx + rng.uniform(-0.04, 0.04), cy + rng.uniform(-0.04, 0.04))]
    else:  # a row or a column of evenly spaced objects
        along = [0.28, 0.72] if k == 2 else [0.18, 0.5, 0.82]
        across = rng.uniform(0.3, 0.7)
        centres = [(t, across) for t in along] if rng.random() < 0.5 else [(across, t) for t in along]
    draw = ImageDraw.Draw(img)
    for cx, cy in centres:
        outline = _outline(s["shape"], cx * n, cy * n, r)
        (draw.ellipse if s["shape"] == "circle" else draw.polygon)(outline, fill=colour)
    return img


def caption_scene(s, rng):
    """A caption with varied phrasing; size, colour, position and background are sometimes left out."""
    k = COUNTS.index(s["count"]) + 1
    words = [s["size"] if rng.random() < 0.5 else None, s["colour"] if rng.random() < 0.8 else None]
    words = [w for w in words if w]
    if k == 1:
        noun = " ".join(words + [s["shape"]])
        noun = ("one " if rng.random() < 0.2 else "an " if noun[0] in "aeiou" else "a ") + noun
    else:
        noun = " ".join([s["count"]] + words + [s["shape"] + ("es" if s["shape"] == "cross" else "s")])
    there = "there is " if k == 1 else "there are "
    text = rng.choice(["", "", "a picture of ", "an image of ", "a drawing of ", there]) + noun
    if s["position"] and rng.random() < 0.6:
        text += " " + rng.choice(POSITION_WORDS[s["position"]])
    if rng.random() < 0.3:
        text += f" on a {s['background']} background"
    return text + ("." if rng.random() < 0.5 else "")


class SyntheticCaptions(Dataset):
    """Coloured shapes drawn with PIL: (image, caption), the same for the same (seed, split, index)."""

    def __init__(self, split="train", size=None, image_size=64, seed=0):
        self.split, self.image_size, self.seed = split, image_size, seed
        self.size = size or (100_000 if split == "train" else 1_000)

    def __len__(self):
        return self.size

    def scene(self, index):  # string seeds are hashed with sha512: the same in every process and run
        rng = random.Random(f"{self.seed}/{self.split}/{index}")
        return sample_scene(rng), rng

    def __getitem__(self, index):
        s, rng = self.scene(index)
        return render_scene(s, rng, self.image_size), caption_scene(s, rng)


class SyntheticTask(Dataset):
    """(image, label) for a zero-shot task of SYNTHETIC_TASKS on held-out images, classes balanced."""

    def __init__(self, task, size=600, image_size=64, seed=0, split="val"):
        self.classnames, self.templates = SYNTHETIC_TASKS[task]
        self.task, self.size, self.image_size, self.seed, self.split = task, size, image_size, seed, split

    def __len__(self):
        return self.size

    def scene(self, index):
        rng = random.Random(f"{self.seed}/{self.split}/{self.task}/{index}")
        fixed = {"count": "one"} if self.task != "count" else {}  # one object, so counts cannot confuse the rest
        return sample_scene(rng, **fixed, **{self.task: self.classnames[index % len(self.classnames)]}), rng

    def __getitem__(self, index):
        s, rng = self.scene(index)
        return render_scene(s, rng, self.image_size), index % len(self.classnames)

# -----------------------------------------------------------------------------
# image files: COCO Captions 2017 and CSV/TSV lists


def default_workers(ranks_per_node=1):
    """DataLoader workers per rank: the cores this process may run on (its CPU affinity, as torch's "too many
    workers" warning counts them), less one for the training or evaluation loop, at least 1, at most 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 2
    return min(8, max(1, cores // ranks_per_node - 1))


def load_image(path):
    """An RGB image from a file, decoded now so that a corrupt file fails inside the dataset: a (3, H, W) uint8 tensor
    from torchvision.io (JPEG decoding 1.7x faster than PIL's here: `python bench.py --data-dir`), or, for a format
    torchvision cannot read, a PIL image. The transforms (torchvision.transforms.v2) take either."""
    with open(path, "rb") as f:
        return decode_image(f.read())


def decode_image(raw):
    """load_image on the bytes of an image file (a member of a tar shard)."""
    try:
        with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders in favour of TorchCodec
            warnings.simplefilter("ignore", DeprecationWarning)
            return tvio.decode_image(torch.frombuffer(bytearray(raw), dtype=torch.uint8), mode=tvio.ImageReadMode.RGB)
    except RuntimeError:  # an unsupported format, or a broken file: PIL reads the one and names the other
        with Image.open(io.BytesIO(raw)) as img:
            if img.mode.startswith("I;16"):  # 16-bit grey, as torchvision.io gives it (PIL's RGB would clip at 255)
                return torch.from_numpy(np.array(img).astype(np.uint16)).expand(3, -1, -1)
            return img.convert("RGB")


class UnreadableImage(Exception):
    """An image file that is missing, corrupt, or in a format neither torchvision.io nor PIL reads."""

    def __init__(self, path, reason):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


class UnreadableImages(Exception):
    """Too many unreadable images to go on training: the data is not where it was looked for."""


class ImageCaptions(Dataset):
    """One item per (image path, caption) pair; retrieval() groups the captions by image. An image that cannot be read
    raises UnreadableImage (train.py replaces it)."""

    def __init__(self, paths, captions):
        self.paths, self.captions = paths, captions

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        try:
            image = load_image(self.paths[index])
        except Exception as e:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
            raise UnreadableImage(self.paths[index], str(e) or type(e).__name__) from e
        return image, self.captions[index]

    def retrieval(self):
        """(image_paths, captions, caption_image): caption_image[j] indexes the image that caption j describes."""
        image_index = {}
        caption_image = [image_index.setdefault(p, len(image_index)) for p in self.paths]
        return list(image_index), list(self.captions), caption_image


class CocoCaptions(ImageCaptions):
    """COCO Captions 2017: root/{train,val}2017/*.jpg and root/annotations/captions_{split}2017.json."""

    def __init__(self, root, split="train"):
        ann = os.path.join(root, "annotations", f"captions_{split}2017.json")
        image_dir = os.path.join(root, f"{split}2017")
        if not os.path.isfile(ann):
            raise FileNotFoundError(f"{ann} not found: download http://images.cocodataset.org/annotations/"
                                    f"annotations_trainval2017.zip and unzip it into {root}")
        if not os.path.isdir(image_dir):
            raise FileNotFoundError(f"{image_dir} not found: download http://images.cocodataset.org/zips/"
                                    f"{split}2017.zip and unzip it into {root}")
        with open(ann) as f:
            coco = json.load(f)
        file_names = {im["id"]: im["file_name"] for im in coco["images"]}
        pairs = sorted((a["image_id"], a["id"], a["caption"].strip()) for a in coco["annotations"])
        super().__init__([os.path.join(image_dir, file_names[i]) for i, _, _ in pairs], [c for _, _, c in pairs])


class CsvCaptions(ImageCaptions):
    """A CSV/TSV with an image-path column and a caption column (open_clip's filepath/title, or image/caption, or
    those named by img_key and caption_key); sep defaults to a tab for .tsv files, a comma otherwise."""

    IMAGE_KEYS, CAPTION_KEYS = ("filepath", "image", "image_path", "file_name"), ("title", "caption", "text")

    def __init__(self, path, img_key=None, caption_key=None, sep=None, root=None):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"caption file {path} does not exist")
        sep = "\t" if sep == "\\t" else sep or ("\t" if path.endswith(".tsv") else ",")  # \t typed in a shell: a tab
        if len(sep) != 1:
            raise ValueError(f"--csv-separator {sep!r}: a separator is one character")
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter=sep)
            rows, columns = list(reader), reader.fieldnames or []
        keys = []
        for given, options in ((img_key, self.IMAGE_KEYS), (caption_key, self.CAPTION_KEYS)):
            found = [k for k in ([given] if given else options) if k in columns]
            if not found:
                raise ValueError(f"{path}: no column {' or '.join(map(repr, [given] if given else options))}; "
                                 f"columns found: {list(columns)} with separator {sep!r}; name the columns with "
                                 f"--csv-img-key and --csv-caption-key, the separator with --csv-separator")
            keys.append(found[0])
        root = root or os.path.dirname(os.path.abspath(path))
        kept = [r for r in rows if (r[keys[1]] or "").strip()]
        if not kept:
            raise ValueError(f"{path}: no captions (all {len(rows)} rows have empty captions)")
        if len(kept) < len(rows):
            warnings.warn(f"{path}: dropped {len(rows) - len(kept)} of {len(rows)} rows with empty captions")
        super().__init__([os.path.join(root, r[keys[0]]) for r in kept], [r[keys[1]].strip() for r in kept])


def make_dataset(data, data_dir=None, split="train", image_size=64, img_key=None, caption_key=None, sep=None):
    """"synthetic", "coco" (data_dir = COCO root) or a .csv/.tsv path (data_dir = root of relative paths; the
    file is the split, so `split` is not used; img_key, caption_key and sep as in CsvCaptions)."""
    if data == "synthetic":
        return SyntheticCaptions(split, image_size=image_size)
    if data == "coco":
        if data_dir is None:
            raise ValueError("data 'coco' needs data_dir: the folder holding train2017/, val2017/, annotations/")
        return CocoCaptions(data_dir, split)
    if str(data).endswith((".csv", ".tsv")):
        return CsvCaptions(data, img_key, caption_key, sep, root=data_dir)
    raise ValueError(f"unknown data {data!r}: use 'synthetic', 'coco' (with data_dir) or a path to a .csv/.tsv file")


def retrieval_set(data, data_dir=None, split="val", **csv_keys):
    """(image_paths, captions, caption_image) for image-text retrieval on "coco" or a .csv/.tsv file."""
    if data == "synthetic":
        raise ValueError("retrieval needs 'coco' or a .csv/.tsv file; evaluate synthetic data with SyntheticTask")
    return make_dataset(data, data_dir, split, **csv_keys).retrieval()


# -----------------------------------------------------------------------------
# the data stream: which samples make each rank's micro-batches, and the seeds of their augmentations


@lru_cache(maxsize=1)
def epoch_order(n, seed, epoch):
    """The permutation of the n items that epoch `epoch` of the data stream follows."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


class Batches(torch.utils.data.Sampler):
    """Index lists of this rank's micro-batches. The data is one endless stream: epoch e is a permutation drawn from
    (seed, e); global micro-batch i is positions [i·G, (i+1)·G) of the stream, G = micro · world, and rank r takes
    its r-th slice. So the global batch at a step does not depend on the world size, and a resumed run starts at
    exactly the next batch. Each item carries its stream position, which seeds that sample's augmentation."""

    def __init__(self, n, micro, rank, world, seed, start):
        self.n, self.micro, self.rank, self.world, self.seed, self.start = n, micro, rank, world, seed, start

    def __iter__(self):
        i = self.start
        while True:
            first = i * self.micro * self.world + self.rank * self.micro
            positions = range(first, first + self.micro)
            yield [(epoch_order(self.n, self.seed, p // self.n)[p % self.n].item(), p) for p in positions]
            i += 1


class Seeded(torch.utils.data.Dataset):
    """Stream item (index, position) -> transform(image, caption) plus "bad", the (path, reason) of each unreadable
    image passed over. Augmentations are a pure function of (run seed, stream position), and so is the replacement of
    an unreadable image: identical whatever the world size, the number of workers, or a resume in between.

    An unreadable image is replaced by the item at the same place of the following batches of its epoch, then of the
    preceding ones: stream positions p ± k·G, G the global micro-batch. An epoch holds each item at one position only,
    and the G places of a batch draw on disjoint sets of positions, so a replacement never repeats an item of its batch
    (a batch that straddles two epochs can, as can the last resort, later epochs, for datasets of a few batches)."""

    max_tries = 64  # reads for one sample before giving up: at most 1 in 2^64 when half the images are readable

    def __init__(self, dataset, transform, seed, group):
        self.dataset, self.transform, self.seed, self.group = dataset, transform, seed, group  # group: G

    def __len__(self):
        return len(self.dataset)

    def positions(self, position):
        n, G = len(self.dataset), self.group
        start = position - position % n  # of the epoch
        after = range(position, start + n, G)  # starts with the position itself
        return itertools.chain(after, range(position - G, start - 1, -G), itertools.count(after[-1] + G, G))

    def __getitem__(self, item):
        index, position = item
        n, bad = len(self.dataset), []
        for p in itertools.islice(self.positions(position), self.max_tries):
            i = index if p == position else epoch_order(n, self.seed, p // n)[p % n].item()
            try:
                image, caption = self.dataset[i]
            except UnreadableImage as e:
                bad.append((e.path, e.reason))
                continue
            with torch.random.fork_rng(devices=[]):
                # the CPU generator only: torch.manual_seed also queues a seeding of every CUDA device's (~0.1 ms)
                torch.default_generator.manual_seed(self.seed * 1_000_003 + position)
                return {**self.transform(image, caption), "bad": bad}
        raise UnreadableImages(f"{len(bad)} images in a row are unreadable, the first {bad[0][0]} "
                                    f"({bad[0][1]}); are the paths right (relative to the csv's folder, or --data-dir)?")


def collate(samples):
    """default_collate, with the samples' lists of unreadable images joined into one"""
    bad = [b for sample in samples for b in sample.pop("bad")]
    return {**torch.utils.data.default_collate(samples), "bad": bad}


# -----------------------------------------------------------------------------
# tar shards (WebDataset's layout, as img2dataset writes them), streamed
#
# Read with the standard library rather than the webdataset package: the rest of this section (which shards each
# reader takes, a shuffle that resumes exactly, bad samples counted rather than only warned about) would be written
# here either way, through webdataset's hooks, and what webdataset would replace is reading a tar in order and grouping
# its members by key (tar_members, tar_samples: 50 lines). webdataset reads tars with the tarfile module, whose header
# parsing (every field, in Python) costs more than the rest of reading an image: 173 us an image of the shards that
# `bench.py --vs-shards` makes, against 42 us with tar_members and 15 us to read the image as a file, where a worker
# spends ~2.4 ms to decode and transform it. So tar_members reads only what a shard needs, and nothing is added to
# requirements.txt.

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def braces(pattern):
    """'a/{00000..00002}.tar' -> ['a/00000.tar', 'a/00001.tar', 'a/00002.tar']; '{x,y}' lists too (as braceexpand,
    which webdataset and open_clip use)."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    r = re.fullmatch(r"(\d+)\.\.(\d+)", m.group(1))
    items = [str(i).zfill(len(r.group(1))) for i in range(int(r.group(1)), int(r.group(2)) + 1)] if r else \
        m.group(1).split(",")
    return [p for item in items for p in braces(pattern[:m.start()] + item + pattern[m.end():])]


def shard_list(spec):
    """The tar shards --data names, or None if it names none: a folder of .tar files, a brace pattern
    ('cc3m/{00000..00331}.tar'), or several of those joined by '::' (as open_clip's --train-data)."""
    if spec in ("synthetic", "coco"):  # names, even where a folder of that name exists
        return None
    if os.path.isdir(spec):
        shards = sorted(os.path.join(spec, f) for f in os.listdir(spec) if f.endswith(".tar"))
        if not shards:
            raise FileNotFoundError(f"{spec} holds no .tar files")
        return shards
    shards = [path for part in spec.split("::") for path in braces(part)]
    if not all(path.endswith(".tar") for path in shards):
        return None
    missing = [path for path in shards if not os.path.isfile(path)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of the {len(shards)} shards of {spec} do not exist, the first "
                                f"{missing[0]}")
    return shards


def tar_members(f):
    """(name, bytes) of each file of an uncompressed tar, read in order: ustar headers, and the long names that pax and
    GNU records carry; other entries (folders, links) are skipped. A file cut short ends with (name, None), the entry it
    cuts; a header whose checksum is wrong raises ValueError."""
    long_name = None
    while (header := f.read(512)).strip(b"\0"):  # a block of zeros, or the file's end, ends the archive
        checksum = sum(header) - sum(header[148:156]) + 8 * ord(" ")  # the checksum field counts as 8 spaces
        if len(header) < 512 or int(header[148:156].strip(b"\0 ") or b"-1", 8) != checksum:
            raise ValueError("not a tar header: the shard is cut short or corrupt")
        size = int(header[124:136].strip(b"\0 ") or b"0", 8)
        data, _ = f.read(size), f.read(-size % 512)  # members are padded to 512 bytes
        prefix = header[345:500].rstrip(b"\0") + b"/" if header[257:263] == b"ustar\0" and header[345] else b""
        name = long_name or (prefix + header[:100].rstrip(b"\0")).decode("utf-8", "replace")
        if len(data) < size:
            yield name, None
            return
        kind = header[156:157]
        if kind == b"x":  # pax records, "LENGTH key=value\n", for the next entry: its name, if long
            found = re.search(rb"\d+ path=([^\n]*)\n", data)
            long_name = found.group(1).decode("utf-8", "replace") if found else long_name
            continue
        if kind == b"L":  # GNU's record of the next entry's long name
            long_name = data.rstrip(b"\0").decode("utf-8", "replace")
            continue
        if kind in (b"0", b"\0"):  # a regular file
            yield name, data
        long_name = None


def tar_samples(path):
    """A shard's samples in file order: (key, {extension: bytes}) for each run of members sharing a key (the member's
    name up to the first dot of its base name, as webdataset groups them); then ("", reason) if the file cannot be read
    to its end, in which case the sample it was reading is dropped."""
    key, members = None, {}
    try:
        with open(path, "rb") as f:
            for name, data in tar_members(f):
                folder, base = os.path.split(name)
                stem, _, ext = base.partition(".")
                if os.path.join(folder, stem) != key and members:
                    yield key, members
                    members = {}
                key = os.path.join(folder, stem)
                if data is None:  # after the sample before, if this member began a new one
                    raise ValueError(f"the shard ends within {name} (it is cut short)")
                members[ext.lower()] = data
    except (OSError, ValueError) as e:  # missing, cut short, corrupt
        yield "", str(e)
        return
    if members:
        yield key, members


def decode_sample(members, caption_key=None):
    """{extension: bytes} -> (image, caption): the first image member (jpg, jpeg, png, webp), the caption from txt or
    else the json member's "caption" (or caption_key's) field. Raises ValueError for a sample without either."""
    image = next((members[ext] for ext in IMAGE_EXTS if ext in members), None)
    if image is None:
        raise ValueError(f"no image ({', '.join(IMAGE_EXTS)}) among its members {sorted(members)}")
    if "txt" in members and caption_key is None:
        caption = members["txt"].decode("utf-8")
    elif "json" in members:
        caption = json.loads(members["json"]).get(caption_key or "caption")
    else:
        caption = None
    if not isinstance(caption, str) or not caption.strip():
        where = f"a json field {caption_key!r}" if caption_key else "a txt member or a json field 'caption'"
        raise ValueError(f"no caption ({where})")
    return decode_image(image), caption.strip()


class ShardStream(torch.utils.data.IterableDataset):
    """Tar shards as N endless streams ("lanes"), one per reader: N = ranks × DataLoader workers (a rank without
    workers is one reader). Epoch e shuffles the shard list with (seed, e); lane l reads shards l, l + N, l + 2N, ... of it, and
    when they are done goes on to its share of epoch e + 1: no shard is read by two lanes in an epoch, and no lane runs
    out (unequal shards only move where each lane's epochs end).

    A lane shuffles in blocks of `buffer` samples (fewer at the end of its epoch): it reads that many (bytes only),
    permutes them with a seed drawn from the block's first position, then decodes and augments them in that order,
    each seeded by (seed, epoch, shard, index in the shard). So lane l's stream is a function of (seed, N, l), and where
    it stands is four integers: the position of its block's first sample (epoch, the lane's shard number in that
    epoch, sample in the shard) and how many of the block were passed. A lane started from those four integers goes
    on exactly where it stood, after reading again, without decoding, at most one shard and one block.

    Reader k of the rank whose first lane is `first_lane` yields chunks of `sizes[k]` samples: the collated transforms,
    plus "bad", the (name, reason) of each sample passed over (unreadable image, no caption, truncated shard), and
    "lanes", [(lane, its position after the chunk)]. join() makes a micro-batch of one chunk from each reader."""

    max_bad = 64  # unreadable samples in a row before giving up, as for image files (Seeded)

    def __init__(self, shards, transform, seed, readers, first_lane, sizes, buffer=2000, start=None, caption_key=None):
        self.shards, self.transform, self.seed, self.readers = shards, transform, seed, readers
        self.first_lane, self.sizes, self.buffer, self.caption_key = first_lane, sizes, buffer, caption_key
        self.start = start or [(0, 0, 0, 0)] * readers

    def lane_shards(self, lane, epoch):
        order = random.Random(f"{self.seed}/shards/{epoch}").sample(range(len(self.shards)), len(self.shards))
        return order[lane::self.readers]

    def read(self, lane, epoch, j, i):
        """The lane's samples from sample i of its j-th shard of `epoch` on: ((epoch, j, i), shard, key, value)."""
        while True:
            found = False
            for j, shard in enumerate(self.lane_shards(lane, epoch)[j:], start=j):
                for n, (key, value) in enumerate(tar_samples(self.shards[shard])):
                    found = True
                    if n >= i:
                        yield (epoch, j, n), shard, key, value
                i = 0
            if not found:  # else an epoch of empty shards would loop forever
                raise UnreadableImages(f"the shards of reader {lane} hold no samples, the first "
                                       f"{self.shards[self.lane_shards(lane, epoch)[0]]}")
            epoch, j = epoch + 1, 0

    def blocks(self, lane, epoch, j, i, taken):
        """The lane's samples in shuffled order from a position on, each with the lane's position after it."""
        samples = self.read(lane, epoch, j, i)
        for _, one_epoch in itertools.groupby(samples, key=lambda sample: sample[0][0]):  # no block spans two epochs
            while block := list(itertools.islice(one_epoch, self.buffer)):
                first = block[0][0]
                order = random.Random(f"{self.seed}/block/{lane}/{first}").sample(range(len(block)), len(block))
                for t in range(taken, len(block)):
                    yield block[order[t]], (*first, t + 1)
                taken = 0

    def __iter__(self):
        worker = torch.utils.data.get_worker_info()
        k = worker.id if worker else 0
        lane, size = self.first_lane + k, self.sizes[k]
        samples, bad, in_a_row = [], [], 0
        for ((epoch, _, n), shard, key, value), position in self.blocks(lane, *self.start[lane]):
            name = f"{self.shards[shard]}/{key}" if key else self.shards[shard]
            try:
                if not key:
                    raise ValueError(value)  # the shard's read error
                image, caption = decode_sample(value, self.caption_key)
            except Exception as e:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
                bad.append((name, str(e) or type(e).__name__))
                in_a_row += 1
                if in_a_row == self.max_bad:
                    name, reason = bad[-in_a_row]
                    raise UnreadableImages(f"{in_a_row} samples in a row are unreadable, the first {name} ({reason})") \
                        from None
                continue
            in_a_row = 0
            seed = hashlib.blake2b(f"{self.seed}/{epoch}/{shard}/{n}".encode(), digest_size=8).digest()  # 1 us
            with torch.random.fork_rng(devices=[]):  # the CPU generator only, as Seeded
                torch.default_generator.manual_seed(int.from_bytes(seed, "little"))
                samples.append(self.transform(image, caption))
            if len(samples) == size:
                yield {**torch.utils.data.default_collate(samples), "bad": bad, "lanes": [(lane, position)]}
                samples, bad = [], []


def join(chunks, k, device):
    """A shard stream's micro-batches: one chunk from each of this rank's k readers (DataLoader workers, which the
    DataLoader returns in turn), concatenated on the device, where pinned chunks arrive asynchronously."""
    for parts in zip(*[chunks] * k):  # k consecutive chunks at a time
        yield {key: torch.cat([p[key].to(device, non_blocking=True) for p in parts]) if torch.is_tensor(parts[0][key])
               else [x for p in parts for x in p[key]] for key in parts[0]}
