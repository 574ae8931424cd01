"""Evaluation that compares with the papers (issue 11): the linear probe against scikit-learn and the paper's search,
ImageNet's names and templates against open_clip's, Karpathy's retrieval splits, --output, one-image inference, and
--eval-every on a folder without changing the training run."""

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import clip
import data
import eval_zeroshot
import train
from model import create_model
from plumbing import evalsets, samples
from plumbing.tokenizer import get_tokenizer
from plumbing.weights import load_method
from scripts import eval_linear

TINY = ["--model", "tiny-vit", "--batch-size", "8", "--workers", "0", "--log-every", "1"]


def blobs(n, D, classes, seed, spread=1.0):
    """Stand-in features: Gaussian blobs around one random centre per class, classes balanced."""
    g = torch.Generator().manual_seed(seed)
    centres = 1.5 * torch.randn(classes, D, generator=g, dtype=torch.float64)
    y = torch.arange(n) % classes
    return centres[y] + spread * torch.randn(n, D, generator=g, dtype=torch.float64), y


def colour_folders(root, classes=("red", "blue"), n=4, size=(40, 32)):
    """root/<class>/<i>.png: one colour per class, shades varying per image (a task any encoder separates)"""
    rgb = {"red": (210, 30, 30), "blue": (30, 40, 220), "green": (30, 180, 40)}
    for name in classes:
        os.makedirs(root / name, exist_ok=True)
        for i in range(n):
            Image.new("RGB", size, tuple(min(255, c + 9 * i) for c in rgb[name])).save(root / name / f"{i}.png")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt")
    train.main([*TINY, "--steps", "1", "--eval-size", "0", "--out-dir", str(out)])
    return out / "ckpt.pt"


# --- the linear probe --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("C", [0.01, 1.0, 30.0])
def test_fit_is_scikit_learns_logistic_regression(C):
    """The same minimum as LogisticRegression(C): sklearn's weights, its intercept (up to the constant shift softmax
    ignores), and a gradient of the objective that vanishes there."""
    from sklearn.linear_model import LogisticRegression

    x, y = blobs(240, 12, 4, seed=0)
    W, b = eval_linear.fit(x, y, 4, C)
    reference = LogisticRegression(C=C, tol=1e-12, max_iter=100_000).fit(x.numpy(), y.numpy())
    scale = np.abs(reference.coef_).max()
    np.testing.assert_allclose(W.numpy(), reference.coef_, rtol=0, atol=1e-4 * scale)
    np.testing.assert_allclose((b - b.mean()).numpy(), reference.intercept_ - reference.intercept_.mean(), rtol=0,
                               atol=1e-4 * max(1.0, np.abs(reference.intercept_).max()))
    assert torch.equal(torch.addmm(b, x, W.T).argmax(1), torch.from_numpy(reference.predict(x.numpy())))
    W, b = W.clone().requires_grad_(), b.clone().requires_grad_()
    (C * F.cross_entropy(x @ W.T + b, y, reduction="sum") + (W * W).sum() / 2).backward()
    assert W.grad.abs().max() < 1e-4 * max(1.0, C) and b.grad.abs().max() < 1e-4 * max(1.0, C)


def test_fit_sums_its_chunks_of_rows_exactly():
    """The loss and gradient are summed over chunks of rows (ImageNet's 1.28M × 1000 logits): 3 chunks, one of them
    short, reach the minimum of one."""
    x, y = blobs(90, 5, 3, seed=1)
    W, b = eval_linear.fit(x, y, 3, 1.0)
    chunked_W, chunked_b = eval_linear.fit(x, y, 3, 1.0, rows=31)
    torch.testing.assert_close(chunked_W, W, rtol=0, atol=1e-8)
    torch.testing.assert_close(chunked_b, b, rtol=0, atol=1e-8)


def test_search_is_the_papers():
    """λ = 1/C over [1e-6, 1e6]: every other decade first, then halving the step around the best down to 1/8 decade,
    so the best of a peaked score is found to the nearest 1/8 decade in 15 fits; ties go to the smaller C."""
    calls = []

    def peaked(e):
        calls.append(e)
        return -abs(e - 1.3)

    best, tried = eval_linear.search(peaked)
    assert calls[:7] == [-6.0, -4.0, -2.0, 0.0, 2.0, 4.0, 6.0]
    assert best == 1.25 and len(tried) == len(calls) == 15
    assert all(abs(e * 8 - round(e * 8)) < 1e-12 for e in tried)
    assert eval_linear.search(lambda e: 0.5)[0] == -6.0  # all equal: the strongest regularisation
    best, _ = eval_linear.search(lambda e: -abs(e + 7))  # a peak beyond the range: its edge, nothing outside
    assert best == -6.0


def test_probe_protocol_against_scikit_learn():
    """C is the one of the search with the best validation top-1 on a seeded 20% of the training set; the classifier
    is then refit on the whole training set with that C and scored on the test set."""
    from sklearn.linear_model import LogisticRegression

    x, y = blobs(500, 8, 5, seed=2, spread=2.5)  # overlapping classes: the regularisation matters
    x, y, test_x, test_y = x[:200], y[:200], x[200:], y[200:]
    r = eval_linear.probe(x.float(), y, test_x.float(), test_y, 5, "cpu", val_fraction=0.2, seed=3)
    order = torch.randperm(200, generator=torch.Generator().manual_seed(3))
    val, rest = order[:40].numpy(), order[40:].numpy()
    X, Y = x.float().double().numpy(), y.numpy()

    def validation(C):
        model = LogisticRegression(C=C, tol=1e-10, max_iter=10_000).fit(X[rest], Y[rest])
        return (model.predict(X[val]) == Y[val]).mean()

    _, tried = eval_linear.search(lambda e: validation(10 ** e))
    assert r["validation"] == pytest.approx(max(tried.values()))
    assert validation(r["C"]) == pytest.approx(max(tried.values()))
    final = LogisticRegression(C=r["C"], tol=1e-10, max_iter=10_000).fit(X, Y)
    predicted = final.predict(test_x.float().double().numpy())
    assert r["top1"] == pytest.approx((predicted == test_y.numpy()).mean())
    assert r["fits"] == 15 and r["train"] == 200 and r["test"] == 300 and r["features"] == 8
    assert 0.3 < r["top1"] < 1.0  # neither trivial nor hopeless: a real choice of C


def test_mean_per_class_recall_is_balanced_accuracy():
    from sklearn.metrics import balanced_accuracy_score

    labels = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 2, 3])
    predictions = torch.tensor([0, 0, 1, 2, 1, 0, 2, 2, 2, 0])
    expected = balanced_accuracy_score(labels.numpy(), predictions.numpy())  # (2/4 + 1/2 + 3/3 + 0/1) / 4
    assert eval_zeroshot.mean_per_class_recall(predictions, labels, 5) == pytest.approx(expected) == 0.5


def test_linear_probe_on_folders_with_cached_features(checkpoint, tmp_path, monkeypatch, capsys):
    for split in ("train", "val"):
        colour_folders(tmp_path / "D" / split, ("red", "blue", "green"), n=6 if split == "train" else 3)
    args = ["--checkpoint", str(checkpoint), "--dataset", "folder", "--data-dir", str(tmp_path / "D"), "--workers",
            "0", "--cache-dir", str(tmp_path / "cache"), "--output", str(tmp_path / "r.json")]
    eval_linear.main(args)
    first = capsys.readouterr().out
    assert first.startswith("linear probe folder: top-1 100.00%  mean per-class recall 100.00%")
    assert "18 train, 9 test" in first
    [r] = json.loads((tmp_path / "r.json").read_text())
    assert r["task"] == "linear_probe" and r["dataset"] == "folder" and r["checkpoint"] == str(checkpoint)
    assert r["top1"] == 1.0 and r["classes"] == 3 and r["train"] == 18 and r["test"] == 9 and r["fits"] == 15
    assert len(os.listdir(tmp_path / "cache")) == 2  # train and test features

    def no_encoder(*args, **kwargs):
        raise AssertionError("the features should have come from the cache")

    monkeypatch.setattr(eval_linear, "features", no_encoder)
    eval_linear.main(args)
    assert capsys.readouterr().out == first
    stat = os.stat(checkpoint)  # the same file, written again: the cache no longer holds its features
    os.utime(checkpoint, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    with pytest.raises(AssertionError, match="from the cache"):
        eval_linear.main(args)
    Image.new("RGB", (40, 32), (200, 40, 40)).save(tmp_path / "D" / "val" / "red" / "new.png")
    os.utime(checkpoint, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(AssertionError, match="from the cache"):  # another image in the folder: features again
        eval_linear.main(args)


def test_linear_probe_bad_folders_give_one_line(checkpoint, tmp_path):
    colour_folders(tmp_path / "D" / "train", ("red", "blue"))
    colour_folders(tmp_path / "D" / "val", ("red", "green"))
    for data_dir, words in [(tmp_path / "none", "train/ and val/"), (tmp_path / "D", "different class folders")]:
        with pytest.raises(SystemExit) as stopped:
            eval_linear.main(["--checkpoint", str(checkpoint), "--dataset", "folder", "--data-dir", str(data_dir),
                              "--cache-dir", ""])
        assert words in str(stopped.value.code) and "\n" not in str(stopped.value.code)


# --- ImageNet out of the box -------------------------------------------------------------------------------------


def test_imagenet_names_and_templates_are_openais():
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

    names = evalsets.imagenet_classnames()
    assert len(names) == 1000 and names == list(IMAGENET_CLASSNAMES)
    assert names[0] == "tench" and names[999] == "toilet paper"
    assert len(evalsets.IMAGENET_TEMPLATES_80) == 80
    assert evalsets.IMAGENET_TEMPLATES_80 == [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]
    assert len(evalsets.IMAGENET_TEMPLATES) == 7
    assert evalsets.IMAGENET_TEMPLATES == [t("{}") for t in SIMPLE_IMAGENET_TEMPLATES]
    assert set(evalsets.IMAGENET_TEMPLATES) < set(evalsets.IMAGENET_TEMPLATES_80)


def test_imagenet_folder_needs_no_classnames_file(tmp_path):
    wnids = [f"n{10_000_000 + 7 * i:08d}" for i in range(1000)]
    for i, wnid in enumerate(reversed(wnids)):  # created in another order than the classes'
        os.makedirs(tmp_path / "val" / wnid)
        Image.new("RGB", (8, 8), (i % 256, 0, 0)).save(tmp_path / "val" / wnid / f"{wnid}.png")
    [task] = eval_zeroshot.prepare("imagenet", str(tmp_path / "val"), 64)
    assert task["classnames"] == evalsets.imagenet_classnames()
    assert task["templates"] == evalsets.IMAGENET_TEMPLATES_80 and len(task["images"]) == 1000
    samples = task["images"].dataset.samples  # (path, label): the sorted WordNet ids are the class indices
    assert [label for _, label in samples] == list(range(1000))
    assert all(path.endswith(f"{wnids[label]}.png") for path, label in samples)
    [task] = eval_zeroshot.prepare("imagenet", str(tmp_path / "val"), 64, templates="7")
    assert task["templates"] == evalsets.IMAGENET_TEMPLATES
    colour_folders(tmp_path / "pets", ("red", "blue"))
    with pytest.raises(SystemExit, match="1,000 ImageNet class folders named by WordNet id"):
        eval_zeroshot.prepare("imagenet", str(tmp_path / "pets"), 64)


# --- retrieval on Karpathy's splits ------------------------------------------------------------------------------


def karpathy_entry(filename, split, captions, filepath=None):
    """An image of Karpathy's split files, with the fields they hold (tokens, ids) besides the ones read."""
    entry = {"filename": filename, "imgid": 0, "split": split, "sentids": list(range(len(captions))),
             "sentences": [{"raw": c, "tokens": c.lower().split(), "imgid": 0, "sentid": j}
                           for j, c in enumerate(captions)]}
    if filepath:
        entry = {"filepath": filepath, **entry, "cocoid": 42}
    return entry


def write_karpathy(tmp_path):
    coco = tmp_path / "coco"
    entries = [karpathy_entry(f"COCO_val2014_{i:012d}.jpg", split,
                              [f"a scene {i} number {j}" for j in range(5 + (i == 2))], "val2014")
               for i, split in enumerate(["test", "val", "test", "restval", "test"])]
    entries.append(karpathy_entry("COCO_train2014_000000000009.jpg", "train", ["a train image"], "train2014"))
    (coco / "val2014").mkdir(parents=True)
    for e in entries:
        if e["split"] == "test":
            colour = (int(e["filename"][-6:-4]) * 40, 80, 160)
            Image.new("RGB", (48, 40), colour).save(coco / e["filepath"] / e["filename"])
    (coco / "dataset_coco.json").write_text(json.dumps({"images": entries, "dataset": "coco"}))
    flickr = tmp_path / "flickr30k"
    (flickr / "flickr30k-images").mkdir(parents=True)
    entries = [karpathy_entry(f"{1000092795 + i}.jpg", split, [f"  people {i} doing {j}. " for j in range(5)])
               for i, split in enumerate(["train", "test", "test", "val"])]
    for e in entries[1:3]:
        Image.new("RGB", (40, 48), (30, 200, 90)).save(flickr / "flickr30k-images" / e["filename"])
    (flickr / "dataset_flickr30k.json").write_text(json.dumps({"images": entries, "dataset": "flickr30k"}))
    return coco, flickr


def test_karpathy_splits_read_the_test_images_and_all_their_captions(tmp_path):
    coco, flickr = write_karpathy(tmp_path)
    paths, captions, caption_image = evalsets.retrieval_data("coco-5k", str(coco), 64)
    assert paths == [str(coco / "val2014" / f"COCO_val2014_{i:012d}.jpg") for i in (0, 2, 4)]
    assert captions == [f"a scene {i} number {j}" for i in (0, 2, 4) for j in range(5 + (i == 2))]  # every one
    assert caption_image == [0] * 5 + [1] * 6 + [2] * 5
    paths, captions, caption_image = evalsets.retrieval_data("flickr30k", str(flickr), 64)
    assert paths == [str(flickr / "flickr30k-images" / f"{1000092795 + i}.jpg") for i in (1, 2)]
    assert captions[:2] == ["people 1 doing 0.", "people 1 doing 1."] and len(captions) == 10
    assert caption_image == [0] * 5 + [1] * 5

    os.remove(paths[1])
    with pytest.raises(FileNotFoundError, match=r"1 of the 2 test images .* missing, the first .*1000092797.jpg"):
        evalsets.retrieval_data("flickr30k", str(flickr), 64)
    with pytest.raises(FileNotFoundError, match="dataset_coco.json"):
        evalsets.retrieval_data("coco-5k", str(tmp_path), 64)
    for damaged in (json.dumps([{"file": "x.jpg"}]), "{'images': }", json.dumps({"images": [
            {"split": "test", "filename": "x.jpg", "sentences": [{"raw": 5}]}]})):  # a list, not JSON, a number
        (tmp_path / "dataset_coco.json").write_text(damaged)
        with pytest.raises(ValueError, match="dataset_coco.json is not in the format of Karpathy's split files"):
            evalsets.retrieval_data("coco-5k", str(tmp_path), 64)


def test_retrieval_on_coco_5k_with_output(checkpoint, tmp_path, capsys):
    coco, _ = write_karpathy(tmp_path)
    eval_zeroshot.main(["--checkpoint", str(checkpoint), "--dataset", "coco-5k", "--data-dir", str(coco), "--workers",
                        "0", "--output", str(tmp_path / "r.json")])
    [line] = capsys.readouterr().out.splitlines()
    head, *directions = line.split(" | ")
    assert head == "retrieval coco-5k: 3 images, 16 captions" and len(directions) == 2
    [r] = json.loads((tmp_path / "r.json").read_text())
    assert r["task"] == "retrieval" and r["dataset"] == "coco-5k" and r["images"] == 3 and r["captions"] == 16
    for way, recalls in (d.split(" ", 1) for d in directions):  # the file holds what was printed
        for recall in recalls.split("  "):
            k, value = recall.split(" ")
            assert f"{100 * r[f'{way} {k}']:.2f}%" == value
    assert r["image->text R@10"] == 1.0 and r["text->image R@5"] == 1.0  # 16 captions, 3 images


# --- --output, inference -----------------------------------------------------------------------------------------


def test_output_json_of_zero_shot_classification(checkpoint, tmp_path, capsys):
    eval_zeroshot.main(["--checkpoint", str(checkpoint), "--workers", "0", "--output", str(tmp_path / "s.json")])
    printed = capsys.readouterr().out.splitlines()
    results = json.loads((tmp_path / "s.json").read_text())
    assert [r["dataset"] for r in results] == [f"synthetic/{t}" for t in ("shape", "colour", "size", "count")]
    for r, line in zip(results, printed):
        assert r["task"] == "zeroshot_classification" and r["images"] == 1000 and r["checkpoint"] == str(checkpoint)
        assert line.startswith(f"zero-shot {r['dataset'][10:]}: top-1 {100 * r['top1']:.2f}%  top-5 "
                               f"{100 * r['top5']:.2f}%")
        assert r["chance"] == pytest.approx(1 / r["classes"]) and 0 <= r["mean_per_class_recall"] <= 1
    colour_folders(tmp_path / "val", ("red", "blue"), n=3)
    eval_zeroshot.main(["--checkpoint", str(checkpoint), "--dataset", "folder", "--data-dir", str(tmp_path / "val"),
                        "--workers", "0", "--templates", "a {} thing.", "--output", str(tmp_path / "f.json")])
    [r] = json.loads((tmp_path / "f.json").read_text())
    assert (r["dataset"], r["classes"], r["images"], r["templates"]) == ("folder", 2, 6, 1)
    assert "(2 classes, 6 images, 1 templates)" in capsys.readouterr().out


def test_one_image_inference(checkpoint, tmp_path, capsys):
    Image.new("RGB", (50, 40), (220, 30, 30)).save(tmp_path / "a.png")
    labels = ["red circle", "blue square", "a green star"]
    eval_zeroshot.main(["--checkpoint", str(checkpoint), "--image", str(tmp_path / "a.png"), "--labels",
                        " red circle,blue square , a green star", "--templates", "a photo of a {}.", "--output",
                        str(tmp_path / "p.json")])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(": ")[0] for line in lines] == labels
    [r] = json.loads((tmp_path / "p.json").read_text())
    probabilities = [r["probabilities"][label] for label in labels]
    assert sum(probabilities) == pytest.approx(1.0)
    assert [line.split(": ")[1] for line in lines] == [f"{100 * p:.2f}%" for p in probabilities]

    method, tokenizer = load_method(str(checkpoint))  # the same, written out: softmax of s·cos
    with torch.no_grad():
        image = data.eval_transform(64)(samples.load_image(str(tmp_path / "a.png")))[None]
        i = F.normalize(method.model.encode_image(image), dim=-1)
        t = F.normalize(method.model.encode_text(tokenizer([f"a photo of a {c}." for c in labels], 24)), dim=-1)
        expected = (method.model.logit_scale.exp() * i @ t.T).softmax(dim=-1)[0]
    np.testing.assert_allclose(probabilities, expected.numpy(), rtol=1e-5)
    for bad in (["--image", str(tmp_path / "a.png")], ["--image", str(tmp_path / "a.png"), "--labels", "dog"]):
        with pytest.raises(SystemExit, match="--image and --labels go together"):
            eval_zeroshot.main(["--checkpoint", str(checkpoint), *bad])


# --- evaluation during training ------------------------------------------------------------------------------------


def test_evaluate_leaves_modes_and_random_state_as_they_were(tmp_path):
    torch.manual_seed(0)
    method = clip.CLIP(create_model("tiny-rn")).train()
    method.model.visual.bn1.eval()  # a module in another mode than its parent's, kept so
    colour_folders(tmp_path / "val", ("red", "blue"), n=2)
    tasks = eval_zeroshot.prepare("folder", str(tmp_path / "val"), 64)
    before = [m.training for m in method.modules()]
    rng = torch.get_rng_state()
    results = eval_zeroshot.evaluate(method, get_tokenizer(), tasks, "cpu", workers=0)
    assert results[0]["images"] == 4
    assert [m.training for m in method.modules()] == before and torch.equal(torch.get_rng_state(), rng)


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("kind", ["folder", "csv"])
def test_eval_every_logs_and_leaves_training_unchanged(kind, tmp_path, capsys):
    """A ResNet (BatchNorm: the mode matters) with DataLoader workers, evaluated every 2 steps on a folder
    (classification) or a CSV (retrieval): the same losses and weights, bit for bit, as the run without; the log gets
    one line per evaluation."""
    colour_folders(tmp_path / "val", ("red", "blue"), n=3)
    rows = [f"val/{c}/{i}.png,a {c} thing" for c in ("red", "blue") for i in range(3)]
    (tmp_path / "pairs.csv").write_text("filepath,title\n" + "\n".join(rows) + "\n")
    evaluation = ["--eval-dataset", "folder", "--eval-data-dir", str(tmp_path / "val")] if kind == "folder" else \
        ["--eval-dataset", str(tmp_path / "pairs.csv")]
    args = [*TINY, "--model", "tiny-rn", "--workers", "1", "--steps", "5", "--eval-size", "0"]
    train.main([*args, "--out-dir", str(tmp_path / "plain")])
    train.main([*args, "--out-dir", str(tmp_path / "evaluated"), "--eval-every", "2", *evaluation])
    out = capsys.readouterr().out
    assert out.count("zero-shot folder: top-1" if kind == "folder" else "pairs.csv: 6 images, 6 captions | image->text "
                     "R@1") == 3  # steps 2, 4, and the end

    plain, evaluated = read_log(tmp_path / "plain"), read_log(tmp_path / "evaluated")
    evals = [e for e in evaluated if "task" in e]
    assert [e["step"] for e in evals] == [2, 4, 5]
    for e in evals:
        if kind == "folder":
            assert e["task"] == "zeroshot_classification" and e["dataset"] == "folder" and e["images"] == 6
            assert 0 <= e["top1"] <= 1
        else:
            assert e["task"] == "retrieval" and e["images"] == 6 and e["captions"] == 6
            assert 0 <= e["image->text R@1"] <= 1 and e["text->image R@10"] == 1
    assert [e["loss"] for e in evaluated if "task" not in e] == [e["loss"] for e in plain]
    a = torch.load(tmp_path / "plain" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "evaluated" / "ckpt.pt", weights_only=True)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k  # BatchNorm's running statistics included


def test_eval_every_checks_its_dataset_before_training(tmp_path):
    for extra, words in [(["--data", str(tmp_path / "pairs.csv")], "name what to evaluate with --eval-dataset"),
                         (["--eval-dataset", "folder", "--eval-data-dir", str(tmp_path / "none")],
                          "needs --eval-data-dir pointing at"),  # train.py's flag, not eval_zeroshot's --data-dir
                         (["--eval-dataset", "flickr30k", "--eval-data-dir", str(tmp_path)], "dataset_flickr30k.json")]:
        Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
        (tmp_path / "pairs.csv").write_text("filepath,title\na.png,a thing\na.png,another\n")
        with pytest.raises(SystemExit) as stopped:
            train.main([*TINY, "--steps", "2", "--eval-every", "1", *extra, "--out-dir", str(tmp_path / "o")])
        assert words in str(stopped.value.code)
        assert not (tmp_path / "o" / "ckpt.pt").exists()


def test_synthetic_retrieval_during_training(tmp_path, capsys):
    train.main([*TINY, "--steps", "2", "--eval-every", "1", "--eval-dataset", "synthetic-retrieval", "--eval-size",
                "20", "--out-dir", str(tmp_path)])
    assert capsys.readouterr().out.count("retrieval synthetic-retrieval: 20 images, 20 captions | image->text R@1") == 2
    evals = [e for e in read_log(tmp_path) if "task" in e]
    assert [(e["step"], e["images"], e["captions"]) for e in evals] == [(1, 20, 20), (2, 20, 20)]
