"""
CLIP's two encoders (Radford et al. 2021), in one file, with OpenAI's checkpoint layout.

    image (B, 3, R, R) --visual-->      pooled image feature --proj-->            (B, D)
    text  (B, L) ids   --transformer--> token at the EOT position --text_projection--> (B, D)

The image encoder is either
  * a Vision Transformer: patches + a class token, pre-LN transformer, the class token after ln_post, or
  * OpenAI's "ModifiedResNet": a ResNet-50 with a 3-conv stem, anti-aliased (avg-pool) strided convolutions and
    attention pooling (the mean of the final feature map is the single query) in place of global average pooling.
The text encoder is a causal (GPT-style) pre-LN transformer; the sequence is represented by its EOT token, which
is the largest id in the vocabulary, so its position is text.argmax(-1).

State-dict keys and shapes are those of OpenAI's released checkpoints (and of open_clip's OpenAI-layout models),
so that weights.build_model loads them strictly (Attention keeps nn.MultiheadAttention's parameter names). Every
method (CLIP, SigLIP, SLIP, DeCLIP, FILIP) trains this same model; the methods only add heads and losses.

Two memory and speed options for training (train.py --grad-checkpointing, --patch-dropout), off by default:
  * activation checkpointing (set_grad_checkpointing): each transformer block and each ResNet stage (the stem is one)
    keeps only its input and runs its forward again in the backward: the activations of one block or stage instead of
    all of them, for ~1/3 more compute. The gradients are bit-identical to those without it.
  * patch dropout (FLIP, Li et al. 2023; open_clip's patch_dropout): in training, a ViT keeps a random (1 − p) of its
    patch tokens (the class token always) after adding their positional embeddings; evaluation sees every token.
"""

import math
from collections import OrderedDict
from contextlib import contextmanager, nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


class QuickGELU(nn.Module):
    # x·σ(1.702x): the sigmoid approximation of GELU that OpenAI's checkpoints were trained with
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


# -----------------------------------------------------------------------------
# transformer (shared by the text encoder and the ViT)

class Attention(nn.Module):
    """Multi-head self-attention. Parameter names follow nn.MultiheadAttention (one fused q,k,v projection) so that
    OpenAI checkpoints load unchanged; the computation is PyTorch's fused scaled_dot_product_attention."""

    def __init__(self, width, heads):
        super().__init__()
        assert width % heads == 0, f"width {width} is not divisible by {heads} heads"
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))  # rows: [W_q; W_k; W_v]
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.normal_(self.in_proj_weight, std=width ** -0.5)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x, causal=False):
        B, L, C = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)                     # (B, L, 3C)
        q, k, v = qkv.view(B, L, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)  # 3 × (B, H, L, C/H)
        x = F.scaled_dot_product_attention(q, k, v, is_causal=causal)                  # (B, H, L, C/H)
        return self.out_proj(x.transpose(1, 2).reshape(B, L, C))                       # (B, L, C)


class ResidualAttentionBlock(nn.Module):
    # pre-LN: x + attn(ln(x)), then x + mlp(ln(x)); the MLP is 4× wide
    def __init__(self, width, heads, act):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(width, 4 * width), gelu=act(),
                                             c_proj=nn.Linear(4 * width, width)))

    def forward(self, x, causal=False):
        x = x + self.attn(self.ln_1(x), causal)
        x = x + self.mlp(self.ln_2(x))
        return x


class Transformer(nn.Module):
    def __init__(self, width, layers, heads, act):
        super().__init__()
        self.width, self.layers = width, layers
        self.grad_checkpointing = False  # CLIPModel.set_grad_checkpointing
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads, act) for _ in range(layers)])
        # OpenAI's init: projections that write into the residual stream are scaled down by sqrt(2·layers),
        # so the variance of the stream does not grow with depth (2 writes per block)
        attn_std = width ** -0.5
        proj_std = width ** -0.5 * (2 * layers) ** -0.5
        fc_std = (2 * width) ** -0.5
        for block in self.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)

    def forward(self, x, causal=False):  # (B, L, width) -> (B, L, width)
        for block in self.resblocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, causal, use_reentrant=False)  # keeps x; block's forward reruns in backward
            else:
                x = block(x, causal)
        return x


# -----------------------------------------------------------------------------
# image encoder 1: Vision Transformer

class VisionTransformer(nn.Module):
    def __init__(self, image_resolution, patch_size, width, layers, heads, output_dim, act, patch_dropout=0.0):
        super().__init__()
        self.patch_dropout = patch_dropout  # fraction of patch tokens dropped in training (see the module docstring)
        # the patch embedding (the DeCLIP benchmark freezes it at its random init: train.py --freeze-patch-embed)
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width ** -0.5
        grid = image_resolution // patch_size
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        # the text transformer's init (OpenAI's, see Transformer; out_proj/c_proj std 0.0074 for ViT-B), as DeCLIP's
        # release does for its ViT. OpenAI defines no ViT init and open_clip leaves its ViT blocks at PyTorch's
        # defaults (nn.Linear's: std 0.021 for ViT-B's out_proj, 0.010 for its c_proj). One init for both towers.
        self.transformer = Transformer(width, layers, heads, act)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def features(self, x):  # (B, 3, R, R) -> pooled (B, width), tokens (B, P, width) (P' with patch dropout)
        x = self.conv1(x.to(self.conv1.weight.dtype))                     # (B, width, R/P, R/P)
        x = x.flatten(2).transpose(1, 2)                                   # (B, P, width), P = (R/P)²
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (B, 1, width)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        if self.training and self.patch_dropout > 0:
            x = drop_patches(x, self.patch_dropout)                        # (B, 1+P', width), P' = ⌊(1 − p)·P⌋
        x = self.transformer(self.ln_pre(x))                               # (B, 1+P, width), or 1+P'
        x = self.ln_post(x)  # per-token LayerNorm: the class token's is the pooled feature, the rest FILIP's tokens
        return x[:, 0], x[:, 1:]

    def project(self, pooled):  # (B, width) -> (B, D)
        return pooled @ self.proj


def drop_patches(x, p):
    """(B, 1+P, width) tokens, the class token first -> (B, 1+P', width): the class token and a random
    P' = max(1, ⌊(1 − p)·P⌋) of the P patch tokens of each image (as open_clip's PatchDropout), drawn from torch's
    generator on x's device, which train.py seeds per step and micro-batch so that a resumed run and the two passes of
    gradient accumulation draw the same patches (compiled too: `compiled`). The kept tokens come in random order: their
    positions are already in them, and nothing downstream depends on it (FILIP's max and mean over tokens included)."""
    B, L, width = x.shape
    keep = max(1, int((L - 1) * (1 - p)))
    index = torch.rand(B, L - 1, device=x.device).topk(keep, dim=1).indices + 1  # (B, P') patch positions
    return torch.cat([x[:, :1], x.gather(1, index[:, :, None].expand(-1, -1, width))], dim=1)


# -----------------------------------------------------------------------------
# image encoder 2: OpenAI's ModifiedResNet

class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        # every conv has stride 1; downsampling is an avg-pool before the last 1×1 conv (anti-aliased, as in
        # "Making Convolutional Networks Shift-Invariant Again"), and the same pool on the shortcut
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        nn.init.zeros_(self.bn3.weight)  # each block starts as the identity (plus its shortcut)
        self.downsample = None
        if stride > 1 or inplanes != planes * self.expansion:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes * self.expansion, 1, bias=False),
                                            nn.BatchNorm2d(planes * self.expansion))

    def forward(self, x):
        # ReLUs (and the residual add) in place, as torchvision's ResNets: no BatchNorm backward reads its output
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = F.relu(self.bn2(self.conv2(out)), inplace=True)
        out = self.bn3(self.conv3(self.avgpool(out)))
        shortcut = x if self.downsample is None else self.downsample(self.avgpool(x))
        return F.relu(out.add_(shortcut), inplace=True)


class AttentionPool2d(nn.Module):
    """Replaces global average pooling: one attention step whose only query is the mean of the feature map
    (prepended as an extra token), over all positions plus that mean token, then a projection to the output."""

    def __init__(self, spatial, embed_dim, heads, output_dim):
        super().__init__()
        self.heads = heads
        self.positional_embedding = nn.Parameter(torch.randn(spatial * spatial + 1, embed_dim) / embed_dim ** 0.5)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim)
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.c_proj):
            nn.init.normal_(proj.weight, std=embed_dim ** -0.5)

    def forward(self, x):  # (B, C, H, W) -> (B, output_dim)
        x = x.flatten(2).transpose(1, 2)                                     # (B, HW, C)
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)               # (B, 1+HW, C)
        x = x + self.positional_embedding.to(x.dtype)
        B, L, C = x.shape
        H = self.heads
        q = self.q_proj(x[:, :1]).view(B, 1, H, C // H).transpose(1, 2)     # (B, H, 1, C/H)
        k = self.k_proj(x).view(B, L, H, C // H).transpose(1, 2)            # (B, H, L, C/H)
        v = self.v_proj(x).view(B, L, H, C // H).transpose(1, 2)            # (B, H, L, C/H)
        x = F.scaled_dot_product_attention(q, k, v)                          # (B, H, 1, C/H)
        return self.c_proj(x.transpose(1, 2).reshape(B, C))                  # (B, output_dim)


class ModifiedResNet(nn.Module):
    def __init__(self, layers, output_dim, heads, image_resolution, width):
        super().__init__()
        self.grad_checkpointing = False  # CLIPModel.set_grad_checkpointing: per stage, the stem one of them
        # stem: three 3×3 convs (the first with stride 2) and an avg-pool instead of one 7×7 conv and a max-pool
        self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.avgpool = nn.AvgPool2d(2)
        # four stages of bottlenecks, planes width·(1, 2, 4, 8); stages 2-4 halve the resolution: R/4 -> R/32
        inplanes = width
        for i, blocks in enumerate(layers):
            planes, stride = width * 2 ** i, (1 if i == 0 else 2)
            stage = [Bottleneck(inplanes, planes, stride)]
            stage += [Bottleneck(planes * Bottleneck.expansion, planes) for _ in range(blocks - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
            inplanes = planes * Bottleneck.expansion
        self.attnpool = AttentionPool2d(image_resolution // 32, width * 32, heads, output_dim)

    def stem(self, x):  # (B, 3, R, R) -> (B, width, R/4, R/4)
        x = F.relu(self.bn1(self.conv1(x)), inplace=True)
        x = F.relu(self.bn2(self.conv2(x)), inplace=True)
        x = F.relu(self.bn3(self.conv3(x)), inplace=True)
        return self.avgpool(x)

    def features(self, x):  # (B, 3, R, R) -> pooled (B, D), tokens (B, (R/32)², 32·width)
        x = x.to(self.conv1.weight.dtype)
        for stage in (self.stem, self.layer1, self.layer2, self.layer3, self.layer4):  # -> (B, 32·width, R/32, R/32)
            if self.grad_checkpointing and torch.is_grad_enabled():
                # the stage's forward runs again in the backward, without updating the running statistics of its
                # BatchNorm layers a second time
                if torch.compiler.is_compiling():  # Dynamo refuses a context_fn; and the compiled backward's
                    # recomputation updates no running statistics (tests/test_accum.py checks both)
                    x = checkpoint(stage, x, use_reentrant=False)
                else:
                    x = checkpoint(stage, x, use_reentrant=False,
                                   context_fn=lambda: (nullcontext(), frozen_batchnorm_statistics(self)))
            else:
                x = stage(x)
        return self.attnpool(x), x.flatten(2).transpose(1, 2)

    def project(self, pooled):  # attnpool's c_proj already maps to the embedding dimension
        return pooled


# -----------------------------------------------------------------------------
# CLIP

class CLIPModel(nn.Module):
    def __init__(self, embed_dim, image_resolution, vision_layers, vision_width, vision_patch_size,
                 context_length, vocab_size, transformer_width, transformer_heads, transformer_layers,
                 quick_gelu=True, patch_dropout=0.0):
        super().__init__()
        self.embed_dim, self.image_resolution = embed_dim, image_resolution
        self.context_length, self.vocab_size = context_length, vocab_size
        self.vision_width, self.transformer_width = vision_width, transformer_width
        # the activation of both transformers' MLPs: OpenAI's weights use QuickGELU, most of open_clip's (LAION-2B,
        # DataComp, every name without -quickgelu) nn.GELU. A state dict cannot tell them apart; quick_gelu says it.
        act = QuickGELU if quick_gelu else nn.GELU
        if isinstance(vision_layers, (tuple, list)):  # a list of 4 stage depths means a ResNet
            if patch_dropout:
                raise ValueError("patch dropout needs a ViT: a ResNet has no patch tokens")
            self.visual = ModifiedResNet(vision_layers, embed_dim, heads=vision_width * 32 // 64,
                                         image_resolution=image_resolution, width=vision_width)
        else:  # heads of width 64, as in OpenAI's ViTs (build_model relies on it)
            self.visual = VisionTransformer(image_resolution, vision_patch_size, vision_width, vision_layers,
                                            heads=vision_width // 64, output_dim=embed_dim, act=act,
                                            patch_dropout=patch_dropout)
        self.transformer = Transformer(transformer_width, transformer_layers, transformer_heads, act)
        self.token_embedding = nn.Embedding(vocab_size, transformer_width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, transformer_width))
        self.ln_final = nn.LayerNorm(transformer_width)
        self.text_projection = nn.Parameter(torch.empty(transformer_width, embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # s = exp(.) = 1/τ, τ = 0.07
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=transformer_width ** -0.5)

    def set_grad_checkpointing(self, enable=True):
        """Activation checkpointing per transformer block (both towers) and per ResNet stage (see the docstring)."""
        for module in (self.visual, getattr(self.visual, "transformer", None), self.transformer):
            if module is not None:
                module.grad_checkpointing = enable

    def image_features(self, images):
        """(B, 3, R, R) -> pooled (B, Wp) before the projection, tokens (B, P, Wt); see visual.features."""
        if images.shape[-2:] != (self.image_resolution, self.image_resolution):
            raise ValueError(f"expected {self.image_resolution}x{self.image_resolution} images, "
                             f"got {tuple(images.shape[-2:])}")
        return self.visual.features(images)

    def image_projection(self, pooled):  # (B, Wp) -> (B, D); ViT: @ proj, ResNet: identity
        return self.visual.project(pooled)

    def encode_image(self, images):  # (B, 3, R, R) -> (B, D), not normalised
        return self.image_projection(self.image_features(images)[0])

    def text_features(self, text, causal=True, embeddings=None):
        """(B, L) token ids -> pooled (B, width) at the EOT token, tokens (B, L, width), both after ln_final.
        causal=False lets every token see the whole caption (for a masked-language-model head); `embeddings`
        (B, L, width) replaces token_embedding(text), e.g. with a [MASK] vector at some positions."""
        if text.shape[1] > self.context_length:
            raise ValueError(f"text has {text.shape[1]} tokens; the model's context length is {self.context_length}")
        if embeddings is None:
            embeddings = self.token_embedding(text)
        x = embeddings + self.positional_embedding[: text.shape[1]]  # (B, L, width)
        x = self.transformer(x, causal=causal)
        x = self.ln_final(x)
        # EOT has the largest id, so argmax finds it; with the causal mask it has seen the whole caption
        pooled = x[torch.arange(x.shape[0], device=x.device), text.argmax(dim=-1)]  # (B, width)
        return pooled, x

    def encode_text(self, text):  # (B, L) -> (B, D), not normalised
        return self.text_features(text)[0] @ self.text_projection

    def forward(self, images, text):  # -> (B, D), (B, D), s: the pieces of the CLIP logits s·Î·T̂ᵀ
        return self.encode_image(images), self.encode_text(text), self.logit_scale.exp()


@contextmanager
def frozen_batchnorm_statistics(module):
    """The BatchNorm layers in `module` normalise with the batch's statistics as in training, but leave their running
    statistics and batch counts as they were: for a forward that repeats one already made (activation checkpointing's
    recomputation, the second pass of train.py's gradient accumulation), which would otherwise count that batch
    twice. The layers run the same operations as in training (checkpointing checks that), with a momentum of 0."""
    layers = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in layers]
    for m in layers:
        m.momentum = 0.0  # running = 1 · running + 0 · batch
    try:
        yield
    finally:
        for m, (momentum, count) in zip(layers, saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(count)


# -----------------------------------------------------------------------------
# configurations

def _config(embed_dim, image_resolution, vision_layers, vision_width, vision_patch_size=None,
            text=(512, 8, 12), context_length=77):
    width, heads, layers = text  # text transformer width, heads, layers
    return dict(embed_dim=embed_dim, image_resolution=image_resolution, vision_layers=vision_layers,
                vision_width=vision_width, vision_patch_size=vision_patch_size, context_length=context_length,
                vocab_size=49408, transformer_width=width, transformer_heads=heads, transformer_layers=layers,
                quick_gelu=True)


# name -> CLIPModel kwargs. All use QuickGELU, as OpenAI's models (train.py saves the config, activation included, in
# every checkpoint); weights.build_model infers the rest from a state dict's shapes, so heads are always width // 64.
CONFIGS = {
    # OpenAI's released models
    "RN50": _config(1024, 224, [3, 4, 6, 3], 64),
    "RN101": _config(512, 224, [3, 4, 23, 3], 64),
    "RN50x4": _config(640, 288, [4, 6, 10, 6], 80, text=(640, 10, 12)),
    "ViT-B-32": _config(512, 224, 12, 768, 32),
    "ViT-B-16": _config(512, 224, 12, 768, 16),
    "ViT-L-14": _config(768, 224, 24, 1024, 14, text=(768, 12, 12)),
    # SLIP's ViT-Small sizes (width 384, 12 layers, 6 heads, patch 16) with CLIP's 512-wide text transformer, built as
    # an OpenAI-layout ViT (QuickGELU, ln_pre, patch conv without bias, LayerNorm eps 1e-5). SLIP's ViT-S is a timm
    # ViT (GELU, no ln_pre, a patch-conv bias, LayerNorm eps 1e-6): the same sizes, not the same network.
    "ViT-S-16": _config(512, 224, 12, 384, 16),
    # small models for CPU runs and tests (64 px images, 8×8 patches)
    # (the synthetic captions are at most 19 tokens long, hence a context of 24)
    "tiny-vit": _config(128, 64, 3, 128, 8, text=(128, 2, 3), context_length=24),
    "tiny-rn": _config(128, 64, [1, 1, 1, 1], 32, text=(128, 2, 3), context_length=24),
    "small-vit": _config(256, 64, 6, 256, 8, text=(256, 4, 6)),
}


def create_model(name, **overrides):
    """A randomly initialised CLIPModel from CONFIGS; keyword arguments override config entries."""
    if name not in CONFIGS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(CONFIGS)}")
    return CLIPModel(**{**CONFIGS[name], **overrides})


def compiled(module):
    """torch.compile(module), with the random numbers of eager mode: inductor otherwise draws torch.rand (patch
    dropout) from its own generator, so that accumulation's compiled second pass would drop other patches than its
    eager first pass did, and the gradients would be wrong."""
    torch._inductor.config.fallback_random = True
    return torch.compile(module)
