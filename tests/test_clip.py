"""CLIP's loss: parity with open_clip, a direct loop computation, and the distributed version vs one process."""

import math

import pytest
import torch
import torch.nn.functional as F

from clip import clip_loss
from ranks import run_distributed


def features(N=12, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, D, generator=g, dtype=torch.float64), torch.randn(N, D, generator=g, dtype=torch.float64)


def slow_clip_loss(image, text, s):
    """The paper's formula written out row by row."""
    image = [x / x.norm() for x in image]
    text = [t / t.norm() for t in text]
    N = len(image)
    total = 0.0
    for i in range(N):
        logits_i = torch.stack([s * image[i] @ text[j] for j in range(N)])
        logits_t = torch.stack([s * text[i] @ image[j] for j in range(N)])
        total = total - torch.log_softmax(logits_i, 0)[i] - torch.log_softmax(logits_t, 0)[i]
    return total / (2 * N)


def test_matches_direct_computation():
    image, text = features()
    s = torch.tensor(1 / 0.07, dtype=torch.float64)
    torch.testing.assert_close(clip_loss(image, text, s).double(), slow_clip_loss(image, text, s))


def test_matches_open_clip_loss_and_gradients():
    import open_clip.loss as open_clip_loss
    image, text = features()
    image.requires_grad_(True), text.requires_grad_(True)
    s = torch.tensor(math.exp(2.3), dtype=torch.float64, requires_grad=True)
    ours = clip_loss(image, text, s)
    g_ours = torch.autograd.grad(ours, (image, text, s))
    # open_clip's ClipLoss takes normalised features and the exponentiated scale
    theirs = open_clip_loss.ClipLoss()(F.normalize(image, dim=-1), F.normalize(text, dim=-1), s)
    g_theirs = torch.autograd.grad(theirs, (image, text, s))
    torch.testing.assert_close(ours.double(), theirs)
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a.double(), b)


def _rank_loss(rank, world, image, text, s):
    B = image.shape[0] // world
    local_image = image[rank * B:(rank + 1) * B].clone().requires_grad_(True)
    local_text = text[rank * B:(rank + 1) * B].clone().requires_grad_(True)
    scale = s.clone().requires_grad_(True)
    loss = clip_loss(local_image, local_text, scale)
    loss.backward()
    return loss.detach(), local_image.grad, local_text.grad, scale.grad


@pytest.mark.parametrize("world", [2, 3])
def test_distributed_equals_one_process(world):
    """Each rank: B local rows against N gathered ones. Mean of rank losses = the global loss; the gradient every
    rank receives for its own features, averaged over ranks as DDP does (÷W), equals the global one."""
    image, text = features(N=12)
    s = torch.tensor(1 / 0.07, dtype=torch.float64)
    full_image, full_text, full_s = image.clone().requires_grad_(True), text.clone().requires_grad_(True), s.clone().requires_grad_(True)
    full = clip_loss(full_image, full_text, full_s)
    full.backward()
    results = run_distributed(_rank_loss, world, image, text, s)
    losses = torch.stack([r[0] for r in results])
    torch.testing.assert_close(losses.mean(), full.detach())
    torch.testing.assert_close(torch.cat([r[1] for r in results]) / world, full_image.grad)
    torch.testing.assert_close(torch.cat([r[2] for r in results]) / world, full_text.grad)
    torch.testing.assert_close(torch.stack([r[3] for r in results]).mean(), full_s.grad)


# --- optimiser settings: weight-decay groups and the per-encoder Adam settings ---------------------------------------


def open_clip_excluded(name, p):
    # open_clip_train/main.py (not installed here), verbatim: the parameters trained without weight decay
    return p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name


def decayed_names(Method, module, weight_decay=0.2):
    """Names of the module's parameters in each of Method.param_groups' groups, by weight decay."""
    names = {id(p): n.removeprefix("model.") for n, p in module.named_parameters()}
    groups = Method.param_groups(module, weight_decay)
    assert [g["weight_decay"] for g in groups] == [weight_decay, 0.0]
    return {names[id(p)] for p in groups[0]["params"]}, {names[id(p)] for p in groups[1]["params"]}


@pytest.mark.parametrize("name", ["ViT-B-32", "RN50"])
def test_weight_decay_groups_are_open_clips(name):
    import open_clip

    from clip import CLIP
    from model import create_model
    with torch.device("meta"):  # names and shapes only
        ours = CLIP(create_model(name))
        theirs = open_clip.create_model(name, pretrained=None, device="meta")
    decay, no_decay = decayed_names(CLIP, ours)
    their_params = dict(theirs.named_parameters())
    assert decay | no_decay == set(their_params)  # same names: both are in OpenAI's layout
    assert decay == {n for n, p in their_params.items() if not open_clip_excluded(n, p)}
    # the CLIP paper decays "all weights that are not gains or biases": the embeddings too
    assert {"token_embedding.weight", "positional_embedding", "visual.conv1.weight"} <= decay
    assert {"logit_scale", "ln_final.weight", "ln_final.bias"} <= no_decay
    if name == "ViT-B-32":
        assert {"visual.positional_embedding", "visual.proj"} <= decay and "visual.class_embedding" in no_decay
    else:
        assert "visual.attnpool.positional_embedding" in decay and "visual.bn1.weight" in no_decay


def test_frozen_parameters_are_in_no_group():
    from clip import CLIP
    from model import create_model
    method = CLIP(create_model("tiny-vit"))
    method.model.visual.conv1.weight.requires_grad_(False)
    decay, no_decay = decayed_names(CLIP, method)
    assert "visual.conv1.weight" not in decay | no_decay and "visual.proj" in decay


@pytest.mark.parametrize("name,betas,eps", [("ViT-B-32", (0.9, 0.98), 1e-6), ("tiny-vit", (0.9, 0.98), 1e-6),
                                            ("RN50", (0.9, 0.999), 1e-8), ("tiny-rn", (0.9, 0.999), 1e-8)])
def test_adam_settings_follow_the_encoder(name, betas, eps):
    # the CLIP paper's table and open_clip_train's get_default_params: β2 0.999 and eps 1e-8 for ResNets
    import importlib

    from model import CONFIGS
    hp = importlib.import_module("clip").Method.optimizer_defaults(CONFIGS[name])
    assert (hp["betas"], hp["eps"], hp["lr"], hp["weight_decay"]) == (betas, eps, 5e-4, 0.2)
    assert "resnet" not in hp
    # the other methods' references give one setting for every encoder: their defaults, ResNet or not
    for method in ("siglip", "slip", "declip", "filip"):
        Method = importlib.import_module(method).Method
        expected = {k: v for k, v in Method.defaults.items() if k != "resnet"}
        assert Method.optimizer_defaults(CONFIGS[name]) == expected


# --- the learning rate at the user's batch ---------------------------------------------------------------------------


@pytest.mark.parametrize("method,batch,lr", [
    ("clip", 128, 5e-4), ("clip", 32768, 5e-4), ("filip", 128, 5e-4),  # at or below the floor: never scaled
    ("slip", 128, 3e-3 * math.sqrt(128 / 4096)), ("slip", 1024, 1.5e-3), ("slip", 4096, 3e-3), ("slip", 65536, 3e-3),
    ("declip", 128, 5e-4), ("declip", 2048, 1e-3 * math.sqrt(0.5)), ("declip", 4096, 1e-3), ("defilip", 128, 5e-4),
    ("siglip", 128, 5e-4), ("siglip", 8192, 5e-4), ("siglip", 16384, 1e-3 * math.sqrt(0.5)), ("siglip", 32768, 1e-3),
])
def test_learning_rate_rule(method, batch, lr):
    import importlib

    Method = importlib.import_module(method).Method
    got, source = Method.learning_rate(batch)
    assert got == pytest.approx(lr, rel=1e-12)
    assert Method.__name__ in source


def test_train_prints_the_effective_lr_and_its_source(tmp_path, capsys):
    import train

    common = ["--model", "tiny-vit", "--steps", "1", "--workers", "0", "--eval-size", "0", "--method", "slip",
              "--method-args", "mlp_dim=16,min_bn_batch=4", "--batch-size", "8"]
    train.main([*common, "--out-dir", str(tmp_path / "a")])
    assert "lr 0.0005 (SLIP's 0.003 at batch 4096 × √(8/4096) = 0.00013, raised to 0.0005)" in capsys.readouterr().out
    train.main([*common, "--lr", "2e-4", "--out-dir", str(tmp_path / "b")])
    assert "lr 0.0002 (--lr)" in capsys.readouterr().out
