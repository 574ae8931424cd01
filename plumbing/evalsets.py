"""
The evaluation data: classification sets (CIFAR-10/100 and STL-10 from torchvision, ImageNet, any folder of class
folders) with OpenAI's prompt templates, and retrieval sets (COCO val2017, Karpathy's COCO 5k and Flickr30k 1k test
splits, any CSV/TSV). eval_zeroshot.prepare reads them; scripts/eval_linear.py reads the classification sets.
"""

import json
import os
import re

import torch
import torchvision
from PIL import Image

import data
from plumbing import samples, stops
from plumbing.runlog import fail, signals
from plumbing.synthetic import SyntheticCaptions

HERE = os.path.dirname(os.path.abspath(__file__))
# OpenAI's names of the 1,000 ImageNet classes, one per line in class-index order (the sorted WordNet ids n01440764...)
IMAGENET_CLASSES = os.path.join(HERE, "imagenet_classes.txt")
# OpenAI's prompts (openai/CLIP data/prompts.md): CIFAR's (the same for CIFAR-10 and CIFAR-100), STL-10's, the 80
# ImageNet templates, and the 7 of them that do as well as all 80 (OpenAI's prompt-engineering notebook)
with open(os.path.join(HERE, "templates.json"), encoding="utf-8") as f:
    TEMPLATES = json.load(f)
CIFAR_TEMPLATES, STL10_TEMPLATES = TEMPLATES["cifar"], TEMPLATES["stl10"]
IMAGENET_TEMPLATES_80, IMAGENET_TEMPLATES = TEMPLATES["imagenet80"], TEMPLATES["imagenet7"]
# Karpathy's splits (caption_datasets.zip): the split file each retrieval benchmark reads from --data-dir
KARPATHY = {"coco-5k": "dataset_coco.json", "flickr30k": "dataset_flickr30k.json"}
RETRIEVAL = ("coco", "synthetic-retrieval", *KARPATHY)
DATASETS = ("synthetic", "cifar10", "cifar100", "stl10", "imagenet", "folder", *RETRIEVAL)  # and .csv/.tsv


class Labelled(torch.utils.data.Dataset):
    """(image, label) dataset -> (tensor, label) with the evaluation transform; images are PIL images (converted to
    RGB here) or tensors from samples.load_image."""

    def __init__(self, dataset, transform):
        self.dataset, self.transform = dataset, transform

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        image, label = self.dataset[i]
        return self.transform(image.convert("RGB") if isinstance(image, Image.Image) else image), label


def classification_set(name, data_dir, download, classnames_file, image_size, split="test"):
    """-> (dataset of (image, label), classnames, templates). split: "test" or "train" for the torchvision sets (the
    linear probe fits on train); a folder dataset is the folder given."""
    root = os.path.expanduser(data_dir or "~/data")
    try:
        if name in ("cifar10", "cifar100"):
            cifar = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
            ds = cifar(root, train=split == "train", download=download)
            return ds, [c.replace("_", " ") for c in ds.classes], CIFAR_TEMPLATES  # CIFAR-100's maple_tree, ...
        if name == "stl10":
            ds = torchvision.datasets.STL10(root, split=split, download=download)
            return ds, ds.classes, STL10_TEMPLATES
    except (RuntimeError, OSError) as e:  # "Dataset not found or corrupted. You can use download=True", no network
        fail(f"{name} not found under {root} ({e}); add --download, or point --data-dir at it")
    if name == "imagenet":  # OpenAI's class names: the folders must be the 1,000 WordNet ids, whose order they follow
        ds = image_folder(data_dir, name)
        if len(ds.classes) != 1000 or not all(re.fullmatch(r"n\d{8}", c) for c in ds.classes):
            fail(f"--dataset imagenet: {data_dir} should hold the 1,000 ImageNet class folders named by WordNet id "
                 f"(n01440764, ...), found {len(ds.classes)} folders such as {ds.classes[0]}; use --dataset folder "
                 f"for other class folders")
        return ds, imagenet_classnames(), IMAGENET_TEMPLATES_80
    if name == "folder":
        ds = image_folder(data_dir, name)
        classnames = [c.replace("_", " ") for c in ds.classes]
        if classnames_file:
            try:
                with open(classnames_file, encoding="utf-8") as f:
                    classnames = [line.strip() for line in f if line.strip()]
            except (OSError, UnicodeDecodeError) as e:  # a name that is not a file, a file that is not UTF-8
                fail(f"--classnames {classnames_file} cannot be read: {getattr(e, 'strerror', None) or e}")
            if len(classnames) != len(ds.classes):
                fail(f"{classnames_file} has {len(classnames)} names but {data_dir} has {len(ds.classes)} class "
                     f"folders")
        twice = [name for name in classnames if classnames.count(name) > 1]
        if twice:  # two classes of one name get one prompt embedding: neither can be told from the other
            fail(f"class name {twice[0]!r} is given to two classes ({classnames_file or data_dir}): give each its own")
        return ds, classnames, IMAGENET_TEMPLATES
    fail(f"unknown dataset '{name}'; choose synthetic, cifar10, cifar100, stl10, imagenet, folder (classification), "
         f"{', '.join(RETRIEVAL)} or a .csv/.tsv path (retrieval)")


def image_folder(data_dir, name):
    """One folder of images per class, sorted by name: the class index order."""
    if not data_dir or not os.path.isdir(data_dir):
        fail(f"--dataset {name} needs --data-dir pointing at a folder of class folders (got {data_dir})")
    try:  # decoded as in training (samples.load_image): a 16-bit PNG through PIL's convert("RGB") comes out white
        ds = torchvision.datasets.ImageFolder(data_dir, loader=read_image)
    except FileNotFoundError as e:  # no class folder, or no image in any of them
        fail(f"--data-dir {data_dir}: {e} (--dataset {name} expects one folder of images per class)")
    if len(ds.classes) < 2:
        fail(f"--data-dir {data_dir} holds one class folder, {ds.classes[0]}: classification needs at least 2 "
             f"classes (a single class scores 100%)")
    return ds


def imagenet_classnames():
    with open(IMAGENET_CLASSES) as f:
        return [line.rstrip("\n") for line in f]


def templates_for(choice, default):
    """--templates: "80" (OpenAI's ImageNet set), "7" (its subset), or one template holding {}; None: default."""
    named = {None: default, "80": IMAGENET_TEMPLATES_80, "7": IMAGENET_TEMPLATES}
    if choice in named:
        return named[choice]
    if "{}" not in choice or set("{}") & set(choice.replace("{}", "")):  # 'a {} of {kind}' stops str.format
        fail(f"--templates {choice!r}: give 80, 7, or one template with {{}} where the class name goes (no other "
             f"brace)")
    return [choice]


def eval_pairs(names, folders):
    """--eval-dataset's comma-separated datasets and their --eval-data-dir -> [(dataset, folder)]: one folder serves
    every dataset, or several go one to each in order (an empty one to a dataset that reads none). Spaces around the
    commas do not count; a value that is one existing path is one item, commas and all."""
    names = [names] if os.path.exists(names) else [name.strip() for name in names.split(",")]
    if "" in names:
        fail(f"--eval-dataset {','.join(names)!r}: an empty name; give datasets separated by single commas, e.g. "
             f"imagenet,coco-5k")
    for name in names:
        if name not in DATASETS and not name.endswith((".csv", ".tsv")):
            fail(f"--eval-dataset {name}: unknown dataset; choose from {', '.join(DATASETS)} or a .csv/.tsv path")
        if names.count(name) > 1:
            fail(f"--eval-dataset names {name} twice: each dataset is evaluated once, and logged under its name")
    if folders is None or len(names) == 1:  # one dataset: its folder as given
        return [(name, folders) for name in names]
    folders = [folders] if os.path.isdir(folders) else [os.path.expanduser(f.strip()) or None
                                                        for f in folders.split(",")]
    if len(folders) not in (1, len(names)):
        fail(f"--eval-data-dir gives {len(folders)} folders for {len(names)} datasets of --eval-dataset: give one "
             f"folder for all, or one per dataset in the same order, comma-separated (an empty one for a dataset that "
             f"reads none, as in --eval-dataset synthetic,coco-5k --eval-data-dir ,~/coco2014)")
    return list(zip(names, folders * len(names) if len(folders) == 1 else folders))


def check_outputs(outputs, inputs):
    """[(flag, path)] an evaluation will write, before hours of it: each a file, in a folder this user can write, and
    none of `inputs` (a checkpoint overwritten with JSON is lost), nor each other."""
    outputs = [(flag, path) for flag, path in outputs if path is not None]
    for flag, path in outputs:
        folder = os.path.dirname(os.path.abspath(path))
        problem = "names no file" if not path.strip() else "is a folder" if os.path.isdir(path) else \
            f"is in {folder}, no folder this user can write" if not os.access(folder, os.W_OK | os.X_OK) else \
            "is a file this user may not write" if os.path.exists(path) and not os.access(path, os.W_OK) else None
        if problem:
            fail(f"{flag} {path!r} {problem}")
        for i in inputs:
            if i and os.path.exists(i) and os.path.exists(path) and os.path.samefile(i, path):
                fail(f"{flag} {path} is {i}, an input of this evaluation, which it would overwrite: pick another file")
    if len({os.path.abspath(path) for _, path in outputs}) < len(outputs):
        fail(f"{' and '.join(flag for flag, _ in outputs)} name one file: give each its own")


def write_output(path, text):
    """An evaluation's file (--output, --show-file), whole or not at all: written beside it, then renamed over it (or
    the file a link names); a device or pipe (/dev/stdout) is written as it is."""
    real = os.path.realpath(path) if os.path.isfile(path) or not os.path.exists(path) else None  # not a pipe
    tmp = real and f"{real}.{os.getpid()}.tmp"
    try:
        with open(tmp or path, "w", encoding="utf-8") as f:
            f.write(text)
        if tmp:
            os.replace(tmp, real)
    except OSError as e:
        if tmp and os.path.exists(tmp):
            os.remove(tmp)
        fail(f"could not write {path}: {(e.strerror or str(e)).lower()}")


class Images(torch.utils.data.Dataset):
    """Image files, read here, or images in memory (the synthetic captions') -> evaluation tensors."""

    def __init__(self, images, transform):
        self.images, self.transform = images, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        image = self.images[i]
        return self.transform(read_image(image) if isinstance(image, str) else image)


def cat(chunks):
    """Concatenate batch-first embeddings, which are tensors or (FILIP) tuples of tensors."""
    return tuple(map(torch.cat, zip(*chunks))) if isinstance(chunks[0], tuple) else torch.cat(chunks)


def loader(dataset, batch_size, workers):
    """The dataset's batches in order. A stop signal (train.py's evaluation: runlog.stop_on_signals) ends them at the
    next batch with stops.Stopped, and so does a worker that died with it."""
    batches = iter(torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers, shuffle=False,
                                               worker_init_fn=stops.ignore_interrupts, timeout=workers and stops.TICK))
    stops.found_when_read()
    while not signals:
        try:
            yield stops.next_batch(batches)
        except StopIteration:
            return
    raise stops.Stopped("evaluating")


def class_embeddings(method, tokenizer, classnames, templates, device):
    """Every class name in every template -> the method's classifier (method.embed_classes), in chunks."""
    L = method.model.context_length
    chunk = max(1, 512 // len(templates))  # classes per text batch
    classifier = []
    for i in range(0, len(classnames), chunk):
        names = classnames[i:i + chunk]
        tokens = tokenizer([t.format(c) for c in names for t in templates], L).view(len(names), len(templates), L)
        classifier.append(method.embed_classes(tokens.to(device)))
    return cat(classifier)


def read_image(path):
    """samples.load_image, as in training, but an unreadable file stops the evaluation: skipping would change it."""
    try:
        return samples.load_image(path)
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
        raise ValueError(f"cannot read {path} ({e}); fix or remove it to evaluate on this set") from None


def karpathy_split(json_path, image_root, split="test"):
    """One split of Karpathy's split files (dataset_coco.json, dataset_flickr30k.json, from caption_datasets.zip:
    {"images": [{"filepath" (COCO's only), "filename", "split": train|restval|val|test, "sentences": [{"raw": ...}]}]})
    -> (image_paths, captions, caption_image). COCO's test split is the 5,000 val2014 images of the "5k test" papers
    quote, Flickr30k's the 1,000 images of its "1k test"; every caption of an image is kept."""
    try:
        with open(json_path) as f:
            entries = [e for e in json.load(f)["images"] if e["split"] == split]
        paths = [os.path.join(image_root, e.get("filepath", ""), e["filename"]) for e in entries]
        pairs = [(s["raw"].strip(), i) for i, e in enumerate(entries) for s in e["sentences"]]
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # not JSON; a field missing or of another type
        raise ValueError(f"{json_path} is not in the format of Karpathy's split files ({type(e).__name__}: {e})") \
            from None
    if not paths:
        raise ValueError(f"{json_path} has no image in the '{split}' split")
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of the {len(paths)} {split} images of {json_path} are missing, the "
                                f"first {missing[0]}")
    return paths, [c for c, _ in pairs], [i for _, i in pairs]


def retrieval_data(name, data_dir, image_size, size=1000, **csv_keys):
    """-> (images, captions, caption_image) of a retrieval benchmark (--dataset): synthetic-retrieval (held-out
    captions of the built-in data, drawn as train.py's), coco (val2017), coco-5k / flickr30k (Karpathy's test splits:
    --data-dir holds the split file and the images, COCO's as val2014/..., Flickr30k's in flickr30k-images/ or
    directly), or a .csv/.tsv."""
    if name == "synthetic-retrieval":
        pairs = [SyntheticCaptions("val", size=size, image_size=image_size)[i] for i in range(size)]
        return [image for image, _ in pairs], [caption for _, caption in pairs], list(range(size))
    if name in KARPATHY:
        if not data_dir or not os.path.isfile(os.path.join(data_dir, KARPATHY[name])):
            raise FileNotFoundError(f"--dataset {name} needs --data-dir holding {KARPATHY[name]} (Karpathy's split "
                                    f"file, from caption_datasets.zip) and the images; got {data_dir}")
        root = os.path.join(data_dir, "flickr30k-images")
        root = root if name == "flickr30k" and os.path.isdir(root) else data_dir
        return karpathy_split(os.path.join(data_dir, KARPATHY[name]), root)
    return data.retrieval_set(name, data_dir, **csv_keys)
