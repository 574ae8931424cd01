"""DeFILIP: DeCLIP's loss plus 0.2 × FILIP's token-wise loss on views DeCLIP already encodes, against a direct
computation from the encoders; its temperature, weight decay, and 2 gloo processes against one process."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from declip import DeCLIP
from defilip import DeFILIP
from filip import filip_loss, text_padding_mask
from model import create_model
from ranks import assert_close_at_scale, run_distributed
from test_declip import _batch

SMALL = dict(queue_size=64, proj_dim=32, pred_dim=16, min_bn_batch=4)


def _method(name="tiny-vit", **kwargs):
    return DeFILIP(create_model(name), **{**SMALL, **kwargs})


def _forward(method, batch):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # small-batch BatchNorm
        return method(batch)


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-rn"])
def test_loss_is_declip_plus_filip_on_the_first_view_and_masked_caption(name):
    torch.manual_seed(0)
    method = _method(name)
    declip = DeCLIP(method.model, **SMALL)
    declip.load_state_dict(method.state_dict(), strict=False)  # the same model, heads and queue
    with torch.no_grad():
        method.logit_scale_filip.fill_(math.log(20.0))
    batch = _batch(B=8, mlm_probability=0.0)  # no masking: the masked caption is the caption itself
    loss, logs = _forward(method, batch)
    assert set(logs) == {"clip", "simsiam", "mlm", "nn", "logit_scale", "queue", "filip", "logit_scale_filip"}
    declip_loss, _ = _forward(declip, batch)
    torch.testing.assert_close(loss, declip_loss + 0.2 * logs["filip"])
    model = method.model
    with torch.no_grad():  # FILIP's loss written from the encoders: image_a's patch tokens, the caption's tokens
        direct = filip_loss(method.image_head(model.image_features(batch["image_a"])[1]),
                            method.text_head(model.text_features(batch["text"])[1]), text_padding_mask(batch["text"]),
                            torch.tensor(20.0))
    torch.testing.assert_close(logs["filip"], direct)
    assert logs["logit_scale_filip"].item() == pytest.approx(20.0)

    method.zero_grad()
    loss.backward()
    for n, p in method.named_parameters():
        assert p.grad is not None, n  # DDP's find_unused_parameters=False holds
    for p in (*method.image_head.parameters(), *method.text_head.parameters(), method.logit_scale_filip):
        assert p.grad.abs().sum() > 0


def test_temperatures_clamped_and_not_decayed():
    method = _method()
    with torch.no_grad():
        method.model.logit_scale.fill_(7.0)
        method.logit_scale_filip.fill_(2.0)
    method.post_step()
    assert method.model.logit_scale.item() == 6.0 and method.logit_scale_filip.item() == 3.0
    no_decay = {id(p) for p in DeFILIP.param_groups(method, 0.1)[1]["params"]}
    assert id(method.logit_scale_filip) in no_decay and id(method.image_head.weight) not in no_decay


def _rank(rank, world, state, batch):
    method = _method()
    method.load_state_dict(state)
    B = batch["text"].shape[0] // world
    loss, logs = _forward(method, {k: v[rank * B:(rank + 1) * B] for k, v in batch.items()})
    loss.backward()
    checked = ("image_head.weight", "text_head.weight", "logit_scale_filip", "model.visual.conv1.weight")
    return loss.detach(), logs["filip"], {n: p.grad for n, p in method.named_parameters() if n in checked}


def test_two_processes_equal_one():
    torch.manual_seed(0)
    method = _method()
    method.enqueue(F.normalize(torch.randn(20, 128), dim=-1))
    state, batch = method.state_dict(), _batch(B=8)
    full = _rank(0, 1, state, batch)
    results = run_distributed(_rank, 2, state, batch)
    torch.testing.assert_close(torch.stack([r[0] for r in results]).mean(), full[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.stack([r[1] for r in results]).mean(), full[1], rtol=1e-5, atol=1e-6)
    for name, grad in full[2].items():
        assert_close_at_scale((results[0][2][name] + results[1][2][name]) / 2, grad)
