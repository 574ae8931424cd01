"""train.py and eval_zeroshot.py end to end on tiny configs: every method trains, resume is exact, 2 gloo ranks
equal 1 process on the same global batch, and bad input gives one clear line."""

import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model", "tiny-vit", "--batch-size", "8", "--workers", "0", "--log-every", "1", "--eval-size", "24"]


def run(script, *args, cwd, check=True, launcher=()):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="default")
    p = subprocess.run([sys.executable, *launcher, os.path.join(ROOT, script), *map(str, args)], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"{script} {args} exited {p.returncode}:\n{p.stdout}\n{p.stderr}")
    return p


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def weights(out_dir):
    return torch.load(os.path.join(out_dir, "ckpt.pt"), weights_only=False)["model"]


# method-args keep the heads and queues of SLIP/DeCLIP/FILIP small for a CPU test
METHOD_ARGS = {"clip": "", "siglip": "", "slip": "mlp_dim=64,min_bn_batch=4", "declip": "queue_size=64,proj_dim=32,pred_dim=16,min_bn_batch=4",
               "filip": ""}


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


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, monkeypatch):
    import train

    args = ["--steps", "4", "--save-every", "2", *TINY, "--eval-size", "0"]
    train.main([*args, "--out-dir", str(tmp_path / "full")])

    # the same run killed right after its step-2 checkpoint, then resumed
    real_save = train.save_checkpoint

    def save_then_die(path, method, optimizer, step, meta):
        real_save(path, method, optimizer, step, meta)
        if step == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(train, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train.main([*args, "--out-dir", str(tmp_path / "resumed")])
    monkeypatch.setattr(train, "save_checkpoint", real_save)
    train.main([*args, "--out-dir", str(tmp_path / "resumed"), "--resume"])

    full, resumed = weights(tmp_path / "full"), weights(tmp_path / "resumed")
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], rtol=0, atol=0, msg=k)
    assert [e["loss"] for e in read_log(tmp_path / "resumed")] == [e["loss"] for e in read_log(tmp_path / "full")]


def test_two_gloo_ranks_equal_one_process(tmp_path):
    args = ["--steps", "3", *TINY, "--eval-size", "0"]
    run("train.py", *args, "--out-dir", tmp_path / "one", cwd=tmp_path)
    run("train.py", *args, "--out-dir", tmp_path / "two", cwd=tmp_path,
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


def test_gradient_accumulation_runs_micro_batches(tmp_path):
    run("train.py", "--steps", "2", *TINY, "--grad-accum", "2", "--eval-size", "0", "--out-dir", tmp_path / "o",
        cwd=tmp_path)
    p = run("train.py", "--steps", "2", *TINY, "--grad-accum", "3", "--out-dir", tmp_path / "o", cwd=tmp_path,
            check=False)
    assert p.returncode != 0 and "divisible" in p.stderr


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


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "o"
    run("train.py", "--steps", "2", *TINY, "--eval-size", "0", "--out-dir", out, cwd=tmp_path)
    good = weights(out)
    # make the resumed run diverge (--lr is at most 1): a weight decay of 1e30 in the optimizer state, which resuming
    # restores, multiplies each weight by 1 - lr·wd, about -1e26, at every step
    checkpoint = torch.load(out / "ckpt.pt", weights_only=False)
    for group in checkpoint["optimizer"]["param_groups"]:
        group["weight_decay"] = 1e30
    torch.save(checkpoint, out / "ckpt.pt")
    p = run("train.py", "--steps", "8", *TINY, "--save-every", "1", "--out-dir", out, "--resume", cwd=tmp_path,
            check=False)
    one_line_error(p, "not finite", "ckpt.pt")
    kept = torch.load(out / "ckpt.pt", weights_only=False)
    assert all(torch.isfinite(v).all() for v in kept["model"].values() if v.is_floating_point())
    assert kept["step"] >= 2
    if kept["step"] == 2:
        for k in good:
            torch.testing.assert_close(kept["model"][k], good[k], rtol=0, atol=0)
