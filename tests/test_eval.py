"""eval_zeroshot.py: recall@k and top-k against a direct computation, and each dataset mode end to end."""

import json
import os
import pickle

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import cli
import clip
import data
import eval_zeroshot
from model import CONFIGS, create_model
from plumbing import evalsets, samples, synthetic
from plumbing.tokenizer import get_tokenizer
from plumbing.torchscript import is_torchscript
from plumbing.weights import load_method

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_images(folder, n, size=(48, 40)):
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(n):
        path = os.path.join(folder, f"{i:03d}.jpg")
        Image.new("RGB", size, ((37 * i) % 256, (91 * i) % 256, (53 * i) % 256)).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def method():
    torch.manual_seed(0)
    return clip.CLIP(create_model("tiny-vit")).eval()


def test_retrieval_recall_matches_a_direct_computation(method, tmp_path):
    paths = write_images(tmp_path, 7)
    captions = [f"a photo number {j} of {w}" for j, w in enumerate("abcdefghijklmnopqrstu")]  # 21 captions
    caption_image = [j % 7 for j in range(21)]  # 3 captions per image
    tokenizer = get_tokenizer()
    results = eval_zeroshot.retrieve(method, tokenizer, paths, captions, caption_image, "cpu", batch_size=3)

    with torch.no_grad():  # the same scores, computed in one go
        images = torch.stack([data.eval_transform(64)(samples.load_image(p)) for p in paths])
        scores = method.similarity(method.embed_images(images), method.embed_texts(tokenizer(captions, 24)))  # (7, 21)
    owner = torch.tensor(caption_image)
    for k in (1, 5, 10):
        i2t = sum((owner[scores[i].topk(min(k, 21)).indices] == i).any().item() for i in range(7)) / 7
        t2i = sum((scores[:, j].topk(min(k, 7)).indices == owner[j]).any().item() for j in range(21)) / 21
        assert results[f"image->text R@{k}"] == pytest.approx(i2t)
        assert results[f"text->image R@{k}"] == pytest.approx(t2i)
    assert results["text->image R@10"] == 1.0  # only 7 images: every caption's image is in its top 10


def test_classification_top_k_matches_a_direct_computation(method):
    classnames, templates = synthetic.TASKS["shape"]
    dataset = evalsets.Labelled(synthetic.SyntheticTask("shape", size=30), data.eval_transform(64))
    r = eval_zeroshot.classify(method, get_tokenizer(), dataset, classnames, templates, "cpu", batch_size=8)
    tokenizer = get_tokenizer()
    with torch.no_grad():
        weights = []
        for c in classnames:  # OpenAI's prompt ensemble, written out
            e = torch.nn.functional.normalize(method.model.encode_text(tokenizer([t.format(c) for t in templates], 24)), dim=-1)
            weights.append(torch.nn.functional.normalize(e.mean(0), dim=-1))
        images = torch.stack([dataset[i][0] for i in range(30)])
        labels = torch.tensor([dataset[i][1] for i in range(30)])
        logits = torch.nn.functional.normalize(method.model.encode_image(images), dim=-1) @ torch.stack(weights).T
    assert r["top1"] == pytest.approx((logits.argmax(1) == labels).float().mean().item())
    assert r["top5"] == pytest.approx((logits.topk(5).indices == labels[:, None]).any(1).float().mean().item())
    assert r["n"] == 30 and r["chance"] == pytest.approx(1 / 6)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt")
    p = cli.run("train.py", "--model", "tiny-vit", "--steps", "1", "--batch-size", "4", "--workers", "0",
                "--eval-size", "0", "--out-dir", out, cwd=out)
    assert p.returncode == 0, p.stderr
    return out / "ckpt.pt"


def evaluate(*args, cwd):
    return cli.run("eval_zeroshot.py", *args, "--workers", "0", cwd=cwd, timeout=300)


def test_folder_classification(checkpoint, tmp_path):
    for name in ("golden_retriever", "tabby_cat"):
        write_images(tmp_path / "val" / name, 3)
    p = evaluate("--checkpoint", checkpoint, "--dataset", "folder", "--data-dir", tmp_path / "val", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "folder: top-1" in p.stdout and "(2 classes, 6 images, 7 templates)" in p.stdout
    (tmp_path / "names.txt").write_text("dog\n")
    p = evaluate("--checkpoint", checkpoint, "--dataset", "folder", "--data-dir", tmp_path / "val",
                 "--classnames", tmp_path / "names.txt", cwd=tmp_path)
    assert p.returncode != 0 and "has 1 names but" in p.stderr and "Traceback" not in p.stderr


def test_retrieval_on_csv_and_coco(checkpoint, tmp_path):
    paths = write_images(tmp_path / "imgs", 4)
    rows = [f"imgs/{os.path.basename(p)},caption {i} of image {i // 2}" for i, p in enumerate(paths + paths)]
    (tmp_path / "pairs.csv").write_text("filepath,title\n" + "\n".join(rows) + "\n")
    p = evaluate("--checkpoint", checkpoint, "--dataset", tmp_path / "pairs.csv", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "4 images, 8 captions | image->text R@1 " in p.stdout and p.stdout.rstrip().endswith("R@10 100.00%")

    coco = tmp_path / "coco"
    write_images(coco / "val2017", 3)
    ann = {"images": [{"id": i, "file_name": f"{i:03d}.jpg"} for i in range(3)],
           "annotations": [{"id": 10 + j, "image_id": j % 3, "caption": f"a thing {j}"} for j in range(6)]}
    os.makedirs(coco / "annotations")
    (coco / "annotations" / "captions_val2017.json").write_text(json.dumps(ann))
    p = evaluate("--checkpoint", checkpoint, "--dataset", "coco", "--data-dir", coco, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "3 images, 6 captions" in p.stdout


def test_openai_layout_state_dict_and_missing_downloads(checkpoint, tmp_path):
    state_dict = torch.load(checkpoint, weights_only=True)["model"]  # the OpenAI layout, as a released file holds
    torch.save(state_dict, tmp_path / "openai.pt")
    p = evaluate("--checkpoint", tmp_path / "openai.pt", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "colour: top-1" in p.stdout
    p = evaluate("--checkpoint", checkpoint, "--dataset", "cifar10", "--data-dir", tmp_path / "none", cwd=tmp_path)
    assert p.returncode != 0 and "Traceback" not in p.stderr and "--download" in p.stderr.strip().splitlines()[-1]


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::FutureWarning")  # tracing, once, to make one
def test_open_clip_and_torchscript_files_load(checkpoint, tmp_path):
    """Files of the other kinds eval_zeroshot.py reads, each holding our checkpoint's weights: open_clip's state_dict()
    and its training checkpoint (DDP's "module." prefix, optimiser state), and a TorchScript archive, the format of
    OpenAI's released files, read as data (plumbing/torchscript.py: not torch.jit.load, which runs the archive's code)."""
    import open_clip

    ours = torch.load(checkpoint, weights_only=True)["model"]
    cfg = CONFIGS["tiny-vit"]  # the checkpoint's architecture
    vision = open_clip.model.CLIPVisionCfg(layers=cfg["vision_layers"], width=cfg["vision_width"], head_width=64,
                                           patch_size=cfg["vision_patch_size"], image_size=cfg["image_resolution"])
    text = open_clip.model.CLIPTextCfg(context_length=cfg["context_length"], vocab_size=cfg["vocab_size"],
                                       width=cfg["transformer_width"], heads=cfg["transformer_heads"],
                                       layers=cfg["transformer_layers"])
    theirs = open_clip.model.CLIP(cfg["embed_dim"], vision, text, quick_gelu=True)
    theirs.load_state_dict(ours, strict=True)
    torch.save(theirs.state_dict(), tmp_path / "open_clip_state_dict.pt")
    optimizer = torch.optim.AdamW(theirs.parameters())
    theirs(torch.zeros(1, 3, 64, 64), torch.zeros(1, 24, dtype=torch.long))[0].sum().backward()
    optimizer.step()  # open_clip's training checkpoint, as its train loop writes it (epoch, name, state_dict, optimizer)
    trained = theirs.state_dict()
    torch.save({"epoch": 1, "name": "tiny", "state_dict": {"module." + k: v for k, v in trained.items()},
                "optimizer": optimizer.state_dict()}, tmp_path / "open_clip_epoch_1.pt")

    model = create_model("tiny-vit").eval()
    model.load_state_dict(ours)
    traced = torch.jit.trace(model, (torch.zeros(2, 3, 64, 64), torch.zeros(2, 24, dtype=torch.long)), check_trace=False)
    traced.save(str(tmp_path / "torchscript.pt"))
    assert is_torchscript(str(tmp_path / "torchscript.pt")) and not is_torchscript(checkpoint)

    for name in ("open_clip_state_dict.pt", "open_clip_epoch_1.pt", "torchscript.pt"):
        method, _ = load_method(str(tmp_path / name))
        reference = trained if name == "open_clip_epoch_1.pt" else ours
        loaded = method.model.state_dict()
        assert loaded.keys() == ours.keys(), name
        for k in ours:
            torch.testing.assert_close(loaded[k], reference[k], rtol=0, atol=0, msg=f"{name}: {k}")


def write_torchvision_set(name, root, n=6):
    """n random test images in the file format torchvision reads for CIFAR-10, CIFAR-100 or STL-10; -> classnames."""
    g = np.random.default_rng(0)
    if name == "stl10":
        classnames = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
        folder = root / "stl10_binary"
        folder.mkdir(parents=True)
        g.integers(0, 256, (n, 3, 96, 96), dtype=np.uint8).tofile(folder / "test_X.bin")
        (np.arange(n, dtype=np.uint8) % 10 + 1).tofile(folder / "test_y.bin")  # 1-based on disk
        (folder / "class_names.txt").write_text("\n".join(classnames) + "\n")
        return classnames
    classes = 10 if name == "cifar10" else 100
    # CIFAR-100's names have underscores ("aquarium_fish")
    classnames = [f"class_{i}" if classes == 100 else f"class{i}" for i in range(classes)]
    folder = root / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    folder.mkdir(parents=True)
    labels = "labels" if name == "cifar10" else "fine_labels"
    batch = {"data": g.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8), labels: [i % classes for i in range(n)]}
    meta = {"label_names" if name == "cifar10" else "fine_label_names": classnames}
    for file, content in zip(("test_batch", "batches.meta") if name == "cifar10" else ("test", "meta"), (batch, meta)):
        with open(folder / file, "wb") as f:
            pickle.dump(content, f)
    return classnames


@pytest.mark.parametrize("name,templates", [("cifar10", 18), ("cifar100", 18), ("stl10", 2)])
def test_torchvision_classification_sets(name, templates, checkpoint, tmp_path, monkeypatch, capsys):
    """CIFAR-10/100 and STL-10 through torchvision, from stand-in files in the published formats (nothing can be
    downloaded here; torchvision's md5 checks are switched off for them): class names with spaces, OpenAI's templates,
    every test image evaluated."""
    classnames = write_torchvision_set(name, tmp_path)
    for module in (torchvision.datasets.cifar, torchvision.datasets.stl10):
        monkeypatch.setattr(module, "check_integrity", lambda *args, **kwargs: True)
    _, names, _ = evalsets.classification_set(name, str(tmp_path), False, None, 64)
    assert names == [c.replace("_", " ") for c in classnames]
    eval_zeroshot.main(["--checkpoint", str(checkpoint), "--dataset", name, "--data-dir", str(tmp_path),
                        "--workers", "0"])
    assert f"({len(classnames)} classes, 6 images, {templates} templates)" in capsys.readouterr().out


# --- the activation: QuickGELU (OpenAI) or GELU (most open_clip weights), which a state dict cannot tell ---------------


@pytest.mark.parametrize("kind", ["vit", "rn"])
def test_open_clip_gelu_weights_with_act_gelu(kind, tmp_path):
    """An open_clip nn.GELU model (no -quickgelu) saved as a state dict: evaluated with the GELU choice, our model
    gives open_clip's embeddings; with the QuickGELU default it does not."""
    import open_clip

    from test_model import SMALL, assert_same_outputs, perturbed
    torch.manual_seed(0)
    cfg = SMALL[kind]
    theirs = open_clip.model.CLIP(cfg["embed_dim"], open_clip.model.CLIPVisionCfg(**cfg["vision_cfg"]),
                                  open_clip.model.CLIPTextCfg(**cfg["text_cfg"]), quick_gelu=False)
    assert isinstance(theirs.transformer.resblocks[0].mlp.gelu, torch.nn.GELU)
    theirs.load_state_dict(perturbed(theirs.state_dict()))
    torch.save({"state_dict": {f"module.{k}": v for k, v in theirs.state_dict().items()}}, tmp_path / "gelu.pt")

    gelu, _ = load_method(str(tmp_path / "gelu.pt"), quick_gelu=False)
    assert_same_outputs(gelu.model, theirs)
    quick, _ = load_method(str(tmp_path / "gelu.pt"))  # the default: OpenAI's QuickGELU
    with pytest.raises(AssertionError):  # the text tower, and a ViT's image tower, use the activation
        assert_same_outputs(quick.model, theirs)


def test_act_flag_and_recorded_activation(checkpoint, tmp_path, monkeypatch):
    # our checkpoints record the activation in model_config, and eval rebuilds it without being told
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["model_config"]["quick_gelu"] is True
    method, _ = load_method(str(checkpoint))
    assert type(method.model.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    saved["model_config"]["quick_gelu"] = False
    torch.save(saved, tmp_path / "gelu_ckpt.pt")
    method, _ = load_method(str(tmp_path / "gelu_ckpt.pt"))
    assert isinstance(method.model.visual.transformer.resblocks[0].mlp.gelu, torch.nn.GELU)
    # --act reaches the loader: gelu -> False, quickgelu -> True, absent -> None (the checkpoint's own)
    seen = []

    def record(path, device="cpu", trust=False, quick_gelu=None):
        seen.append(quick_gelu)
        raise SystemExit

    monkeypatch.setattr(eval_zeroshot, "load_method", record)
    for act in (["--act", "gelu"], ["--act", "quickgelu"], []):
        with pytest.raises(SystemExit):
            eval_zeroshot.main(["--checkpoint", str(checkpoint), *act])
    assert seen == [False, True, None]
