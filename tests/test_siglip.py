"""SigLIP's pairwise sigmoid loss: against open_clip's SigLipLoss and a direct double loop in one process, and the
neighbour-exchange version on 2, 3 and 4 gloo processes against one process holding the whole global batch."""

import math

import pytest
import torch
import torch.nn.functional as F

from ranks import run_distributed
from siglip import NeighbourExchange, ShiftRight, SigLIP, siglip_loss


def _inputs(N=12, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(N, D, generator=g, dtype=torch.float64)
    text = torch.randn(N, D, generator=g, dtype=torch.float64)
    # a temperature and bias away from the init, so that positives and negatives both matter
    return image, text, torch.tensor(math.log(5.0), dtype=torch.float64), torch.tensor(-2.0, dtype=torch.float64)


def _leaves(*tensors):
    return [t.clone().requires_grad_(True) for t in tensors]


def test_matches_open_clip_value_and_gradients():
    import open_clip.loss as open_clip_loss
    image, text, t, b = _inputs()
    ours = _leaves(image, text, t, b)
    loss = siglip_loss(ours[0], ours[1], ours[2].exp(), ours[3])
    loss.backward()

    # open_clip takes normalised features, the exponentiated scale and the bias
    theirs = _leaves(image, text, t, b)
    reference = open_clip_loss.SigLipLoss()(F.normalize(theirs[0], dim=-1), F.normalize(theirs[1], dim=-1),
                                            theirs[2].exp(), theirs[3])
    reference.backward()
    torch.testing.assert_close(loss.double(), reference.double())
    for a, r in zip(ours, theirs):
        torch.testing.assert_close(a.grad.double(), r.grad.double(), rtol=1e-5, atol=1e-6)


def test_matches_direct_formula():
    image, text, t, b = _inputs(N=6)
    loss = siglip_loss(image, text, t.exp(), b)
    x, y = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    total = 0.0
    for i in range(6):
        for j in range(6):
            z = 1.0 if i == j else -1.0
            logit = t.exp() * (x[i] @ y[j]) + b
            total += -math.log(1 / (1 + math.exp(-z * float(logit))))
    assert abs(float(loss) - total / 6) < 1e-5


def test_initial_loss_is_small_with_the_paper_init():
    # s = 10, b = −10: every logit is ≈ −10 ± 10, so the N² − N negatives cost almost nothing at the start
    image, text, _, _ = _inputs(N=32)
    loss = siglip_loss(image, text, torch.tensor(10.0), torch.tensor(-10.0))
    assert float(loss) < 12.0  # the positives' −log σ(−10 + 10·cos) ≈ 10 each dominate, divided by B


def test_float32_under_autocast():
    # autocast runs matmuls in bf16 even on float32 inputs; the loss switches it off for its logits, which would
    # otherwise be off by ~0.05 at s = 10
    image, text, t, b = (x.float() for x in _inputs(N=32, D=64))
    exact = siglip_loss(image, text, t.exp(), b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = siglip_loss(image, text, t.exp(), b)
    assert autocast.dtype == torch.float32
    torch.testing.assert_close(autocast, exact)


def _exchanges(rank, world):
    """The two autograd Functions on their own, with different tensors sent left and right and a different weight
    on every rank's received values, so that a gradient sent back the wrong way shows."""
    to_left = torch.full((2,), float(rank), requires_grad=True)
    to_right = torch.full((2,), 100.0 + rank, requires_grad=True)
    from_left, from_right = NeighbourExchange.apply((rank - 1) % world, (rank + 1) % world, to_left, to_right)
    shifted_in = torch.full((2,), 200.0 + rank, requires_grad=True)
    shifted = ShiftRight.apply((rank - 1) % world, (rank + 1) % world, shifted_in)
    ((1 + rank) * from_left.sum() + (10 + rank) * from_right.sum() + (20 + rank) * shifted.sum()).backward()
    return from_left.detach(), from_right.detach(), shifted.detach(), to_left.grad, to_right.grad, shifted_in.grad


def _distributed_loss(rank, world, image, text, t, b):
    B = image.shape[0] // world
    local = slice(rank * B, (rank + 1) * B)
    image, text, t = _leaves(image[local], text[local], t)
    b = b.clone().requires_grad_(True)
    loss = siglip_loss(image, text, t.exp(), b)
    loss.backward()
    return (loss.detach(), image.grad, text.grad, t.grad, b.grad), _exchanges(rank, world)


# 2: one one-way round; 3: one bidirectional round; 4: a bidirectional and a one-way round
@pytest.mark.parametrize("world", [2, 3, 4])
def test_distributed_equals_single_process(world):
    image, text, t, b = _inputs(N=4 * world)
    single = _leaves(image, text, t, b)
    global_loss = siglip_loss(single[0], single[1], single[2].exp(), single[3])
    global_loss.backward()

    results, exchanges = zip(*run_distributed(_distributed_loss, world, image, text, t, b))
    losses, image_grads, text_grads, t_grads, b_grads = zip(*results)
    # the global loss is the mean of the rank losses (each divides by the local B, the paper by the global N)
    torch.testing.assert_close(torch.stack(losses).mean(), global_loss.detach())
    # each rank's features receive the gradient of every rank's loss (the texts through the exchange's backward);
    # DDP averages over ranks, so the single-process gradient is that sum divided by W
    torch.testing.assert_close(torch.cat(image_grads) / world, single[0].grad)
    torch.testing.assert_close(torch.cat(text_grads) / world, single[1].grad)
    # the temperature and bias are replicated parameters: DDP averages their per-rank gradients
    torch.testing.assert_close(torch.stack(t_grads).mean(), single[2].grad)
    torch.testing.assert_close(torch.stack(b_grads).mean(), single[3].grad)

    # the exchanges: values arrive from the right neighbours and gradients go back to where the values came from.
    # (In the loss above, the first bidirectional round sends the same tensor both ways, which would hide a swap.)
    for rank, (from_left, from_right, shifted, grad_to_left, grad_to_right, grad_shifted) in enumerate(exchanges):
        left, right = (rank - 1) % world, (rank + 1) % world
        assert from_left.tolist() == [100.0 + left] * 2 and from_right.tolist() == [float(right)] * 2
        assert shifted.tolist() == [200.0 + left] * 2
        # what we sent left was weighted by the left rank's from_right weight, and so on
        assert grad_to_left.tolist() == [10.0 + left] * 2 and grad_to_right.tolist() == [1.0 + right] * 2
        assert grad_shifted.tolist() == [20.0 + right] * 2


def test_method_forward_and_defaults():
    import model as model_module
    torch.manual_seed(0)
    model = model_module.create_model("tiny-vit")
    with torch.no_grad():  # what train.py does for a fresh model
        model.logit_scale.fill_(math.log(SigLIP.defaults["logit_scale_init"]))
    method = SigLIP(model)
    assert method.logit_bias.item() == -10.0 and abs(model.logit_scale.exp().item() - 10.0) < 1e-5
    R, L = model.image_resolution, model.context_length
    text = torch.zeros(4, L, dtype=torch.long)
    text[:, 0], text[:, 1:4] = 49406, torch.randint(1, 1000, (4, 3))
    text[:, 4] = 49407
    loss, logs = method({"image": torch.randn(4, 3, R, R), "text": text})
    assert set(logs) == {"siglip", "logit_scale", "logit_bias"} and torch.isfinite(loss)
    loss.backward()
    assert method.logit_bias.grad is not None and model.logit_scale.grad is not None
    assert all(p.grad is not None for p in method.parameters())  # DDP's find_unused_parameters=False is right
    assert "logit_bias" in method.state_dict()


@pytest.mark.parametrize("name", ["ViT-B-32", "RN50"])
def test_weight_decay_on_kernels_only(name):
    """big_vision decays only kernels: the dense and conv weights and the projections, not the embedding tables,
    gains, biases, the temperature or the bias b."""
    import model as model_module
    with torch.device("meta"):
        method = SigLIP(model_module.create_model(name))
    names = {id(p): n.removeprefix("model.") for n, p in method.named_parameters()}
    decay, no_decay = ({names[id(p)] for p in g["params"]} for g in SigLIP.param_groups(method, 0.1))
    layers = (torch.nn.Linear, torch.nn.Conv2d)
    kernels = {f"{n}.weight" for n, m in method.model.named_modules() if isinstance(m, layers)}
    kernels |= {n for n in names.values() if n.endswith("in_proj_weight")} | {"text_projection"}
    kernels |= {"visual.proj"} if name == "ViT-B-32" else set()
    assert decay == kernels
    assert {"token_embedding.weight", "positional_embedding", "logit_scale", "logit_bias"} <= no_decay
