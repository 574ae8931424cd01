"""Every number taken from a paper or a reference, pinned as train.py builds the method (train.build_method with the
defaults of `python train.py --method NAME`, train.make_optimizer, the transform the method returns): temperatures
and their initial values, loss weights, head widths, augmentation parameters, queue sizes, the learning-rate rule
and the weight-decay rule, the model's init. Each expected value is written here, with where it comes from
(/work/shared/reference/methods.md gathers them: "methods.md" below); none is read from the code under test.

The model is a tiny ViT whose three widths differ (vision 192, text 128, embedding 96), so that a head reading the
wrong one has the wrong shape."""

import math

import pytest
import torch
import torch.nn as nn
from torchvision.transforms import v2

import data
import train
from model import CONFIGS
from plumbing import pretrained
from plumbing.distributed import GlobalBatchNorm
from plumbing.tokenizer import get_tokenizer

ODD = dict(CONFIGS["tiny-vit"], vision_width=192, embed_dim=96)  # 3 heads of 64 in the ViT
METHODS = ("clip", "siglip", "slip", "declip", "filip", "defilip")


@pytest.fixture(scope="module")
def built():
    """Each method as `python train.py --method NAME --model <ODD>` builds it: no --method-args (SLIP's 4096-wide
    head, DeCLIP's queue of 65,536), seed 0."""
    methods = {}
    for name in METHODS:
        torch.manual_seed(0)
        methods[name] = train.build_method(name, ODD, {}, "cpu")
    return methods


# --- temperatures -----------------------------------------------------------------------------------------------------

# s = exp(t) at the start of training. CLIP: τ = 0.07 (CLIP paper §2.5; methods.md "logit_scale init ln(1/0.07)");
# SigLIP: t' = ln 10, b = −10 (SigLIP paper §3.2; methods.md); SLIP: its CLIP term is CLIP's (SLIP models.py);
# DeCLIP: ln(1/0.07) (methods.md, DeCLIP); FILIP: "the DeCLIP repo initialises its FILIP temperature to ln(1/0.07)";
# DeFILIP: DeCLIP's, and its FILIP temperature logit_scale_dense also ln(1/0.07)
INITIAL_SCALE = {"clip": 1 / 0.07, "siglip": 10.0, "slip": 1 / 0.07, "declip": 1 / 0.07, "filip": 1 / 0.07,
                 "defilip": 1 / 0.07}


@pytest.mark.parametrize("name", METHODS)
def test_initial_temperature_is_the_papers_after_train_builds_the_method(built, name):
    # checked on the method train.py trains: build_method overwrites the model's own init
    method = built[name]
    assert method.model.logit_scale.exp().item() == pytest.approx(INITIAL_SCALE[name], rel=1e-6)
    if name == "siglip":
        assert method.logit_bias.item() == -10.0
    if name == "defilip":
        assert method.logit_scale_filip.exp().item() == pytest.approx(1 / 0.07, rel=1e-6)


# after each optimiser step: CLIP, SigLIP (open_clip), SLIP, FILIP: t in [0, ln 100] (methods.md, CLIP); DeCLIP and
# DeFILIP (both temperatures): t in [3, 6] (methods.md, DeCLIP: "parameter clamped to [3, 6]")
CLAMP = {"clip": (0.0, math.log(100)), "siglip": (0.0, math.log(100)), "slip": (0.0, math.log(100)),
         "filip": (0.0, math.log(100)), "declip": (3.0, 6.0), "defilip": (3.0, 6.0)}


@pytest.mark.parametrize("name", METHODS)
def test_temperature_clamps_after_a_step(built, name):
    method = built[name]
    low, high = CLAMP[name]
    temperatures = [method.model.logit_scale] + ([method.logit_scale_filip] if name == "defilip" else [])
    saved = [t.detach().clone() for t in temperatures]
    try:
        for value, expected in ((low - 0.5, low), (high + 0.5, high), ((low + high) / 2, (low + high) / 2)):
            with torch.no_grad():
                for t in temperatures:
                    t.fill_(value)
            method.post_step()
            assert [t.item() for t in temperatures] == pytest.approx([expected] * len(temperatures), abs=1e-6)
    finally:
        with torch.no_grad():
            for t, v in zip(temperatures, saved):
                t.copy_(v)


# --- loss weights and the heads' widths ----------------------------------------------------------------------------


def layers(sequential):
    """A head as [(kind, in, out)]: Linear -> ("linear", in, out), GlobalBatchNorm -> ("bn", C, C), ReLU -> relu"""
    out = []
    for m in sequential:
        if isinstance(m, nn.Linear):
            out.append(("linear", m.in_features, m.out_features))
        elif isinstance(m, GlobalBatchNorm):
            out.append(("bn", m.weight.shape[0], m.weight.shape[0]))
        elif isinstance(m, nn.ReLU):
            out.append(("relu",))
        else:
            out.append((type(m).__name__,))
    return out


def test_slip_head_and_weights(built):
    # methods.md, SLIP: loss = clip_loss + ssl_scale·simclr_loss, ssl_scale 1.0, τ 0.1, MLP hidden 4096, output 256;
    # Linear(w→4096) → BN → ReLU → Linear(4096→4096) → BN → ReLU → Linear(4096→256), on the pooled feature before
    # the CLIP projection (the ViT's width, 192 here)
    slip = built["slip"]
    assert (slip.ssl_scale, slip.ssl_temperature) == (1.0, 0.1)
    assert layers(slip.image_mlp) == [("linear", 192, 4096), ("bn", 4096, 4096), ("relu",), ("linear", 4096, 4096),
                                      ("bn", 4096, 4096), ("relu",), ("linear", 4096, 256)]
    # a ResNet's attention pool already ends in its projection: the head reads the embedding (slip.py)
    torch.manual_seed(0)
    rn = train.build_method("slip", dict(CONFIGS["tiny-rn"], embed_dim=96), {"mlp_dim": 8}, "cpu")
    assert layers(rn.image_mlp)[0] == ("linear", 96, 8)


def test_declip_heads_queue_and_weights(built):
    # methods.md, DeCLIP: L = 0.4·mean(4 CLIP) + 0.2·SimSiam + 0.2·MLM + 0.2·NN; SimSiam projector D→1024→1024→1024
    # with BN after all three linears and ReLU after the first two, predictor 1024→512 (BN, ReLU)→1024; MLM: each
    # token masked with p 0.15, head one Linear(text width → vocab); queue of 65,536 text embeddings of dimension D
    for name in ("declip", "defilip"):
        method = built[name]
        assert (method.clip_weight, method.simsiam_weight, method.mlm_weight, method.nn_weight) == (0.4, 0.2, 0.2, 0.2)
        assert method.mlm_probability == 0.15
        assert layers(method.projector) == [("linear", 96, 1024), ("bn", 1024, 1024), ("relu",),
                                            ("linear", 1024, 1024), ("bn", 1024, 1024), ("relu",),
                                            ("linear", 1024, 1024), ("bn", 1024, 1024)]
        assert layers(method.predictor) == [("linear", 1024, 512), ("bn", 512, 512), ("relu",), ("linear", 512, 1024)]
        assert (method.mlm_head.in_features, method.mlm_head.out_features) == (128, 49408)
        assert method.queue.shape == (65536, 96) and method.queue_filled.item() == 0 and method.queue_ptr.item() == 0
        # [MASK]: a vector of the text width, initialised as the token embedding (std 0.02, methods.md init)
        assert method.mask_embedding.shape == (128,) and 0.015 < method.mask_embedding.std().item() < 0.025
        assert method.transform(get_tokenizer("clip")).mlm_probability == 0.15


def test_filip_heads_and_weights(built):
    # methods.md, FILIP: image patch tokens and text tokens, each through a linear map to 256-d; no top-k by default
    # here (FILIP.__init__'s note: exact by default); DeFILIP (DeCLIP repo): DeCLIP's loss + 0.2·FILIP
    for name in ("filip", "defilip"):
        method = built[name]
        assert (method.image_head.in_features, method.image_head.out_features) == (192, 256)
        assert (method.text_head.in_features, method.text_head.out_features) == (128, 256)
        assert method.keep_fraction == 1.0 and method.gather_dtype is None
    assert built["defilip"].filip_weight == 0.2
    # a ResNet's tokens are its final feature map: 32 · width channels (tiny-rn: width 32)
    torch.manual_seed(0)
    rn = train.build_method("filip", CONFIGS["tiny-rn"], {}, "cpu")
    assert rn.image_head.in_features == 32 * 32


# --- augmentations --------------------------------------------------------------------------------------------------


def test_normalisation_constants_are_openais():
    # methods.md, CLIP: mean (0.48145466, 0.4578275, 0.40821073), std (0.26862954, 0.26130258, 0.27577711)
    assert data.MEAN == (0.48145466, 0.4578275, 0.40821073)
    assert data.STD == (0.26862954, 0.26130258, 0.27577711)
    x = torch.tensor([0, 128, 255], dtype=torch.uint8).view(3, 1, 1).expand(3, 2, 2)
    expected = torch.tensor([(0 / 255 - 0.48145466) / 0.26862954, (128 / 255 - 0.4578275) / 0.26130258,
                             (255 / 255 - 0.40821073) / 0.27577711]).view(3, 1, 1).expand(3, 2, 2)
    torch.testing.assert_close(data.normalise(x), expected)
    # evaluation: resize the short side (bicubic), centre crop, the same normalisation (OpenAI's preprocess)
    image = torch.arange(3 * 40 * 60, dtype=torch.uint8).view(3, 40, 60)
    reference = v2.functional.center_crop(v2.functional.resize(image, 32, interpolation=v2.InterpolationMode.BICUBIC,
                                                               antialias=True), 32)
    torch.testing.assert_close(data.eval_transform(32)(image), data.normalise(reference), rtol=0, atol=1e-6)


def crop_of(compose):
    crop = compose.transforms[0]
    assert isinstance(crop, data.RandomResizedCrop)
    return crop


def assert_simclr_views(compose, scale, size):
    """SimCLR's / MoCo v2's augmentation (methods.md, SLIP and DeCLIP): RRC(scale), ColorJitter(0.4, 0.4, 0.4, 0.1)
    p 0.8, RandomGrayscale 0.2, Gaussian blur σ ∈ [0.1, 2] p 0.5, horizontal flip; the blur kernel ~10% of the side,
    odd (SimCLR), at least 3"""
    crop, jitter, grey, blur, flip, *to_uint8 = compose.transforms
    assert crop_of(compose).scale == scale and crop.ratio == (3 / 4, 4 / 3) and crop.size == size
    assert isinstance(jitter, v2.RandomApply) and jitter.p == 0.8 and len(jitter.transforms) == 1
    cj = jitter.transforms[0]
    assert isinstance(cj, v2.ColorJitter)
    assert (cj.brightness, cj.contrast, cj.saturation) == ((0.6, 1.4),) * 3 and cj.hue == (-0.1, 0.1)
    assert isinstance(grey, v2.RandomGrayscale) and grey.p == 0.2
    assert isinstance(blur, v2.RandomApply) and blur.p == 0.5
    gaussian = blur.transforms[0]
    assert isinstance(gaussian, v2.GaussianBlur) and list(gaussian.sigma) == [0.1, 2.0]
    kernel = {64: 7, 224: 23}[size]
    assert list(gaussian.kernel_size) == [kernel, kernel]
    assert isinstance(flip, v2.RandomHorizontalFlip) and flip.p == 0.5
    assert [type(t) for t in to_uint8] == [v2.ToImage, v2.ToDtype]


def test_augmentations_are_the_papers(built):
    tokenizer = get_tokenizer("clip")
    # CLIP, SigLIP, FILIP: open_clip's RandomResizedCrop(scale 0.9-1.0) (methods.md, CLIP)
    for name in ("clip", "siglip", "filip"):
        crop = crop_of(built[name].transform(tokenizer).image)
        assert (crop.scale, crop.ratio, crop.size) == ((0.9, 1.0), (3 / 4, 4 / 3), 64), name
    # SLIP: the CLIP view RRC(scale 0.5-1.0), no flip, no colour; SimCLR views RRC(0.08-1) and the rest
    slip = built["slip"].transform(tokenizer)
    assert crop_of(slip.image).scale == (0.5, 1.0) and len(slip.image.transforms) == 2
    assert_simclr_views(slip.ssl, (0.08, 1.0), 64)
    # DeCLIP, DeFILIP: MoCo v2, RRC(scale 0.2-1)
    for name in ("declip", "defilip"):
        assert_simclr_views(built[name].transform(tokenizer).image, (0.2, 1.0), 64)
    from slip import ssl_augmentation
    assert_simclr_views(ssl_augmentation(224, (0.08, 1.0)), (0.08, 1.0), 224)  # SimCLR's 23 px kernel at 224 px


# --- the optimiser: AdamW settings, weight decay, the learning-rate rule ----------------------------------------------

# (weight decay, betas, eps) for a ViT. CLIP: open_clip's params.py wd 0.2, betas (0.9, 0.98), eps 1e-6 (methods.md);
# SigLIP: β2 0.95 (paper), big_vision's wd 1e-4 not multiplied by lr, = 0.1 at lr 1e-3 in torch's AdamW, eps 1e-8
# (optax); SLIP: wd 0.1, betas (0.9, 0.98), eps 1e-8 (methods.md); DeCLIP, DeFILIP: wd 0.1, (0.9, 0.98), 1e-8
# (methods.md); FILIP: the DeCLIP benchmark's FILIP config, wd 0.5, (0.9, 0.98), 1e-8
ADAMW = {"clip": (0.2, (0.9, 0.98), 1e-6), "siglip": (0.1, (0.9, 0.95), 1e-8), "slip": (0.1, (0.9, 0.98), 1e-8),
         "declip": (0.1, (0.9, 0.98), 1e-8), "filip": (0.5, (0.9, 0.98), 1e-8), "defilip": (0.1, (0.9, 0.98), 1e-8)}
# the peak lr at the paper's own batch: CLIP 5e-4 (open_clip); SigLIP 1e-3 at 32k; SLIP 3e-3 at 4096; DeCLIP 1e-3 at
# 4096; FILIP 5e-4; DeFILIP DeCLIP's
PAPER = {"clip": (32768, 5e-4), "siglip": (32768, 1e-3), "slip": (4096, 3e-3), "declip": (4096, 1e-3),
         "filip": (4096, 5e-4), "defilip": (4096, 1e-3)}


def open_clip_decays(name, p):
    # open_clip_train/main.py's rule (methods.md, CLIP): no decay for ndim < 2 or bn, ln, bias, logit_scale in the name
    return not (p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name)


def big_vision_decays(method, name, p):
    # big_vision decays only kernels (methods.md, CLIP): dense and conv weights and the projections; not embeddings
    kernels = {f"{n}.weight" for n, m in method.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    return name in kernels or name.endswith(("in_proj_weight", "text_projection", "visual.proj"))


@pytest.mark.parametrize("name", METHODS)
def test_make_optimizer_uses_the_papers_settings(built, name):
    method = built[name]
    wd, betas, eps = ADAMW[name]
    optimizer, lr, line = train.make_optimizer(method, ODD, 128)
    # at batch 128 the rule gives every method 5e-4 (README, "Learning rate"; SLIP: 3e-3·√(128/4096) = 5.3e-4)
    expected_lr = 3e-3 * math.sqrt(128 / 4096) if name == "slip" else 5e-4
    assert lr == pytest.approx(expected_lr, rel=1e-12)
    decayed, other = optimizer.param_groups
    assert (decayed["weight_decay"], other["weight_decay"]) == (wd, 0.0) and f"wd {wd:g}" in line
    for group in (decayed, other):
        assert (group["lr"], tuple(group["betas"]), group["eps"]) == (pytest.approx(expected_lr), betas, eps)
    # the weight-decay rule, parameter by parameter: the method's heads and parameters included
    named = dict(method.named_parameters())
    ids = {id(p): n for n, p in named.items()}
    rule = (lambda n, p: big_vision_decays(method, n, p)) if name == "siglip" else open_clip_decays
    assert sorted(ids[id(p)] for p in decayed["params"]) == sorted(n for n, p in named.items() if rule(n, p))
    assert sorted(ids[id(p)] for p in other["params"]) == sorted(n for n, p in named.items() if not rule(n, p))
    assert "model.token_embedding.weight" in {ids[id(p)] for p in (other if name == "siglip" else decayed)["params"]}
    # at the paper's batch: the paper's lr; half of it: ×√½ unless that is below the floor of 5e-4
    batch, paper_lr = PAPER[name]
    assert train.make_optimizer(method, ODD, batch)[1] == pytest.approx(paper_lr, rel=1e-12)
    assert train.make_optimizer(method, ODD, 4 * batch)[1] == pytest.approx(paper_lr, rel=1e-12)
    assert train.make_optimizer(method, ODD, batch // 2)[1] == pytest.approx(max(5e-4, paper_lr * 0.5 ** 0.5),
                                                                             rel=1e-12)
    assert train.make_optimizer(method, ODD, 8, lr=2e-4, weight_decay=0.3)[0].param_groups[0]["lr"] == 2e-4


def test_resnet_adam_settings_for_clip():
    # CLIP on a ResNet: β2 0.999 and eps 1e-8 (methods.md: "eps 1e-6 (ViT) / 1e-8 and beta2 0.999 (ResNet)")
    torch.manual_seed(0)
    method = train.build_method("clip", CONFIGS["tiny-rn"], {}, "cpu")
    for group in train.make_optimizer(method, CONFIGS["tiny-rn"], 128)[0].param_groups:
        assert (tuple(group["betas"]), group["eps"]) == ((0.9, 0.999), 1e-8)


def test_lr_schedule_is_linear_warmup_then_cosine_to_zero():
    # README, Learning rate: "AdamW, warmup for 10% of --steps, then cosine"; docstring: warmup from 0, cosine to 0
    peak, warmup, total = 2.0, 4, 12
    got = [train.lr_at(step, peak, warmup, total) for step in range(total)]
    expected = [peak * (s + 1) / warmup for s in range(warmup)]
    expected += [peak * 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup))) for s in range(warmup, total)]
    assert got == pytest.approx(expected, rel=1e-12)
    assert got[warmup - 1] == got[warmup] == peak and got[-1] > 0
    assert train.lr_at(total, peak, warmup, total) == pytest.approx(0, abs=1e-12)
    assert train.lr_at(total + 5, peak, warmup, total) == pytest.approx(0, abs=1e-12)  # stays at 0 past the end
    assert [train.lr_at(s, 1.0, 0, 2) for s in range(2)] == pytest.approx([1.0, 0.5])  # no warmup
    # the default warmup: 10% of --steps, at most 10k; fine-tuning's: 100, at most 10%
    for steps, expected_warmup in ((500, 50), (9, 0), (200_000, 10_000)):
        args = train.get_args(["--steps", str(steps)])
        assert pretrained.lr_and_warmup(args) == (None, "--lr", expected_warmup)


# --- the model's init, as train.py builds it ------------------------------------------------------------------------


def assert_std(tensor, expected, name):
    """The sample std of a tensor drawn with std `expected`, within 5 of its standard errors (√(1/2n))"""
    n = tensor.numel()
    assert abs(tensor.std().item() / expected - 1) < 5 * (2 * n) ** -0.5, (name, tensor.std().item(), expected)


def test_model_init_is_openais(built):
    # methods.md, CLIP (encoders, init): token_embedding std 0.02, positional std 0.01; text transformer attn in_proj
    # std d^-½, out_proj and c_proj std d^-½·(2L)^-½, c_fc (2d)^-½ (the project applies it to the ViT too, as
    # DeCLIP's release: model.py); text_projection width^-½; ViT class/positional embeddings and proj width^-½·randn
    model = built["clip"].model
    assert_std(model.token_embedding.weight, 0.02, "token_embedding")
    assert_std(model.positional_embedding, 0.01, "positional_embedding")
    assert_std(model.text_projection, 128 ** -0.5, "text_projection")
    for tower, d in ((model.transformer, 128), (model.visual.transformer, 192)):
        L = len(tower.resblocks)
        assert L == 3
        for i, block in enumerate(tower.resblocks):
            assert_std(block.attn.in_proj_weight, d ** -0.5, f"{d}/{i} in_proj")
            assert_std(block.attn.out_proj.weight, d ** -0.5 * (2 * L) ** -0.5, f"{d}/{i} out_proj")
            assert_std(block.mlp.c_fc.weight, (2 * d) ** -0.5, f"{d}/{i} c_fc")
            assert_std(block.mlp.c_proj.weight, d ** -0.5 * (2 * L) ** -0.5, f"{d}/{i} c_proj")
            assert (block.attn.in_proj_bias == 0).all() and (block.attn.out_proj.bias == 0).all()
    visual = model.visual
    for tensor, what in ((visual.class_embedding, "class"), (visual.positional_embedding, "positional"),
                         (visual.proj, "proj")):
        assert_std(tensor, 192 ** -0.5, what)
    assert visual.positional_embedding.shape == (1 + (64 // 8) ** 2, 192) and visual.proj.shape == (192, 96)


def test_resnet_init_is_openais():
    # methods.md: "ResNet bn3 weights 0"; the attention pool's q, k, v, c projections std C^-½ and its positional
    # embedding randn/√C, C = 32·width (OpenAI's initialize_parameters); heads = width·32 // 64
    torch.manual_seed(0)
    visual = train.build_method("clip", CONFIGS["tiny-rn"], {}, "cpu").model.visual
    for stage in (visual.layer1, visual.layer2, visual.layer3, visual.layer4):
        for block in stage:
            assert (block.bn3.weight == 0).all()
    C = 32 * 32
    pool = visual.attnpool
    assert pool.heads == C // 64
    for proj in (pool.q_proj, pool.k_proj, pool.v_proj):
        assert_std(proj.weight, C ** -0.5, "attnpool")
    assert_std(pool.c_proj.weight, C ** -0.5, "attnpool c_proj")
    assert_std(pool.positional_embedding, C ** -0.5, "attnpool positional")


# --- zero-shot: a fixed scale of 100 ------------------------------------------------------------------------------------


def test_zero_shot_scores_are_100_times_the_similarity(built):
    # methods.md, zero-shot classification: "Logits = 100·Î·Wᵀ (a fixed 100)", whatever the model's temperature;
    # FILIP: the same token-wise similarity as its loss (mean over patches of the best word), times 100
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    a, b = F.normalize(torch.randn(3, 96, generator=g), dim=-1), F.normalize(torch.randn(4, 96, generator=g), dim=-1)
    for name in ("clip", "siglip", "slip", "declip", "defilip"):
        torch.testing.assert_close(built[name].similarity(a, b), 100 * a @ b.T)
    patches = F.normalize(torch.randn(2, 3, 256, generator=g), dim=-1)
    words = F.normalize(torch.randn(4, 5, 256, generator=g), dim=-1)
    valid = torch.arange(5)[None] < torch.tensor([[2], [5], [3], [4]])
    expected = torch.stack([torch.stack([(patches[i] @ words[j][valid[j]].T).max(dim=1).values.mean()
                                         for j in range(4)]) for i in range(2)])
    torch.testing.assert_close(built["filip"].similarity(patches, (words, valid)), 100 * expected)
