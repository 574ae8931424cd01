"""
Linear-probe evaluation, the CLIP paper's protocol: a logistic regression on frozen image features, its regularisation
chosen on a held-out share of the training set, then refit on all of it and scored on the test set (docs/evaluation.md).

    python scripts/eval_linear.py --checkpoint out/ckpt.pt                                # the built-in synthetic tasks
    python scripts/eval_linear.py --checkpoint out/ckpt.pt --dataset cifar10 --data-dir ~/data --download
    python scripts/eval_linear.py --checkpoint ViT-B-32.pt --dataset imagenet --data-dir ~/imagenet   # train/ and val/
    python scripts/eval_linear.py --checkpoint out/ckpt.pt --dataset folder --data-dir D  # D/train/, D/val/: classes
    ... --output results.json                                                     # the metrics, one object per task
"""

import contextlib
import hashlib
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project's root, from any folder

import data
import eval_zeroshot
from plumbing import evalsets
from plumbing.runlog import fail
from plumbing.synthetic import TASKS, SyntheticTask


@torch.no_grad()
def features(method, dataset, device, batch_size=256, workers=0):
    """dataset of (image tensor, label) -> ((N, D) float32 features of encode_image, (N,) labels)"""
    method.eval()
    xs, ys = [], []
    for images, labels in evalsets.loader(dataset, batch_size, workers):
        xs.append(method.model.encode_image(images.to(device)).float().cpu())
        ys.append(labels)
    return torch.cat(xs), torch.cat(ys)


def cached_features(method, dataset, key, cache_dir, device, batch_size, workers):
    """features(), read from cache_dir when a file there was written for the same key."""
    path = os.path.join(cache_dir, hashlib.sha256(key.encode()).hexdigest()[:24] + ".pt") if cache_dir else None
    if path and os.path.isfile(path):
        with contextlib.suppress(Exception):  # a damaged file (cut short, overwritten): computed again, replaced
            cached = torch.load(path, weights_only=True)
            if cached["key"] == key and torch.is_tensor(cached["features"]) and torch.is_tensor(cached["labels"]):
                return cached["features"], cached["labels"]
    try:
        x, y = features(method, dataset, device, batch_size, workers)
    except ValueError as e:  # an unreadable image (evalsets.read_image); from a worker, with its traceback
        fail(str(e).strip().splitlines()[-1] if workers else e)
    if path:
        torch.save(dict(key=key, features=x, labels=y), path + ".tmp")
        os.replace(path + ".tmp", path)  # a probe killed while writing leaves no half file under the real name
    return x, y


def fit(x, y, classes, C, init=None, max_iter=1000, rows=None):
    """Multinomial logistic regression, scikit-learn's LogisticRegression(C) objective C·Σ_i CE(W x_i + b, y_i) + ½‖W‖²,
    by full-batch L-BFGS: x (n, D) float64, y (n,) -> (W (classes, D), b (classes,)), from init's (W, b) if given. The
    objective is divided by C·n (of order 1 at any n, for L-BFGS's tolerances); its gradient is written out (no
    autograd graph at each of up to 1,000 evaluations) and summed over chunks of rows (default 16M logits, 128 MiB)."""
    n, D = x.shape
    W = torch.zeros(classes, D, dtype=x.dtype, device=x.device) if init is None else init[0].clone()
    b = torch.zeros(classes, dtype=x.dtype, device=x.device) if init is None else init[1].clone()
    rows = rows or max(1, 2 ** 24 // classes)
    optimizer = torch.optim.LBFGS([W, b], lr=1, max_iter=max_iter, tolerance_grad=1e-12, tolerance_change=1e-15,
                                  history_size=20, line_search_fn="strong_wolfe")

    def closure():
        loss = (W * W).sum() / (2 * C * n)
        W.grad, b.grad = W / (C * n), torch.zeros_like(b)
        for i in range(0, n, rows):
            xi, yi = x[i:i + rows], y[i:i + rows]
            log_p = torch.addmm(b, xi, W.T).log_softmax(dim=1)  # (rows, classes)
            loss += -log_p.gather(1, yi[:, None]).sum() / n
            residual = log_p.exp()  # ∂CE/∂logits = softmax - onehot(y)
            residual[torch.arange(len(yi), device=x.device), yi] -= 1
            W.grad.addmm_(residual.T, xi, alpha=1 / n)
            b.grad += residual.sum(dim=0) / n
        return loss

    optimizer.step(closure)
    return W, b


def scores(x, y, W, b, classes):
    predictions = torch.addmm(b, x, W.T).argmax(dim=1).cpu()
    y = y.cpu()
    return dict(top1=(predictions == y).sum().item() / len(y),
                mean_per_class_recall=eval_zeroshot.mean_per_class_recall(predictions, y, classes))


def search(score):
    """The CLIP paper's search for the regularisation: λ = 1/C over [1e-6, 1e6], first at λ = 1e-6, 1e-4, ..., 1e6,
    then halving the step around the best value until it is 1/8 decade. score(log10 C) -> validation metric.
    -> (best log10 C, {log10 C: score}). Ties go to the stronger regularisation (the smaller C)."""
    tried = {float(e): score(float(e)) for e in range(-6, 7, 2)}

    def best():
        return max(tried, key=lambda e: (tried[e], -e))

    for step in (1, 1 / 2, 1 / 4, 1 / 8):
        centre = best()
        for e in (centre - step, centre + step):
            if -6 <= e <= 6 and e not in tried:
                tried[e] = score(e)
    return best(), tried


def probe(train_x, train_y, test_x, test_y, classes, device, val_fraction=0.2, seed=0, metric="top1"):
    """Choose C on a validation split of the training features, refit on all of them, score the test features."""
    n = len(train_x)
    if n < 2:
        fail(f"the linear probe needs 2 or more training images (got {n})")
    n_val = min(n - 1, max(1, round(val_fraction * n)))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))  # its own generator: no global state
    x, y = train_x.to(device, torch.float64), train_y.to(device)
    fit_x, fit_y, val_x, val_y = x[order[n_val:]], y[order[n_val:]], x[order[:n_val]], y[order[:n_val]]
    solutions = {}

    def score(e):  # each fit starts from the nearest C's solution: the same minimum, reached in fewer iterations
        nearest = min(solutions, key=lambda s: abs(s - e), default=None)
        solutions[e] = fit(fit_x, fit_y, classes, 10 ** e, solutions.get(nearest))
        return scores(val_x, val_y, *solutions[e], classes)[metric]

    e, tried = search(score)
    W, b = fit(x, y, classes, 10 ** e, solutions[e])
    return dict(scores(test_x.to(device, torch.float64), test_y.to(device), W, b, classes), C=10 ** e,
                validation=tried[e], fits=len(tried), train=n, test=len(test_x), features=x.shape[1])


def probe_sets(name, data_dir, download, image_size, train_size):
    """--dataset -> [(task name, train set, test set, classes, cache identity)]; the sets yield (tensor, label)."""
    transform = data.eval_transform(image_size)
    if name == "synthetic":  # training images drawn apart from the held-out ones of zero-shot, which are the test
        return [(f"synthetic/{task}",
                 evalsets.Labelled(SyntheticTask(task, train_size, image_size, split="train"), transform),
                 evalsets.Labelled(SyntheticTask(task, 1000, image_size, split="val"), transform),
                 len(names), f"synthetic/{task}/{train_size}/{image_size}")
                for task, (names, _) in TASKS.items()]
    if name in ("folder", "imagenet"):
        if not data_dir or not all(os.path.isdir(os.path.join(data_dir, s)) for s in ("train", "val")):
            fail(f"--dataset {name} needs --data-dir holding train/ and val/, each with one folder of images per "
                 f"class (got {data_dir})")
        train, names, _ = evalsets.classification_set(name, os.path.join(data_dir, "train"), False, None, image_size)
        test, _, _ = evalsets.classification_set(name, os.path.join(data_dir, "val"), False, None, image_size)
        if train.classes != test.classes:
            fail(f"{data_dir}/train and {data_dir}/val hold different class folders ({len(train.classes)} and "
                 f"{len(test.classes)}); the probe's classes are train's")
        # the list of files, so that images added to or removed from the folders are features to compute again
        files = hashlib.sha256(repr((train.samples, test.samples)).encode()).hexdigest()
        identity = f"{name}/{os.path.abspath(data_dir)}/{files}/{image_size}"
    else:
        train, names, _ = evalsets.classification_set(name, data_dir, download, None, image_size, split="train")
        test, _, _ = evalsets.classification_set(name, data_dir, download, None, image_size, split="test")
        identity = f"{name}/{os.path.abspath(os.path.expanduser(data_dir or '~/data'))}/{image_size}"
    return [(name, evalsets.Labelled(train, transform), evalsets.Labelled(test, transform), len(names), identity)]


def main(argv=None):
    p = eval_zeroshot.evaluation_args(__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="synthetic",
                   help="synthetic | cifar10 | cifar100 | stl10 (torchvision) | folder | imagenet (--data-dir with "
                        "train/ and val/ class folders; imagenet: the 1,000 WordNet-id folders)")
    p.add_argument("--train-size", type=int, default=5000, help="training images per synthetic task")
    p.add_argument("--val-fraction", type=float, default=0.2, help="share of the training images held out to choose C")
    p.add_argument("--metric", choices=("top1", "mean_per_class_recall"), default="top1",
                   help="what C is chosen for on the validation split (the dataset's metric in the CLIP paper)")
    p.add_argument("--seed", type=int, default=0, help="of the validation split")
    p.add_argument("--cache-dir", default=os.path.join("~", ".cache", "clip-pretrain", "features"),
                   help="where features are kept, keyed by the checkpoint file, dataset and split ('' to keep none)")
    args = p.parse_args(argv)
    if args.train_size < 2 or not 0 < args.val_fraction < 1:
        fail(f"--train-size must be 2 or more and --val-fraction between 0 and 1 (got {args.train_size} and "
             f"{args.val_fraction})")
    cache_dir = os.path.expanduser(args.cache_dir)
    if cache_dir:  # checked now, not once the features are computed
        with contextlib.suppress(OSError):  # a file of that name, or a folder this user may not create: said below
            os.makedirs(cache_dir, exist_ok=True)
        if not (os.path.isdir(cache_dir) and os.access(cache_dir, os.W_OK)):
            fail(f"--cache-dir {args.cache_dir} is not a folder this user can write: pass one, or '' to cache nothing")
    method, _ = eval_zeroshot.load_evaluated(args)
    stat = os.stat(args.checkpoint)
    checkpoint = f"{os.path.abspath(args.checkpoint)}/{stat.st_size}/{stat.st_mtime_ns}/{args.act}"
    results = []
    for task, train, test, classes, identity in probe_sets(args.dataset, args.data_dir, args.download,
                                                           method.model.image_resolution, args.train_size):
        train_x, train_y = cached_features(method, train, f"{checkpoint}|{identity}|train", cache_dir, args.device,
                                           args.batch_size, args.workers)
        test_x, test_y = cached_features(method, test, f"{checkpoint}|{identity}|test", cache_dir, args.device,
                                         args.batch_size, args.workers)
        r = probe(train_x, train_y, test_x, test_y, classes, args.device, args.val_fraction, args.seed, args.metric)
        results.append(dict(task="linear_probe", dataset=task, classes=classes, metric=args.metric, **r))
        print(eval_zeroshot.describe(results[-1]))
    if args.output:
        eval_zeroshot.write_results(args.output, results, args.checkpoint)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback
        raise SystemExit("interrupted") from None
