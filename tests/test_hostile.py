"""Hostile inputs, each to be refused with one line (or handled), with no file of the user's touched: what a checkpoint
file holds, --pretrained and the lock flags, --resume with another --pretrained, eval_zeroshot.py's flags and outputs,
the --show page, scripts/plot.py's logs and scripts/eval_linear.py's feature cache. In this process (train.main,
eval_zeroshot.main), each stopping before any training or evaluation."""

import json
import os
import shutil
import stat
import sys
import threading

import pytest
import torch
from PIL import Image

import eval_zeroshot
import train
from plumbing import evalsets, show
from scripts import eval_linear, plot
from test_train import TINY, main_error

QUIET = [*TINY, "--eval-size", "0"]


def eval_error(*argv):
    """eval_zeroshot.main in this process, which must stop with one line -> that line."""
    with pytest.raises(SystemExit) as stopped:
        eval_zeroshot.main([str(a) for a in [*argv, "--workers", "0"]])
    message = str(stopped.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 2-step run from scratch, one fine-tuned from it, a folder of 2 classes and a CSV of 3 image-caption pairs."""
    root = tmp_path_factory.mktemp("hostile")
    train.main([*QUIET, "--steps", "2", "--out-dir", str(root / "scratch")])
    train.main([*QUIET, "--steps", "2", "--out-dir", str(root / "tuned"), "--pretrained", str(root / "scratch" /
                                                                                            "ckpt.pt")])
    for i, name in enumerate(("cat", "dog")):
        (root / "set" / name).mkdir(parents=True)
        Image.new("RGB", (40, 40), (200 * i, 50, 0)).save(root / "set" / name / "0.png")
    rows = ["filepath,title"]
    for i in range(3):
        Image.new("RGB", (40, 40), (80 * i, 0, 0)).save(root / f"{i}.png")
        rows.append(f"{root / f'{i}.png'},a picture number {i}")
    (root / "pairs.csv").write_text("\n".join(rows) + "\n")
    return root


def checkpoint(runs, change):
    """The scratch run's checkpoint, changed by change(dict)."""
    found = torch.load(runs / "scratch/ckpt.pt", weights_only=True)
    change(found)
    return found


def nan(found):
    found["model"]["ln_final.weight"][0] = float("nan")


CHANGES = {  # what a train.py checkpoint holds, changed -> the refusal's words
    "no method": (lambda c: c["config"].pop("method"), "its method is None"),
    "method 'this' (a module that prints when imported)": (lambda c: c["config"].update(method="this"),
                                                           "its method is 'this'"),
    "an unknown tokenizer": (lambda c: c["config"].update(tokenizer="no-such-encoding"), "cannot be loaded"),
    "CLIP's tokenizer for another vocabulary": (lambda c: c["model_config"].update(vocab_size=1000) or c[
        "model"].update({"token_embedding.weight": c["model"]["token_embedding.weight"][:1000]}), "token embeddings"),
    "an unknown model_config key": (lambda c: c["model_config"].update(colour=1), "its model_config is"),
    "a 1 TB model_config": (lambda c: c["model_config"].update(vision_width=2 ** 20), "model_config's vision_width"),
    "a model_config entry that is a tensor": (lambda c: c["model_config"].update(embed_dim=torch.ones(3)),
                                              "model_config's embed_dim"),
    "an unknown method argument": (lambda c: c["method_kwargs"].update(nope=1), "unexpected keyword argument"),
    "DeCLIP asked for a 51 GB queue": (lambda c: c["config"].update(method="declip") or c["method_kwargs"].update(
        queue_size=10 ** 8), "its tensors are other ones"),  # seen on the meta device: nothing allocated
    "NaN weights": (nan, "ln_final.weight holds NaN"),
    "a tensor of stride 0": (lambda c: c["model"].update({"ln_final.weight": torch.ones(1).expand(128)}),
                             "of its own elements"),
    "a bias of stride 0": (lambda c: c["model"].update({"ln_final.bias": torch.zeros(1).expand(128)}),
                           "ln_final.bias claims more elements than its storage holds"),
    "a step that is text": (lambda c: c.update(step="2"), "its step is '2'"),
    "a negative step": (lambda c: c.update(step=-5), "its step is -5"),
    "no batch size": (lambda c: c["config"].pop("batch_size"), "its batch_size is None"),
    "a model_config that is text": (lambda c: c.update(model_config="tiny-vit"), "its model_config is 'tiny-vit'"),
    "a 1-d conv1": (lambda c: c["model"].update({"visual.conv1.weight": torch.zeros(5)}), "not a 4-d tensor"),
    "a 0-d text_projection": (lambda c: c["model"].update(text_projection=torch.tensor(1.0)), "not a 2-d tensor"),
}


@pytest.mark.parametrize("case", CHANGES)
def test_what_a_checkpoint_holds_is_checked_before_anything_is_built(runs, tmp_path, capsys, case):
    change, words = CHANGES[case]
    torch.save(checkpoint(runs, change), tmp_path / "ck.pt")
    assert words in eval_error("--checkpoint", tmp_path / "ck.pt")
    assert "Beautiful is better than ugly" not in capsys.readouterr().out  # `this` was not imported


@pytest.mark.parametrize("change, words", [
    (lambda c: c.update(optimizer={}), "no optimiser state"),
    (lambda c: c["optimizer"]["state"][0].update(exp_avg=c["optimizer"]["state"][0]["exp_avg"] * float("inf")),
     "optimizer state 0.exp_avg holds NaN or infinite"),
    (lambda c: c.update(stream=dict(readers=1, shards=4)), "record of the shard stream"),
    (lambda c: c.update(step=-5), "its step is -5"),
])
def test_a_checkpoint_to_resume_is_checked_too(runs, tmp_path, change, words):
    torch.save(checkpoint(runs, change), tmp_path / "ck.pt")
    assert words in main_error(*QUIET, "--steps", "4", "--resume", tmp_path / "ck.pt", "--out-dir", tmp_path / "o")


def test_resume_ignores_rank_buffers_that_are_not_a_list(runs, tmp_path):
    torch.save(checkpoint(runs, lambda c: c.update(rank_buffers=5)), tmp_path / "ck.pt")
    train.main([*QUIET, "--steps", "3", "--resume", str(tmp_path / "ck.pt"), "--out-dir", str(tmp_path / "o")])
    assert torch.load(tmp_path / "o" / "ckpt.pt", weights_only=True)["step"] == 3


@pytest.mark.parametrize("change, words", [
    (lambda sd: sd.update({"extra.weight": torch.zeros(2)}), 'Unexpected key(s) in state_dict: "extra.weight"'),
    (lambda sd: sd.pop("ln_final.bias"), 'Missing key(s) in state_dict: "ln_final.bias"'),
    (lambda sd: sd.update({"ln_final.bias": torch.zeros(7)}), "size mismatch for ln_final.bias"),
    (lambda sd: sd["visual.proj"].fill_(float("nan")), "visual.proj holds NaN"),
    (lambda sd: sd.update({"ln_final.weight": 5}), "holds no tensor but '5'"),
    (lambda sd: sd.pop("visual.proj") is sd.update({"visual.attnpool.positional_embedding": torch.zeros(5, 8)}),
     "visual.layer1.0.conv1.weight is None"),  # a ResNet without its layers
])
def test_pretrained_weights_that_do_not_fit_stop_with_one_line(runs, tmp_path, change, words):
    state = torch.load(runs / "scratch/ckpt.pt", weights_only=True)["model"]
    change(state)
    torch.save(state, tmp_path / "sd.pt")
    assert words in main_error(*QUIET, "--steps", "1", "--pretrained", tmp_path / "sd.pt", "--out-dir", tmp_path / "o")


@pytest.mark.parametrize("flags, words", [
    (["--lock-image"], "without --pretrained"),
    (["--lock-text"], "without --pretrained"),
    (["--pretrained", "P", "--lock-image", "--lock-text"], "only the temperature would train"),
    (["--pretrained", "P", "--lock-image", "--lock-image-unlocked-groups", "5"], "the tower has 5 groups"),
    (["--pretrained", "P", "--lock-image", "--lock-image-unlocked-groups", "99"], "the tower has 5 groups"),
    (["--pretrained", "P", "--lock-text", "--lock-text-unlocked-layers", "3"], "the tower has 3 blocks"),
    (["--pretrained", ""], "--pretrained '' names no weights"),
])
def test_lock_flags_that_lock_nothing_or_random_weights(runs, tmp_path, flags, words):
    flags = [str(runs / "scratch/ckpt.pt") if f == "P" else f for f in flags]
    assert words in main_error(*QUIET, "--steps", "1", *flags, "--out-dir", tmp_path / "o")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("run, words", [("scratch", "was trained from scratch, not from"),
                                        ("tuned", "was fine-tuned from")])
def test_resume_with_another_pretrained_is_refused(runs, tmp_path, run, words):
    shutil.copytree(runs / run, tmp_path / run)
    before = {p.name: p.read_bytes() for p in (tmp_path / run).iterdir() if p.is_file()}
    other = tmp_path / "other.pt"
    shutil.copy(runs / "scratch/ckpt.pt", other)  # the same weights, another file
    assert words in main_error(*QUIET, "--steps", "4", "--pretrained", other, "--resume", "--out-dir", tmp_path / run)
    assert {p.name: p.read_bytes() for p in (tmp_path / run).iterdir() if p.is_file()} == before
    assert json.loads((tmp_path / run / "config.json").read_text())["config"]["pretrained"] == (
        None if run == "scratch" else str(runs / "scratch/ckpt.pt"))


FLAGS = [  # eval_zeroshot.py's flags -> the refusal's words (@set: 2 class folders, @csv: 3 pairs, @ck: a run's)
    (["--dataset", "@csv", "--templates", "{}"], "--templates would be ignored with --dataset"),
    (["--templates", "{}"], "--templates would be ignored with --dataset synthetic"),
    (["--classnames", "n.txt"], "--classnames would be ignored"),
    (["--data-dir", "@set"], "--data-dir would be ignored"),
    (["--download"], "--download would be ignored"),
    (["--csv-img-key", "x"], "--csv-* would be ignored"),
    (["--image", "@set/cat/0.png", "--labels", "a,b", "--dataset", "coco"], "--dataset would be ignored with --image"),
    (["--image", "@set/cat/0.png", "--labels", "a,b", "--show", "5"], "--show would be ignored with --image"),
    (["--image", "@set/cat/0.png", "--labels", "dog,dog,cat"], "names 'dog' twice"),
    (["--show", "-3"], "--show -3"),
    (["--show-file", "page.html"], "--show-file would be ignored without --show"),
    (["--device", "tpu"], "--device tpu: not a device"),
    (["--device", "cuda:7"], "--device cuda:7: not a device"),
    (["--output", "@ck"], "an input of this evaluation"),
    (["--show", "2", "--show-file", "@ck"], "an input of this evaluation"),
    (["--output", "no/such/folder/r.json"], "no/such/folder, no folder this user can write"),
    (["--output", "."], "--output '.' is a folder"),
    (["--output", ""], "--output '' names no file"),
    (["--output", "r.html", "--show", "2", "--show-file", "r.html"], "--output and --show-file name one file"),
    (["--dataset", "folder", "--data-dir", "@set", "--templates", "a {} of {kind}"], "no other brace"),
    (["--dataset", "folder", "--data-dir", "@set", "--templates", "a {} {"], "no other brace"),
    (["--dataset", "folder", "--data-dir", "@set", "--classnames", "none.txt"], "none.txt cannot be read"),
    (["--dataset", "folder", "--data-dir", "@set", "--classnames", "latin1.txt"], "latin1.txt cannot be read"),
    (["--dataset", "folder", "--data-dir", "@set", "--classnames", "twice.txt"], "'cat' is given to two classes"),
]


@pytest.mark.parametrize("flags, words", FLAGS)
def test_eval_flags_ignored_or_unusable_stop_before_evaluating(runs, tmp_path, monkeypatch, flags, words):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\nthé\n".encode("latin-1"))
    (tmp_path / "twice.txt").write_text("cat\ncat\n")
    shutil.copy(runs / "scratch/ckpt.pt", tmp_path / "ck.pt")
    flags = [f.replace("@csv", str(runs / "pairs.csv")).replace("@set", str(runs / "set")).replace("@ck", "ck.pt")
             for f in flags]
    assert words in eval_error("--checkpoint", "ck.pt", *flags)
    assert (tmp_path / "ck.pt").read_bytes() == (runs / "scratch/ckpt.pt").read_bytes()


def test_show_n_above_the_set_size_shows_all_and_says_so(runs, tmp_path, capsys):
    assert show.spread(3, 10) == [0, 1, 2] and show.spread(10, 3) == [0, 3, 6]
    page = tmp_path / "page.html"
    eval_zeroshot.main(["--checkpoint", str(runs / "scratch/ckpt.pt"), "--dataset", str(runs / "pairs.csv"),
                        "--show", "10", "--show-file", str(page), "--workers", "0"])
    html = page.read_text()
    assert html.count('<div class="panel">') == 6  # 3 captions, 3 images: all of them
    assert "3 captions and 3 images shown of the 10 asked" in html
    assert "3 captions and 3 images shown of the 10 asked" in capsys.readouterr().out


def test_an_output_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    (tmp_path / "target.json").write_text("old")
    (tmp_path / "link.json").symlink_to(tmp_path / "target.json")  # a link: the file it names gets the results
    evalsets.write_output(str(tmp_path / "link.json"), "new")
    assert (tmp_path / "link.json").is_symlink() and (tmp_path / "target.json").read_text() == "new"
    os.mkfifo(tmp_path / "pipe")  # a pipe (or /dev/stdout, /dev/null) is written to, not replaced by a file
    read = []
    reader = threading.Thread(target=lambda: read.append(open(tmp_path / "pipe").read()), daemon=True)
    reader.start()
    evalsets.write_output(str(tmp_path / "pipe"), "through the pipe")
    reader.join(timeout=10)
    assert read == ["through the pipe"] and stat.S_ISFIFO(os.stat(tmp_path / "pipe").st_mode)
    for name in ("target.json", "link.json", "pipe"):
        os.remove(tmp_path / name)
    (tmp_path / "r.json").write_text("the earlier results")

    def full_disk(*args):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(evalsets.os, "replace", full_disk)
    with pytest.raises(SystemExit, match="could not write .*r.json: no space left on device"):
        evalsets.write_output(str(tmp_path / "r.json"), "new results")
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"] and (tmp_path / "r.json").read_text() == "the earlier " \
                                                                                                      "results"


@pytest.mark.parametrize("lines, out, words", [
    (['{"step": 1, "loss": 2.0}', '{"step": 1, "task": "retrieval", "image->text R@1": 0.5}'], "plot.png", None),
    (['{"step": 1, "loss": 2.0}', '{"step": 1, "task": ["a"], "dataset": "d", "top1": 0.5}'], "plot.png", None),
    (['{"step": 1, "loss": 1e308}', '{"step": 2, "loss": -1e308}', '{"step": 3, "loss": 1.0}'], "plot.png", None),
    (['{"step": 1}', '{"step": 2}'], "plot.png", "no number to plot"),
    (['{"step": 1, "loss": 2.0}'], "x.foo", "could not write x.foo: format 'foo' is not supported"),
])
def test_plot_draws_what_an_odd_log_holds_or_says_why_not(tmp_path, monkeypatch, lines, out, words):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "log.jsonl").write_text("\n".join(lines) + "\n")
    monkeypatch.chdir(tmp_path)
    if words:
        with pytest.raises(SystemExit, match=words):
            plot.main(["run", "--out", out])
    else:
        plot.main(["run", "--out", out])
        assert (tmp_path / out).stat().st_size > 0


def test_the_linear_probes_cache_a_file_or_a_damaged_one(runs, tmp_path, monkeypatch):
    (tmp_path / "cache").write_text("a file, not a folder")
    with pytest.raises(SystemExit, match="--cache-dir .*cache is not a folder this user can write"):
        eval_linear.main(["--checkpoint", str(runs / "scratch/ckpt.pt"), "--cache-dir", str(tmp_path / "cache")])
    # a cache file cut short (a probe killed while another wrote it by hand, a full disk): computed again, replaced
    features = (torch.ones(2, 3), torch.tensor([0, 1]))
    monkeypatch.setattr(eval_linear, "features", lambda *args: features)
    (tmp_path / "c").mkdir()
    eval_linear.cached_features(None, None, "key", str(tmp_path / "c"), "cpu", 8, 0)
    (cached,) = (tmp_path / "c").iterdir()
    cached.write_bytes(cached.read_bytes()[:100])
    x, y = eval_linear.cached_features(None, None, "key", str(tmp_path / "c"), "cpu", 8, 0)
    assert torch.equal(x, features[0]) and torch.load(cached, weights_only=True)["key"] == "key"
    assert sys.modules.get("this") is None or "this" in sys.builtin_module_names
