"""The GPU path: bf16 autocast, fused AdamW, NCCL, torch.compile, and train.py / eval_zeroshot.py on CUDA.

Every test here is marked `cuda`: on a machine without a GPU they are deselected (conftest.py), not skipped and not
counted. On a GPU machine `python -m pytest -m cuda tests` runs them alone; `bash tests/gpu.sh` runs them and then
the GPU benchmarks."""

import copy
import importlib
import json
import os
import subprocess
import sys

import pytest
import torch

import clip
import eval_zeroshot
import siglip
import train
from model import create_model
from plumbing import distributed
from scripts import bench

pytestmark = pytest.mark.cuda

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ["clip", "siglip", "slip", "declip", "filip"]
# small heads and queues, as tests/test_train.py
METHOD_KWARGS = {"clip": {}, "siglip": {}, "slip": dict(mlp_dim=64, min_bn_batch=4),
                 "declip": dict(queue_size=64, proj_dim=32, pred_dim=16, min_bn_batch=4), "filip": {}}
METHOD_ARGS = {m: ",".join(f"{k}={v}" for k, v in kw.items()) for m, kw in METHOD_KWARGS.items()}
TINY = ["--model", "tiny-vit", "--batch-size", "16", "--workers", "0", "--log-every", "1", "--device", "cuda"]


@pytest.fixture(autouse=True)
def tf32_as_train_py():
    # train.py and scripts/bench.py allow TF32 for float32 matmuls on CUDA (the losses' float32 logits): test with it
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


# --- one bf16 step on CUDA against the float32 step on the CPU ---------------------------------------------------------


def gradients(method, batch, device, autocast):
    """One forward and backward on `batch` moved to `device`: the loss, its logged components and every gradient as
    one float64 CPU vector (None where a parameter got none)."""
    method.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same in-loss randomness for every run
    with autocast:
        loss, logs = method({k: v.to(device) for k, v in batch.items()})
    loss.backward()
    grads = [None if p.grad is None else p.grad.detach().double().cpu().flatten() for p in method.parameters()]
    return loss.item(), {k: v.item() for k, v in logs.items()}, grads


def relative_error(grads, reference):
    assert [g is None for g in grads] == [r is None for r in reference], "a different set of parameters got gradients"
    g, r = torch.cat([x for x in grads if x is not None]), torch.cat([x for x in reference if x is not None])
    assert torch.isfinite(g).all()
    return ((g - r).norm() / r.norm()).item()


@pytest.mark.parametrize("name", METHODS)
def test_bf16_step_on_cuda_matches_the_float32_step(name):
    # the batch comes from the method's transform on the CPU, DeCLIP's MLM masks included: all runs mask the same tokens
    torch.manual_seed(0)
    method = importlib.import_module(name).Method(create_model("tiny-vit"), **METHOD_KWARGS[name]).train()
    batch = bench.synthetic_batch(method, 32, torch.device("cpu"), seed=0)
    # a fresh copy for each run: a forward changes state (DeCLIP's queue, BatchNorm's running statistics)
    cpu_method, gpu_method, cpu_bf16_method = method, copy.deepcopy(method).cuda(), copy.deepcopy(method)
    bf16 = dict(dtype=torch.bfloat16)

    loss, logs, reference = gradients(cpu_method, batch, "cpu", torch.autocast("cpu", enabled=False))
    cuda_loss, cuda_logs, cuda_grads = gradients(gpu_method, batch, "cuda", torch.autocast("cuda", **bf16))
    # bf16 keeps 8 significant bits (relative rounding 2^-9 = 0.2%): tolerances are a few of those on the loss, and
    # for the gradients, which pass through every layer, the error that bf16 arithmetic itself gives on this step,
    # measured with CPU bf16 autocast (the same matmuls in bf16), with a margin for the CUDA kernels' other order
    cpu_loss, _, cpu_bf16_grads = gradients(cpu_bf16_method, batch, "cpu", torch.autocast("cpu", **bf16))
    bf16_error = relative_error(cpu_bf16_grads, reference)
    error = relative_error(cuda_grads, reference)
    print(f"{name}: loss fp32 {loss:.5f}, cuda bf16 {cuda_loss:.5f}, cpu bf16 {cpu_loss:.5f}; gradient error cuda "
          f"{error:.2e}, cpu bf16 {bf16_error:.2e}")
    assert cuda_loss == pytest.approx(loss, rel=1e-2)
    for k in logs:
        assert cuda_logs[k] == pytest.approx(logs[k], rel=2e-2, abs=2e-2), k
    assert error < max(4 * bf16_error, 0.02)


def test_fused_adamw_equals_the_unfused_step():
    torch.manual_seed(0)
    params = [torch.randn(shape, device="cuda") for shape in [(256, 128), (128,), (3, 64, 8, 8), ()]]
    fused, plain = ([p.clone().requires_grad_() for p in params] for _ in range(2))
    groups = lambda ps: [dict(params=ps[:1] + ps[2:3], weight_decay=0.2), dict(params=ps[1:2] + ps[3:], weight_decay=0)]
    opt_fused = torch.optim.AdamW(groups(fused), lr=1e-3, betas=(0.9, 0.98), eps=1e-6, fused=True)
    opt_plain = torch.optim.AdamW(groups(plain), lr=1e-3, betas=(0.9, 0.98), eps=1e-6, foreach=False)
    for _ in range(5):
        for a, b in zip(fused, plain):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        opt_fused.step()
        opt_plain.step()
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# --- train.py and eval_zeroshot.py on CUDA ---------------------------------------------------------------------------


@pytest.fixture
def deterministic():
    # exact resume needs every kernel deterministic; some CUDA backward kernels (index_put with accumulation, ...)
    # use atomics unless asked not to. CUBLAS_WORKSPACE_CONFIG is set in conftest.py, before cuBLAS starts.
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("name", METHODS)
def test_train_20_steps_on_cuda_and_resume_exactly(name, tmp_path, killed_while_saving, deterministic):
    args = ["--method", name, "--method-args", METHOD_ARGS[name], "--steps", "20", "--save-every", "10", *TINY,
            "--eval-size", "0"]
    train.main([*args, "--out-dir", str(tmp_path / "full")])

    # killed while writing its last checkpoint: ckpt.pt holds step 10 (as tests/test_train.py's resume test)
    killed_while_saving([*args, "--out-dir", tmp_path / "resumed"], step=20)
    assert torch.load(tmp_path / "resumed" / "ckpt.pt", weights_only=True)["step"] == 10
    train.main([*args, "--out-dir", str(tmp_path / "resumed"), "--resume"])

    full, resumed = read_log(tmp_path / "full"), read_log(tmp_path / "resumed")
    assert [e["step"] for e in full] == list(range(1, 21))
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in full)
    assert [e["loss"] for e in resumed] == [e["loss"] for e in full]  # one line per step, steps 11-20 run again
    a = torch.load(tmp_path / "full" / "ckpt.pt", map_location="cpu", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "ckpt.pt", map_location="cpu", weights_only=True)
    for part in ("model", "method"):
        for k in a[part]:
            torch.testing.assert_close(b[part][k], a[part][k], rtol=0, atol=0, msg=f"{part}.{k}")


@pytest.mark.parametrize("name", ["clip", "slip"])
def test_accumulation_and_checkpointing_on_cuda_give_the_whole_batch_losses(name, tmp_path):
    # 4 micro-batches of 4 with activation checkpointing, in bf16: the losses of one batch of 16 (bf16 rounds the
    # micro-batches' matmuls differently: close, not bitwise)
    args = ["--method", name, "--method-args", METHOD_ARGS[name], "--steps", "4", *TINY, "--eval-size", "0"]
    train.main([*args, "--out-dir", str(tmp_path / "one")])
    train.main([*args, "--grad-accum", "4", "--grad-checkpointing", "--out-dir", str(tmp_path / "four")])
    one, four = read_log(tmp_path / "one"), read_log(tmp_path / "four")
    assert [e["loss"] for e in four] == pytest.approx([e["loss"] for e in one], rel=1e-2)


@pytest.mark.parametrize("name", ["clip", "filip"])
def test_compile_gives_the_eager_losses(name, tmp_path):
    args = ["--method", name, "--steps", "5", *TINY, "--eval-size", "0"]
    train.main([*args, "--out-dir", str(tmp_path / "eager")])
    train.main([*args, "--out-dir", str(tmp_path / "compiled"), "--compile"])
    eager, compiled = read_log(tmp_path / "eager"), read_log(tmp_path / "compiled")
    # the compiler fuses elementwise work and rounds bf16 intermediates at other places: close, not bitwise
    assert [e["loss"] for e in compiled] == pytest.approx([e["loss"] for e in eager], rel=1e-2)


def test_eval_zeroshot_on_cuda_agrees_with_the_cpu(tmp_path, capsys):
    train.main(["--steps", "30", *TINY, "--eval-size", "0", "--out-dir", str(tmp_path)])
    capsys.readouterr()
    results = {}
    for device in ("cuda", "cpu"):
        eval_zeroshot.main(["--checkpoint", str(tmp_path / "ckpt.pt"), "--workers", "0", "--device", device])
        lines = [line for line in capsys.readouterr().out.splitlines() if "top-1" in line]
        results[device] = {line.split(":")[0]: float(line.split("top-1 ")[1].split("%")[0]) for line in lines}
    assert set(results["cuda"]) == {"shape", "colour", "size", "count"}
    for task, top1 in results["cpu"].items():  # float32 on both; TF32 matmuls on CUDA may flip a near-tie or two
        assert results["cuda"][task] == pytest.approx(top1, abs=1.0), task


@pytest.mark.parametrize("name", ["clip", "filip"])
def test_torchrun_with_nccl_trains(name, tmp_path):
    # DDP on NCCL with one rank: process group, device_ids, find_unused_parameters (FILIP), the all-reduced logs
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                        os.path.join(ROOT, "train.py"), "--method", name, "--steps", "3", *TINY, "--eval-size", "0",
                        "--out-dir", str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "1 rank(s) on cuda:0" in p.stdout
    assert [e["step"] for e in read_log(tmp_path)] == [1, 2, 3]


def test_losses_and_all_gather_on_a_nccl_group_of_one():
    import socket

    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.manual_seed(0)
    image, text = (torch.randn(64, 32, device="cuda") for _ in range(2))
    scale, bias = torch.tensor(10.0, device="cuda"), torch.tensor(-10.0, device="cuda")
    alone = clip.clip_loss(image, text, scale), siglip.siglip_loss(image, text, scale, bias)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        x = torch.randn(8, 4, device="cuda", requires_grad=True)
        gathered = distributed.AllGather.apply(x)  # the collectives themselves, which a group of one otherwise skips
        (gathered * 3).sum().backward()
        torch.testing.assert_close(gathered, x)
        torch.testing.assert_close(x.grad, torch.full_like(x, 3.0))
        in_group = clip.clip_loss(image, text, scale), siglip.siglip_loss(image, text, scale, bias)
    finally:
        dist.destroy_process_group()
    for a, b in zip(in_group, alone):
        torch.testing.assert_close(a, b)


def test_gpu_decode_on_cuda_agrees_with_the_cpu(tmp_path):
    # --gpu-decode: nvJPEG's decodes and the CUDA crops (float bicubic, rounded) against libjpeg's and torchvision's
    # uint8 crop on the CPU, for the same boxes (tests/test_jpeg.py checks those); then train.py with it
    from test_jpeg import first_batch, photos, psnr, unnormalised
    paths = photos(tmp_path)
    on_gpu, _ = first_batch(paths, workers=2, device="cuda", decode_on_device=True)
    on_cpu, _ = first_batch(paths, workers=2, decode_on_device=True)
    assert on_gpu["image"].is_cuda and torch.equal(on_gpu["text"].cpu(), on_cpu["text"])
    values = [psnr(unnormalised(a.cpu()), unnormalised(b)) for a, b in zip(on_gpu["image"], on_cpu["image"])]
    print("PSNR of the CUDA path against the CPU's:", [round(v, 1) for v in values])
    assert min(values) > 35, values
    rows = [f"{os.path.basename(p)}\ta photo number {i}" for i, p in enumerate(paths * 3)]
    (tmp_path / "pairs.tsv").write_text("filepath\ttitle\n" + "\n".join(rows) + "\n")
    train.main(["--data", str(tmp_path / "pairs.tsv"), "--gpu-decode", "--steps", "3", *TINY, "--batch-size", "6",
                "--workers", "2", "--eval-size", "0", "--out-dir", str(tmp_path / "out")])
    assert [e["step"] for e in read_log(tmp_path / "out") if "loss" in e] == [1, 2, 3]


def test_micro_batches_copied_on_a_side_stream_equal_the_plain_copy():
    """data.on_device on CUDA: pinned uint8 micro-batches, each copied and normalised on a side stream while the
    previous one is in use, arrive as to_device makes them one at a time, and the accumulated step is the step on
    micro-batches moved beforehand (the K > 1 path of train.forward_backward, in float32)."""
    import data
    torch.manual_seed(0)
    method = importlib.import_module("clip").Method(create_model("tiny-vit")).cuda()
    host = bench.synthetic_batch(method, 16, torch.device("cpu"), seed=0)  # normalised floats: back to uint8
    host["image"] = torch.randint(0, 256, host["image"].shape, dtype=torch.uint8).pin_memory()
    micro = [{k: v[i * 4:(i + 1) * 4].pin_memory() for k, v in host.items()} for i in range(4)]
    moved = list(data.on_device(micro, torch.device("cuda")))
    for got, batch in zip(moved, micro):
        expected = data.to_device(batch, torch.device("cuda"))
        assert all(torch.equal(got[k], expected[k]) for k in expected)
    one = copy.deepcopy(method)
    loss = train.forward_backward(method, method, micro, seed=0)[0]
    reference = train.forward_backward(one, one, [data.to_device(b, torch.device("cuda")) for b in micro], seed=0)[0]
    torch.cuda.synchronize()
    assert torch.equal(loss, reference)
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(method.parameters(), one.parameters()) if p.grad is not None)
