"""Seeing a run: scripts/plot.py on the logs of real train.py runs, --report-to's trackers read back with their own
readers, and eval_zeroshot.py --show's rankings."""

import base64
import glob
import importlib.util
import io
import json
import re
import struct
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import cli
from test_train import ROOT, TINY, read_log, run

sys.path.insert(0, ROOT)
from scripts import plot  # noqa: E402

BLUE, ORANGE = (31, 119, 180), (255, 127, 14)  # matplotlib's C0 and C1: the first and second run's curves


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two real runs: CLIP evaluating every 2 steps, logged to tensorboard and (offline) wandb too; SigLIP without
    evaluation lines."""
    tmp = tmp_path_factory.mktemp("runs")
    # wandb offline, its files here: an environment of its own, so a fresh interpreter (cli.run with env)
    env = dict(WANDB_MODE="offline", WANDB_DIR=str(tmp), WANDB_SILENT="true")
    trackers = "tensorboard,wandb" if importlib.util.find_spec("wandb") else "tensorboard"  # see the wandb test
    p = cli.run("train.py", "--steps", "4", "--eval-every", "2", *TINY, "--out-dir", tmp / "clip", "--report-to",
                trackers, cwd=tmp, env=env)
    assert p.returncode == 0, p.stderr
    run("train.py", "--method", "siglip", "--steps", "3", *TINY, "--eval-size", "0", "--out-dir", tmp / "siglip",
        cwd=tmp)
    return tmp


def picture(path):
    image = Image.open(path)
    image.load()
    return image.size, np.asarray(image.convert("RGB"))


def has(pixels, colour):
    return bool((np.abs(pixels.astype(int) - colour).sum(axis=-1) < 30).sum() > 50)


@pytest.mark.parametrize("names, panels", [(["clip"], 11), (["siglip"], 8), (["clip", "siglip"], 13)])
def test_plot_draws_every_curve_of_every_run(runs, names, panels):
    # clip: loss, clip, logit_scale, lr, samples_per_s, data_wait, max_memory_mb and 4 synthetic tasks' top-1; siglip:
    # loss, siglip, logit_scale, logit_bias, lr, samples_per_s, data_wait, max_memory_mb (no evaluation lines); both:
    # their union
    assert any("task" in e for e in read_log(runs / "clip")) and not any("task" in e for e in read_log(runs / "siglip"))
    out = runs / f"{'-'.join(names)}.png"
    p = run("scripts/plot.py", *[runs / n for n in names], "--out", out, cwd=runs)
    assert p.stdout.strip() == str(out)
    assert len(plot.curves([plot.read_run(str(runs / n)) for n in names])) == panels
    size, pixels = picture(out)
    rows = -(-panels // plot.COLS)
    assert size == (100 * plot.PANEL[0] * plot.COLS, 100 * plot.PANEL[1] * rows)
    assert (pixels < 250).any(axis=-1).mean() > 0.05  # not blank
    assert has(pixels, BLUE) and has(pixels, ORANGE) == (len(names) == 2)


def drawn(monkeypatch, out_dirs, out):
    """plot.plot(out_dirs, out) -> {panel title: [(xs, ys) of each line drawn in it]}, as matplotlib was given them."""
    import matplotlib.axes

    lines, real_plot = [], matplotlib.axes.Axes.plot

    def spy(ax, xs, ys, *args, **kwargs):
        lines.append((ax, list(xs), list(ys)))
        return real_plot(ax, xs, ys, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", spy)
    plot.plot([str(d) for d in out_dirs], str(out))
    panels = {}
    for ax, xs, ys in lines:
        panels.setdefault(ax.get_title(), []).append((xs, ys))
    return panels


def test_plot_draws_data_wait_and_memory_beside_samples_per_s(runs, tmp_path, monkeypatch):
    log = [e for e in read_log(runs / "clip") if "task" not in e]
    panels = drawn(monkeypatch, [runs / "clip"], tmp_path / "p.png")
    titles = list(panels)
    at = titles.index("samples_per_s")
    assert titles[at + 1:at + 3] == ["data_wait (share of the time)", "max_memory_mb (peak MiB)"]
    for title, key in (("data_wait (share of the time)", "data_wait"), ("max_memory_mb (peak MiB)", "max_memory_mb")):
        assert panels[title] == [([e["step"] for e in log], [e[key] for e in log])]
        assert all(0 <= e["data_wait"] <= 1 and e["max_memory_mb"] > 0 for e in log)

    # a log of before these fields: no such panels; a log with them in some lines only: drawn where they are
    (tmp_path / "old").mkdir()
    (tmp_path / "mixed").mkdir()
    old = [{k: v for k, v in e.items() if k not in ("data_wait", "max_memory_mb")} for e in log]
    (tmp_path / "old" / "log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in old))
    mixed = old[:2] + log[2:]
    (tmp_path / "mixed" / "log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in mixed))
    assert not any(t.startswith(("data_wait", "max_memory_mb")) for t in drawn(monkeypatch, [tmp_path / "old"],
                                                                               tmp_path / "old.png"))
    panels = drawn(monkeypatch, [tmp_path / "mixed"], tmp_path / "mixed.png")
    assert panels["data_wait (share of the time)"] == [([e["step"] for e in log[2:]],
                                                         [e["data_wait"] for e in log[2:]])]
    assert len(panels["loss"][0][0]) == len(log)


def test_plot_labels_runs_by_method_and_model(runs):
    assert [plot.read_run(str(runs / n))[0] for n in ("clip", "siglip")] == \
        ["clip tiny-vit (clip)", "siglip tiny-vit (siglip)"]
    run("scripts/plot.py", runs / "siglip", cwd=runs)  # one run: OUT/plot.png by default
    assert picture(runs / "siglip" / "plot.png")[0] == (1200, 900)  # 8 panels, 3 rows


def test_plot_fails_with_one_line(runs, tmp_path, monkeypatch):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "log.jsonl").write_text('{"step": 1, "loss": 2.0}\nnot json\n')
    for folder, message in ((tmp_path / "none", "cannot read"), (tmp_path / "bad", "line 2 is not a log entry")):
        p = run("scripts/plot.py", folder, cwd=tmp_path, check=False)
        assert p.returncode == 1 and message in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    with pytest.raises(SystemExit, match="pip install matplotlib"):
        plot.plot([str(runs / "clip")], str(tmp_path / "x.png"))


def logged(out_dir):
    """log.jsonl as the trackers should hold it: {name: {step: value}}."""
    scalars = {}
    for entry in read_log(out_dir):
        prefix = f"{entry['dataset']}/" if "task" in entry else "train/"
        for k, v in entry.items():
            if k != "step" and isinstance(v, (int, float)):
                scalars.setdefault(prefix + k, {})[entry["step"]] = v
    return scalars


def test_tensorboard_holds_what_the_log_holds(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(runs / "clip" / "tensorboard"))
    events.Reload()
    expected = logged(runs / "clip")
    assert "synthetic/shape/top1" in expected and "train/logit_scale" in expected
    assert sorted(events.Tags()["scalars"]) == sorted(expected)
    for name, values in expected.items():
        got = {e.step: e.value for e in events.Scalars(name)}
        assert got == pytest.approx(values, rel=1e-6), name


def wandb_history(run_file):
    """The history rows of a wandb run file (a LevelDB-format log of protobuf records; wandb no longer ships a Python
    reader for it): 7-byte file header, 32 KiB blocks of records, each with a 7-byte header (crc, length, type)."""
    from wandb.proto import wandb_internal_pb2

    raw, pos, data, rows = open(run_file, "rb").read(), 7, b"", []
    while pos + 7 <= len(raw):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, n, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        data, pos = data + raw[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(data)
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
            data = b""
    return rows


def test_wandb_offline_run_holds_what_the_log_holds(runs):
    pytest.importorskip("wandb", reason="wandb is not installed (pip install wandb)")
    run_id = (runs / "clip" / "wandb_id").read_text().strip()
    files = glob.glob(str(runs / "wandb" / f"offline-run-*-{run_id}" / f"run-{run_id}.wandb"))
    assert len(files) == 1
    got = {}
    for row in wandb_history(files[0]):
        for name, value in row.items():
            if not name.startswith("_"):
                got.setdefault(name, {})[row["_step"]] = value
    expected = logged(runs / "clip")
    assert sorted(got) == sorted(expected)
    for name, values in expected.items():
        assert got[name] == pytest.approx(values), name


def test_show_ranks_as_the_embeddings_say_and_marks_the_correct_items(runs):
    import eval_zeroshot
    from plumbing import show
    from plumbing.weights import load_method

    method, tokenizer = load_method(str(runs / "clip" / "ckpt.pt"))
    # retrieval: 24 held-out pairs (caption i is image i's); 5 queries each way, ranked against an independent
    # similarity matrix: CLIP's cosine of every image with every caption
    task, = eval_zeroshot.prepare("synthetic-retrieval", image_size=method.model.image_resolution, size=24)
    panels = show.rankings(method, tokenizer, task, "cpu", 5)
    transform = eval_zeroshot.data.eval_transform(method.model.image_resolution)
    with torch.no_grad():
        images = torch.stack([transform(image) for image in task["images"]])
        tokens = tokenizer(task["captions"], method.model.context_length)
        image_features = torch.nn.functional.normalize(method.model.encode_image(images), dim=-1)
        text_features = torch.nn.functional.normalize(method.model.encode_text(tokens), dim=-1)
    similarity = 100 * image_features @ text_features.T  # (images, captions)
    assert [p["direction"] for p in panels] == ["text->image"] * 5 + ["image->text"] * 5
    assert [p["query"] for p in panels] == [0, 4, 9, 14, 19] * 2  # spread over the 24
    for p in panels:
        scores = similarity[:, p["query"]] if p["direction"] == "text->image" else similarity[p["query"]]
        assert p["correct"] == [p["query"]]
        assert [i for i, _ in p["top"]] == scores.argsort(descending=True)[:5].tolist()
        assert [s for _, s in p["top"]] == pytest.approx(scores.sort(descending=True).values[:5].tolist(), abs=1e-3)
        assert p["rank"] == 1 + (scores > scores[p["query"]]).sum().item()

    # classification: the mistakes shown are mistakes, as many as asked (or as there are), marked with the true class
    for task in eval_zeroshot.prepare("synthetic", image_size=method.model.image_resolution, size=24):
        panels = show.rankings(method, tokenizer, task, "cpu", 3)
        result = eval_zeroshot.classify(method, tokenizer, task["images"], task["classnames"], task["templates"], "cpu")
        assert len(panels) == min(3, round((1 - result["top1"]) * 24))
        for p in panels:
            label = task["images"][p["query"]][1]
            assert p["correct"] == [label] and p["top"][0][0] != label and p["rank"] > 1
            assert [s for _, s in p["top"]] == sorted([s for _, s in p["top"]], reverse=True)


def test_show_writes_one_page_with_a_panel_per_query(runs, tmp_path):
    page = tmp_path / "show.html"
    p = run("eval_zeroshot.py", "--checkpoint", runs / "clip" / "ckpt.pt", "--dataset", "synthetic-retrieval",
            "--workers", "0", "--show", "3", "--show-file", page, cwd=tmp_path)
    assert p.stdout.strip().splitlines()[-1] == str(page)
    text = page.read_text()
    assert text.count('class="panel"') == 6 and text.count("<h2>") == 2
    # every inlined image opens: 3 text->image panels of 5 images, 3 image->text queries
    images = re.findall(r'src="data:image/jpeg;base64,([^"]+)"', text)
    assert len(images) == 3 * 5 + 3
    for data in images:
        assert Image.open(io.BytesIO(base64.b64decode(data))).size == (112, 112)
    # an item is marked where it is correct: the shown rank of the query's own image/caption, or "correct at rank r"
    marked = text.count('class="correct"')
    assert marked + text.count("correct at rank") == 6


def test_a_resumed_run_continues_its_tensorboard_log(tmp_path, killed_while_saving):
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    # killed while saving step 4: ckpt.pt holds step 2, tensorboard has steps 1-4; the resumed run logs 3 and 4 again
    args = ["--steps", "4", "--save-every", "2", *TINY, "--eval-size", "0", "--report-to", "tensorboard",
            "--out-dir", tmp_path]
    killed_while_saving(args, step=4)
    import train
    train.main([str(a) for a in args] + ["--resume"])
    first, second = sorted(glob.glob(str(tmp_path / "tensorboard" / "events.*")))
    steps = [[e.step for e in EventFileLoader(f).Load() if e.HasField("summary") and
              e.summary.value[0].tag == "train/loss"] for f in (first, second)]
    assert steps == [[1, 2, 3, 4], [3, 4]]
    # the second file hides the first's steps from 3 on (purge_step), as log.jsonl was cut back to step 2
    start, = [e for e in EventFileLoader(second).Load() if e.HasField("session_log")]
    assert start.step == 3 and start.session_log.status == start.session_log.START


@pytest.mark.parametrize("trackers, message", [
    ("wandb", "--report-to wandb needs the wandb package: pip install wandb"),
    ("tensorboard,mlflow", "--report-to mlflow: choose from")])
def test_report_to_fails_with_one_line(tmp_path, monkeypatch, trackers, message):
    import train

    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with pytest.raises(SystemExit, match=message) as e:
        train.main(["--steps", "1", *TINY, "--report-to", trackers, "--out-dir", str(tmp_path)])
    assert "\n" not in str(e.value.code)
