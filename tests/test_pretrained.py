"""train.py --pretrained, the lock flags, OpenAI's model names and eval_zeroshot.py --interpolate (WiSE-FT), on
weights built and saved by open_clip (an independent implementation), in every file format users have."""
import argparse
import functools
import hashlib
import io
import json
import logging
import math
import sys
import warnings

import open_clip  # the independent reference (requirements-dev.txt)
import pytest
import torch

import train
from model import CONFIGS
from plumbing import pretrained, weights
from test_model import random_text
from test_train import METHOD_ARGS, main_error, read_log

logging.getLogger().setLevel(logging.ERROR)

TINY = ["--batch-size", "8", "--workers", "0", "--log-every", "1", "--eval-size", "0"]


def open_clip_model(name, seed=0, **changes):
    """open_clip's CLIP with the architecture of one of our tiny configs (with `changes` to it), random weights
    (BatchNorm statistics perturbed so that freezing them is visible), a temperature unlike any method's init."""
    cfg = {**CONFIGS[name], **changes}
    vision = open_clip.model.CLIPVisionCfg(layers=cfg["vision_layers"], width=cfg["vision_width"], head_width=64,
                                           patch_size=cfg["vision_patch_size"] or 16,  # ResNet: unused
                                           image_size=cfg["image_resolution"])
    text = open_clip.model.CLIPTextCfg(context_length=cfg["context_length"], vocab_size=cfg["vocab_size"],
                                       width=cfg["transformer_width"], heads=cfg["transformer_heads"],
                                       layers=cfg["transformer_layers"])
    torch.manual_seed(seed)
    oc = open_clip.model.CLIP(cfg["embed_dim"], vision, text, quick_gelu=True).eval()
    with torch.no_grad():
        oc.logit_scale.fill_(math.log(42.0))
        for k, v in oc.state_dict().items():
            if "running" in k:
                v.copy_(torch.rand_like(v) + 0.5)
    return oc


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """One open_clip ViT saved as open_clip saves it (.bin, epoch_N.pt with DDP's prefix and its optimiser,
    .safetensors) and as a TorchScript archive traced from open_clip's model (OpenAI's format) -> (model, paths)."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("pretrained")
    oc = open_clip_model("tiny-vit")
    sd = oc.state_dict()
    torch.save(sd, folder / "open_clip_pytorch_model.bin")
    torch.save({"epoch": 3, "name": "tiny", "state_dict": {"module." + k: v for k, v in sd.items()},
                "optimizer": torch.optim.AdamW(oc.parameters()).state_dict()}, folder / "epoch_3.pt")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "open_clip_model.safetensors"))
    with warnings.catch_warnings():  # tracing warns about its own limits (and its deprecation): only weights are kept
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(oc, (torch.zeros(2, 3, 64, 64), torch.zeros(2, 24, dtype=torch.long)),
                                 check_trace=False)
    traced.save(str(folder / "ViT-tiny.pt"))
    names = ["open_clip_pytorch_model.bin", "epoch_3.pt", "open_clip_model.safetensors", "ViT-tiny.pt"]
    return oc, [str(folder / name) for name in names]


def run(tmp_path, *argv, name="out"):
    out = tmp_path / name
    train.main([str(a) for a in [*TINY, "--out-dir", out, *argv]])
    return torch.load(out / "ckpt.pt", weights_only=True)["model"]


def assert_encodes_like(state_dict, oc):
    """The model in `state_dict`, loaded by open_clip's own code (strictly), encodes as `oc`."""
    theirs = open_clip_model("tiny-vit", seed=1)
    theirs.load_state_dict(state_dict, strict=True)
    images, text = torch.randn(3, 3, 64, 64), random_text(3, 24, 49408)
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode_image(images), oc.encode_image(images), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs.encode_text(text), oc.encode_text(text), rtol=1e-5, atol=1e-5)


def loaded(*argv):
    """The CLIP model train.py starts from with these flags (its weights loaded, nothing trained) -> its state dict."""
    args = train.get_args([str(a) for a in argv])
    config, weights = pretrained.model_config(args, 49408)
    method = train.build_method("clip", config, {}, "cpu")
    pretrained.start(method, weights, args)
    return method.model.state_dict()


def test_every_format_loads_and_the_locked_weights_stay_bit_identical(files, tmp_path, capsys):
    oc, paths = files
    sd = oc.state_dict()
    moving = ("transformer.resblocks.2.", "ln_final.", "text_projection", "logit_scale")  # tiny-vit's last text block
    for i, path in enumerate(paths):
        model = ["--model", "tiny-vit"] if i == 0 else []  # the right --model is accepted, and may be left out
        start = loaded("--pretrained", path, *model)
        assert start.keys() == sd.keys() and all(torch.equal(start[k], sd[k]) for k in sd), path
        assert_encodes_like(start, oc)
        trained = run(tmp_path, "--pretrained", path, "--lock-image", "--lock-text", "--lock-text-unlocked-layers",
                      "1", "--steps", "2", *model, name=f"out{i}")
        first = capsys.readouterr().out.splitlines()[0]
        assert "(7.6M params, 0.2M trained)" in first and "lr 1e-05 (fine-tuning" in first, first
        for k in sd:
            assert torch.equal(trained[k], sd[k]) != k.startswith(moving), f"{path}: {k}"


def test_our_checkpoint_is_a_source_too(files, tmp_path):
    oc, paths = files
    first = run(tmp_path, "--pretrained", paths[0], "--steps", "2", "--lr", "1e-3", name="first")
    second = loaded("--pretrained", tmp_path / "first" / "ckpt.pt")
    assert not torch.equal(first["visual.proj"], oc.state_dict()["visual.proj"])
    assert all(torch.equal(second[k], first[k]) for k in first)


def test_every_method_starts_from_the_same_file(files):
    oc, paths = files
    sd = oc.state_dict()
    for method in METHOD_ARGS:
        args = train.get_args(["--pretrained", paths[0], "--method", method])
        config, weights = pretrained.model_config(args, 49408)
        assert args.model == "tiny-vit" and config == CONFIGS["tiny-vit"]
        m = train.build_method(method, config, train.parse_kwargs(METHOD_ARGS[method]), "cpu")
        init = {k: v.clone() for k, v in m.state_dict().items() if not k.startswith("model.")}
        pretrained.start(m, weights, args)
        loaded = m.model.state_dict()
        for k in sd:
            if k != "logit_scale":
                torch.testing.assert_close(loaded[k], sd[k], rtol=0, atol=0, msg=f"{method}: {k}")
        # the temperature: the file's, but SigLIP's own init (ln 10); the method's own parameters keep their init
        expected = math.log(10.0) if method == "siglip" else math.log(42.0)
        assert loaded["logit_scale"].item() == pytest.approx(expected)
        for k, v in m.state_dict().items():
            if not k.startswith("model."):
                torch.testing.assert_close(v, init[k], rtol=0, atol=0)


def test_lock_image_only_trains_the_text_tower(files, tmp_path):
    oc, paths = files
    sd = oc.state_dict()
    trained = run(tmp_path, "--pretrained", paths[0], "--lock-image", "--steps", "2", "--lr", "1e-3")
    for k in sd:
        if k.startswith("visual."):
            torch.testing.assert_close(trained[k], sd[k], rtol=0, atol=0, msg=k)
    text = [k for k in sd if not k.startswith("visual.") and k != "logit_scale"]
    assert all(not torch.equal(trained[k], sd[k]) for k in text)  # every text weight moved


@pytest.mark.parametrize("groups, changed", [(1, ["visual.proj"]),
                                             (2, ["visual.proj", "visual.ln_post", "visual.transformer.resblocks.2"])])
def test_unlocked_image_groups_are_the_last_ones(files, tmp_path, groups, changed):
    oc, paths = files
    sd = oc.state_dict()
    trained = run(tmp_path, "--pretrained", paths[0], "--lock-image", "--lock-image-unlocked-groups", groups,
                  "--steps", "2", "--lr", "1e-3")
    for k in (k for k in sd if k.startswith("visual.")):
        assert torch.equal(trained[k], sd[k]) != any(k.startswith(prefix) for prefix in changed), k


def test_unlocked_text_layers(files, tmp_path):
    oc, paths = files
    sd = oc.state_dict()
    trained = run(tmp_path, "--pretrained", paths[0], "--lock-text", "--lock-text-unlocked-layers", "1",
                  "--lock-image", "--steps", "2", "--lr", "1e-3")
    moving = ("transformer.resblocks.2.", "ln_final.", "text_projection")  # the last of tiny-vit's 3 text blocks
    for k in (k for k in sd if not k.startswith("visual.") and k != "logit_scale"):
        assert torch.equal(trained[k], sd[k]) != k.startswith(moving), k


def test_a_locked_resnet_keeps_its_batchnorm_statistics(tmp_path):
    oc = open_clip_model("tiny-rn")
    sd = oc.state_dict()
    torch.save(sd, tmp_path / "rn.bin")
    trained = run(tmp_path, "--pretrained", tmp_path / "rn.bin", "--lock-image", "--steps", "2", "--lr", "1e-3",
                  "--eval-every", "1", "--eval-size", "6")  # evaluation restores the training mode in between
    for k, v in sd.items():
        if k.startswith("visual."):
            torch.testing.assert_close(trained[k], v, rtol=0, atol=0, msg=k)
    assert not torch.equal(trained["text_projection"], sd["text_projection"])
    # the last of a ResNet's groups is its attention pool (with the projection): it alone changes
    trained = run(tmp_path, "--pretrained", tmp_path / "rn.bin", "--lock-image", "--lock-image-unlocked-groups", "1",
                  "--steps", "2", "--lr", "1e-3", name="last")
    for k in (k for k in sd if k.startswith("visual.")):
        assert torch.equal(trained[k], sd[k]) != k.startswith("visual.attnpool."), k


def test_a_locked_tower_builds_no_graph(files):
    _, paths = files
    args = train.get_args(["--pretrained", paths[0], "--lock-image"])
    config, weights = pretrained.model_config(args, 49408)
    method = train.build_method("clip", config, {}, "cpu")
    pretrained.start(method, weights, args)
    features = method.features({"image": torch.randn(2, 3, 64, 64), "text": random_text(2, 24, 49408)})
    assert features["image"].grad_fn is None and features["text"].grad_fn is not None
    optimizer, _, _ = train.make_optimizer(method, config, 8)
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not any(id(p) in held for p in method.model.visual.parameters())  # no AdamW state for it


def test_refusals(files, tmp_path, monkeypatch):
    _, paths = files
    out = ["--out-dir", tmp_path / "out", *TINY]
    assert "architecture" in main_error("--pretrained", paths[0], "--model", "tiny-rn", *out)
    assert "OpenAI's model names (RN50, RN101" in main_error("--pretrained", "ViT-B-32", *out)  # open_clip's spelling
    assert "BPE" in main_error("--pretrained", paths[0], "--tokenizer", "cl100k_base", *out)
    assert "ResNet" in main_error("--pretrained", str(tmp_path / "none.pt"), "--model", "tiny-rn", "--patch-dropout",
                                "0.5", *out)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)  # as if the package were not installed
    assert "pip install safetensors" in main_error("--pretrained", paths[2], *out)


def fake_name(monkeypatch, tmp_path, content):
    """OpenAI's ViT-B/32 entry pointed at an unreachable URL that carries the SHA-256 of `content`, the cache in
    tmp_path -> the path the file goes to."""
    url = f"http://127.0.0.1:9/clip/models/{hashlib.sha256(content).hexdigest()}/ViT-B-32.pt"
    monkeypatch.setitem(pretrained.OPENAI, "ViT-B/32", url)
    monkeypatch.setenv("CLIP_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "ViT-B-32.pt"


def test_openai_names(files, tmp_path, monkeypatch, capsys):
    import eval_zeroshot

    monkeypatch.setattr(eval_zeroshot, "prepare", functools.partial(eval_zeroshot.prepare, size=24))  # a short eval
    _, paths = files
    content = open(paths[3], "rb").read()
    path = fake_name(monkeypatch, tmp_path, content)
    # no network: one line naming the URL and where to put the file
    message = main_error("--pretrained", "ViT-B/32", "--out-dir", tmp_path / "o", *TINY)
    assert pretrained.OPENAI["ViT-B/32"] in message and str(path) in message
    assert not path.exists()
    # a download: checked, kept (urlopen replaced by one that serves the file)
    monkeypatch.setattr(pretrained.urllib.request, "urlopen", lambda url, timeout: io.BytesIO(content))
    assert pretrained.resolve("ViT-B/32") == str(path) and path.read_bytes() == content
    # the same name in eval_zeroshot.py, from the cache
    capsys.readouterr()
    eval_zeroshot.main(["--checkpoint", "ViT-B/32", "--workers", "0", "--batch-size", "8"])
    assert "colour: top-1" in capsys.readouterr().out
    # a file of another SHA-256 at the cache path is refused, and never read
    path.write_bytes(content[:-1] + b"x")
    monkeypatch.setattr(weights, "read", lambda *a: pytest.fail("a file with the wrong SHA-256 was read"))
    assert "SHA-256" in main_error("--pretrained", "ViT-B/32", "--out-dir", tmp_path / "o", *TINY)
    # a download with the wrong bytes is removed, not kept
    path.unlink()
    monkeypatch.setattr(pretrained.urllib.request, "urlopen", lambda url, timeout: io.BytesIO(b"not the file"))
    assert "SHA-256" in main_error("--pretrained", "ViT-B/32", "--out-dir", tmp_path / "o", *TINY)
    assert list((tmp_path / "cache").iterdir()) == []


def test_wise_ft_interpolates_the_weights(files, tmp_path, monkeypatch):
    import eval_zeroshot

    monkeypatch.setattr(eval_zeroshot, "prepare", functools.partial(eval_zeroshot.prepare, size=48))  # a short eval
    oc, paths = files
    trained = run(tmp_path, "--pretrained", paths[0], "--steps", "3", "--lr", "1e-3")

    def results(*argv):
        out = tmp_path / "results.json"
        eval_zeroshot.main([*map(str, argv), "--workers", "0", "--output", str(out), "--dataset", "synthetic"])
        return [{k: v for k, v in r.items() if k != "checkpoint"} for r in json.loads(out.read_text())]

    a, b = paths[0], tmp_path / "out" / "ckpt.pt"
    assert results("--checkpoint", a) != results("--checkpoint", b)  # so that the two ends tell A from B
    assert results("--interpolate", a, b, "--alpha", "0") == results("--checkpoint", a)
    assert results("--interpolate", a, b, "--alpha", "1") == results("--checkpoint", b)
    sd = oc.state_dict()
    mixed = {k: 0.3 * sd[k] + 0.7 * trained[k] if sd[k].is_floating_point() else trained[k] for k in sd}
    torch.save(mixed, tmp_path / "mixed.pt")
    assert results("--interpolate", a, b, "--alpha", "0.7") == results("--checkpoint", tmp_path / "mixed.pt")


def test_two_gloo_ranks_with_accumulation_equal_one_process_when_locked(files, tmp_path):
    """DDP (which must skip the locked parameters) and the exact accumulation (whose features of a locked tower carry
    no graph) with a partly locked image tower: the same weights as one process on the whole batch."""
    from test_train import run as run_script

    _, paths = files
    args = ["--pretrained", paths[0], "--lock-image", "--lock-image-unlocked-groups", "1", "--steps", "3",
            "--lr", "1e-3", *TINY]
    run_script("train.py", *args, "--out-dir", tmp_path / "one", cwd=tmp_path)
    run_script("train.py", *args, "--grad-accum", "2", "--out-dir", tmp_path / "two", cwd=tmp_path,
               launcher=("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"))
    one, two = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True)["model"] for d in ("one", "two"))
    for k in one:  # as tests/test_train.py's two ranks: Adam turns rounding noise of ~0 gradients into steps ~lr
        torch.testing.assert_close(two[k], one[k], rtol=0, atol=1e-4, msg=k)


def test_fine_tuning_defaults():
    """The README's: with --pretrained and no --lr, lr 1e-5 and 100 warmup steps (at most 10% of --steps)."""
    args = argparse.Namespace(pretrained="ViT-B/32", lr=None, warmup=None, steps=4620)
    assert pretrained.lr_and_warmup(args) == (1e-5, pretrained.FINETUNE_SOURCE, 100)
    args.steps = 200
    assert pretrained.lr_and_warmup(args)[2] == 20
    args.lr, args.warmup = 3e-5, 7
    assert pretrained.lr_and_warmup(args) == (3e-5, "--lr", 7)
    args.pretrained, args.lr, args.warmup, args.steps = None, None, None, 500_000  # pre-training: the method's rule
    assert pretrained.lr_and_warmup(args) == (None, "--lr", 10_000)


@pytest.mark.parametrize("config", ["tiny-vit", None])
def test_a_fine_tuning_run_resumes_with_its_own_command(files, tmp_path, killed_while_saving, config):
    # After a preemption the README says: the same command with --resume. For a fine-tuning run that keeps
    # fine-tuning's lr and warmup (not pre-training's) and the locks, and needs neither the weights file again nor
    # --model; the command without --pretrained resumes the same way. Both give the uninterrupted run's weights. Also
    # for weights of an architecture no model.py config has (--model pretrained): the checkpoint records it.
    _, paths = files
    source = paths[0] if config else str(tmp_path / "wider.bin")
    if not config:
        torch.save(open_clip_model("tiny-vit", embed_dim=48).state_dict(), source)
    args = [*TINY, "--pretrained", source, "--lock-text", "--steps", "6", "--save-every", "3"]
    train.main([str(a) for a in [*args, "--out-dir", tmp_path / "full"]])
    full = [(e["lr"], e["loss"]) for e in read_log(tmp_path / "full") if "loss" in e]
    assert max(lr for lr, _ in full) == pytest.approx(1e-5)  # fine-tuning's peak (pre-training's: 5e-4)
    assert json.load(open(tmp_path / "full" / "config.json"))["config"]["model"] == (config or "pretrained")
    without = [a for a in args if a != source and a != "--pretrained"]
    for name, again in (("same", args), ("without", without)):
        killed_while_saving([*args, "--out-dir", tmp_path / name], step=6)  # ckpt.pt holds step 3
        train.main([str(a) for a in [*again, "--out-dir", tmp_path / name, "--resume"]])
        assert [(e["lr"], e["loss"]) for e in read_log(tmp_path / name) if "loss" in e] == full, name
        a, b = (torch.load(tmp_path / run / "ckpt.pt", weights_only=True)["model"] for run in ("full", name))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert f"--model {config or 'pretrained'}, this run has tiny-rn" in main_error(
        *without, "--model", "tiny-rn", "--out-dir", tmp_path / "same", "--resume")


def test_a_resnet_file_refuses_patch_flags_without_model(tmp_path):
    """--pretrained a ResNet's weights and no --model: the architecture is known only from the file, where --patch-
    dropout and --freeze-patch-embed (ViT only) are refused, before anything is written."""
    torch.save(open_clip_model("tiny-rn").state_dict(), tmp_path / "rn.bin")
    for flag in (["--patch-dropout", "0.5"], ["--freeze-patch-embed"]):
        message = main_error("--pretrained", tmp_path / "rn.bin", *flag, "--out-dir", tmp_path / "o", *TINY)
        assert f"{flag[0]}: {tmp_path / 'rn.bin'} is a ResNet" in message, message
    assert not (tmp_path / "o").exists()


def test_a_download_cut_off_leaves_nothing_in_the_cache(files, tmp_path, monkeypatch):
    _, paths = files
    content = open(paths[3], "rb").read()
    path = fake_name(monkeypatch, tmp_path, content)

    class CutOff(io.BytesIO):  # the first block arrives, then the connection drops
        def read(self, size=-1):
            if self.tell():
                raise ConnectionResetError("connection reset by peer")
            return super().read(1000)

    monkeypatch.setattr(pretrained.urllib.request, "urlopen", lambda url, timeout: CutOff(content))
    message = main_error("--pretrained", "ViT-B/32", "--out-dir", tmp_path / "o", *TINY)
    assert "could not download ViT-B/32" in message and "connection reset by peer" in message and str(path) in message
    assert list((tmp_path / "cache").iterdir()) == []  # no partial file, at the cache path or beside it


def test_our_checkpoint_as_pretrained_keeps_its_activation_and_refuses_another_tokenizer(files, tmp_path):
    """A ckpt.pt records its run: --pretrained takes its activation (GELU here, where OpenAI's files mean QuickGELU,
    and --act overrides it), and refuses one trained with another tokenizer (its token embedding means other ids)."""
    oc, _ = files
    run = dict(method="clip", model="tiny-vit", batch_size=8, seed=0, tokenizer="clip")  # as train.py writes it
    ours = {"config": run, "model_config": dict(CONFIGS["tiny-vit"], quick_gelu=False), "model": oc.state_dict(),
            "step": 1, "method": {}, "method_kwargs": {}}
    torch.save(ours, tmp_path / "gelu.pt")
    for act, quick_gelu in ((None, False), ("quickgelu", True)):
        args = train.get_args(["--pretrained", str(tmp_path / "gelu.pt"), *(["--act", act] if act else [])])
        config, weights_ = pretrained.model_config(args, 49408)
        assert config["quick_gelu"] is quick_gelu and args.model == "tiny-vit"
    torch.save({**ours, "config": dict(run, tokenizer="cl100k_base")}, tmp_path / "other.pt")
    message = main_error("--pretrained", tmp_path / "other.pt", "--out-dir", tmp_path / "o", *TINY)
    assert "was trained with --tokenizer cl100k_base; --pretrained needs CLIP's BPE" in message
