"""scripts/bench.py, scripts/bench_data.py, scripts/bench_loss.py: every method's training step runs end to end, the
side-by-side and variant modes, the input pipeline's and the losses' memory benchmarks work, and the FLOP counter
matches a hand count, torch's own counter, and open_clip's published profile."""

import os
import re
import subprocess
import sys

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import cli
from model import CONFIGS, CLIPModel
from scripts import bench, bench_data

# small heads and queues so that SLIP/DeCLIP run fast on a CPU (as tests/test_train.py)
METHOD_ARGS = {"clip": "", "siglip": "", "slip": "mlp_dim=64,min_bn_batch=4",
               "declip": "queue_size=64,proj_dim=32,pred_dim=16,min_bn_batch=4", "filip": "",
               "defilip": "queue_size=64,proj_dim=32,pred_dim=16,min_bn_batch=4"}
BENCH_LINE = re.compile(r"^bench (\w+) tiny-vit \| cpu fp32 1 threads \| batch 8 \| ([\d.]+) samples/s \| "
                        r"step [\d.]+ ms median, 2 steps \| peak RSS [\d.]+ GiB \| "
                        r"([\d.]+) GFLOP/sample fwd, [\d.e-]+ TFLOP/s \| python scripts/bench.py .*$", re.M)


@pytest.fixture(autouse=True)
def one_thread():
    # two OpenMP threads on two cores crawl as soon as anything else runs (each parallel op waits for a time slice)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("method", list(METHOD_ARGS))
def test_every_method_steps(method, capsys):
    bench.main(["--method", method, "--method-args", METHOD_ARGS[method], "--batch-size", "8", "--warmup", "1",
                "--steps", "2"])
    match = BENCH_LINE.search(capsys.readouterr().out)
    assert match and match.group(1) == method, capsys.readouterr().out
    assert float(match.group(2)) > 0
    # encoder passes per sample: SLIP 3 images + 1 caption, DeCLIP 2 + 2, the others 1 + 1
    image, text = bench.forward_flops(CONFIGS["tiny-vit"])
    views = {"slip": (3, 1), "declip": (2, 2), "defilip": (2, 2)}.get(method, (1, 1))
    assert float(match.group(3)) == pytest.approx((views[0] * image + views[1] * text) / 1e9, abs=0.006)


def test_side_by_side_with_open_clip(capsys):
    ratio = bench.main(["--vs-open-clip", "--batch-size", "8", "--warmup", "1", "--steps", "2", "--rounds", "2"])
    out = capsys.readouterr().out
    assert ratio > 0
    # the same weights load strictly into open_clip's model and give the same loss
    losses = re.search(r"loss ours ([\d.]+), open_clip ([\d.]+)", out)
    assert losses and float(losses.group(1)) == pytest.approx(float(losses.group(2)), abs=1e-4), out
    assert re.search(r"^bench clip tiny-vit vs open_clip \| .* \| ours [\d.]+ samples/s .* open_clip [\d.]+ "
                     r"samples/s .* \| ours/open_clip [\d.]+ \(rounds", out, re.M), out
    with pytest.raises(SystemExit, match="compares CLIP only"):
        bench.main(["--vs-open-clip", "--method", "siglip"])


def test_variants_side_by_side():
    """--variants: one line per variant with its samples/s, its time against the first variant's (per round) and its
    activation memory; checkpointing keeps less, and so does accumulation (one micro-batch's activations at a
    time). In a subprocess: the CPU memory measurement changes malloc's settings for the rest of the process."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    args = ["--batch-size", "32", "--grad-accum", "4", "--patch-dropout", "0.5", "--warmup", "1", "--steps", "2",
            "--rounds", "2", "--variants", "plain,accum,ckpt,ckpt+accum,pd"]
    p = cli.run("scripts/bench.py", *args, cwd=root, timeout=300)
    assert p.returncode == 0, p.stderr
    memory = {}
    for name, detail in [("plain", ""), ("accum", " = 4 × 8"), ("ckpt", ""), ("ckpt+accum", " = 4 × 8"),
                         ("pd", ", patch dropout 0.5")]:
        line = re.search(rf"^variant {re.escape(name)} \| clip tiny-vit \| cpu fp32 1 threads \| batch 32{re.escape(detail)} \| "
                         rf"[\d.]+ samples/s, \d+ ms/sample(, time [\d.]+× plain's \(rounds [\d.]+-[\d.]+\))? \| "
                         rf"activations ([\d.]+) MiB, [\d.]+ MiB/sample.* \| python scripts/bench.py .*$", p.stdout,
                         re.M)
        assert line and bool(line.group(1)) == (name != "plain"), p.stdout
        memory[name] = float(line.group(2))
    assert memory["ckpt"] < memory["plain"] and memory["accum"] < memory["plain"], memory
    with pytest.raises(SystemExit, match="tiny-rn is a ResNet"):
        bench.main(["--model", "tiny-rn", "--patch-dropout", "0.5", "--variants", "plain,pd"])


def test_data_pipeline(tmp_path, capsys):
    folder = str(tmp_path / "jpegs")
    bench_data.main(["--make-jpegs", "6", folder])
    bench_data.main(["--data-dir", folder, "--workers", "1"])
    out = capsys.readouterr().out
    R = CONFIGS["tiny-vit"]["image_resolution"]
    assert "wrote 6 500x375 JPEGs" in out
    for name in ("PIL", "torchvision.io", "decoded by the crop"):
        assert re.search(rf"^data clip {R}px {name} \| 6 JPEGs × 2 passes \| 1 worker [\d.]+ images/s", out, re.M), out
    with pytest.raises(SystemExit, match="no .jpg files"):
        bench_data.main(["--data-dir", str(tmp_path)])
    bench_data.main(["--vs-open-clip", "--images", "2", "--rounds", "1", "--gpu-rate", "1000"])  # against open_clip
    out = capsys.readouterr().out
    for size in ("640x480", "256x256"):
        line = re.search(rf"^data-vs-open_clip {size} -> {R}px \| open_clip (\d+) .* ours (\d+) .*ours/open_clip "
                         rf"([\d.]+)x", out, re.M)
        assert line and abs(int(line.group(2)) / int(line.group(1)) - float(line.group(3))) < 0.05, out
        assert re.search(rf"^decode-only {size} \| decode 1/1 [\d.]+ ms .* decode 1/8 [\d.]+ ms$", out, re.M), out
        cores = re.search(rf"^cores-per-gpu {size} at 1,000 samples/s \| open_clip ([\d.]+) .* ours ([\d.]+) \|", out,
                          re.M)
        assert cores and abs(float(cores.group(2)) - 1000 / int(line.group(2))) < 0.2, out


# a config of our own, so that the hand count below does not depend on model.CONFIGS
TINY = dict(embed_dim=96, image_resolution=32, vision_layers=2, vision_width=128, vision_patch_size=8,
            context_length=16, vocab_size=49408, transformer_width=64, transformer_heads=1, transformer_layers=3)
TINY_RN = dict(TINY, vision_layers=[1, 1, 1, 1], vision_width=32, vision_patch_size=None, image_resolution=64)


def test_flops_by_hand():
    # image: (32/8)² = 16 patches + the class token = 17 tokens of width 128, 2 layers, projection to D = 96;
    # text: 16 tokens of width 64, 3 layers. Per layer 12·L·w² (projections, MLP) + 2·L²·w (scores, weighted sum).
    patch_embed = 16 * (3 * 8 * 8) * 128
    vit = 2 * (12 * 17 * 128 ** 2 + 2 * 17 ** 2 * 128)
    text = 3 * (12 * 16 * 64 ** 2 + 2 * 16 ** 2 * 64)
    assert (patch_embed + vit + 128 * 96, text + 64 * 96) == (7_238_144, 2_463_744)
    assert bench.forward_flops(TINY) == (2 * 7_238_144, 2 * 2_463_744)  # 2 FLOPs per multiply-add
    # ResNet, width 32 at 64 px: stem 3×3 convs 3→16→16→32 at 32², then one bottleneck per stage (planes 32, 64,
    # 128, 256; 4× expansion) at 16², 8², 4², 2² (stride-2 stages pool before conv3 and the shortcut conv), and the
    # attention pool over 2² + 1 tokens of 1024 channels: q for the mean token only, k and v for all 5
    stem = 32 ** 2 * 9 * (3 * 16 + 16 * 16 + 16 * 32)
    stages = 0
    for planes, inplanes, h, out in [(32, 32, 16, 16), (64, 128, 16, 8), (128, 256, 8, 4), (256, 512, 4, 2)]:
        stages += h * h * (inplanes * planes + 9 * planes * planes) + out * out * (planes * 4 * planes
                                                                                   + inplanes * 4 * planes)
    pool = 1024 ** 2 + 2 * 5 * 1024 ** 2 + 2 * 5 * 1024 + 1024 * 96
    assert bench.forward_flops(TINY_RN)[0] == 2 * (stem + stages + pool)


@pytest.mark.parametrize("config", [TINY, TINY_RN, CONFIGS["tiny-vit"], CONFIGS["tiny-rn"]])
def test_flops_match_torch_flop_counter(config):
    # torch's counter (2 FLOPs per multiply-add) sees every matmul and convolution of the actual forward; the math
    # attention backend makes the attention products visible to it
    model = CLIPModel(**config)
    R, L = model.image_resolution, model.context_length
    text = torch.zeros(2, L, dtype=torch.long)
    text[:, 0], text[:, 5] = 49406, 49407
    counted = []
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        for run in (lambda: model.encode_image(torch.randn(2, 3, R, R)), lambda: model.encode_text(text)):
            with FlopCounterMode(display=False) as counter:
                run()
            counted.append(counter.get_total_flops() // 2)  # per sample
    assert bench.forward_flops(config) == tuple(counted)


# open_clip's docs/model_profile.csv: forward GFLOPs per sample (image, text), 2 FLOPs per multiply-add
PUBLISHED = {"ViT-B-32": (8.82, 5.96), "ViT-B-16": (35.13, 5.96), "RN50": (12.22, 5.96)}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_flops_match_open_clip_profile(name):
    image, text = bench.forward_flops(CONFIGS[name])
    published = PUBLISHED[name]
    assert (image + text) / 1e9 == pytest.approx(sum(published), rel=0.05)
    assert text / 1e9 == pytest.approx(published[1], rel=0.002)
    if name.startswith("ViT"):
        assert image / 1e9 == pytest.approx(published[0], rel=0.002)
    else:
        # OpenAI's (and open_clip's) attention pool runs all 50 tokens as queries and keeps the first output; ours
        # runs only that one query. Adding the 49 other queries' q/c_proj projections and scores gives the profile.
        C, D, L = 2048, 1024, 50
        all_queries = (L - 1) * (C * C + C * D) + 2 * (L * L - L) * C
        assert (image + 2 * all_queries) / 1e9 == pytest.approx(published[0], rel=0.002)


def test_loss_memory_on_two_gloo_ranks():
    """scripts/bench_loss.py under torchrun: one line per loss, our distributed loss, open_clip's and the all-gather N×N
    version each measured, and all three giving the same global loss (the memory figures are the benchmark's
    output, not asserted here)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.join(root, "scripts/bench_loss.py"), "--batch-size", "64", "--embed-dim", "16"],
                       env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    for name in ("clip", "siglip"):
        line = re.search(rf"^loss-memory {name} \| cpu gloo, 2 ranks \| N 64 = 2 × 32, D 16 \| .*$", p.stdout, re.M)
        assert line, p.stdout
        mib = re.findall(r"(ours|open_clip|all-gather N×N) ([\d.]+) MiB", line.group(0))
        assert [v for v, _ in mib] == ["ours", "open_clip", "all-gather N×N"], line.group(0)
        losses = [float(x) for x in re.findall(r"(?:ours|open_clip|all-gather N×N) ([\d.]+)(?:,| \|)",
                                               line.group(0).split("global loss")[1])]
        assert len(losses) == 3 and max(losses) - min(losses) < 1e-5, line.group(0)
        assert line.group(0).endswith("torchrun --nproc_per_node=2 scripts/bench_loss.py --batch-size 64 "
                                      "--embed-dim 16")
