"""SLIP: the NT-Xent loss against SimCLR's textbook formula, GlobalBatchNorm against nn.BatchNorm1d, the small-batch
warning, 2 gloo processes against one process (NT-Xent, the BatchNorm head, the whole method on a tiny model), the
transform, and a forward/backward on a tiny model."""

import pickle
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from model import create_model
from plumbing.distributed import GlobalBatchNorm
from plumbing.tokenizer import get_tokenizer
from ranks import assert_close_at_scale, run_distributed
from slip import SLIP, simclr_loss


def _views(N=10, E=8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, E, generator=g, dtype=dtype), torch.randn(N, E, generator=g, dtype=dtype)


def _batch(B=8, seed=0, resolution=64, context_length=24):  # the tiny configs' context
    """Random images and well-formed captions: SOT, ordinary ids, EOT, zero padding."""
    g = torch.Generator().manual_seed(seed)
    text = torch.zeros(B, context_length, dtype=torch.long)
    for i in range(B):
        n = int(torch.randint(1, context_length - 1, (), generator=g))
        text[i, 0], text[i, n + 1] = 49406, 49407
        text[i, 1:n + 1] = torch.randint(1, 49406, (n,), generator=g)
    views = {k: torch.randn(B, 3, resolution, resolution, generator=g) for k in ("image", "image_a", "image_b")}
    return {**views, "text": text}


# ---------------------------------------------------------------------------------------------------------------------
# NT-Xent


def textbook_nt_xent(z_a, z_b, tau):
    """SimCLR as written in its paper: 2N views, cosine similarities / τ, each view's positive is the other view of
    its image, the denominator runs over the 2N − 1 other views; mean over the 2N views."""
    z = F.normalize(torch.cat([z_a, z_b]).double(), dim=-1)  # (2N, E)
    N = z_a.shape[0]
    total = 0.0
    for i in range(2 * N):
        positive = (i + N) % (2 * N)
        others = [k for k in range(2 * N) if k != i]
        logits = torch.stack([z[i] @ z[k] / tau for k in others])
        total = total - torch.log_softmax(logits, 0)[others.index(positive)]
    return total / (2 * N)


def test_simclr_loss_matches_textbook_formula():
    z_a, z_b = _views()
    loss, accuracy = simclr_loss(z_a, z_b, temperature=0.1)
    torch.testing.assert_close(loss.double(), textbook_nt_xent(z_a, z_b, 0.1), rtol=1e-5, atol=1e-6)
    q_a, q_b = F.normalize(z_a, dim=-1), F.normalize(z_b, dim=-1)
    assert float(accuracy) == float(((q_a @ q_b.T).argmax(1) == torch.arange(10)).float().mean())


def test_simclr_logits_stay_float32_under_autocast():
    z_a, z_b = _views(N=16, E=32)
    full, _ = simclr_loss(z_a, z_b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast, _ = simclr_loss(z_a, z_b)
    torch.testing.assert_close(autocast, full)


def test_simclr_loss_identical_views_is_low():
    z_a, _ = _views(N=16, E=32)
    loss, accuracy = simclr_loss(z_a, z_a.clone(), temperature=0.1)
    assert float(accuracy) == 1.0 and float(loss) < 1.0


def _rank_simclr(rank, world, z_a, z_b):
    B = z_a.shape[0] // world
    a = z_a[rank * B:(rank + 1) * B].clone().requires_grad_(True)
    b = z_b[rank * B:(rank + 1) * B].clone().requires_grad_(True)
    loss, _ = simclr_loss(a, b, temperature=0.1)
    loss.backward()
    return loss.detach(), a.grad, b.grad


def test_simclr_distributed_equals_one_process():
    """Negatives come from the whole global batch: mean of the rank losses = the one-process loss, and the gradients
    (÷ W, as DDP averages) equal the one-process ones."""
    z_a, z_b = _views(N=12)
    a, b = z_a.clone().requires_grad_(True), z_b.clone().requires_grad_(True)
    full, _ = simclr_loss(a, b, temperature=0.1)
    full.backward()
    world = 2
    results = run_distributed(_rank_simclr, world, z_a, z_b)
    torch.testing.assert_close(torch.stack([r[0] for r in results]).mean(), full.detach())
    torch.testing.assert_close(torch.cat([r[1] for r in results]) / world, a.grad)
    torch.testing.assert_close(torch.cat([r[2] for r in results]) / world, b.grad)


# ---------------------------------------------------------------------------------------------------------------------
# BatchNorm over the global batch (distributed.GlobalBatchNorm, SLIP's head)


def test_global_batchnorm_equals_batchnorm1d_in_one_process():
    x = torch.randn(16, 6) * 3 + 1
    ours, reference = GlobalBatchNorm(6, min_batch=2), nn.BatchNorm1d(6)
    with torch.no_grad():
        for m in (ours, reference):
            m.weight.copy_(torch.linspace(0.5, 2, 6))
            m.bias.copy_(torch.linspace(-1, 1, 6))
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y1, y2 = ours(x1), reference(x2)
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
    (y1 * torch.arange(6.0)).sum().backward()
    (y2 * torch.arange(6.0)).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.weight.grad, reference.weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.bias.grad, reference.bias.grad)
    torch.testing.assert_close(ours.running_mean, reference.running_mean)
    torch.testing.assert_close(ours.running_var, reference.running_var)
    ours.eval(), reference.eval()  # eval: running statistics
    torch.testing.assert_close(ours(x), reference(x), rtol=1e-5, atol=1e-5)


def test_small_batch_warns_once():
    bn = GlobalBatchNorm(4, min_batch=32)
    with pytest.warns(UserWarning, match="SLIP issue #7"):
        bn(torch.randn(8, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bn(torch.randn(8, 4))  # once per layer, not every step
        GlobalBatchNorm(4, min_batch=32)(torch.randn(32, 4))  # at the threshold: silent
        GlobalBatchNorm(4, min_batch=32).eval()(torch.randn(2, 4))  # eval uses running statistics: silent
    with pytest.raises(ValueError):
        GlobalBatchNorm(4)(torch.randn(1, 4))


def _head(mlp_dim, batchnorm):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, mlp_dim), batchnorm(mlp_dim), nn.ReLU(), nn.Linear(mlp_dim, mlp_dim),
                         batchnorm(mlp_dim), nn.ReLU(), nn.Linear(mlp_dim, 4))


def _head_loss(head, h_a, h_b):
    loss, _ = simclr_loss(head(h_a), head(h_b), temperature=0.1)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in head.parameters()], [b.clone() for b in head.buffers()]


def _rank_head(rank, world, h_a, h_b):
    B = h_a.shape[0] // world
    local = slice(rank * B, (rank + 1) * B)
    return {name: _head_loss(_head(16, bn), h_a[local], h_b[local])
            for name, bn in (("global", GlobalBatchNorm), ("per_rank", nn.BatchNorm1d))}


def test_batchnorm_head_distributed_equals_one_process():
    """SimCLR head + NT-Xent with 2 ranks of 4: with GlobalBatchNorm, loss, gradients and running statistics are
    those of one process with 8; with per-rank nn.BatchNorm1d (what a plain BatchNorm gives under DDP) they differ."""
    g = torch.Generator().manual_seed(1)
    h_a, h_b = torch.randn(8, 6, generator=g), torch.randn(8, 6, generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # batch 8 < 32
        full_loss, full_grads, full_buffers = _head_loss(_head(16, GlobalBatchNorm), h_a, h_b)
        results = run_distributed(_rank_head, 2, h_a, h_b)
    losses = torch.stack([r["global"][0] for r in results])
    torch.testing.assert_close(losses.mean(), full_loss)
    for i, full_grad in enumerate(full_grads):  # DDP averages the ranks' gradients
        torch.testing.assert_close((results[0]["global"][1][i] + results[1]["global"][1][i]) / 2, full_grad,
                                   rtol=1e-4, atol=1e-6)
    for i, buffer in enumerate(full_buffers):  # every rank holds the global running statistics
        torch.testing.assert_close(results[0]["global"][2][i], buffer)
        torch.testing.assert_close(results[1]["global"][2][i], buffer)
    per_rank = torch.stack([r["per_rank"][0] for r in results]).mean()
    assert abs(float(per_rank) - float(full_loss)) > 1e-3


def test_convert_sync_batchnorm_leaves_the_heads_alone():
    """train.py may call nn.SyncBatchNorm.convert_sync_batchnorm on the whole method: the heads already synchronise
    (and torch's SyncBatchNorm would refuse CPU tensors under gloo), so they must come out unchanged."""
    method = nn.SyncBatchNorm.convert_sync_batchnorm(SLIP(create_model("tiny-vit"), mlp_dim=32))
    kinds = [type(m) for m in method.image_mlp]
    assert kinds.count(GlobalBatchNorm) == 2
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in method.image_mlp.modules())


# ---------------------------------------------------------------------------------------------------------------------
# The method


def test_transform_views_and_pickling():
    method = SLIP(create_model("tiny-vit"), mlp_dim=32)
    transform = pickle.loads(pickle.dumps(method.transform(get_tokenizer("clip"))))
    image = Image.new("RGB", (80, 60), (200, 40, 40))
    image.paste((20, 40, 220), (10, 10, 40, 40))
    torch.manual_seed(0)
    out = transform(image, "a red square")
    assert set(out) == {"image", "image_a", "image_b", "text"}
    for key in ("image", "image_a", "image_b"):
        assert out[key].shape == (3, 64, 64) and out[key].dtype == torch.uint8  # normalised on the device
    assert out["text"].shape == (method.model.context_length,) and out["text"].dtype == torch.long
    assert not torch.equal(out["image_a"], out["image_b"])  # two independent draws
    torch.manual_seed(0)
    again = transform(image, "a red square")
    assert all(torch.equal(out[k], again[k]) for k in out)  # torch's RNG only: train.py's per-sample seeding holds


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-rn"])
def test_forward_backward_tiny_model(name):
    torch.manual_seed(0)
    method = SLIP(create_model(name), mlp_dim=64)
    assert method.defaults["lr"] == 3e-3 and method.defaults["weight_decay"] == 0.1
    assert method.defaults["eps"] == 1e-8 and method.defaults["betas"] == (0.9, 0.98)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss, logs = method(_batch(B=8))
    assert set(logs) == {"clip", "ssl", "ssl_acc", "logit_scale"}
    assert torch.isfinite(loss) and all(torch.isfinite(v) and v.dim() == 0 for v in logs.values())
    torch.testing.assert_close(loss.detach(), logs["clip"] + logs["ssl"])
    loss.backward()
    for name, p in method.named_parameters():
        assert p.grad is not None, name  # DDP's find_unused_parameters=False holds
    for p in method.image_mlp.parameters():
        assert p.grad.abs().sum() > 0  # the head is trained
    assert method.model.visual.conv1.weight.grad.abs().sum() > 0
    method.post_step()


def _rank_slip(rank, world, state, batch):
    method = SLIP(create_model("tiny-vit"), mlp_dim=32)
    method.load_state_dict(state)
    B = batch["text"].shape[0] // world
    local = {k: v[rank * B:(rank + 1) * B] for k, v in batch.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss, logs = method(local)
    loss.backward()
    grads = {n: p.grad for n, p in method.named_parameters() if n in _CHECKED}
    return loss.detach(), logs, grads, method.image_mlp[1].running_var


_CHECKED = ("image_mlp.0.weight", "image_mlp.1.weight", "image_mlp.6.weight", "model.visual.conv1.weight",
            "model.visual.proj", "model.text_projection", "model.logit_scale")


def test_slip_distributed_equals_one_process():
    """The whole SLIP step on 2 ranks × 4 equals one process × 8: the CLIP and SimCLR losses gather the global batch
    and the head's BatchNorm normalises over it."""
    torch.manual_seed(0)
    state = SLIP(create_model("tiny-vit"), mlp_dim=32).state_dict()
    batch = _batch(B=8)
    full = _rank_slip(0, 1, state, batch)
    results = run_distributed(_rank_slip, 2, state, batch)
    torch.testing.assert_close(torch.stack([r[0] for r in results]).mean(), full[0], rtol=1e-5, atol=1e-6)
    for key in ("clip", "ssl"):
        torch.testing.assert_close(torch.stack([r[1][key] for r in results]).mean(), full[1][key], rtol=1e-5, atol=1e-6)
    for name in _CHECKED:
        assert_close_at_scale((results[0][2][name] + results[1][2][name]) / 2, full[2][name])
    torch.testing.assert_close(results[1][3], full[3])
