"""model.py against open_clip (an independent implementation of the same OpenAI layout), plus the API contract,
activation checkpointing and patch dropout."""
import copy
import logging
import math

import open_clip  # the independent reference (requirements-dev.txt)
import pytest
import torch

import model as M
from plumbing import weights

logging.getLogger().setLevel(logging.ERROR)  # open_clip warns "no pretrained weights loaded" on every model

OPENAI_NAMES = ["RN50", "RN101", "RN50x4", "ViT-B-32", "ViT-B-16", "ViT-L-14"]


def shapes(module):
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def perturbed(state_dict, seed=0):
    """A copy with noise on every float tensor, so zero-initialised weights (bn3, biases) and BatchNorm statistics
    take part in the comparison; running_var stays positive."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in state_dict.items():
        if v.is_floating_point() and k != "logit_scale":
            v = v + 0.05 * torch.randn(v.shape, generator=g)
            if k.endswith("running_var"):
                v = v.abs() + 0.5
        out[k] = v
    return out


def random_text(batch, length, vocab, seed=0):
    """Ids in [1, vocab-2], one EOT (= vocab-1, the largest id) at a random position, zeros after it."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(1, vocab - 1, (batch, length), generator=g)
    eot = torch.randint(1, length, (batch,), generator=g)
    eot[0] = length - 1  # one caption fills the whole context
    pos = torch.arange(length)
    text = torch.where(pos > eot[:, None], 0, text)
    text[torch.arange(batch), eot] = vocab - 1
    return text


def assert_same_outputs(ours, theirs, batch=3, seed=0):
    ours.eval(), theirs.eval()
    g = torch.Generator().manual_seed(seed)
    R = ours.image_resolution
    images = torch.randn(batch, 3, R, R, generator=g)
    text = random_text(batch, ours.context_length, ours.vocab_size, seed)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_image(images), theirs.encode_image(images), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ours.encode_text(text), theirs.encode_text(text), rtol=1e-4, atol=1e-4)


# small custom architectures, built by open_clip with random weights: one ViT, one ModifiedResNet
SMALL = {
    "vit": dict(embed_dim=96, quick_gelu=True,
                vision_cfg=dict(layers=2, width=128, patch_size=8, image_size=32),
                text_cfg=dict(context_length=16, vocab_size=1000, width=128, heads=2, layers=2)),
    "rn": dict(embed_dim=96, quick_gelu=True,
               vision_cfg=dict(layers=(1, 2, 1, 1), width=16, patch_size=None, image_size=64),
               text_cfg=dict(context_length=16, vocab_size=1000, width=128, heads=2, layers=3)),
}


def open_clip_small(kind, seed=0):
    torch.manual_seed(seed)
    cfg = SMALL[kind]
    oc = open_clip.model.CLIP(cfg["embed_dim"], open_clip.model.CLIPVisionCfg(**cfg["vision_cfg"]),
                              open_clip.model.CLIPTextCfg(**cfg["text_cfg"]), quick_gelu=True)
    oc.load_state_dict(perturbed(oc.state_dict(), seed))
    return oc


# -----------------------------------------------------------------------------
# parity with open_clip

@pytest.mark.parametrize("kind", ["vit", "rn"])
def test_build_model_from_open_clip_matches_outputs(kind):
    oc = open_clip_small(kind)
    ours = weights.build_model(oc.state_dict())
    assert shapes(ours) == shapes(oc)
    assert not ours.training  # build_model returns an eval-mode model, as OpenAI's loader does
    assert_same_outputs(ours, oc)


@pytest.mark.parametrize("kind", ["vit", "rn"])
def test_open_clip_loads_our_state_dict(kind):
    # the other direction: our state dict through open_clip's own OpenAI-checkpoint loader
    oc = open_clip_small(kind)
    ours = weights.build_model(oc.state_dict())
    ours.load_state_dict(perturbed(ours.state_dict(), seed=1))
    sd = ours.state_dict()
    theirs = open_clip.model.build_model_from_openai_state_dict(dict(sd), quick_gelu=True, cast_dtype=None)
    # that loader rounds the weights to float16 (OpenAI's checkpoints are half); reload them in full precision
    theirs.float().load_state_dict(sd)
    assert_same_outputs(ours, theirs, seed=1)


@pytest.mark.parametrize("name", ["RN50", "ViT-B-32"])
def test_full_size_models_match_open_clip(name):
    torch.manual_seed(0)
    oc = open_clip.create_model(f"{name}-quickgelu", pretrained=None)
    oc.load_state_dict(perturbed(oc.state_dict()))
    ours = weights.build_model(oc.state_dict())
    assert dict(weights.infer_config(oc.state_dict()), quick_gelu=True) == M.CONFIGS[name]
    assert_same_outputs(ours, oc, batch=2)


@pytest.mark.parametrize("name", OPENAI_NAMES)
def test_keys_and_shapes_equal_open_clip(name):
    with torch.device("meta"):  # shapes only: nothing is allocated
        ours = M.create_model(name)
        oc = open_clip.create_model(f"{name}-quickgelu", pretrained=None, device="meta")
    assert list(ours.state_dict()) == list(oc.state_dict())  # same keys, same order
    assert shapes(ours) == shapes(oc)
    assert "attn_mask" not in ours.state_dict()  # the causal mask is not part of the checkpoint


@pytest.mark.parametrize("name,millions", [("RN50", 102.0), ("ViT-B-32", 151.3), ("ViT-B-16", 149.6)])
def test_parameter_counts(name, millions):
    with torch.device("meta"):
        n = sum(p.numel() for p in M.create_model(name).parameters())
    assert round(n / 1e6, 1) == millions


@pytest.mark.parametrize("name", list(M.CONFIGS))
def test_infer_config_round_trips_every_config(name):
    with torch.device("meta"):
        sd = M.create_model(name).state_dict()
    assert dict(weights.infer_config(sd), quick_gelu=True) == M.CONFIGS[name]  # shapes cannot tell the activation


# -----------------------------------------------------------------------------
# API contract

@pytest.fixture(scope="module")
def tiny_models():
    torch.manual_seed(0)
    return {name: M.create_model(name).eval() for name in ("tiny-vit", "tiny-rn")}


def test_text_features_pool_at_eot(tiny_models):
    m = tiny_models["tiny-vit"]
    text = random_text(4, m.context_length, m.vocab_size)
    with torch.no_grad():
        pooled, tokens = m.text_features(text)
        assert tokens.shape == (4, m.context_length, m.transformer_width)
        assert pooled.shape == (4, m.transformer_width)
        torch.testing.assert_close(pooled, tokens[torch.arange(4), text.argmax(-1)])
        torch.testing.assert_close(m.encode_text(text), pooled @ m.text_projection)
        # a shorter sequence is fine (positional embeddings are sliced)
        assert m.text_features(text[:, :10])[1].shape == (4, 10, m.transformer_width)


def test_text_causal_mask(tiny_models):
    m = tiny_models["tiny-vit"]
    text = random_text(2, m.context_length, m.vocab_size)
    changed = text.clone()
    changed[:, 20:] = 7  # change only the tail
    with torch.no_grad():
        a, b = m.text_features(text)[1], m.text_features(changed)[1]
        torch.testing.assert_close(a[:, :20], b[:, :20])  # causal: earlier tokens do not see later ones
        a, b = m.text_features(text, causal=False)[1], m.text_features(changed, causal=False)[1]
        assert not torch.allclose(a[:, :20], b[:, :20])


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-rn"])
def test_image_features(tiny_models, name):
    m = tiny_models[name]
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        pooled, tokens = m.image_features(images)
        torch.testing.assert_close(m.encode_image(images), m.image_projection(pooled))
    if name == "tiny-vit":
        w = m.vision_width
        assert pooled.shape == (2, w) and tokens.shape == (2, (64 // 8) ** 2, w)  # class token excluded
        assert m.encode_image(images).shape == (2, 128)
    else:
        assert pooled.shape == (2, 128) and tokens.shape == (2, (64 // 32) ** 2, 32 * 32)
        torch.testing.assert_close(m.image_projection(pooled), pooled)  # attnpool already projects


def test_input_size_errors(tiny_models):
    m = tiny_models["tiny-vit"]
    with pytest.raises(ValueError, match="expected 64x64 images"):
        m.encode_image(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match=f"context length is {m.context_length}"):
        m.encode_text(torch.ones(1, m.context_length + 1, dtype=torch.long))


def test_init_values():
    torch.manual_seed(0)
    m = M.create_model("tiny-rn")
    assert m.logit_scale.shape == () and math.isclose(m.logit_scale.item(), math.log(1 / 0.07), rel_tol=1e-6)
    assert all((b.bn3.weight == 0).all() for stage in (m.visual.layer1, m.visual.layer4) for b in stage)
    assert abs(m.token_embedding.weight.std().item() - 0.02) < 1e-3
    assert abs(m.positional_embedding.std().item() - 0.01) < 1e-3
    block = m.transformer.resblocks[0]
    assert abs(block.attn.in_proj_weight.std().item() - 128 ** -0.5) < 5e-3
    # OpenAI's proj_std: width^-½ · (2 · layers)^-½, tiny-rn's text transformer: 3 layers (not 4: within 5e-3 too)
    assert abs(block.attn.out_proj.weight.std().item() / (128 ** -0.5 * 6 ** -0.5) - 1) < 0.05


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-rn"])
def test_every_parameter_gets_a_gradient(name):
    torch.manual_seed(0)
    m = M.create_model(name).train()
    img, txt, s = m(torch.randn(2, 3, 64, 64), random_text(2, m.context_length, m.vocab_size))
    (s * (img * txt).sum()).backward()
    assert [n for n, p in m.named_parameters() if p.grad is None] == []


def test_bfloat16_autocast_runs(tiny_models):
    m = tiny_models["tiny-vit"]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(m.encode_image(torch.randn(2, 3, 64, 64)).float()).all()


# -----------------------------------------------------------------------------
# errors

def test_create_model_unknown_name():
    with pytest.raises(ValueError, match=r"unknown model 'nope'; choose one of: .*ViT-B-32.*tiny-vit"):
        M.create_model("nope")


def test_create_model_overrides():
    m = M.create_model("tiny-vit", context_length=16)
    assert m.context_length == 16 and m.positional_embedding.shape == (16, 128)


def test_build_model_rejects_garbage():
    with pytest.raises(ValueError, match="not a CLIP state dict"):
        weights.build_model({"weight": torch.zeros(3), "bias": torch.zeros(3)})
    sd = M.create_model("tiny-vit").state_dict()
    with pytest.raises(ValueError, match="module."):
        weights.build_model({f"module.{k}": v for k, v in sd.items()})
    with pytest.raises(ValueError, match=r"checkpoint\['model'\]"):
        weights.build_model({"model": sd, "step": 3})


def test_build_model_is_strict():
    torch.manual_seed(0)
    m = M.create_model("tiny-vit")
    sd = m.state_dict()
    rebuilt = weights.build_model(sd)  # round trip
    for k, v in rebuilt.state_dict().items():
        assert torch.equal(v, sd[k]), k
    # OpenAI's JIT checkpoints carry these scalars; they are dropped, not an error
    weights.build_model({**sd, "input_resolution": torch.tensor(64), "context_length": torch.tensor(32)})
    missing = {k: v for k, v in sd.items() if k != "visual.ln_pre.weight"}
    with pytest.raises(ValueError, match="visual.ln_pre.weight"):
        weights.build_model(missing)
    with pytest.raises(ValueError, match="unexpected_head"):
        weights.build_model({**sd, "unexpected_head.weight": torch.zeros(2)})
    bad = dict(sd)
    bad["visual.positional_embedding"] = torch.zeros(50, 192)  # 49 is a square but 7*8=56 != 64 px
    bad["visual.conv1.weight"] = torch.zeros(192, 3, 8, 9)
    with pytest.raises(ValueError, match="does not fit"):
        weights.build_model(bad)
    bad = dict(sd)
    bad["visual.positional_embedding"] = torch.zeros(51, 192)
    with pytest.raises(ValueError, match="square grid"):
        weights.build_model(bad)


# -----------------------------------------------------------------------------
# activation checkpointing and patch dropout (training options)

def _clip_step(model, images, text):
    """One CLIP loss forward and backward -> (loss, gradients, buffers, bytes the autograd graph saved)."""
    from clip import clip_loss
    saved = []

    def pack(x):
        saved.append(x.numel() * x.element_size())
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        loss = clip_loss(model.encode_image(images), model.encode_text(text), model.logit_scale.exp())
    loss.backward()
    return loss.detach(), [p.grad for p in model.parameters()], [b.clone() for b in model.buffers()], sum(saved)


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-rn"])
def test_grad_checkpointing_gives_bit_identical_gradients(name):
    """Per transformer block (both towers) and per ResNet stage: the loss and every gradient bit for bit, the same
    BatchNorm running statistics (the recomputation must not count the batch a second time), and the graph keeps
    only the blocks' and stages' inputs."""
    torch.manual_seed(0)
    plain = M.create_model(name).train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.set_grad_checkpointing()
    images, text = torch.randn(4, 3, 64, 64), random_text(4, plain.context_length, plain.vocab_size)
    loss, grads, buffers, saved = _clip_step(plain, images, text)
    ck_loss, ck_grads, ck_buffers, ck_saved = _clip_step(checkpointed, images, text)
    assert torch.equal(ck_loss, loss)
    for (n, _), a, b in zip(plain.named_parameters(), ck_grads, grads):
        assert torch.equal(a, b), n
    for (n, _), a, b in zip(plain.named_buffers(), ck_buffers, buffers):
        assert torch.equal(a, b), n
    print(f"{name}: saved for the backward {saved / 2**20:.2f} MiB, checkpointed {ck_saved / 2**20:.2f} MiB")
    assert ck_saved < saved / 2
    # without gradients (evaluation, the first pass of gradient accumulation) nothing is checkpointed
    with torch.no_grad():
        torch.testing.assert_close(checkpointed.encode_image(images), plain.encode_image(images), rtol=0, atol=0)


def test_drop_patches_keeps_the_class_token_and_a_random_subset():
    x = torch.arange(2 * 17 * 3, dtype=torch.float32).reshape(2, 17, 3)  # 2 images: class token + 16 patches
    torch.manual_seed(0)
    out = M.drop_patches(x, 0.75)
    assert out.shape == (2, 1 + 4, 3)
    assert torch.equal(out[:, 0], x[:, 0])  # the class token, first
    kept = []
    for b in range(2):  # distinct patch tokens of the same image, whole rows (their positional embedding in them)
        rows = [int((x[b, 1:] == t).all(dim=1).nonzero()) for t in out[b, 1:]]
        assert len(set(rows)) == 4
        kept.append(sorted(rows))
    assert kept[0] != kept[1]  # drawn per image
    torch.manual_seed(0)
    assert torch.equal(M.drop_patches(x, 0.75), out)  # torch's generator: seeded, reproducible
    assert M.drop_patches(x, 0.99).shape == (2, 2, 3)  # at least one patch


def test_patch_dropout_in_training_only():
    torch.manual_seed(0)
    model = M.create_model("tiny-vit", patch_dropout=0.5)
    full = copy.deepcopy(model)
    full.visual.patch_dropout = 0.0
    images = torch.randn(3, 3, 64, 64)
    pooled, tokens = model.train().image_features(images)
    assert tokens.shape == (3, 32, model.vision_width)  # 64 patches of 8 px, half kept
    assert not torch.allclose(pooled, full.train().image_features(images)[0])
    with torch.no_grad():  # evaluation sees every token: the model without patch dropout
        assert model.eval().image_features(images)[1].shape == (3, 64, model.vision_width)
        torch.testing.assert_close(model.encode_image(images), full.eval().encode_image(images), rtol=0, atol=0)
    with pytest.raises(ValueError, match="patch dropout needs a ViT"):
        M.create_model("tiny-rn", patch_dropout=0.5)
