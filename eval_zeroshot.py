"""
Zero-shot classification and image-text retrieval, for our checkpoints and for OpenAI-format state dicts.

    python eval_zeroshot.py --checkpoint out/ckpt.pt                                   # the built-in synthetic tasks
    python eval_zeroshot.py --checkpoint out/ckpt.pt --dataset cifar10 --data-dir ~/data --download
    python eval_zeroshot.py --checkpoint ViT-B-32.pt --dataset folder --data-dir ~/imagenet/val --classnames names.txt
    python eval_zeroshot.py --checkpoint out/ckpt.pt --dataset coco --data-dir ~/coco  # retrieval on val2017
    python eval_zeroshot.py --checkpoint out/ckpt.pt --dataset my_pairs.tsv            # retrieval on any csv/tsv

Classification (OpenAI's protocol): every class name is put in each prompt template; the method embeds the
prompts and combines them into one classifier per class (CLIP: normalise each, average, renormalise); an image's
logits are its similarity to each class. Retrieval (CLIP_benchmark's protocol): recall@k image→text (a hit when
any of the image's captions is in the top k) and text→image. Scores come from the method's own similarity
(cosine for CLIP, token-wise for FILIP), through the interface in clip.py.
"""

import argparse
import importlib
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
# the 7 of OpenAI's 80 ImageNet templates that do as well as all 80 (OpenAI's prompt-engineering notebook)
IMAGENET_TEMPLATES = [
    "itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.", "a {} in a video game.",
    "art of the {}.", "a photo of the small {}.",
]


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
    """dataset yields (image tensor, label). Returns dict(top1, top5, chance, n)."""
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
    correct1 = correct5 = n = 0
    for images, labels in loader(dataset, batch_size, workers):
        logits = method.similarity(method.embed_images(images.to(device)), classifier)  # (B, C)
        top = logits.topk(k, dim=-1).indices.cpu()  # (B, k)
        hits = top == labels[:, None]
        correct1 += hits[:, 0].sum().item()
        correct5 += hits.any(dim=1).sum().item()
        n += len(labels)
    method.train(was_training)
    return dict(top1=correct1 / n, top5=correct5 / n, chance=1 / len(classnames), n=n)


def synthetic(method, tokenizer, device, size=1000):
    """The built-in held-out zero-shot tasks (data.py): the quick check that a model learned something."""
    results = {}
    for task, (classnames, templates) in data.SYNTHETIC_TASKS.items():
        R = method.model.image_resolution
        dataset = Labelled(data.SyntheticTask(task, size=size, image_size=R), data.eval_transform(R))
        results[task] = classify(method, tokenizer, dataset, classnames, templates, device)
    return results


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


def classification_set(name, data_dir, download, classnames_file, image_size):
    """-> (dataset of (image, label), classnames, templates)"""
    root = os.path.expanduser(data_dir or "~/data")
    try:
        if name == "cifar10":
            ds = torchvision.datasets.CIFAR10(root, train=False, download=download)
            return ds, ds.classes, CIFAR_TEMPLATES
        if name == "cifar100":
            ds = torchvision.datasets.CIFAR100(root, train=False, download=download)
            return ds, [c.replace("_", " ") for c in ds.classes], CIFAR_TEMPLATES
        if name == "stl10":
            ds = torchvision.datasets.STL10(root, split="test", download=download)
            return ds, ds.classes, STL10_TEMPLATES
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted. You can use download=True ..."
        fail(f"{name} not found under {root} ({e}); add --download, or point --data-dir at it")
    if name == "folder":
        if not data_dir or not os.path.isdir(data_dir):
            fail(f"--dataset folder needs --data-dir pointing at a folder of class folders (got {data_dir})")
        try:  # decoded as in training (data.load_image): a 16-bit PNG through PIL's convert("RGB") comes out white
            ds = torchvision.datasets.ImageFolder(data_dir, loader=read_image)
        except FileNotFoundError as e:  # no class folder, or no image in any of them
            fail(f"--data-dir {data_dir}: {e} (--dataset folder expects one folder of images per class)")
        if len(ds.classes) < 2:
            fail(f"--data-dir {data_dir} holds one class folder, {ds.classes[0]}: zero-shot classification needs at "
                 f"least 2 classes (a single class scores 100%)")
        classnames = [c.replace("_", " ") for c in ds.classes]
        if classnames_file:
            with open(classnames_file) as f:
                classnames = [line.strip() for line in f if line.strip()]
            if len(classnames) != len(ds.classes):
                fail(f"{classnames_file} has {len(classnames)} names but {data_dir} has {len(ds.classes)} class folders")
        return ds, classnames, IMAGENET_TEMPLATES
    fail(f"unknown dataset '{name}'; choose synthetic, cifar10, cifar100, stl10, folder, coco, or a .csv/.tsv path")


# ---------------------------------------------------------------------------------------------------------------------
# Retrieval


class Images(torch.utils.data.Dataset):
    def __init__(self, paths, transform):
        self.paths, self.transform = paths, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return self.transform(read_image(self.paths[i]))


def read_image(path):
    """data.load_image, as in training, but an unreadable file stops the evaluation: skipping would change the
    benchmark, so say which file to fix."""
    try:
        return data.load_image(path)
    except OSError as e:
        raise ValueError(f"cannot read {path} ({e}); fix or remove it to evaluate on this set") from None


@torch.no_grad()
def retrieve(method, tokenizer, image_paths, captions, caption_image, device, batch_size=256, workers=0, ks=(1, 5, 10)):
    """image_paths: M images; captions: K strings; caption_image: (K,) index of each caption's image.
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
    for images in loader(Images(image_paths, transform), batch_size, workers):
        scores = method.similarity(method.embed_images(images.to(device)), texts).float().cpu()  # (b, K)
        top = scores.topk(min(kmax, scores.shape[1]), dim=1).indices  # (b, k) captions
        own = torch.arange(first, first + len(images))
        for k in ks:  # a hit when any of the image's captions is among its top k
            image_hits[k] += (caption_image[top[:, :k]] == own[:, None]).any(dim=1).sum().item()
        column_scores = torch.cat([scores.T] + ([best_scores] if best_scores is not None else []), dim=1)
        column_images = torch.cat([own.expand(len(captions), -1)] + ([best_images] if best_images is not None else []), 1)
        best_scores, idx = column_scores.topk(min(kmax, column_scores.shape[1]), dim=1)
        best_images = column_images.gather(1, idx)
        first += len(images)
    results = {f"image->text R@{k}": image_hits[k] / len(image_paths) for k in ks}
    for k in ks:
        results[f"text->image R@{k}"] = (best_images[:, :k] == caption_image[:, None]).any(dim=1).float().mean().item()
    return results


# ---------------------------------------------------------------------------------------------------------------------


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a train.py ckpt.pt, an OpenAI .pt, or a CLIP state dict")
    p.add_argument("--dataset", default="synthetic",
                   help="synthetic | cifar10 | cifar100 | stl10 | folder (classification); coco | a .csv/.tsv (retrieval)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--csv-img-key", default=None, help="as in train.py, for a .csv/.tsv dataset")
    p.add_argument("--csv-caption-key", default=None, help="as in train.py")
    p.add_argument("--csv-separator", default=None, help="as in train.py")
    p.add_argument("--classnames", default=None, help="for --dataset folder: a file with one class name per line")
    p.add_argument("--download", action="store_true", help="let torchvision download CIFAR/STL-10")
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

    method, tokenizer = load(args.checkpoint, args.device, args.trust_checkpoint,
                              None if args.act is None else args.act == "quickgelu")
    R = method.model.image_resolution
    if args.dataset == "synthetic":
        for task, r in synthetic(method, tokenizer, args.device).items():
            print(f"{task}: top-1 {100 * r['top1']:.2f}%  top-5 {100 * r['top5']:.2f}%  "
                  f"(chance {100 * r['chance']:.1f}%, {r['n']} images)")
    elif args.dataset == "coco" or args.dataset.endswith((".csv", ".tsv")):
        try:
            image_paths, captions, caption_image = data.retrieval_set(
                args.dataset, args.data_dir, img_key=args.csv_img_key, caption_key=args.csv_caption_key,
                sep=args.csv_separator)
        except (ValueError, FileNotFoundError) as e:
            fail(e)
        try:
            results = retrieve(method, tokenizer, image_paths, captions, caption_image, args.device, args.batch_size,
                               args.workers)
        except ValueError as e:
            fail(str(e).strip().splitlines()[-1] if args.workers else e)  # a worker's error arrives with its traceback
        print(f"{args.dataset}: {len(image_paths)} images, {len(captions)} captions")
        for name, value in results.items():
            print(f"{name}: {100 * value:.2f}%")
    else:
        dataset, classnames, templates = classification_set(args.dataset, args.data_dir, args.download,
                                                            args.classnames, R)
        try:
            r = classify(method, tokenizer, Labelled(dataset, data.eval_transform(R)), classnames, templates,
                         args.device, args.batch_size, args.workers)
        except ValueError as e:
            fail(str(e).strip().splitlines()[-1] if args.workers else e)  # a worker's error arrives with its traceback
        print(f"{args.dataset}: top-1 {100 * r['top1']:.2f}%  top-5 {100 * r['top5']:.2f}%  "
              f"({len(classnames)} classes, {r['n']} images, {len(templates)} templates)")


if __name__ == "__main__":
    main()
