"""Every method's loss and every component it logs, against the paper's formula written out in this file, on the
method's own features: the method built as train.py builds it (train.build_method, only the sizes of SLIP's head and
DeCLIP's queue and heads made small), a batch made by the method's own transform, method.features(batch) given to
both method.loss and the formula. Values and the gradients with respect to the features and to every parameter of
the loss (temperatures, bias, heads) must agree. The formulas (methods.md, /work/shared/reference):

    CLIP     ½[CE(s·Î·T̂ᵀ, y) + CE(s·T̂·Îᵀ, y)], s = exp(t)
    SigLIP   −Σ_ij log σ(z_ij·(s·Î_i·T̂_j + b)) / B, z = 2I − 1
    SLIP     CLIP + 1.0·NT-Xent(τ = 0.1) of the head's outputs on the two views (2N views, each against the 2N − 1
             others, positive the other view of its image)
    DeCLIP   0.4·mean of the 4 CLIP losses {x_a, x_b} × {t, t_eda} + 0.2·SimSiam (−½[cos(p_a, sg z_b) + cos(p_b,
             sg z_a)]) + 0.2·MLM (the mean CE over the batch's chosen tokens) + 0.2·NN (mean over {x_a, x_b} ×
             {NN(t), NN(t_eda)} of CE(s·x̂·NNᵀ, y), the neighbours from the queue as it was before the step)
    FILIP    ½[CE(s·S^I, y) + CE(s·S^T, y)], S^I = mean over patches of the max over the caption's words, S^T = mean
             over the caption's words of the max over the patches; padding (after EOT) in neither
    DeFILIP  DeCLIP + 0.2·FILIP(x_a's patches, the masked caption's tokens) with its own temperature

The heads are written out with F.linear, F.batch_norm (batch statistics, eps 1e-5) and F.relu from their weights, so a
change inside the heads' modules shows too."""

import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import train
from model import CONFIGS
from plumbing.distributed import GlobalBatchNorm
from scripts import bench

EOT = 49407
SMALL = {"clip": {}, "siglip": {}, "filip": {}, "slip": {"mlp_dim": 64},
         "declip": {"queue_size": 64, "proj_dim": 32, "pred_dim": 16},
         "defilip": {"queue_size": 64, "proj_dim": 32, "pred_dim": 16}}
CONFIG = dict(CONFIGS["tiny-vit"], image_resolution=32, embed_dim=96, transformer_width=64)  # 3 widths, 16 patches


def build(name):
    torch.manual_seed(0)
    return train.build_method(name, CONFIG, SMALL[name], "cpu")


def batch_of(method, seed=0):
    return bench.synthetic_batch(method, 8, torch.device("cpu"), seed=seed)


def run_loss(method, features):
    """method.loss on leaves made of the features -> (loss, logs, leaves)"""
    leaves = {k: v.detach().clone().requires_grad_(v.is_floating_point()) for k, v in features.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # BatchNorm heads over a small batch
        loss, logs = method.loss(leaves)
    return loss, logs, leaves


def assert_same_loss_and_gradients(method, loss, expected, leaves):
    """loss == expected, and their gradients with respect to the floating features and to every parameter"""
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    inputs = [v for v in leaves.values() if v.requires_grad]
    names, params = zip(*[(n, p) for n, p in method.named_parameters() if p.requires_grad])
    got = torch.autograd.grad(loss, [*inputs, *params], allow_unused=True, retain_graph=True)
    want = torch.autograd.grad(expected, [*inputs, *params], allow_unused=True, retain_graph=True)
    labels = [f"feature {k}" for k, v in leaves.items() if v.requires_grad] + [f"parameter {n}" for n in names]
    # a bias right before a BatchNorm has a gradient of 0 but for rounding: each gradient is compared at least at
    # 1e-6 of the largest entry of all
    floor = 1e-6 * max(w.abs().max().item() for w in want if w is not None)
    for label, g, w in zip(labels, got, want):
        g = torch.zeros_like(w) if g is None and w is not None else g
        w = torch.zeros_like(g) if w is None and g is not None else w
        if g is not None:
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4 * w.abs().max().item() + floor, msg=label)
    assert any(g is not None and g.abs().sum() > 0 for g in got[len(inputs):])  # the loss's parameters learn


# --- the formulas ----------------------------------------------------------------------------------------------------


def clip_formula(image, text, s):
    image, text = F.normalize(image.float(), dim=-1), F.normalize(text.float(), dim=-1)
    logits = s * image @ text.T
    y = torch.arange(len(image))
    return (F.cross_entropy(logits, y) + F.cross_entropy(logits.T, y)) / 2


def siglip_formula(image, text, s, b):
    image, text = F.normalize(image.float(), dim=-1), F.normalize(text.float(), dim=-1)
    z = 2 * torch.eye(len(image)) - 1
    return -F.logsigmoid(z * (s * image @ text.T + b)).sum() / len(image)


def head(sequential, x):
    """An MLP head of Linear, GlobalBatchNorm and ReLU layers, written out from its parameters"""
    for m in sequential:
        if isinstance(m, nn.Linear):
            x = F.linear(x, m.weight, m.bias)
        elif isinstance(m, GlobalBatchNorm):
            x = F.batch_norm(x, None, None, m.weight, m.bias, training=True, eps=1e-5)
        elif isinstance(m, nn.ReLU):
            x = F.relu(x)
        else:
            raise AssertionError(f"unexpected layer {m}")
    return x


def nt_xent(z_a, z_b, tau):
    """SimCLR's NT-Xent: the 2N views, each against the 2N − 1 others, its positive the other view of its image"""
    z = F.normalize(torch.cat([z_a, z_b]).float(), dim=-1)  # (2N, E)
    N = len(z_a)
    logits = (z @ z.T / tau).masked_fill(torch.eye(2 * N, dtype=torch.bool), -math.inf)
    return F.cross_entropy(logits, torch.cat([torch.arange(N, 2 * N), torch.arange(N)]))


def simsiam_formula(p_a, p_b, z_a, z_b):
    return -(F.cosine_similarity(p_a, z_b.detach(), dim=-1).mean() + F.cosine_similarity(p_b, z_a.detach(), dim=-1)
             .mean()) / 2


def token_wise(image_tokens, text_tokens, valid, s):
    """FILIP: the two B×B token-wise similarity matrices, then CLIP's symmetric cross-entropy"""
    x, y = F.normalize(image_tokens.float(), dim=-1), F.normalize(text_tokens.float(), dim=-1)
    B = len(x)
    s_i = torch.zeros(B, B)  # image i, caption j
    s_t = torch.zeros(B, B)  # caption i, image j
    for i in range(B):
        for j in range(B):
            words_j = y[j][valid[j]]  # (Lj, d)
            s_i[i, j] = (x[i] @ words_j.T).max(dim=1).values.mean()
            s_t[i, j] = (y[i][valid[i]] @ x[j].T).max(dim=1).values.mean()
    labels = torch.arange(B)
    return (F.cross_entropy(s * s_i, labels) + F.cross_entropy(s * s_t, labels)) / 2


def caption_tokens(ids):
    """True at SOT..EOT: found by EOT's id (49407), not by argmax"""
    eot = (ids == EOT).float().argmax(dim=1, keepdim=True)  # the first EOT
    return torch.arange(ids.shape[1])[None] <= eot


# --- the methods -----------------------------------------------------------------------------------------------------


def test_clip_loss_is_the_symmetric_cross_entropy():
    method = build("clip")
    batch = batch_of(method)
    features = method.features(batch)
    model = method.model
    with torch.no_grad():  # the features: the class token after ln_post @ proj, the EOT token after ln_final @ proj
        torch.testing.assert_close(features["image"], model.visual.features(batch["image"])[0] @ model.visual.proj)
        eot = batch["text"].argmax(dim=1)
        tokens = model.text_features(batch["text"])[1]
        torch.testing.assert_close(features["text"], tokens[torch.arange(8), eot] @ model.text_projection)
    loss, logs, f = run_loss(method, features)
    s = method.model.logit_scale.exp()
    expected = clip_formula(f["image"], f["text"], s)
    assert set(logs) == {"clip", "logit_scale"}
    assert logs["clip"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert logs["logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-5)
    assert_same_loss_and_gradients(method, loss, expected, f)


def test_siglip_loss_is_the_pairwise_sigmoid():
    method = build("siglip")
    features = method.features(batch_of(method))
    loss, logs, f = run_loss(method, features)
    s, b = method.model.logit_scale.exp(), method.logit_bias
    expected = siglip_formula(f["image"], f["text"], s, b)
    assert set(logs) == {"siglip", "logit_scale", "logit_bias"}
    assert logs["siglip"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert (logs["logit_scale"].item(), logs["logit_bias"].item()) == (pytest.approx(10.0, rel=1e-5), -10.0)
    assert_same_loss_and_gradients(method, loss, expected, f)
    # away from the init too (positives and negatives both count): s = 5, b = −2
    with torch.no_grad():
        method.model.logit_scale.fill_(math.log(5.0))
        method.logit_bias.fill_(-2.0)
    loss, _, f = run_loss(method, features)
    assert_same_loss_and_gradients(method, loss, siglip_formula(f["image"], f["text"], method.model.logit_scale.exp(),
                                                                method.logit_bias), f)


def test_slip_loss_is_clip_plus_nt_xent_at_tau_0_1():
    method = build("slip")
    batch = batch_of(method)
    features = method.features(batch)
    model = method.model
    with torch.no_grad():  # the features: CLIP's embeddings, and the ViT's class token (before the projection)
        torch.testing.assert_close(features["image"], model.visual.features(batch["image"])[0] @ model.visual.proj)
        for view in ("image_a", "image_b"):
            torch.testing.assert_close(features[view], model.visual.features(batch[view])[0])
        torch.testing.assert_close(features["text"], model.encode_text(batch["text"]))
    loss, logs, f = run_loss(method, features)
    clip = clip_formula(f["image"], f["text"], model.logit_scale.exp())
    z_a, z_b = head(method.image_mlp, f["image_a"]), head(method.image_mlp, f["image_b"])
    ssl = nt_xent(z_a, z_b, 0.1)
    expected = clip + 1.0 * ssl
    assert set(logs) == {"clip", "ssl", "ssl_acc", "logit_scale"}
    assert logs["clip"].item() == pytest.approx(clip.item(), rel=1e-5)
    assert logs["ssl"].item() == pytest.approx(ssl.item(), rel=1e-5)
    q_a, q_b = F.normalize(z_a, dim=-1), F.normalize(z_b, dim=-1)
    accuracy = ((q_a @ q_b.T).argmax(dim=1) == torch.arange(8)).float().mean()
    assert logs["ssl_acc"].item() == pytest.approx(accuracy.item())
    assert_same_loss_and_gradients(method, loss, expected, f)
    assert 0 < accuracy < 1  # the batch tells a right accuracy from a wrong one


def declip_terms(method, f, queue, filled):
    """DeCLIP's four terms written out: (L_MVS, L_SimSiam, L_MLM, L_NN) on the features f, the queue before the
    step holding `filled` entries"""
    s = method.model.logit_scale.exp()  # below 100 at the init: no clamp
    mvs = sum(clip_formula(x, t, s) for x in (f["image_a"], f["image_b"]) for t in (f["text"], f["text_eda"])) / 4
    z_a, z_b = head(method.projector, f["image_a"]), head(method.projector, f["image_b"])
    p_a, p_b = head(method.predictor, z_a), head(method.predictor, z_b)
    simsiam = simsiam_formula(p_a, p_b, z_a, z_b)
    mlm = f["mlm_sum"].sum() / f["mlm_count"].sum()
    entries = queue[:filled]
    nn_terms = []
    for x in (f["image_a"], f["image_b"]):
        for t in (f["text"], f["text_eda"]):
            t = F.normalize(t.detach(), dim=-1)
            neighbours = entries[(t @ entries.T).argmax(dim=1)]  # (B, D) top-1 cosine
            nn_terms.append(F.cross_entropy(s * F.normalize(x, dim=-1) @ neighbours.T, torch.arange(len(x))))
    return mvs, simsiam, mlm, sum(nn_terms) / 4


@pytest.mark.parametrize("name", ["declip", "defilip"])
def test_declip_loss_is_its_four_weighted_terms(name):
    method = build(name)
    method.enqueue(F.normalize(torch.randn(16, 96), dim=-1))  # as a first step would: the NN term is on
    queue, filled = method.queue.clone(), method.queue_filled.item()
    assert filled == 16
    batch = batch_of(method)
    features = method.features(batch)
    model = method.model
    with torch.no_grad():  # the features: both image views, the masked caption (with [MASK]) and the EDA caption
        torch.testing.assert_close(features["image_a"], model.visual.features(batch["image_a"])[0] @ model.visual.proj)
        torch.testing.assert_close(features["image_b"], model.visual.features(batch["image_b"])[0] @ model.visual.proj)
        torch.testing.assert_close(features["text"], method.masked_text_features(batch["text"])[0] @ model.text_projection)
        torch.testing.assert_close(features["text_eda"], model.encode_text(batch["text_eda"]))
        assert not torch.equal(batch["text"], batch["text_eda"]) and (batch["text"] == -1).any()  # [MASK] is -1
    # the MLM term's per-caption sums: the head's cross-entropy at the chosen tokens of the masked caption's tokens
    with torch.no_grad():
        tokens = method.masked_text_features(batch["text"])[1]
        chosen = batch["mlm_labels"] != -100
        assert chosen.sum() >= 2 and torch.equal(features["mlm_count"], chosen.sum(dim=1))
        sums = torch.stack([F.cross_entropy(method.mlm_head(tokens[b][chosen[b]]), batch["mlm_labels"][b][chosen[b]],
                                            reduction="sum") for b in range(8)])
        torch.testing.assert_close(features["mlm_sum"], sums, rtol=1e-5, atol=1e-5)
    loss, logs, f = run_loss(method, features)
    mvs, simsiam, mlm, nn_term = declip_terms(method, f, queue, filled)
    expected = 0.4 * mvs + 0.2 * simsiam + 0.2 * mlm + 0.2 * nn_term
    for key, value in (("clip", mvs), ("simsiam", simsiam), ("mlm", mlm), ("nn", nn_term)):
        assert logs[key].item() == pytest.approx(value.item(), rel=1e-5), key
    assert logs["logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-5)
    assert logs["queue"].item() == pytest.approx(32 / 64)  # 2 steps × 2 captions × 8, of 64 slots
    assert min(mvs.item(), mlm.item(), nn_term.item()) > 0 and -1 < simsiam.item() < 1
    if name == "defilip":
        s = method.logit_scale_filip.exp()
        valid = caption_tokens(batch["text"])
        torch.testing.assert_close(f["text_mask"], valid)
        filip = token_wise(f["image_tokens"], f["text_tokens"], valid, s)
        assert logs["filip"].item() == pytest.approx(filip.item(), rel=1e-5)
        assert logs["logit_scale_filip"].item() == pytest.approx(1 / 0.07, rel=1e-5)
        expected = expected + 0.2 * filip
    assert_same_loss_and_gradients(method, loss, expected, f)
    # the queue after the step: the normalised captions, then EDA captions, of this batch, after the 16 before
    torch.testing.assert_close(method.queue[16:32], F.normalize(torch.cat([features["text"], features["text_eda"]]),
                                                                dim=-1).detach())
    assert method.queue_filled.item() == 32 and method.queue_ptr.item() == 32


def test_filip_loss_is_token_wise():
    method = build("filip")
    batch = batch_of(method)
    features = method.features(batch)
    model = method.model
    valid = caption_tokens(batch["text"])
    assert not valid.all() and valid.sum(1).min() >= 3  # captions of different lengths, padding in the batch
    with torch.no_grad():  # the features: the heads on the ViT's patch tokens after ln_post, and on the text tokens
        torch.testing.assert_close(features["image_tokens"], method.image_head(model.visual.features(batch["image"])[1]))
        torch.testing.assert_close(features["text_tokens"], method.text_head(model.text_features(batch["text"])[1]))
    assert features["image_tokens"].shape == (8, 16, 256) and torch.equal(features["text_mask"], valid)
    loss, logs, f = run_loss(method, features)
    expected = token_wise(f["image_tokens"], f["text_tokens"], valid, model.logit_scale.exp())
    assert set(logs) == {"filip", "logit_scale"} and logs["filip"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert_same_loss_and_gradients(method, loss, expected, f)


def test_the_losses_defaults_are_the_papers():
    """The loss functions' own defaults, used by whoever calls them without the method (scripts/bench_loss.py):
    SimCLR's τ 0.1, DeCLIP's clamp of s at 100, BERT's 15% masking, FILIP without token selection."""
    import declip
    import filip
    import slip

    g = torch.Generator().manual_seed(0)
    z_a, z_b = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    torch.testing.assert_close(slip.simclr_loss(z_a, z_b)[0], nt_xent(z_a, z_b, 0.1))
    assert declip.clamped_exp(torch.tensor(5.0)).item() == 100.0
    assert declip.clamped_exp(torch.tensor(4.0)).item() == pytest.approx(math.exp(4.0))
    text = torch.zeros(2000, 12, dtype=torch.long)
    text[:, 0], text[:, 1:10], text[:, 10] = 49406, 320, EOT
    torch.manual_seed(0)
    _, labels = declip.mask_tokens(text)
    assert abs((labels != -100).float().sum().item() / (2000 * 9) - 0.15) < 0.01
    image, tokens = torch.randn(3, 4, 5, generator=g), torch.randn(3, 6, 5, generator=g)
    mask = torch.arange(6)[None] <= torch.tensor([[2], [5], [3]])
    torch.testing.assert_close(filip.filip_loss(image, tokens, mask, torch.tensor(10.0)),
                               token_wise(image, tokens, mask, torch.tensor(10.0)))
