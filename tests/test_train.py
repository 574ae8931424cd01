"""train.py and eval_zeroshot.py end to end on tiny configs: every method trains, resume is exact, 2 gloo ranks
equal 1 process on the same global batch, and bad input gives one clear line."""

import fractions
import json
import math
import os
import pickle
import random
import re
import shlex

import pytest
import torch
from PIL import Image

import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model", "tiny-vit", "--batch-size", "8", "--workers", "0", "--log-every", "1", "--eval-size", "24"]


def run(script, *args, cwd, check=True, launcher=()):
    p = cli.run(script, *args, cwd=cwd, launcher=launcher)
    if check and p.returncode != 0:
        raise AssertionError(f"{script} {args} exited {p.returncode}:\n{p.stdout}\n{p.stderr}")
    return p


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def weights(out_dir):
    return torch.load(os.path.join(out_dir, "ckpt.pt"), weights_only=True)["model"]


# method-args keep the heads and queues of SLIP/DeCLIP/FILIP small for a CPU test
METHOD_ARGS = {"clip": "", "siglip": "", "slip": "mlp_dim=64,min_bn_batch=4", "declip": "queue_size=64,proj_dim=32,pred_dim=16,min_bn_batch=4",
               "filip": "", "defilip": "queue_size=64,proj_dim=32,pred_dim=16,min_bn_batch=4"}


@pytest.mark.parametrize("method", list(METHOD_ARGS))
def test_every_method_trains_and_evaluates(tmp_path, method):
    out = tmp_path / "out"
    p = run("train.py", "--method", method, "--method-args", METHOD_ARGS[method], "--steps", "2", *TINY,
            "--out-dir", out, cwd=tmp_path)
    log = read_log(out)
    assert [e["step"] for e in log] == [1, 2]
    for entry in log:
        assert all(k in entry for k in ("loss", "lr", "samples_per_s", "logit_scale"))
        assert torch.isfinite(torch.tensor(entry["loss"]))
    assert "zero-shot shape: top-1" in p.stdout and "zero-shot colour: top-1" in p.stdout
    e = run("eval_zeroshot.py", "--checkpoint", out / "ckpt.pt", "--workers", "0", cwd=tmp_path)
    assert "shape: top-1" in e.stdout and "colour: top-1" in e.stdout


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, monkeypatch, killed_while_saving):
    import train

    # patch dropout's draws are seeded per step and micro-batch, like the data's: a resumed run draws the same ones
    args = ["--steps", "4", "--save-every", "2", *TINY, "--eval-size", "0", "--grad-accum", "2", "--patch-dropout", "0.5"]
    train.main([*args, "--out-dir", str(tmp_path / "full")])
    assert [e["step"] for e in read_log(tmp_path / "full")] == [1, 2, 3, 4]

    # the same run killed while writing its step-4 checkpoint: ckpt.pt holds step 2, ckpt.pt.tmp the killed save,
    # and the log has steps 1-4
    out = tmp_path / "resumed"
    killed_while_saving([*args, "--out-dir", out], step=4)
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 2
    assert (out / "ckpt.pt.tmp").exists() and [e["step"] for e in read_log(out)] == [1, 2, 3, 4]

    from plumbing import checkpoint
    real_save = checkpoint.write

    def save_where_nothing_is(path, method, optimizer, step, meta):  # the stale .tmp was deleted at start
        assert not os.path.lexists(path)
        real_save(path, method, optimizer, step, meta)

    monkeypatch.setattr(checkpoint, "write", save_where_nothing_is)
    train.main([*args, "--out-dir", str(out), "--resume"])

    full, resumed = weights(tmp_path / "full"), weights(out)
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], rtol=0, atol=0, msg=k)
    assert not (out / "ckpt.pt.tmp").exists()
    # one line per step: the resumed run dropped the log's steps 3-4 before running them again
    assert [e["step"] for e in read_log(out)] == [1, 2, 3, 4]
    assert [e["loss"] for e in read_log(out)] == [e["loss"] for e in read_log(tmp_path / "full")]


def test_two_gloo_ranks_equal_one_process(tmp_path):
    """2 ranks × 2 micro-batches of 2 = 1 process × 1 batch of 8: the same loss (exact accumulation, DDP's averaging
    after the last micro-batch) and weights."""
    args = ["--steps", "3", *TINY, "--eval-size", "0"]
    run("train.py", *args, "--out-dir", tmp_path / "one", cwd=tmp_path)
    run("train.py", *args, "--grad-accum", "2", "--out-dir", tmp_path / "two", cwd=tmp_path,
        launcher=("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"))
    one, two = read_log(tmp_path / "one"), read_log(tmp_path / "two")
    for a, b in zip(one, two):  # rank-averaged losses of 2 × 4 samples = the loss of one process on the 8
        assert a["step"] == b["step"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    # Adam divides each coordinate by its own gradient scale, so where the true gradient is ~0 (the attention key
    # biases, rarely used embedding rows) float rounding noise becomes a step of up to lr: ~3e-5 seen here, lr 5e-4
    w1, w2 = weights(tmp_path / "one"), weights(tmp_path / "two")
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=0, atol=1e-4, msg=k)


def test_gradient_accumulation_trains_on_the_whole_batch(tmp_path):
    """--grad-accum 4 gives the losses of one batch of 8: the loss is the whole batch's, not the mean of four
    micro-batch losses (SLIP: its BatchNorm head and SimCLR negatives see all 8 too), and so are the updates that the
    later steps' losses depend on. (Weights are compared in the 2-rank test: with SLIP's Adam eps of 1e-8 the rounding
    noise of gradients that are 0 by construction, such as the attention key biases', becomes steps of up to lr.)"""
    import train
    args = ["--method", "slip", "--method-args", METHOD_ARGS["slip"], "--steps", "3", *TINY, "--eval-size", "0"]
    train.main([*args, "--out-dir", str(tmp_path / "one")])
    train.main([*args, "--grad-accum", "4", "--grad-checkpointing", "--out-dir", str(tmp_path / "four")])
    one, four = read_log(tmp_path / "one"), read_log(tmp_path / "four")
    assert len(one) == len(four) == 3
    for a, b in zip(one, four):
        assert {k: b[k] for k in ("loss", "clip", "ssl")} == pytest.approx({k: a[k] for k in ("loss", "clip", "ssl")},
                                                                           rel=1e-5)


# --- bad input: one clear line, no traceback -------------------------------------------------------------------------


def one_line_error(p, *words):
    assert p.returncode != 0
    assert "Traceback" not in p.stderr, p.stderr
    last = p.stderr.strip().splitlines()[-1]
    for w in words:
        assert w in last, last
    return last


def test_unknown_method_and_model(tmp_path):
    one_line_error(run("train.py", "--method", "nope", cwd=tmp_path, check=False), "invalid choice", "clip")
    one_line_error(run("train.py", "--model", "nope", cwd=tmp_path, check=False), "unknown model 'nope'", "ViT-B-32")


def test_missing_dataset_paths(tmp_path):
    one_line_error(run("train.py", "--data", tmp_path / "missing.csv", cwd=tmp_path, check=False), "missing.csv")
    one_line_error(run("train.py", "--data", "coco", "--data-dir", tmp_path / "nococo", cwd=tmp_path, check=False),
                   "captions_train2017.json", "download")
    one_line_error(run("train.py", "--data", "coco", cwd=tmp_path, check=False), "data_dir")
    one_line_error(run("eval_zeroshot.py", "--checkpoint", tmp_path / "none.pt", cwd=tmp_path, check=False),
                   "no checkpoint")


def test_corrupt_images_are_skipped_and_counted_empty_captions_dropped(tmp_path):
    for i in range(6):
        Image.new("RGB", (40, 40), (40 * i, 90, 200)).save(tmp_path / f"{i}.jpg")
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg at all")
    rows = [f"{i}.jpg\ta red thing number {i}" for i in range(6)] + ["broken.jpg\ta broken image", "3.jpg\t  "]
    (tmp_path / "pairs.tsv").write_text("filepath\ttitle\n" + "\n".join(rows) + "\n")
    p = run("train.py", "--data", tmp_path / "pairs.tsv", "--steps", "6", *TINY, "--batch-size", "4",
            "--out-dir", tmp_path / "o", cwd=tmp_path)
    assert "dropped 1 of 8 rows with empty captions" in p.stderr
    skipped = read_log(tmp_path / "o")[-1]["skipped"]
    assert skipped == 1  # distinct files: broken.jpg, met in several epochs
    assert "skipped 1 unreadable images" in p.stdout and "warning: cannot read" in p.stdout and "broken.jpg" in p.stdout
    # 2 ranks visit the same items (the global batches do not depend on the world size): the logged count is the
    # union over ranks, the same as one process's (here rank 1 meets the broken image too)
    run("train.py", "--data", tmp_path / "pairs.tsv", "--steps", "6", *TINY, "--batch-size", "4",
        "--out-dir", tmp_path / "o2", cwd=tmp_path, launcher=("-m", "torch.distributed.run", "--standalone",
                                                               "--nproc_per_node=2"))
    assert read_log(tmp_path / "o2")[-1]["skipped"] == skipped
    # retrieval on the same file: the broken image is unreadable, which evaluation reports rather than hides
    e = run("eval_zeroshot.py", "--checkpoint", tmp_path / "o" / "ckpt.pt", "--dataset", tmp_path / "pairs.tsv",
            "--workers", "0", cwd=tmp_path, check=False)
    one_line_error(e, "broken.jpg")


def test_checkpoint_of_the_wrong_architecture(tmp_path):
    run("train.py", "--steps", "1", *TINY, "--eval-size", "0", "--out-dir", tmp_path / "o", cwd=tmp_path)
    one_line_error(run("train.py", "--model", "tiny-rn", "--steps", "2", "--out-dir", tmp_path / "o", "--resume",
                       cwd=tmp_path, check=False), "--model tiny-vit")
    # an OpenAI-layout state dict with a broken shape, given to the evaluator
    sd = weights(tmp_path / "o")
    sd["visual.proj"] = sd["visual.proj"][:, :7]
    torch.save(sd, tmp_path / "bad.pt")
    one_line_error(run("eval_zeroshot.py", "--checkpoint", tmp_path / "bad.pt", cwd=tmp_path, check=False), "bad.pt")
    (tmp_path / "junk.pt").write_bytes(b"\x00garbage")
    one_line_error(run("eval_zeroshot.py", "--checkpoint", tmp_path / "junk.pt", cwd=tmp_path, check=False), "junk.pt")


# --- checkpoints: what is read, what is written ----------------------------------------------------------------------


def main_error(*argv):
    """train.main in this process, which must stop with one line (fail): -> that line."""
    import train

    with pytest.raises(SystemExit) as stopped:
        train.main([str(a) for a in argv])
    message = str(stopped.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 2-step run (read only: tests copy what they change)."""
    import train

    out = tmp_path_factory.mktemp("trained")
    train.main(["--steps", "2", *TINY, "--eval-size", "0", "--out-dir", str(out)])
    return out


class Payload:
    """Unpickling this runs a shell command: what a .pt file from an untrusted source can do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def test_a_checkpoint_that_would_run_code_is_refused(trained, tmp_path):
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.pt"
    checkpoint = torch.load(trained / "ckpt.pt", weights_only=True)
    torch.save({**checkpoint, "model": Payload(marker)}, evil)  # our checkpoint, its model entry swapped
    for p in (run("eval_zeroshot.py", "--checkpoint", evil, "--workers", "0", cwd=tmp_path, check=False),
              run("train.py", "--steps", "4", *TINY, "--out-dir", tmp_path / "o", "--resume", evil, cwd=tmp_path,
                  check=False)):
        one_line_error(p, "evil.pt", "was not loaded", "objects other than tensors and plain values (posix.system)",
                       "If you trust its source, pass --trust-checkpoint")
        assert len(p.stderr.strip().splitlines()) == 1, p.stderr
        assert not marker.exists()

    # the older torch.save format and a bare pickle are refused too (in this process: nothing may run here either)
    from plumbing.weights import read

    torch.save({"model": Payload(marker)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    (tmp_path / "bare.pt").write_bytes(pickle.dumps({"model": Payload(marker)}))
    for name in ("legacy.pt", "bare.pt"):
        with pytest.raises(SystemExit) as stopped:
            read(str(tmp_path / name))
        assert name in str(stopped.value.code)
    assert not marker.exists()

    # the refusal is what kept the marker away: trusted, the same file runs its command
    run("eval_zeroshot.py", "--checkpoint", evil, "--trust-checkpoint", "--workers", "0", cwd=tmp_path, check=False)
    assert marker.exists()


def test_trust_checkpoint_resumes_from_a_file_with_other_objects(trained, tmp_path):
    import train

    checkpoint = torch.load(trained / "ckpt.pt", weights_only=True)
    checkpoint["config"]["note"] = fractions.Fraction(1, 3)  # harmless, but a class weights_only does not rebuild
    torch.save(checkpoint, tmp_path / "ckpt.pt")
    args = ["--steps", "3", *TINY, "--eval-size", "0", "--out-dir", tmp_path, "--resume"]
    assert "(fractions.Fraction)" in main_error(*args)
    train.main([*map(str, args), "--trust-checkpoint"])
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 3


def test_resume_from_a_file_that_is_not_a_checkpoint(trained, tmp_path):
    raw = (trained / "ckpt.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "random.pt").write_bytes(random.Random(0).randbytes(4096))
    torch.save(weights(trained), tmp_path / "state_dict.pt")  # weights without the run that made them
    for name, problem in [("truncated.pt", "is not a checkpoint torch can read"), ("empty.pt", "is not a checkpoint"),
                          ("random.pt", "is not a checkpoint"), ("state_dict.pt", "is not a checkpoint of train.py"),
                          ("missing.pt", "no checkpoint at")]:
        message = main_error("--steps", "4", *TINY, "--out-dir", tmp_path / "o", "--resume", tmp_path / name)
        assert str(tmp_path / name) in message and problem in message, message


def test_nothing_to_train_is_an_error_not_a_save(trained, tmp_path, capsys):
    for steps in ("0", "-3"):
        assert "--steps must be at least 1" in main_error("--steps", steps, *TINY, "--out-dir", tmp_path / "o")
    message = main_error("--steps", "2", *TINY, "--out-dir", tmp_path / "new", "--resume", trained / "ckpt.pt")
    assert "already trained 2 steps; pass a larger --steps" in message
    assert "saved" not in capsys.readouterr().out
    assert not (tmp_path / "o").exists() and not (tmp_path / "new" / "ckpt.pt").exists()


def test_a_diverging_run_keeps_a_checkpoint_training_can_continue_from(tmp_path):
    import train

    out = tmp_path / "o"
    args = [*TINY, "--eval-size", "0", "--out-dir", str(out)]
    train.main(["--steps", "4", *args])
    good = weights(out)
    # with a weight decay of 1e30 (--lr is capped at 1; the issue's report used --lr 1e6 to the same effect), step 5's
    # loss is still finite (step 4's weights) but its update multiplies each decayed weight by 1 - lr·wd ~ -1e26:
    # finite weights, from which the next loss is not finite. The step-5 state must not become ckpt.pt
    message = main_error("--steps", "12", "--weight-decay", "1e30", "--save-every", "1", "--resume", *args)
    found = re.search(r"the loss is not finite at step (\d+); stopped, \S+ckpt.pt holds step (\d+)\.", message)
    assert found, message
    nan_step, kept_step = map(int, found.groups())
    assert kept_step >= 4 and nan_step == kept_step + 2  # the state after kept_step + 1 was written, then dropped
    kept = torch.load(out / "ckpt.pt", weights_only=True)
    assert kept["step"] == kept_step and not (out / "ckpt.pt.tmp").exists()
    if kept_step == 4:
        for k in good:
            torch.testing.assert_close(kept["model"][k], good[k], rtol=0, atol=0)
    # resumed with the default weight decay (a run's flags, not the checkpoint's, set lr and weight decay), it trains on
    train.main(["--steps", str(kept_step + 3), "--resume", *args])
    log = read_log(out)
    assert [e["step"] for e in log] == list(range(1, kept_step + 4))
    assert all(math.isfinite(e["loss"]) for e in log)

    # a fresh run that diverges before any checkpoint says so, and leaves none
    fresh = tmp_path / "fresh"
    message = main_error("--steps", "12", "--weight-decay", "1e30", *TINY, "--eval-size", "0", "--out-dir", fresh)
    assert "not finite" in message and "no checkpoint was written" in message
    assert not (fresh / "ckpt.pt").exists() and not (fresh / "ckpt.pt.tmp").exists()


def test_non_finite_weights_are_never_saved(tmp_path, monkeypatch):
    real_step = torch.optim.AdamW.step
    steps = []

    def step_to_inf(self, *args, **kwargs):  # an update that leaves an infinite weight at step 2 (the loss was finite)
        real_step(self, *args, **kwargs)
        steps.append(1)
        if len(steps) == 2:
            self.param_groups[0]["params"][0].data.view(-1)[0] = float("inf")

    monkeypatch.setattr(torch.optim.AdamW, "step", step_to_inf)
    out = tmp_path / "o"
    message = main_error("--steps", "4", "--save-every", "1", *TINY, "--eval-size", "0", "--out-dir", out)
    assert f"the weights are not finite after step 2; stopped, {out / 'ckpt.pt'} holds step 1." in message
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 1 and not (out / "ckpt.pt.tmp").exists()


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_a_full_disk_while_saving(tmp_path, monkeypatch):
    from plumbing import checkpoint

    real_save = checkpoint.write

    def save_to_a_full_disk(path, method, optimizer, step, meta):
        if step == 2:
            os.symlink("/dev/full", path)  # every write to /dev/full fails with ENOSPC, as on a full disk
        real_save(path, method, optimizer, step, meta)

    monkeypatch.setattr(checkpoint, "write", save_to_a_full_disk)
    out = tmp_path / "o"
    message = main_error("--steps", "3", "--save-every", "1", *TINY, "--eval-size", "0", "--out-dir", out)
    assert f"could not write {out / 'ckpt.pt.tmp'}: no space left on device" in message
    assert not os.path.lexists(out / "ckpt.pt.tmp")  # the partial file is gone
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 1  # the last checkpoint is untouched


@pytest.mark.parametrize("model,betas,eps", [("tiny-rn", (0.9, 0.999), 1e-8), ("tiny-vit", (0.9, 0.98), 1e-6)])
def test_optimizer_settings_follow_the_method_and_encoder(tmp_path, model, betas, eps):
    """CLIP's Adam settings depend on the encoder (a ResNet's differ), and the embeddings are weight-decayed."""
    import train
    from clip import CLIP
    from model import create_model
    train.main(["--steps", "1", *TINY, "--model", model, "--eval-size", "0", "--out-dir", str(tmp_path)])
    groups = torch.load(tmp_path / "ckpt.pt", weights_only=True)["optimizer"]["param_groups"]
    assert [(g["weight_decay"], tuple(g["betas"]), g["eps"]) for g in groups] == [(0.2, betas, eps), (0.0, betas, eps)]
    method = CLIP(create_model(model))
    decayed = [n for n, p in method.named_parameters() if CLIP.decays(n, p)]
    assert "model.token_embedding.weight" in decayed and "model.positional_embedding" in decayed
    assert len(groups[0]["params"]) == len(decayed)


def test_freeze_patch_embed_keeps_the_random_init(tmp_path):
    """The DeCLIP benchmark's setting: the ViT's patch embedding never trains (and the optimiser never holds it)."""
    import train
    from model import CONFIGS, CLIPModel
    train.main(["--steps", "2", *TINY, "--eval-size", "0", "--freeze-patch-embed", "--out-dir", str(tmp_path)])
    torch.manual_seed(0)  # train.py's seed, right before it builds the model
    init = CLIPModel(**dict(CONFIGS["tiny-vit"], vocab_size=49408)).state_dict()
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert torch.equal(ckpt["model"]["visual.conv1.weight"], init["visual.conv1.weight"])
    assert not torch.equal(ckpt["model"]["visual.proj"], init["visual.proj"])  # the rest trains
    n_trained = sum(len(g["params"]) for g in ckpt["optimizer"]["param_groups"])
    assert n_trained == len(list(CLIPModel(**CONFIGS["tiny-vit"]).parameters())) - 1
    with pytest.raises(SystemExit, match="tiny-rn is a ResNet"):
        train.main(["--steps", "1", *TINY, "--model", "tiny-rn", "--freeze-patch-embed", "--out-dir", str(tmp_path)])
