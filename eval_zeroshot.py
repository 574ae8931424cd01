"""
Zero-shot classification, image-text retrieval and one-image inference, for our checkpoints and OpenAI-format
state dicts.

    python eval_zeroshot.py --checkpoint out/ckpt.pt                                   # the built-in synthetic tasks
    python eval_zeroshot.py --checkpoint out/ckpt.pt --dataset synthetic-retrieval     # retrieval, held-out captions
    python eval_zeroshot.py --checkpoint out/ckpt.pt --dataset cifar10 --data-dir ~/data --download
    python eval_zeroshot.py --checkpoint ViT-B-32.pt --dataset imagenet --data-dir ~/imagenet/val  # names built in
    python eval_zeroshot.py --checkpoint ViT-B-32.pt --dataset folder --data-dir ~/pets/val --classnames names.txt
    python eval_zeroshot.py --checkpoint out/ckpt.pt --dataset coco --data-dir ~/coco  # retrieval on val2017
    python eval_zeroshot.py --checkpoint out/ckpt.pt --dataset coco-5k --data-dir ~/coco2014   # Karpathy's 5k test
    python eval_zeroshot.py --checkpoint out/ckpt.pt --dataset flickr30k --data-dir ~/flickr30k  # Karpathy's 1k test
    python eval_zeroshot.py --checkpoint out/ckpt.pt --dataset my_pairs.tsv            # retrieval on any csv/tsv
    python eval_zeroshot.py --checkpoint ViT-B-32.pt --image dog.jpg --labels "dog,cat,car"   # one image
    ... --output results.json                                                          # metrics, one object per task

Classification (OpenAI's protocol): every class name is put in each prompt template; the method embeds the
prompts and combines them into one classifier per class (CLIP: normalise each, average, renormalise); an image's
logits are its similarity to each class. Retrieval (CLIP_benchmark's protocol): recall@k image→text (a hit when
any of the image's captions is in the top k) and text→image. Scores come from the method's own similarity
(cosine for CLIP, token-wise for FILIP), through the interface in clip.py. train.py --eval-every runs the same
`prepare` and `evaluate`.
"""

import argparse
import importlib
import json
import os
import re
import sys
import warnings
import zipfile

import torch
import torchvision
from PIL import Image

import data
from model import CLIPModel, build_model

# OpenAI's prompts (openai/CLIP data/prompts.md; the CIFAR set is the same for CIFAR-10 and CIFAR-100)
CIFAR_TEMPLATES = [
    "a photo of a {}.", "a blurry photo of a {}.", "a black and white photo of a {}.", "a low contrast photo of a {}.",
    "a high contrast photo of a {}.", "a bad photo of a {}.", "a good photo of a {}.", "a photo of a small {}.",
    "a photo of a big {}.", "a photo of the {}.", "a blurry photo of the {}.", "a black and white photo of the {}.",
    "a low contrast photo of the {}.", "a high contrast photo of the {}.", "a bad photo of the {}.",
    "a good photo of the {}.", "a photo of the small {}.", "a photo of the big {}.",
]
STL10_TEMPLATES = ["a photo of a {}.", "a photo of the {}."]
# OpenAI's 80 ImageNet templates, and the 7 of them that do as well as all 80 (OpenAI's prompt-engineering notebook)
IMAGENET_TEMPLATES_80 = [
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.", "a photo of the hard to see {}.",
    "a low resolution photo of the {}.", "a rendering of a {}.", "graffiti of a {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.", "a photo of a hard to see {}.",
    "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.",
    "a drawing of a {}.", "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a painting of the {}.", "a painting of a {}.",
    "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.", "a cropped photo of a {}.",
    "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.", "a blurry photo of the {}.",
    "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.", "a {} in a video game.",
    "a photo of one {}.", "a doodle of a {}.", "a close-up photo of the {}.", "a photo of a {}.", "the origami {}.",
    "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.", "a origami {}.",
    "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.", "a photo of the clean {}.",
    "a photo of a large {}.", "a rendition of a {}.", "a photo of a nice {}.", "a photo of a weird {}.",
    "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.", "a sketch of the {}.", "a embroidered {}.",
    "a pixelated photo of a {}.", "itap of the {}.", "a jpeg corrupted photo of the {}.", "a good photo of a {}.",
    "a plushie {}.", "a photo of the nice {}.", "a photo of the small {}.", "a photo of the weird {}.",
    "the cartoon {}.", "art of the {}.", "a drawing of the {}.", "a photo of the large {}.",
    "a black and white photo of a {}.", "the plushie {}.", "a dark photo of a {}.", "itap of a {}.",
    "graffiti of the {}.", "a toy {}.", "itap of my {}.", "a photo of a cool {}.", "a photo of a small {}.",
    "a tattoo of the {}.",
]
IMAGENET_TEMPLATES = [
    "itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.", "a {} in a video game.",
    "art of the {}.", "a photo of the small {}.",
]
# OpenAI's names of the 1,000 ImageNet classes, one per line in class-index order (the sorted WordNet ids n01440764...)
IMAGENET_CLASSES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "imagenet_classes.txt")
# Karpathy's splits (caption_datasets.zip): the split file each retrieval benchmark reads from --data-dir
KARPATHY = {"coco-5k": "dataset_coco.json", "flickr30k": "dataset_flickr30k.json"}
RETRIEVAL = ("coco", "synthetic-retrieval", *KARPATHY)


def fail(message):
    sys.exit("error: " + " ".join(str(message).split()))  # one line, whatever the message


# ---------------------------------------------------------------------------------------------------------------------
# Loading: our checkpoints, OpenAI's released files (TorchScript archives), open_clip checkpoints, plain state dicts


def is_torchscript(path):
    """OpenAI's released .pt files are TorchScript archives: zip files with a constants.pkl member (and code/), which
    torch.save never writes."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.partition("/")[2] == "constants.pkl" for name in archive.namelist())
    except zipfile.BadZipFile:  # not a zip (an older torch.save format, or not a checkpoint): torch.load says which
        return False


def read_checkpoint(path, trust=False):
    """The one place a checkpoint file is read (eval_zeroshot.py and train.py --resume). -> what the file holds.
    A .pt file is a pickle, and unpickling can call any function the file names (os.system, say). So torch.load runs
    with weights_only=True, which rebuilds tensors and plain Python values (dicts, lists, numbers, strings) and refuses
    anything else: our checkpoints and open_clip's hold nothing else. OpenAI's files are TorchScript archives, read by
    torch.jit.load (their code is TorchScript, interpreted by torch, not Python), of which we keep the weights.
    trust=True (--trust-checkpoint) reads any pickle, for a file whose source the user trusts. A file that cannot be
    read stops the program with one line."""
    if not os.path.isfile(path):
        fail(f"no checkpoint at {path}")
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


def load(path, device="cpu", trust=False, quick_gelu=None):
    """-> (method, tokenizer). Our checkpoints rebuild their own method; any other CLIP state dict is evaluated as CLIP.
    quick_gelu: the activation, which a state dict cannot tell (model.build_model); None: our checkpoint's recorded
    one, QuickGELU for any other state dict (OpenAI's weights). trust: see read_checkpoint."""
    checkpoint = read_checkpoint(path, trust)
    if isinstance(checkpoint, dict) and "config" in checkpoint and "method" in checkpoint:  # written by train.py
        config = checkpoint["config"]
        act = {} if quick_gelu is None else {"quick_gelu": quick_gelu}  # an explicit choice overrides the recorded one
        model = CLIPModel(**{**checkpoint["model_config"], **act})
        method = importlib.import_module(config["method"]).Method(model, **checkpoint["method_kwargs"])
        try:
            method.load_state_dict({**{"model." + k: v for k, v in checkpoint["model"].items()}, **checkpoint["method"]})
        except RuntimeError as e:
            fail(f"{path} does not match --model {config['model']} / --method {config['method']}: {str(e).splitlines()[0]}")
        tokenizer = data.get_tokenizer(config.get("tokenizer", "clip"))
    else:
        state_dict = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
        if not isinstance(state_dict, dict):
            fail(f"{path} holds neither a train.py checkpoint nor a CLIP state dict")
        state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}  # open_clip saves DDP's prefix
        try:
            method = importlib.import_module("clip").Method(build_model(state_dict, quick_gelu is not False))
        except ValueError as e:
            fail(f"{path}: {e}")
        tokenizer = data.get_tokenizer("clip")
    return method.to(device).eval(), tokenizer


def cat(chunks):
    """Concatenate batch-first embeddings, which are tensors or (FILIP) tuples of tensors."""
    if isinstance(chunks[0], tuple):
        return tuple(torch.cat(parts) for parts in zip(*chunks))
    return torch.cat(chunks)


def loader(dataset, batch_size, workers):
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers, shuffle=False)


# ---------------------------------------------------------------------------------------------------------------------
# Zero-shot classification


@torch.no_grad()
def classify(method, tokenizer, dataset, classnames, templates, device, batch_size=256, workers=0):
    """dataset yields (image tensor, label). Returns dict(top1, top5, mean_per_class_recall, chance, n)."""
    was_training = method.training
    method.eval()
    L = method.model.context_length
    chunk = max(1, 512 // len(templates))  # classes per text batch
    classifier = []
    for i in range(0, len(classnames), chunk):
        names = classnames[i:i + chunk]
        tokens = tokenizer([t.format(c) for c in names for t in templates], L).view(len(names), len(templates), L)
        classifier.append(method.embed_classes(tokens.to(device)))
    classifier = cat(classifier)
    k = min(5, len(classnames))
    correct5, predictions, targets = 0, [], []
    for images, labels in loader(dataset, batch_size, workers):
        logits = method.similarity(method.embed_images(images.to(device)), classifier)  # (B, C)
        top = logits.topk(k, dim=-1).indices.cpu()  # (B, k)
        correct5 += (top == labels[:, None]).any(dim=1).sum().item()
        predictions.append(top[:, 0])
        targets.append(labels)
    method.train(was_training)
    predictions, targets = torch.cat(predictions), torch.cat(targets)
    return dict(top1=(predictions == targets).sum().item() / len(targets), top5=correct5 / len(targets),
                mean_per_class_recall=mean_per_class_recall(predictions, targets, len(classnames)),
                chance=1 / len(classnames), n=len(targets))


def mean_per_class_recall(predictions, labels, classes):
    """The mean over classes of the fraction of each class's images predicted as it (the metric of several of the CLIP
    paper's datasets; scikit-learn's balanced_accuracy_score, as CLIP_benchmark). Classes without images are left
    out."""
    hits = torch.zeros(classes, dtype=torch.float64).index_add_(0, labels, (predictions == labels).double())
    counts = torch.zeros(classes, dtype=torch.float64).index_add_(0, labels, torch.ones_like(hits[labels]))
    return (hits[counts > 0] / counts[counts > 0]).mean().item()


class Labelled(torch.utils.data.Dataset):
    """(image, label) dataset -> (tensor, label) with the evaluation transform; images are PIL images (converted to
    RGB here) or tensors from data.load_image."""

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
    train = split == "train"
    try:
        if name == "cifar10":
            ds = torchvision.datasets.CIFAR10(root, train=train, download=download)
            return ds, ds.classes, CIFAR_TEMPLATES
        if name == "cifar100":
            ds = torchvision.datasets.CIFAR100(root, train=train, download=download)
            return ds, [c.replace("_", " ") for c in ds.classes], CIFAR_TEMPLATES
        if name == "stl10":
            ds = torchvision.datasets.STL10(root, split="train" if train else "test", download=download)
            return ds, ds.classes, STL10_TEMPLATES
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted. You can use download=True ..."
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
            with open(classnames_file) as f:
                classnames = [line.strip() for line in f if line.strip()]
            if len(classnames) != len(ds.classes):
                fail(f"{classnames_file} has {len(classnames)} names but {data_dir} has {len(ds.classes)} class folders")
        return ds, classnames, IMAGENET_TEMPLATES
    fail(f"unknown dataset '{name}'; choose synthetic, cifar10, cifar100, stl10, imagenet, folder (classification), "
         f"{', '.join(RETRIEVAL)} or a .csv/.tsv path (retrieval)")


def image_folder(data_dir, name):
    """One folder of images per class, sorted by name: the class index order."""
    if not data_dir or not os.path.isdir(data_dir):
        fail(f"--dataset {name} needs --data-dir pointing at a folder of class folders (got {data_dir})")
    try:  # decoded as in training (data.load_image): a 16-bit PNG through PIL's convert("RGB") comes out white
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
    if choice is None:
        return default
    if choice in ("80", "7"):
        return IMAGENET_TEMPLATES_80 if choice == "80" else IMAGENET_TEMPLATES
    if "{}" not in choice:
        fail(f"--templates {choice!r}: give 80, 7, or one template with {{}} where the class name goes")
    return [choice]


# ---------------------------------------------------------------------------------------------------------------------
# Retrieval


class Images(torch.utils.data.Dataset):
    """Image files, read here, or images in memory (the synthetic captions') -> evaluation tensors."""

    def __init__(self, images, transform):
        self.images, self.transform = images, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        image = self.images[i]
        return self.transform(read_image(image) if isinstance(image, str) else image)


def read_image(path):
    """data.load_image, as in training, but an unreadable file stops the evaluation: skipping would change the
    benchmark, so say which file to fix."""
    try:
        return data.load_image(path)
    except OSError as e:
        raise ValueError(f"cannot read {path} ({e}); fix or remove it to evaluate on this set") from None


@torch.no_grad()
def retrieve(method, tokenizer, images, captions, caption_image, device, batch_size=256, workers=0, ks=(1, 5, 10)):
    """images: M image paths (or PIL images); captions: K strings; caption_image: (K,) index of each caption's image.
    Returns {"image->text R@k": ..., "text->image R@k": ...}."""
    method.eval()
    transform = data.eval_transform(method.model.image_resolution)
    L = method.model.context_length
    texts = cat([method.embed_texts(tokenizer(captions[i:i + batch_size], L).to(device))
                 for i in range(0, len(captions), batch_size)])
    caption_image = torch.as_tensor(caption_image)
    kmax = max(ks)
    image_hits = {k: 0 for k in ks}
    best_scores = best_images = None  # running top-k images for every caption, over the image batches
    first = 0
    for batch in loader(Images(images, transform), batch_size, workers):
        scores = method.similarity(method.embed_images(batch.to(device)), texts).float().cpu()  # (b, K)
        top = scores.topk(min(kmax, scores.shape[1]), dim=1).indices  # (b, k) captions
        own = torch.arange(first, first + len(batch))
        for k in ks:  # a hit when any of the image's captions is among its top k
            image_hits[k] += (caption_image[top[:, :k]] == own[:, None]).any(dim=1).sum().item()
        column_scores = torch.cat([scores.T] + ([best_scores] if best_scores is not None else []), dim=1)
        column_images = torch.cat([own.expand(len(captions), -1)] + ([best_images] if best_images is not None else []), 1)
        best_scores, idx = column_scores.topk(min(kmax, column_scores.shape[1]), dim=1)
        best_images = column_images.gather(1, idx)
        first += len(batch)
    results = {f"image->text R@{k}": image_hits[k] / len(images) for k in ks}
    for k in ks:
        results[f"text->image R@{k}"] = (best_images[:, :k] == caption_image[:, None]).any(dim=1).double().mean().item()
    return results


def karpathy_split(json_path, image_root, split="test"):
    """One split of Karpathy's split files (dataset_coco.json, dataset_flickr30k.json, from caption_datasets.zip:
    {"images": [{"filepath" (COCO's only), "filename", "split": train|restval|val|test, "sentences": [{"raw": ...}]}]})
    -> (image_paths, captions, caption_image). COCO's test split is the 5,000 val2014 images of the "5k test" papers
    quote, Flickr30k's the 1,000 images of its "1k test"; every caption of an image is kept."""
    with open(json_path) as f:
        entries = json.load(f)
    try:
        entries = [e for e in entries["images"] if e["split"] == split]
        paths = [os.path.join(image_root, e.get("filepath", ""), e["filename"]) for e in entries]
        pairs = [(s["raw"].strip(), i) for i, e in enumerate(entries) for s in e["sentences"]]
    except (KeyError, TypeError) as e:
        raise ValueError(f"{json_path} is not in the format of Karpathy's split files (no {e})") from None
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
        pairs = [data.SyntheticCaptions("val", size=size, image_size=image_size)[i] for i in range(size)]
        return [image for image, _ in pairs], [caption for _, caption in pairs], list(range(size))
    if name in KARPATHY:
        if not data_dir or not os.path.isfile(os.path.join(data_dir, KARPATHY[name])):
            raise FileNotFoundError(f"--dataset {name} needs --data-dir holding {KARPATHY[name]} (Karpathy's split "
                                    f"file, from caption_datasets.zip) and the images; got {data_dir}")
        root = os.path.join(data_dir, "flickr30k-images")
        root = root if name == "flickr30k" and os.path.isdir(root) else data_dir
        return karpathy_split(os.path.join(data_dir, KARPATHY[name]), root)
    return data.retrieval_set(name, data_dir, **csv_keys)


# ---------------------------------------------------------------------------------------------------------------------
# What the scripts and train.py --eval-every run


def prepare(name, data_dir=None, image_size=224, download=False, classnames=None, templates=None, size=1000,
            **csv_keys):
    """--dataset NAME, read and checked now (a bad path or flag stops here with one line: train.py prepares its
    --eval-dataset before training) -> the list of tasks that `evaluate` runs. size: images per synthetic task."""
    if name in ("synthetic", "synthetic-retrieval") and size < 1:
        fail(f"--dataset {name} needs 1 or more held-out images (got {size})")
    transform = data.eval_transform(image_size)
    if name == "synthetic":
        return [dict(task="zeroshot_classification", dataset=f"synthetic/{task}", classnames=names,
                     templates=task_templates, images=Labelled(data.SyntheticTask(task, size, image_size), transform))
                for task, (names, task_templates) in data.SYNTHETIC_TASKS.items()]
    if name in RETRIEVAL or name.endswith((".csv", ".tsv")):
        try:
            images, captions, caption_image = retrieval_data(name, data_dir, image_size, size, **csv_keys)
        except (ValueError, FileNotFoundError) as e:
            fail(e)
        return [dict(task="retrieval", dataset=name, images=images, captions=captions, caption_image=caption_image)]
    dataset, names, default = classification_set(name, data_dir, download, classnames, image_size)
    return [dict(task="zeroshot_classification", dataset=name, classnames=names,
                 templates=templates_for(templates, default), images=Labelled(dataset, transform))]


def evaluate(method, tokenizer, tasks, device, batch_size=256, workers=0):
    """-> one dict of metrics per task of `prepare`. Leaves no trace: every module's train/eval mode is restored and
    the random number generators are forked (a DataLoader draws its seed from them), so that evaluating during
    training (train.py --eval-every) leaves the training run bit for bit as it would be without."""
    modes = [(module, module.training) for module in method.modules()]
    results = []
    try:
        with torch.random.fork_rng(devices=[device] if str(device).startswith("cuda") else []):
            for t in tasks:
                if t["task"] == "retrieval":
                    r = retrieve(method, tokenizer, t["images"], t["captions"], t["caption_image"], device, batch_size,
                                 workers)
                    results.append(dict(task="retrieval", dataset=t["dataset"], images=len(t["images"]),
                                        captions=len(t["captions"]), **r))
                else:
                    r = classify(method, tokenizer, t["images"], t["classnames"], t["templates"], device, batch_size,
                                 workers)
                    results.append(dict(task="zeroshot_classification", dataset=t["dataset"], top1=r["top1"],
                                        top5=r["top5"], mean_per_class_recall=r["mean_per_class_recall"],
                                        chance=r["chance"], images=r["n"], classes=len(t["classnames"]),
                                        templates=len(t["templates"])))
    except ValueError as e:  # an unreadable image (read_image); from a worker it arrives with its traceback
        fail(str(e).strip().splitlines()[-1] if workers else e)
    finally:
        for module, training in modes:
            module.training = training
    return results


@torch.no_grad()
def predict(method, tokenizer, image_path, labels, templates, device):
    """One image file and its candidate labels -> each label's probability: the softmax over the labels of their
    prompt-ensemble scores at the model's learned temperature s (OpenAI's example; similarity() is 100 × the score).
    SigLIP's own probabilities are sigmoids of s·cos + b, one per label: this is its softmax over the labels."""
    method.eval()
    try:
        image = data.eval_transform(method.model.image_resolution)(read_image(image_path))
    except ValueError as e:
        fail(e)
    L = method.model.context_length
    tokens = tokenizer([t.format(c) for c in labels for t in templates], L).view(len(labels), len(templates), L)
    scores = method.similarity(method.embed_images(image[None].to(device)), method.embed_classes(tokens.to(device)))
    return (scores[0].float() / 100 * method.model.logit_scale.exp().float()).softmax(dim=0).tolist()


def describe(r):
    """A result of `evaluate` -> the lines printed."""
    if r["task"] == "retrieval":
        return [f"{r['dataset']}: {r['images']} images, {r['captions']} captions"] + \
            [f"{k}: {100 * v:.2f}%" for k, v in r.items() if "R@" in k]
    if r["dataset"].startswith("synthetic/"):
        return [f"{r['dataset'].removeprefix('synthetic/')}: top-1 {100 * r['top1']:.2f}%  "
                f"top-5 {100 * r['top5']:.2f}%  (chance {100 * r['chance']:.1f}%, {r['images']} images)"]
    return [f"{r['dataset']}: top-1 {100 * r['top1']:.2f}%  top-5 {100 * r['top5']:.2f}%  mean per-class recall "
            f"{100 * r['mean_per_class_recall']:.2f}%  ({r['classes']} classes, {r['images']} images, "
            f"{r['templates']} templates)"]


def write_results(path, results, checkpoint):
    """--output: a JSON list, one object per task, each naming its checkpoint (for tables across checkpoints)."""
    try:
        with open(path, "w") as f:
            json.dump([dict(r, checkpoint=checkpoint) for r in results], f, indent=1)
            f.write("\n")
    except OSError as e:
        fail(f"could not write {path}: {(e.strerror or str(e)).lower()}")


# ---------------------------------------------------------------------------------------------------------------------


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a train.py ckpt.pt, an OpenAI .pt, or a CLIP state dict")
    p.add_argument("--dataset", default="synthetic",
                   help="synthetic | cifar10 | cifar100 | stl10 | imagenet | folder (classification); "
                        "synthetic-retrieval | coco | coco-5k | flickr30k | a .csv/.tsv (retrieval)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--csv-img-key", default=None, help="as in train.py, for a .csv/.tsv dataset")
    p.add_argument("--csv-caption-key", default=None, help="as in train.py")
    p.add_argument("--csv-separator", default=None, help="as in train.py")
    p.add_argument("--classnames", default=None, help="for --dataset folder: a file with one class name per line")
    p.add_argument("--templates", default=None,
                   help="80 (OpenAI's ImageNet templates: the default for imagenet and --image), 7 (their subset: "
                        "the default for folder), or one template with {} for the class name ('{}': the names alone); "
                        "the synthetic tasks keep their own")
    p.add_argument("--image", default=None, help="classify this one image among --labels and print each probability")
    p.add_argument("--labels", default=None, help="with --image: the candidate labels, comma-separated")
    p.add_argument("--download", action="store_true", help="let torchvision download CIFAR/STL-10")
    p.add_argument("--output", default=None, help="write the metrics to this JSON file, one object per task")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=data.default_workers(),
                   help="DataLoader workers (default: the cores available less one, at most 8)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="load a checkpoint that holds Python objects besides tensors (this can run its code)")
    p.add_argument("--act", choices=("quickgelu", "gelu"), default=None,
                   help="the transformers' activation, which a state dict cannot tell: quickgelu for OpenAI's weights "
                        "and open_clip's *-quickgelu ones (the default for state dicts), gelu for most open_clip "
                        "weights (LAION-2B, DataComp, names without -quickgelu). Our checkpoints record their own.")
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.workers < 0:
        fail(f"--batch-size must be 1 or more and --workers 0 or more (got {args.batch_size} and {args.workers})")
    labels = [label.strip() for label in (args.labels or "").split(",") if label.strip()]
    if bool(args.image) != bool(args.labels) or (args.image and len(labels) < 2):
        fail("--image and --labels go together, with 2 or more comma-separated labels: --image a.jpg --labels dog,cat")

    method, tokenizer = load(args.checkpoint, args.device, args.trust_checkpoint,
                              None if args.act is None else args.act == "quickgelu")
    if args.image:
        templates = templates_for(args.templates, IMAGENET_TEMPLATES_80)
        probabilities = predict(method, tokenizer, args.image, labels, templates, args.device)
        for label, probability in zip(labels, probabilities):
            print(f"{label}: {100 * probability:.2f}%")
        results = [dict(task="inference", image=args.image, probabilities=dict(zip(labels, probabilities)))]
    else:
        tasks = prepare(args.dataset, args.data_dir, method.model.image_resolution, args.download, args.classnames,
                        args.templates, img_key=args.csv_img_key, caption_key=args.csv_caption_key,
                        sep=args.csv_separator)
        results = evaluate(method, tokenizer, tasks, args.device, args.batch_size, args.workers)
        for r in results:
            print("\n".join(describe(r)))
    if args.output:
        write_results(args.output, results, args.checkpoint)


if __name__ == "__main__":
    main()
