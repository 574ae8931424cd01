"""
Plot training runs from their OUT/log.jsonl, several overlaid on one PNG: the loss and each component the method logs,
the learning rate, the logit scale, samples/s beside where the time and memory went (data_wait, max_memory_mb), and
every evaluation that --eval-every logged, each dataset in panels of its own (docs/see.md).

    python scripts/plot.py out                                  # -> out/plot.png
    python scripts/plot.py out_clip out_siglip --out side.png   # two runs side by side, labelled by method and model

Needs matplotlib (pip install matplotlib); draws without a display (the Agg backend).
"""
import argparse
import contextlib
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project's root, from any folder

from plumbing.runlog import fail

COLS, PANEL = 3, (4.0, 3.0)  # panels per row, each panel's size in inches (at 100 dpi: 400 × 300 pixels)
NOT_CURVES = ("step", "skipped")  # keys of a step's line that are not plotted
METRICS = {"zeroshot_classification": ("top1",), "retrieval": ("image->text R@1", "text->image R@1")}
TITLES = {"data_wait": "data_wait (share of the time)", "max_memory_mb": "max_memory_mb (peak MiB)"}  # from 0
HUGE = 1e300  # beyond it, a panel's range overflows matplotlib's arithmetic: such points are left out, as NaN ones are


def read_run(out_dir):
    """OUT -> (label, training lines, evaluation lines). The label is the run's method and model (OUT/config.json,
    which train.py writes), else the folder's name."""
    path = os.path.join(out_dir, "log.jsonl")
    if os.path.exists(path) and not os.path.isfile(path):  # a folder, or a device or pipe (/dev/zero: never ends)
        fail(f"{path} is not a file; is {out_dir} the --out-dir of a train.py run?")
    try:
        with open(path, encoding="utf-8-sig", errors="replace") as f:  # as train.py reads it: a BOM is no damage
            lines = f.readlines()
    except OSError as e:
        fail(f"cannot read {path}: {(e.strerror or str(e)).lower()}; is {out_dir} the --out-dir of a train.py run?")
    entries, damaged = [], []
    for i, line in enumerate(lines):
        if not line.endswith("\n"):  # a run writing right now: its last line may be unfinished
            continue
        try:
            entry = json.loads(line)
            if isinstance(entry["step"], bool) or not isinstance(entry["step"], (int, float)):
                raise TypeError  # (JSON's true is no step)
            entries.append(entry)
        except (ValueError, TypeError, KeyError):  # NUL bytes where a killed run's blocks were: train.py drops them too
            damaged.append(f"line {i + 1} {line[:40]!r}")
    if damaged:
        print(f"warning: {path}: skipped {len(damaged)} line(s) that are not log entries of train.py (a JSON object "
              f"with a step), the first {damaged[0]}", file=sys.stderr, flush=True)
    if not entries:
        fail(f"{path} holds no step yet")
    label, config_path = os.path.basename(os.path.normpath(out_dir)), os.path.join(out_dir, "config.json")
    if os.path.isfile(config_path):  # (a FIFO would wait, /dev/zero never end)
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError), open(config_path) as f:
            config = json.load(f)["config"]
            label = f"{config['method']} {config['model']} ({label})"
    evaluations = [e for e in entries if isinstance(e.get("task"), str) and isinstance(e.get("dataset"), str)]
    return label, [e for e in entries if "loss" in e], evaluations  # a damaged evaluation line: the rest is plotted


def shown(name):
    """A run's or dataset's name as matplotlib draws it as it is: $...$ is no formula, a name that is not UTF-8 (a
    folder's bytes) no crash, and a leading _ no hidden legend entry."""
    name = name.encode("utf-8", "replace").decode().replace("$", r"\$")
    return " " + name if name.startswith("_") else name


def curves(runs):
    """-> {panel title: {(run index, metric): (steps, values)}}: the training curves, then the evaluations, each in the
    order first met. A retrieval panel holds both directions' R@1, a classification panel the top-1 (in %)."""
    panels, evaluations_panels = {}, {}

    def add(title, key, step, value, into=panels):
        xs, ys = into.setdefault(title, {}).setdefault(key, ([], []))
        xs.append(step), ys.append(value)

    for i, (_, steps, evaluations) in enumerate(runs):
        for entry in steps:
            for key, value in entry.items():
                if key not in NOT_CURVES and isinstance(value, (int, float)) and not abs(entry["step"]) > HUGE:
                    add(key, (i, key), entry["step"], math.nan if abs(value) > HUGE else value)
        for entry in evaluations:
            for metric in METRICS.get(entry["task"], ()):
                if isinstance(entry.get(metric), (int, float)) and max(abs(entry[metric]), abs(entry["step"])) <= HUGE:
                    title = f"{entry['dataset']} {'R@1' if entry['task'] == 'retrieval' else 'top-1'} (%)"
                    add(title, (i, metric), entry["step"], 100 * entry[metric], evaluations_panels)
    return {**panels, **evaluations_panels}


def plot(out_dirs, out):
    try:
        import matplotlib
    except ImportError:
        fail("scripts/plot.py needs matplotlib: pip install matplotlib")
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    runs = [read_run(d) for d in out_dirs]
    panels = curves(runs)
    if not panels:
        fail(f"{', '.join(out_dirs)}: the log holds steps but no number to plot (no loss, lr or evaluation)")
    rows = math.ceil(len(panels) / COLS)
    fig, axes = plt.subplots(rows, COLS, figsize=(PANEL[0] * COLS, PANEL[1] * rows), dpi=100, squeeze=False)
    for ax, (title, lines) in zip(axes.flat, panels.items()):
        for (i, metric), (xs, ys) in lines.items():
            dashed = metric == "text->image R@1"  # a retrieval panel's second line
            label = runs[i][0] + (f" {metric}" if "R@1" in metric else "")
            ax.plot(xs, ys, "--" if dashed else "-", color=f"C{i % 10}", linewidth=1, markersize=3,
                    marker="o" if len(xs) < 20 else None, label=shown(label))
        ax.set_title(shown(TITLES.get(title, title)), fontsize=10)
        if title in TITLES and not any(y < 0 for _, ys in lines.values() for y in ys):
            ax.set_ylim(bottom=0)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        if title == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
        ax.grid(alpha=0.3)
        if len(lines) > 1 or title == "loss":
            ax.legend(fontsize=7)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    try:
        fig.savefig(out)
    except (OSError, ValueError) as e:  # ValueError: a format matplotlib does not write (--out x.foo)
        fail(f"could not write {out}: {(getattr(e, 'strerror', None) or str(e)).lower()}")
    plt.close(fig)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dirs", nargs="+", metavar="OUT_DIR", help="train.py --out-dir folders")
    p.add_argument("--out", help="the PNG to write (default: OUT_DIR/plot.png for one run, plot.png for several)")
    args = p.parse_args(argv)
    out = args.out or (os.path.join(args.out_dirs[0], "plot.png") if len(args.out_dirs) == 1 else "plot.png")
    if os.path.isdir(out):
        out = os.path.join(out, "plot.png")
    elif not (os.path.splitext(out)[1] or os.path.exists(out)):  # as savefig names it
        out += ".png"
    print(plot(args.out_dirs, out))


if __name__ == "__main__":
    main()
