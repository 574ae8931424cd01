"""
Zero-shot classification, image-text retrieval and one-image inference, for our checkpoints and OpenAI-format
state dicts.

    python eval_zeroshot.py --checkpoint out/ckpt.pt                                   # the built-in synthetic tasks
    python eval_zeroshot.py --checkpoint out/ckpt.pt --dataset synthetic-retrieval     # retrieval, held-out captions
    python eval_zeroshot.py --checkpoint out/ckpt.pt --dataset cifar10 --data-dir ~/data --download
    python eval_zeroshot.py --checkpoint ViT-B-32.pt --dataset imagenet --data-dir ~/imagenet/val  # names built in
    python eval_zeroshot.py --checkpoint ViT-B-32.pt --dataset folder --data-dir ~/pets/val --classnames names.txt
    python eval_zeroshot.py --checkpoint out/ckpt.pt --dataset coco-5k --data-dir ~/coco2014   # or coco, flickr30k
    python eval_zeroshot.py --checkpoint out/ckpt.pt --dataset my_pairs.tsv            # retrieval on any csv/tsv
    python eval_zeroshot.py --checkpoint ViT-B/32 --dataset coco-5k --data-dir ~/coco2014  # OpenAI's, downloaded
    python eval_zeroshot.py --interpolate ViT-B/32 out/ckpt.pt --alpha 0.5 --dataset coco-5k --data-dir ~/coco2014
    python eval_zeroshot.py --checkpoint ViT-B-32.pt --image dog.jpg --labels "dog,cat,car"   # one image
    ... --output results.json                                                          # metrics, one object per task

Classification (OpenAI's protocol): every class name is put in each prompt template; the method embeds the prompts and
combines them into one classifier per class (CLIP: normalise each, average, renormalise); an image's logits are its
similarity to each class. Retrieval (CLIP_benchmark's protocol): recall@k image→text (a hit when any of the image's
captions is in the top k) and text→image. Scores come from the method's own similarity (cosine for CLIP, token-wise for
FILIP), through the interface in clip.py. train.py --eval-every runs the same `prepare` and `evaluate`.
"""

import argparse
import json
import re

import torch

import data
from plumbing import distributed, evalsets, pretrained, show, stops
from plumbing.evalsets import cat, class_embeddings, eval_pairs, loader
from plumbing.runlog import fail
from plumbing.synthetic import TASKS, SyntheticTask
from plumbing.weights import load_method

# ---------------------------------------------------------------------------------------------------------------------
# Zero-shot classification

@torch.no_grad()
def classify(method, tokenizer, dataset, classnames, templates, device, batch_size=256, workers=0):
    """dataset yields (image tensor, label). Returns dict(top1, top5, mean_per_class_recall, chance, n)."""
    method.eval()  # as retrieve: `evaluate` restores every module's mode
    classifier = class_embeddings(method, tokenizer, classnames, templates, device)
    correct5, predictions, targets = 0, [], []
    for images, labels in loader(dataset, batch_size, workers):
        logits = method.similarity(method.embed_images(images.to(device)), classifier)  # (B, C)
        top = logits.topk(min(5, len(classnames)), dim=-1).indices.cpu()  # (B, k)
        correct5 += (top == labels[:, None]).any(dim=1).sum().item()
        predictions.append(top[:, 0])
        targets.append(labels)
    predictions, targets = torch.cat(predictions), torch.cat(targets)
    return dict(top1=(predictions == targets).sum().item() / len(targets), top5=correct5 / len(targets),
                mean_per_class_recall=mean_per_class_recall(predictions, targets, len(classnames)),
                chance=1 / len(classnames), n=len(targets))


def mean_per_class_recall(predictions, labels, classes):
    """The mean over the classes that have images of the share of each one's images predicted as it (the metric of
    several of the CLIP paper's datasets; scikit-learn's balanced_accuracy_score, as CLIP_benchmark)."""
    hits = torch.zeros(classes, dtype=torch.float64).index_add_(0, labels, (predictions == labels).double())
    counts = torch.zeros(classes, dtype=torch.float64).index_add_(0, labels, torch.ones_like(hits[labels]))
    return (hits[counts > 0] / counts[counts > 0]).mean().item()


# ---------------------------------------------------------------------------------------------------------------------
# Retrieval

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
    # the running top-k images of every caption, over the image batches
    best_scores, best_images = torch.empty(len(captions), 0), torch.empty(len(captions), 0, dtype=torch.long)
    first = 0
    for batch in loader(evalsets.Images(images, transform), batch_size, workers):
        scores = method.similarity(method.embed_images(batch.to(device)), texts).float().cpu()  # (b, K)
        top = scores.topk(min(kmax, scores.shape[1]), dim=1).indices  # (b, k) captions
        own = torch.arange(first, first + len(batch))
        for k in ks:  # a hit when any of the image's captions is among its top k
            image_hits[k] += (caption_image[top[:, :k]] == own[:, None]).any(dim=1).sum().item()
        column_scores = torch.cat([scores.T, best_scores], dim=1)  # (K, b + kept)
        best_scores, idx = column_scores.topk(min(kmax, column_scores.shape[1]), dim=1)
        best_images = torch.cat([own.expand(len(captions), -1), best_images], dim=1).gather(1, idx)
        first += len(batch)
    results = {f"image->text R@{k}": image_hits[k] / len(images) for k in ks}
    for k in ks:
        results[f"text->image R@{k}"] = (best_images[:, :k] == caption_image[:, None]).any(dim=1).double().mean().item()
    return results


# ---------------------------------------------------------------------------------------------------------------------
# What the scripts and train.py --eval-every run

def prepare(name, data_dir=None, image_size=224, download=False, classnames=None, templates=None, size=1000,
            **csv_keys):
    """--dataset NAME, read and checked now (a bad path or flag stops here with one line: train.py prepares its
    --eval-dataset before training) -> the list of tasks that `evaluate` runs. size: images per synthetic task."""
    if name in ("synthetic", "synthetic-retrieval") and size < 1:
        fail(f"--dataset {name} needs 1 or more held-out images (--eval-size, got {size})")
    transform = data.eval_transform(image_size)
    if name == "synthetic":
        return [dict(task="zeroshot_classification", dataset=f"synthetic/{task}", classnames=names, templates=prompts,
                     images=evalsets.Labelled(SyntheticTask(task, size, image_size), transform))
                for task, (names, prompts) in TASKS.items()]
    if name in evalsets.RETRIEVAL or name.endswith((".csv", ".tsv")):
        try:
            images, captions, caption_image = evalsets.retrieval_data(name, data_dir, image_size, size, **csv_keys)
        except (ValueError, FileNotFoundError) as e:
            fail(e)
        return [dict(task="retrieval", dataset=name, images=images, captions=captions, caption_image=caption_image)]
    dataset, names, default = evalsets.classification_set(name, data_dir, download, classnames, image_size)
    return [dict(task="zeroshot_classification", dataset=name, classnames=names,
                 templates=evalsets.templates_for(templates, default), images=evalsets.Labelled(dataset, transform))]


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
                    r = dict(images=len(t["images"]), captions=len(t["captions"]), **retrieve(
                        method, tokenizer, t["images"], t["captions"], t["caption_image"], device, batch_size, workers))
                else:
                    r = classify(method, tokenizer, t["images"], t["classnames"], t["templates"], device, batch_size,
                                 workers)
                    r.update(images=r.pop("n"), classes=len(t["classnames"]), templates=len(t["templates"]))
                results.append(dict(task=t["task"], dataset=t["dataset"], **r))
    except ValueError as e:  # an unreadable image (read_image); from a worker it arrives with its traceback
        fail(str(e).strip().splitlines()[-1] if workers else e)
    finally:
        for module, training in modes:
            module.training = training
    return results


def training_tasks(args, image_size):
    """train.py's --eval-dataset's tasks, read now (a bad path stops here, not after hours of training); by default the
    synthetic zero-shot tasks when training on the synthetic data (the quick start's check at the end)."""
    name = args.eval_dataset
    if name is None and args.data == "synthetic" and (args.eval_every or args.eval_size > 0):
        name = "synthetic"
    if name is None and args.eval_every:
        fail(f"--eval-every: name what to evaluate with --eval-dataset (and --eval-data-dir) when training on "
             f"{args.data}, e.g. --eval-dataset coco --eval-data-dir {args.data_dir or 'DIR'}")
    try:
        return name is not None and [task for dataset, folder in eval_pairs(name, args.eval_data_dir)
                                     for task in prepare(dataset, folder, image_size, size=args.eval_size)]
    except SystemExit as e:  # prepare speaks eval_zeroshot.py's flags: say train.py's
        message = re.sub(r"(?<![\w-])--(dataset|data-dir)\b", r"--eval-\1", str(e).removeprefix("error: "))
        fail(message.replace("add --download", "download it (eval_zeroshot.py --download)"))


def report(method, tokenizer, tasks, device, workers, step, log=None):
    """train.py's evaluation, on rank 0: prints the results and logs them to log.jsonl when `log` is given. A task that
    can no longer be evaluated (an image gone since the start) is left out with one warning line: the run and the other
    tasks go on. A stop signal cuts it short, with nothing logged: the run stops (train.py)."""
    results = []
    for task in tasks:
        try:
            results += evaluate(method, tokenizer, [task], device, workers=workers)
        except stops.Stopped:
            return
        except SystemExit as e:  # fail()'s line; another exit (a second SIGTERM or Ctrl-C) stops the run
            if not str(e.code).startswith("error: "):
                raise
            print(f"warning: {task['dataset']} not evaluated at step {step}: {str(e.code).removeprefix('error: ')}",
                  flush=True)
            continue
        print(describe(results[-1]), flush=True)
    if log:
        log.results(step, results)


@torch.no_grad()
def predict(method, tokenizer, image_path, labels, templates, device):
    """One image file and its candidate labels -> each label's probability: the softmax over the labels of their
    prompt-ensemble scores at the model's learned temperature s (OpenAI's example; similarity() is 100 × the score).
    SigLIP's own probabilities are sigmoids of s·cos + b, one per label: this is its softmax over the labels."""
    method.eval()
    try:
        image = data.eval_transform(method.model.image_resolution)(evalsets.read_image(image_path))
    except ValueError as e:
        fail(e)
    L = method.model.context_length
    tokens = tokenizer([t.format(c) for c in labels for t in templates], L).view(len(labels), len(templates), L)
    scores = method.similarity(method.embed_images(image[None].to(device)), method.embed_classes(tokens.to(device)))
    return (scores[0].float() / 100 * method.model.logit_scale.exp().float()).softmax(dim=0).tolist()


def describe(r):
    """A result of `evaluate` (or eval_linear.probe) -> the line eval_zeroshot.py, eval_linear.py and train.py print."""
    name = r["dataset"].removeprefix("synthetic/")
    if r["task"] == "retrieval":
        def recalls(way):  # "R@1 25.20%  R@5 60.40%  R@10 78.80%"
            return "  ".join(f"R@{key.split('R@')[1]} {100 * v:.2f}%" for key, v in r.items() if key.startswith(way))
        return (f"retrieval {name}: {r['images']} images, {r['captions']} captions | image->text "
                f"{recalls('image->text')} | text->image {recalls('text->image')}")
    kind = "linear probe" if r["task"] == "linear_probe" else "zero-shot"
    line = f"{kind} {name}: top-1 {100 * r['top1']:.2f}%"
    if r["task"] == "linear_probe":
        return line + (f"  mean per-class recall {100 * r['mean_per_class_recall']:.2f}%  (C = {r['C']:.3g}, "
                       f"validation {r['metric']} {100 * r['validation']:.2f}%; {r['train']} train, {r['test']} test "
                       f"images, {r['features']} features)")
    if r["dataset"].startswith("synthetic/"):
        return line + f"  top-5 {100 * r['top5']:.2f}%  (chance {100 * r['chance']:.1f}%, {r['images']} images)"
    return line + (f"  top-5 {100 * r['top5']:.2f}%  mean per-class recall {100 * r['mean_per_class_recall']:.2f}%  "
                   f"({r['classes']} classes, {r['images']} images, {r['templates']} templates)")


def write_results(path, results, checkpoint):
    """--output: a JSON list, one object per task, each naming its checkpoint (for tables across checkpoints)."""
    evalsets.write_output(path, json.dumps([dict(r, checkpoint=checkpoint) for r in results], indent=1) + "\n")


# ---------------------------------------------------------------------------------------------------------------------
# The command line

def evaluation_args(description):
    """The flags of both evaluation programs (scripts/eval_linear.py adds its own to this parser)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--checkpoint", default=None, help="a train.py ckpt.pt, an OpenAI .pt or model name (ViT-B/32, "
                   "RN50, ...: downloaded to $CLIP_CACHE, default ~/.cache/clip), or a CLIP state dict")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--download", action="store_true", help="let torchvision download CIFAR/STL-10")
    p.add_argument("--output", default=None, help="write the metrics to this JSON file, one object per task")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=distributed.default_workers(),
                   help="DataLoader workers (default: the cores available less one, at most 8)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="load a checkpoint that holds Python objects besides tensors (this can run its code)")
    p.add_argument("--act", choices=("quickgelu", "gelu"), default=None,
                   help="the transformers' activation, which a state dict cannot tell: quickgelu for OpenAI's weights "
                        "and open_clip's *-quickgelu ones (the default for state dicts), gelu for most open_clip "
                        "weights (LAION-2B, DataComp, names without -quickgelu). Our checkpoints record their own.")
    return p


def load_evaluated(args):
    """--checkpoint (or --interpolate's two), read as --act, --device and --trust-checkpoint say -> (method,
    tokenizer). An OpenAI model name becomes the path of its downloaded file (pretrained.resolve)."""
    if args.batch_size < 1 or args.workers < 0:
        fail(f"--batch-size must be 1 or more and --workers 0 or more (got {args.batch_size} and {args.workers})")
    pair = getattr(args, "interpolate", None)
    if bool(pair) == bool(args.checkpoint):
        fail("pass --checkpoint" + (", or --interpolate A B (WiSE-FT), not both" if hasattr(args, "interpolate")
                                    else ""))
    alpha = getattr(args, "alpha", None)
    if alpha is not None and not pair:
        fail("--alpha is --interpolate's weight of B: it goes with --interpolate A B")
    alpha = 0.5 if alpha is None else alpha
    if pair and not 0 <= alpha <= 1:  # "not" so that NaN fails too
        fail(f"--alpha must be from 0 (A alone) to 1 (B alone) (got {alpha:g})")
    try:  # a device torch knows and this process has: else a traceback, once the checkpoint is read
        if torch.empty(0, device=args.device).device.type not in ("cpu", "cuda", "mps"):  # meta: no values
            raise RuntimeError
    except (RuntimeError, AssertionError):  # not a device name, no GPU, not compiled with CUDA, ...
        fail(f"--device {args.device}: not a device this process has; use cpu or cuda")
    page = args.show_file if getattr(args, "show", None) else None  # eval_zeroshot.py's --show page
    inputs = [*(pair or [args.checkpoint]), *(getattr(args, key, None) for key in ("image", "classnames", "dataset"))]
    evalsets.check_outputs([("--output", args.output), ("--show-file", page)], inputs)  # before a download, hours
    paths = [pretrained.resolve(path) for path in pair or [args.checkpoint]]
    load = [load_method(path, args.device, args.trust_checkpoint, None if args.act is None else args.act == "quickgelu")
            for path in paths]
    if pair:
        args.checkpoint = f"{pair[0]} + {alpha:g} * ({pair[1]} - {pair[0]})"  # how --output names it
        return interpolate(load[0][0], *load[1], alpha)
    args.checkpoint = paths[0]
    return load[0]


def interpolate(method_a, method_b, tokenizer, alpha):
    """WiSE-FT (Wortsman et al. 2022): the model with weights (1 - alpha)·θ_A + alpha·θ_B (every float tensor,
    BatchNorm statistics included), evaluated as B's method -> (method, tokenizer). A and B: one architecture,
    typically the pretrained model and its fine-tuned copy; the paper reports alpha = 0.5 besides a tuned alpha."""
    a, b = method_a.model.state_dict(), method_b.model.state_dict()
    if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
        fail("--interpolate: the two checkpoints are not of the same architecture")
    method_b.model.load_state_dict({k: (1 - alpha) * a[k] + alpha * b[k] if b[k].is_floating_point() else b[k]
                                    for k in b})
    return method_b, tokenizer


def check_flags(args, labels):
    """main's flags, before anything is read: one that this run would not read stops it with one line."""
    if bool(args.image) != bool(args.labels) or (args.image and len(labels) < 2):
        fail("--image and --labels go together, with 2 or more comma-separated labels: --image a.jpg --labels dog,cat")
    if len(set(labels)) < len(labels):  # one label twice would split its probability, and --output keep one
        fail(f"--labels names {next(x for x in labels if labels.count(x) > 1)!r} twice: give each label once")
    dataset = args.dataset or "synthetic"
    retrieval = dataset in evalsets.RETRIEVAL or dataset.endswith((".csv", ".tsv"))
    where = "with --image, which classifies one image" if args.image else f"with --dataset {dataset}"
    for flag, given, read in (
            ("--dataset", args.dataset, not args.image), ("--show", args.show is not None, not args.image),
            ("--data-dir", args.data_dir, not args.image and not dataset.startswith("synthetic")),
            ("--classnames", args.classnames, dataset == "folder" and not args.image),
            ("--templates", args.templates, args.image or not (retrieval or dataset == "synthetic")),
            ("--download", args.download, dataset in ("cifar10", "cifar100", "stl10") and not args.image),
            ("--csv-*", args.csv_img_key or args.csv_caption_key or args.csv_separator,
             dataset.endswith((".csv", ".tsv"))),
            ("--show-file", args.show_file is not None, args.show is not None)):
        if given and not read:
            fail(f"{flag} would be ignored {'without --show' if flag == '--show-file' else where}: leave it out "
                 f"(--help says what it applies to)")
    if args.show is not None and args.show < 1:
        fail(f"--show {args.show}: the number of queries (or mistakes) to show must be 1 or more")
    args.show_file = "show.html" if args.show_file is None else args.show_file


def main(argv=None):
    p = evaluation_args(__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default=None, help="synthetic | cifar10 | cifar100 | stl10 | imagenet | folder "
                   "(classification); synthetic-retrieval | coco | coco-5k | flickr30k | a .csv/.tsv (retrieval)")
    p.add_argument("--csv-img-key", default=None, help="as in train.py, for a .csv/.tsv dataset")
    p.add_argument("--csv-caption-key", default=None, help="as in train.py")
    p.add_argument("--csv-separator", default=None, help="as in train.py")
    p.add_argument("--classnames", default=None, help="for --dataset folder: a file with one class name per line")
    p.add_argument("--templates", default=None,
                   help="80 (OpenAI's ImageNet templates: the default for imagenet and --image), 7 (their subset: "
                        "the default for folder), or one template with {} for the class name ('{}': the names alone); "
                        "not for retrieval or the synthetic tasks, which keep their own")
    p.add_argument("--image", default=None, help="classify this one image among --labels and print each probability")
    p.add_argument("--labels", default=None, help="with --image: the candidate labels, comma-separated")
    p.add_argument("--interpolate", nargs=2, default=None, metavar=("A", "B"), help="instead of --checkpoint: WiSE-FT, "
                   "the weight-space average (1 - alpha)·A + alpha·B of a pretrained A and its fine-tuned B")
    p.add_argument("--alpha", type=float, default=None, help="--interpolate's weight of B, from 0 to 1 (WiSE-FT's "
                   "0.5 if left out)")
    p.add_argument("--show", type=int, default=None, metavar="N", help="write --show-file: N queries' top 5 per "
                   "direction of retrieval, N mistakes per classification task, the correct items marked "
                   "(plumbing/show.py)")
    p.add_argument("--show-file", default=None, help="the HTML page of --show (default: show.html)")
    args = p.parse_args(argv)
    labels = [label.strip() for label in (args.labels or "").split(",") if label.strip()]
    check_flags(args, labels)
    method, tokenizer = load_evaluated(args)
    if args.image:
        templates = evalsets.templates_for(args.templates, evalsets.IMAGENET_TEMPLATES_80)
        probabilities = predict(method, tokenizer, args.image, labels, templates, args.device)
        for label, probability in zip(labels, probabilities):
            print(f"{label}: {100 * probability:.2f}%")
        results = [dict(task="inference", image=args.image, probabilities=dict(zip(labels, probabilities)))]
    else:
        tasks = prepare(args.dataset or "synthetic", args.data_dir, method.model.image_resolution, args.download,
                        args.classnames, args.templates, img_key=args.csv_img_key, caption_key=args.csv_caption_key,
                        sep=args.csv_separator)
        results = evaluate(method, tokenizer, tasks, args.device, args.batch_size, args.workers)
        for r in results:
            print(describe(r))
        if args.show:
            panels = [show.rankings(method, tokenizer, t, args.device, args.show, args.batch_size, args.workers)
                      for t in tasks]
            notes = [show.shortfall(t, p, args.show) for t, p in zip(tasks, panels)]  # fewer than N: said
            sections = [show.section(t, p, note) for t, p, note in zip(tasks, panels, notes)]
            show.write(args.show_file, args.checkpoint, sections)
            print("\n".join([args.show_file, *(f"{t['dataset']}: {note}" for t, note in zip(tasks, notes) if note)]))
    if args.output:
        write_results(args.output, results, args.checkpoint)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback
        raise SystemExit("interrupted") from None
