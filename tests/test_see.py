"""Seeing a run: scripts/plot.py on the logs of real train.py runs, --report-to's trackers read back with their own
readers, and eval_zeroshot.py --show's rankings."""

import base64
import glob
import html
import importlib.util
import io
import json
import math
import os
import re
import struct
import sys
from html.parser import HTMLParser
from types import SimpleNamespace

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
    # synced every 3 steps: the steps logged at once keep each its own values (lr)
    run("train.py", "--method", "siglip", "--steps", "4", *TINY, "--log-every", "3", "--eval-size", "0", "--out-dir",
        tmp / "siglip", cwd=tmp)
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
    (tmp_path / "bad" / "log.jsonl").write_text('not json\n[1]\n')
    for folder, message in ((tmp_path / "none", "cannot read"), (tmp_path / "bad", "holds no step yet")):
        p = run("scripts/plot.py", folder, cwd=tmp_path, check=False)
        assert p.returncode == 1 and message in p.stderr.splitlines()[-1], p.stderr
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
    shown = 0
    for task in eval_zeroshot.prepare("synthetic", image_size=method.model.image_resolution, size=24):
        panels = show.rankings(method, tokenizer, task, "cpu", 3)
        result = eval_zeroshot.classify(method, tokenizer, task["images"], task["classnames"], task["templates"], "cpu")
        assert len(panels) == min(3, round((1 - result["top1"]) * 24))
        shown += len(panels)
        for p in panels:
            label = task["images"][p["query"]][1]
            assert p["correct"] == [label] and p["top"][0][0] != label and p["rank"] > 1
            assert [s for _, s in p["top"]] == sorted([s for _, s in p["top"]], reverse=True)
    assert shown >= 3  # a model of 4 steps errs: the loop above checked mistakes


def test_show_ranks_images_with_several_captions(runs, tmp_path):
    """As COCO: several captions per image (here 3 images × 2 captions, in the csv's order, not the images'). An image's
    panel counts every one of its captions as correct, at the best rank of any; a caption's, its own image."""
    import eval_zeroshot
    from plumbing import show
    from plumbing.weights import load_method

    method, tokenizer = load_method(str(runs / "clip" / "ckpt.pt"))
    for i, colour in enumerate(((220, 30, 30), (30, 40, 220), (30, 180, 40))):
        Image.new("RGB", (50, 40), colour).save(tmp_path / f"{i}.png")
    rows = [(2, "a green thing"), (0, "a red one"), (1, "something blue"), (0, "red, again"), (2, "green"),
            (1, "a blue square")]
    (tmp_path / "pairs.tsv").write_text("filepath\ttitle\n" + "".join(f"{i}.png\t{c}\n" for i, c in rows))
    task, = eval_zeroshot.prepare(str(tmp_path / "pairs.tsv"), image_size=method.model.image_resolution)
    panels = show.rankings(method, tokenizer, task, "cpu", 3)
    owner = [task["images"].index(str(tmp_path / f"{i}.png")) for i, _ in rows]  # each caption's image
    transform = eval_zeroshot.data.eval_transform(method.model.image_resolution)
    with torch.no_grad():
        images = torch.stack([transform(Image.open(path).convert("RGB")) for path in task["images"]])
        image_features = torch.nn.functional.normalize(method.model.encode_image(images), dim=-1)
        text_features = torch.nn.functional.normalize(method.model.encode_text(
            tokenizer([c for _, c in rows], method.model.context_length)), dim=-1)
    similarity = 100 * image_features @ text_features.T  # (3 images, 6 captions)
    assert [p["direction"] for p in panels] == ["text->image"] * 3 + ["image->text"] * 3
    for p in panels:
        if p["direction"] == "text->image":
            scores, correct = similarity[:, p["query"]], [owner[p["query"]]]
        else:
            scores, correct = similarity[p["query"]], [j for j in range(6) if owner[j] == p["query"]]
        assert p["correct"] == correct and len(correct) == (1 if p["direction"] == "text->image" else 2)
        assert [i for i, _ in p["top"]] == scores.argsort(descending=True)[:5].tolist()
        assert p["rank"] == 1 + (scores > scores[correct].max()).sum().item()


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


class FakeWandb:
    """wandb as runlog.wandb uses it (init, run.log, run.finish, errors.Error), recording what it is given"""

    def __init__(self):
        self.inits, self.rows = [], []
        self.errors = SimpleNamespace(Error=RuntimeError)

    def init(self, **kwargs):
        self.inits.append(kwargs)
        return SimpleNamespace(log=lambda scalars, step: self.rows.append((kwargs["id"], step, scalars)),
                               finish=lambda: None)


def test_a_resumed_run_continues_its_tensorboard_log_and_its_wandb_run(tmp_path, monkeypatch, killed_while_saving):
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    monkeypatch.delenv("WANDB_DIR", raising=False)
    # killed while saving step 4: ckpt.pt holds step 2, tensorboard has steps 1-4; the resumed run logs 3 and 4 again
    args = ["--steps", "4", "--save-every", "2", *TINY, "--eval-size", "0", "--report-to", "tensorboard,wandb",
            "--out-dir", tmp_path]
    killed_while_saving(args, step=4)
    import train
    train.main([str(a) for a in args] + ["--resume"])
    first, second = sorted(glob.glob(str(tmp_path / "tensorboard" / "events.*")))
    losses = [{e.step: e.summary.value[0].tensor.float_val[0] for e in EventFileLoader(f).Load() if e.HasField("summary") and
               e.summary.value[0].tag == "train/loss"} for f in (first, second)]
    assert [list(f) for f in losses] == [[1, 2, 3, 4], [3, 4]]
    log = {e["step"]: e for e in read_log(tmp_path)}
    assert losses[1] == pytest.approx({s: log[s]["loss"] for s in (3, 4)}, rel=1e-6)  # the resumed run's values
    # the second file hides the first's steps from 3 on (purge_step), as log.jsonl was cut back to step 2
    start, = [e for e in EventFileLoader(second).Load() if e.HasField("session_log")]
    assert start.step == 3 and start.session_log.status == start.session_log.START
    # the config, as text at step 0, by the fresh run only
    texts = [[e.step for e in EventFileLoader(f).Load() if e.HasField("summary") and
              e.summary.value[0].tag.startswith("config")] for f in (first, second)]
    assert texts == [[0], []]

    # wandb: the resumed run continues the same run (the id kept in OUT/wandb_id), logging steps 3 and 4 again
    run_id = (tmp_path / "wandb_id").read_text().strip()
    assert len(run_id) == 12 and [i["id"] for i in fake.inits] == [run_id, run_id]
    for init in fake.inits:
        assert (init["resume"], init["project"], init["name"], init["dir"]) == ("allow", "clip", tmp_path.name,
                                                                                 str(tmp_path))
        assert init["config"]["config"]["report_to"] == "tensorboard,wandb"
    assert [step for _, step, _ in fake.rows] == [1, 2, 3, 4, 3, 4]
    for _, step, scalars in fake.rows[4:]:
        assert scalars == {f"train/{k}": v for k, v in log[step].items() if k != "step"}


@pytest.mark.parametrize("trackers, message", [
    ("wandb", "--report-to wandb needs the wandb package: pip install wandb"),
    ("tensorboard,mlflow", "--report-to mlflow: choose from")])
def test_report_to_fails_with_one_line(tmp_path, monkeypatch, trackers, message):
    import train

    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with pytest.raises(SystemExit, match=message) as e:
        train.main(["--steps", "1", *TINY, "--report-to", trackers, "--out-dir", str(tmp_path)])
    assert "\n" not in str(e.value.code)


# --- the page escapes what it shows; the plot draws what the log holds; trackers continue a resumed run ---------------

NASTY = ['<script>alert("caption")</script> & a red <b>circle</b>', "Tom's café & crème brûlée: 猫 > 犬 \u00a0ok",
         '" onmouseover="alert(1)', "an ordinary caption"]


class Page(HTMLParser):
    """The tags of a page and its text, character references resolved"""

    def __init__(self, page):
        super().__init__(convert_charrefs=True)
        self.tags, self.text = [], []
        self.feed(page)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def test_show_page_escapes_captions_class_names_and_titles(tmp_path):
    """Captions, class names, the data set's and the checkpoint's names may hold <, &, quotes and any script: the page
    shows them as text (no tag of theirs, no attribute of theirs), and keeps non-ASCII characters, in UTF-8."""
    from plumbing import show

    images = [Image.new("RGB", (20, 16), (60 * i, 90, 200)) for i in range(4)]
    retrieval = {"task": "retrieval", "dataset": "<i>pairs</i> & co.", "captions": NASTY, "images": images}
    panels = [dict(direction="text->image", query=0, top=[(2, 31.5), (0, 30.25)], correct=[0], rank=2),
              dict(direction="image->text", query=1, top=[(1, 12.0), (3, 11.0), (0, 10.0), (2, 9.0)], correct=[3],
                   rank=2),
              dict(direction="image->text", query=2, top=[(0, 5.0)], correct=[2], rank=9),
              dict(direction="image->text", query=0, top=[(3, 4.0), (1, 3.0), (2, 2.0), (3, 1.0), (0, 0.5)],
                   correct=[0], rank=5)]
    classes = ["<em>cat</em> & 'dog'", 'a "quoted" élan', "</div><div class=correct>fake"]
    classification = {"task": "zeroshot_classification", "dataset": 'folder "<x>"', "classnames": classes,
                      "images": SimpleNamespace(dataset=[(images[i], i % 3) for i in range(4)])}
    mistakes = [dict(direction="mistake", query=0, top=[(1, 20.0), (0, 19.0), (2, 3.0)], correct=[0], rank=2)]
    sections = [show.section(retrieval, panels), show.section(classification, mistakes),
                show.section({**classification, "dataset": "<u>none</u> & none"}, [])]
    checkpoint = 'runs/<b>"ckpt"</b> & café.pt'
    show.write(str(tmp_path / "show.html"), checkpoint, sections)
    raw = (tmp_path / "show.html").read_bytes()
    page = Page(raw.decode("utf-8"))  # <meta charset=utf-8>: it must be UTF-8
    # only the page's own tags, each with only the page's own attributes
    allowed = {"meta": {"charset"}, "title": set(), "style": set(), "h1": set(), "p": set(), "h2": set(),
               "div": {"class"}, "br": set(), "small": set(), "img": {"src"}}
    for tag, attrs in page.tags:
        assert tag in allowed and set(attrs) <= allowed[tag], (tag, attrs)
    assert {a.get("class") for t, a in page.tags if t == "div"} <= {None, "panel", "query", "correct"}
    # marked, at their rank: caption 0's own image (2nd), image 1's caption 3 (2nd), image 0's caption 0 (5th, no
    # note: it is shown), the mistake's true class (2nd); one note for the correct item that is not shown
    marked = re.findall(r'<div class="correct">✓ (\d)\. ([^<]*)', raw.decode("utf-8"))
    assert marked == [("2", ""), ("2", html.escape(NASTY[3])), ("5", html.escape(NASTY[0])),
                      ("2", html.escape(classes[0]))]
    text = "".join(page.text)
    for shown in [*NASTY[:2], NASTY[3], *classes[:2], checkpoint, retrieval["dataset"], classification["dataset"],
                  "<u>none</u> & none: no mistakes", "true class: <em>cat</em> & 'dog'", "correct at rank 9"]:
        assert shown in text, shown
    assert text.count("correct at rank") == 1
    assert NASTY[2] in text and classes[2] in text
    assert text.count(checkpoint) == 2  # the title and the heading
    # the right images, in order (each image its own colour): text->image caption 0's items (images 2, 0), the
    # image->text queries (images 1, 2, 0), the mistake (the classification set's image 0)
    shown = [np.asarray(Image.open(io.BytesIO(base64.b64decode(src)))).reshape(-1, 3).mean(axis=0)
             for src in re.findall(r'src="data:image/jpeg;base64,([^"]+)"', raw.decode("utf-8"))]
    expected = [np.asarray(images[i]).reshape(-1, 3).mean(axis=0) for i in (2, 0, 1, 2, 0, 0)]
    assert len(shown) == len(expected) and all(np.abs(a - b).max() < 8 for a, b in zip(shown, expected)), shown
    with pytest.raises(SystemExit, match=f"could not write {tmp_path}: is a directory"):
        show.write(str(tmp_path), checkpoint, sections)


def captured_figure(monkeypatch):
    """Keep the figure scripts/plot.py saves: -> a list that holds it once plot() ran"""
    import matplotlib.figure

    figures, save = [], matplotlib.figure.Figure.savefig

    def keep(self, *args, **kwargs):
        figures.append(self)
        return save(self, *args, **kwargs)
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep)
    return figures


def lines_of(figure):
    """{panel title: [(label, linestyle, colour, xs, ys)]} of the axes that hold lines"""
    from matplotlib.colors import to_hex

    return {ax.get_title(): [(line.get_label(), line.get_linestyle(), to_hex(line.get_color()),
                              list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()]
            for ax in figure.axes if ax.get_lines()}


def test_plot_draws_the_values_of_the_log(tmp_path, monkeypatch):
    """Every panel's lines against a log written here: each training key a panel of its values by step (not the
    skipped count), each evaluation in % (retrieval: both directions' R@1, the second dashed), each run in its colour
    and labelled by its method and model; an unfinished last line (a run writing now) left out."""
    from matplotlib.colors import to_hex

    steps_a = [dict(step=s, loss=3.0 - 0.5 * s, clip=2.0 / s, logit_scale=14.0 + s, lr=1e-4 * s, samples_per_s=100.0 + s,
                    skipped=s) for s in (1, 2, 3)]
    evals_a = [dict(step=s, task="retrieval", dataset="coco", **{"image->text R@1": 0.1 * s, "text->image R@1": 0.05 * s,
                                                                 "image->text R@5": 0.9})
               for s in (2, 3)]
    evals_a += [dict(step=3, task="zeroshot_classification", dataset="folder", top1=0.625, top5=1.0, images=8)]
    steps_b = [dict(step=s, loss=1.0 + s, siglip=0.5 * s, logit_bias=-10.0 + s, lr=2e-4, samples_per_s=50.0)
               for s in (1, 2)]
    for name, method, entries in (("a", "clip", steps_a[:2] + evals_a[:1] + steps_a[2:] + evals_a[1:]),
                                  ("b", "siglip", steps_b)):
        (tmp_path / name).mkdir()
        lines = "".join(json.dumps(e) + "\n" for e in entries)
        (tmp_path / name / "log.jsonl").write_text(lines + ('{"step": 9, "loss": 0.' if name == "a" else ""))
        (tmp_path / name / "config.json").write_text(json.dumps({"config": {"method": method, "model": "tiny-vit"}}))
    figures = captured_figure(monkeypatch)
    plot.plot([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "plot.png"))
    panels = lines_of(figures[0])
    labels = ["clip tiny-vit (a)", "siglip tiny-vit (b)"]
    blue, orange = to_hex("C0"), to_hex("C1")

    def line(i, entries, key, scale=1.0, style="-", suffix=""):
        return (labels[i] + suffix, style, [blue, orange][i], [e["step"] for e in entries],
                [scale * e[key] for e in entries])

    expected = {"loss": [line(0, steps_a, "loss"), line(1, steps_b, "loss")], "clip": [line(0, steps_a, "clip")],
                "logit_scale": [line(0, steps_a, "logit_scale")], "lr": [line(0, steps_a, "lr"), line(1, steps_b, "lr")],
                "samples_per_s": [line(0, steps_a, "samples_per_s"), line(1, steps_b, "samples_per_s")],
                "siglip": [line(1, steps_b, "siglip")], "logit_bias": [line(1, steps_b, "logit_bias")],
                "coco R@1 (%)": [line(0, evals_a[:2], "image->text R@1", 100, "-", " image->text R@1"),
                                 line(0, evals_a[:2], "text->image R@1", 100, "--", " text->image R@1")],
                "folder top-1 (%)": [line(0, evals_a[2:], "top1", 100)]}
    assert panels.keys() == expected.keys()
    for title, lines in expected.items():
        got = panels[title]
        assert [g[:3] for g in got] == [e[:3] for e in lines], title
        for g, e in zip(got, lines):
            assert g[3] == e[3] and g[4] == pytest.approx(e[4], rel=1e-12), title


def test_plot_reads_a_damaged_log_as_train_py_does_and_draws_any_name(tmp_path, monkeypatch):
    """A hostile round's logs: a byte-order mark, bytes that are not UTF-8 and a line of NUL bytes (what a killed run
    leaves: train.py drops such lines) are skipped with one warning, not a refusal or a traceback; negative values keep
    their axis; a run or dataset named with $...$ is drawn as text, not as a formula (which raised)."""
    rows = [dict(step=s, loss=1.0 / s, data_wait=-0.5 * s, max_memory_mb=-1.0) for s in (1, 2)]
    log = "\ufeff" + json.dumps(rows[0]) + "\n" + "\0" * 30 + "\n" + json.dumps(rows[1]) + "\n"
    folder = tmp_path / "run$1_$"
    folder.mkdir()
    (folder / "log.jsonl").write_bytes(log.encode() + b'\xff\xfe{"step": 3}\n{"step": true}\n' + json.dumps(dict(
        step=2, task="zeroshot_classification", dataset="my$x$.csv", top1=0.5)).encode() + b"\n")
    figures = captured_figure(monkeypatch)
    p = run("scripts/plot.py", folder, "--out", tmp_path / "p.png", cwd=tmp_path)
    assert p.stderr.count("warning:") == 1 and "skipped 3 line(s)" in p.stderr and (tmp_path / "p.png").exists()
    plot.plot([str(folder)], str(tmp_path / "q.png"))
    panels = lines_of(figures[0])
    assert [ys for *_, ys in panels["loss"]] == [[1.0, 0.5]] and r"my\$x\$.csv top-1 (%)" in panels
    wait, = [ax for ax in figures[0].axes if ax.get_title().startswith("data_wait")]
    assert wait.get_ylim()[0] < -1.0  # the points at -0.5 and -1.0 are in view


def test_plot_draws_any_folder_name_and_reads_no_config_that_is_not_a_file(tmp_path, monkeypatch):
    """A second round's cases: a folder name that is not UTF-8 (legal on Linux) or starts with _ (which matplotlib
    hides from a legend), a config.json that is a FIFO (whose open waits for a writer), --out a folder (plot.png in
    it)."""
    folder = os.fsdecode(os.fsencode(tmp_path) + b"/_bad\xffname")
    os.mkdir(folder)
    with open(os.path.join(folder, "log.jsonl"), "w") as f:
        f.writelines(json.dumps(dict(step=s, loss=1.0 / s)) + "\n" for s in (1, 2))
    os.mkfifo(os.path.join(folder, "config.json"))
    (tmp_path / "pngs").mkdir()
    run("scripts/plot.py", folder, "--out", tmp_path / "pngs", cwd=tmp_path)
    assert os.listdir(tmp_path / "pngs") == ["plot.png"]
    figures = captured_figure(monkeypatch)
    plot.plot([folder], str(tmp_path / "p.png"))
    (label, *_), = lines_of(figures[0])["loss"]
    assert label == " _bad?name", label


def test_plot_of_a_real_run_draws_its_log(runs, monkeypatch):
    """The quick start's run: its curves are its log.jsonl, its lr the schedule's (no warmup at 4 steps: cosine
    from 5e-4), each evaluation its top-1 in %."""
    figures = captured_figure(monkeypatch)
    plot.plot([str(runs / "clip")], str(runs / "real.png"))
    panels = lines_of(figures[0])
    log = read_log(runs / "clip")
    steps, evals = [e for e in log if "loss" in e], [e for e in log if "task" in e]
    assert [e["lr"] for e in steps] == pytest.approx([5e-4 * 0.5 * (1 + math.cos(math.pi * s / 4)) for s in range(4)])
    # the SigLIP run logged steps 2 and 3 at one sync: each with its lr
    assert [e["lr"] for e in read_log(runs / "siglip")] == pytest.approx([e["lr"] for e in steps])
    for key in ("loss", "clip", "logit_scale", "lr", "samples_per_s"):
        [(_, _, _, xs, ys)] = panels[key]
        assert xs == [1, 2, 3, 4] and ys == pytest.approx([e[key] for e in steps]), key
    for task in ("shape", "colour", "size", "count"):
        [(_, _, _, xs, ys)] = panels[f"synthetic/{task} top-1 (%)"]
        mine = [e for e in evals if e["dataset"] == f"synthetic/{task}"]
        assert xs == [2, 4] == [e["step"] for e in mine] and ys == pytest.approx([100 * e["top1"] for e in mine])
