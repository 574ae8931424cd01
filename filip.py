"""
FILIP: Fine-grained Interactive Language-Image Pre-Training (Yao et al. 2021).

CLIP compares one vector per image with one vector per caption. FILIP keeps the tokens: every image patch token and
every caption token is mapped by a linear head to a small space (256-d) and L2-normalised, and an image and a caption
are compared by a "token-wise late interaction". For image i with patch tokens x_1..x_P and caption j with valid
(non-padding) tokens y_1..y_Lj:

    s^I(i, j) = 1/P  · Σ_k max_{r ≤ Lj} x_k · y_r        image→text: each patch finds its best-matching word
    s^T(j, i) = 1/Lj · Σ_r max_{k ≤ P}  y_r · x_k        text→image: each word finds its best-matching patch

    L_FILIP = ½ [ CE(s · S^I, y) + CE(s · S^T, y) ]      S^I, S^T: (B, N) similarity matrices, y = own index

a symmetric InfoNCE as CLIP's, on the two token-wise similarity matrices, with a learnable temperature s (here the
model's logit_scale). The pooled CLIP features and their projections are not used.

Distributed: as clip_loss, each rank's B images (texts) are scored against the N gathered texts (images), labels =
arange(B) + B·rank, the gather carrying gradient; DDP's averaging then gives the single-process gradient. The B×N×P×L
interaction is computed in chunks of the N gathered rows, each under activation checkpointing, so neither the forward
nor the backward ever holds more than one chunk. The paper's three efficiency tricks: 256-d tokens (the heads' width),
half precision before the all_gather (option `gather_dtype`), and keeping only the top 25% of each sample's tokens
before the all_gather (option `keep_fraction`).

Padding: a caption's valid tokens are positions 0..argmax(text) (SOT to EOT; EOT has the largest id). The pad id is 0,
which is also a real vocabulary id ("!"), so padding is found by position, never by id. Padding is in neither the max
of s^I (it can never be a caption's best word) nor the mean of s^T. Released code differs here: the DeCLIP repo's FILIP
averages s^T over all 77 positions and lets padding tokens compete in the max of s^I; mindformers masks by id > 0,
divides s^T by the number of non-pad tokens, but zeroes the pad tokens' features, so they still enter the max of s^I
with similarity 0 (mindformers also uses label smoothing 0.1 and a separate temperature per direction; we do not).

Patch dropout (train.py --patch-dropout p, ViTs): the token-wise loss then sees only the patches the ViT kept, a
random (1 − p) of them per image: the mean of s^I runs over the kept patches and the max of s^T picks among them. Zero-
shot classification and retrieval see every patch.

The DeCLIP benchmark, whose FILIP recipe we follow (see FILIP.defaults), freezes the ViT's patch-embedding conv at its
random init for every method: `train.py --freeze-patch-embed` does the same (off by default).
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from clip import CLIP
from plumbing import tiled
from plumbing.distributed import all_gather, rank_and_world

# one chunk of the token interaction holds at most this many similarities: 2^25 floats = 128 MiB in float32
CHUNK_ELEMENTS = 2**25


def text_padding_mask(text):
    """(B, L) token ids -> (B, L) bool, True at the caption's tokens: positions 0..argmax (SOT..EOT) inclusive."""
    positions = torch.arange(text.shape[1], device=text.device)  # (L,)
    return positions[None, :] <= text.argmax(dim=-1, keepdim=True)  # (B, L)


# ---------------------------------------------------------------------------------------------------------------------
# Token-wise late interaction, chunked over the rows of the other side


def _image_to_text_block(image_tokens, text_tokens, text_mask):
    """(B, P, d) normalised patches vs (c, L, d) normalised caption tokens with (c, L) mask -> (B, c) s^I."""
    sim = torch.einsum("bpd,cld->bpcl", image_tokens, text_tokens)  # (B, P, c, L)
    sim = sim.masked_fill(~text_mask[None, None], float("-inf"))  # padding can never be the best word
    return sim.amax(dim=3).mean(dim=1)  # max over words, mean over patches -> (B, c)


def _text_to_image_block(text_tokens, text_mask, image_tokens):
    """(B, L, d) normalised caption tokens with (B, L) mask vs (c, P, d) normalised patches -> (B, c) s^T."""
    best = torch.einsum("bld,cpd->blcp", text_tokens, image_tokens).amax(dim=3)  # max over patches -> (B, L, c)
    weights = text_mask.to(best.dtype)[:, :, None]  # (B, L, 1): padding counts for nothing
    return (best * weights).sum(dim=1) / weights.sum(dim=1)  # mean over the caption's own words -> (B, c)


def _chunked(block, queries, keys, chunk_size):
    """block(*queries, *key_chunk) -> (B, c) for chunks of c of the N key rows, concatenated to (B, N).
    Under autograd each chunk is checkpointed: its similarity tensor (B, ·, c, ·) is freed after the forward and
    recomputed in the backward, so memory holds one chunk, never B×N×P×L."""
    if chunk_size is None:  # as many rows as fit in CHUNK_ELEMENTS similarities
        B, Lq = queries[0].shape[:2]
        chunk_size = max(1, CHUNK_ELEMENTS // (B * Lq * keys[0].shape[1]))
    out = []
    for start in range(0, keys[0].shape[0], chunk_size):
        args = (*queries, *(k[start : start + chunk_size] for k in keys))
        if torch.is_grad_enabled():
            out.append(checkpoint(block, *args, use_reentrant=False))
        else:
            out.append(block(*args))
    return torch.cat(out, dim=1)  # (B, N)


def image_to_text_similarity(image_tokens, text_tokens, text_mask, chunk_size=None):
    """s^I: (B, P, d) normalised image tokens vs (N, L, d) normalised text tokens with (N, L) mask -> (B, N)."""
    return _chunked(_image_to_text_block, (image_tokens,), (text_tokens, text_mask), chunk_size)


def text_to_image_similarity(text_tokens, text_mask, image_tokens, chunk_size=None):
    """s^T: (B, L, d) normalised text tokens with (B, L) mask vs (N, P, d) normalised image tokens -> (B, N)."""
    return _chunked(_text_to_image_block, (text_tokens, text_mask), (image_tokens,), chunk_size)


# ---------------------------------------------------------------------------------------------------------------------
# Keeping the top fraction of tokens before the all_gather (the paper's efficiency tricks)


def select_tokens(image_tokens, text_tokens, text_mask, keep_fraction):
    """Keep each sample's ceil(f·P) patches and ceil(f·L) caption tokens with the highest token-wise maximum
    similarity to its own pair: a patch scores max_r x·y_r over its caption's valid words, a word max_k y·x_k over
    its image's patches; padding scores −inf, so it is kept only when a caption has fewer than ceil(f·L) tokens (and
    it stays masked). Returns (B, kP, d) patches, (B, kL, d) text tokens and their (B, kL) mask.

    The paper (as we read it) scores a token against all texts (images) on the same worker; we score it against its
    own pair only, so the selection, and with it the loss, does not depend on how the global batch is split over
    ranks. The DeCLIP repo also uses the own pair but scores by the *sum* of similarities (padding included) and
    keeps k = 16."""
    B, P, d = image_tokens.shape
    L = text_tokens.shape[1]
    with torch.no_grad():  # which tokens travel is a discrete choice: no gradient through it
        sim = torch.einsum("bpd,bld->bpl", image_tokens, text_tokens)  # (B, P, L): own pairs only
        sim = sim.masked_fill(~text_mask[:, None, :], float("-inf"))
        image_score = sim.amax(dim=2)  # (B, P): each patch's best word
        text_score = sim.amax(dim=1)  # (B, L): each word's best patch; −inf at padding
        image_index = image_score.topk(max(1, math.ceil(keep_fraction * P)), dim=1).indices  # (B, kP)
        text_index = text_score.topk(max(1, math.ceil(keep_fraction * L)), dim=1).indices  # (B, kL)
    kept_image = image_tokens.gather(1, image_index[:, :, None].expand(-1, -1, d))  # (B, kP, d)
    kept_text = text_tokens.gather(1, text_index[:, :, None].expand(-1, -1, d))  # (B, kL, d)
    return kept_image, kept_text, text_mask.gather(1, text_index)


# ---------------------------------------------------------------------------------------------------------------------
# The loss


def filip_loss(image_tokens, text_tokens, text_mask, logit_scale, keep_fraction=1.0, gather_dtype=None,
               chunk_size=None):
    """Symmetric InfoNCE on the token-wise similarities of the local rows against the global batch.

    image_tokens: (B, P, d), text_tokens: (B, L, d) local, unnormalised (normalised here per token);
    text_mask: (B, L) bool, True at the caption's tokens; logit_scale: the multiplier s (already exponentiated).
    keep_fraction < 1: only each sample's top tokens (select_tokens) are gathered; they are the *keys*, the words
      maximised over in s^I and the patches maximised over in s^T, while the local queries (the patches averaged in
      s^I, the words averaged in s^T) keep all their tokens, as in the DeCLIP repo. The own rank's keys are reduced
      too, so the loss is the same for any number of ranks.
    gather_dtype: e.g. torch.float16, the paper's half precision before all_gather (the keys are rounded to it on
      every rank, own included, and the interaction then runs in float32).
    chunk_size: key rows per chunk of the interaction (None: sized by CHUNK_ELEMENTS).
    """
    image_tokens = F.normalize(image_tokens.float(), dim=-1)  # (B, P, d)
    text_tokens = F.normalize(text_tokens.float(), dim=-1)  # (B, L, d)
    # float32 throughout: autocast would run the einsums in bf16 even on float32 inputs
    with torch.autocast(image_tokens.device.type, enabled=False):
        image_keys, text_keys, text_key_mask = image_tokens, text_tokens, text_mask
        if keep_fraction < 1.0:
            image_keys, text_keys, text_key_mask = select_tokens(image_tokens, text_tokens, text_mask, keep_fraction)
        if gather_dtype is not None:
            image_keys, text_keys = image_keys.to(gather_dtype), text_keys.to(gather_dtype)
        all_image_keys = all_gather(image_keys).float()  # (N, P', d)
        all_text_keys = all_gather(text_keys).float()  # (N, L', d)
        all_text_key_mask = all_gather(text_key_mask.float()) > 0.5  # (N, L'): float, as every backend gathers it
        rank, _ = rank_and_world()
        B = image_tokens.shape[0]
        labels = torch.arange(B, device=image_tokens.device) + rank * B  # (B,) own index in the global batch
        if tiled.needed(B, all_text_keys.shape[0]):  # (B, N) similarities past tiled.LIMIT_MB: by tiles of both sides
            return tiled.filip_loss(_image_to_text_block, _text_to_image_block, image_tokens, text_tokens, text_mask,
                                    all_image_keys, all_text_keys, all_text_key_mask, logit_scale, labels)

        sim_i2t = image_to_text_similarity(image_tokens, all_text_keys, all_text_key_mask, chunk_size)  # (B, N)
        sim_t2i = text_to_image_similarity(text_tokens, text_mask, all_image_keys, chunk_size)  # (B, N)
        return (F.cross_entropy(logit_scale * sim_i2t, labels) + F.cross_entropy(logit_scale * sim_t2i, labels)) / 2


# ---------------------------------------------------------------------------------------------------------------------
# The method (augmentation: CLIP's, one view per image and one caption)


def image_token_width(model):
    # ViT tokens are ln_post outputs (the ViT's width); ResNet tokens are the final feature map (32 · width channels)
    visual = model.visual
    return visual.ln_post.normalized_shape[0] if hasattr(visual, "ln_post") else visual.attnpool.k_proj.in_features


class FILIP(CLIP):
    # Optimiser: the paper trains with LAMB (its appendix tables), which train.py does not offer. We use the AdamW
    # recipe of the DeCLIP benchmark's FILIP runs (Sense-GVT/DeCLIP, experiments/filip_experiments/yfcc15m/
    # yfcc15m_vit_filip/config.yaml): peak lr 5e-4 (its warmup_lr), weight decay 0.5, betas (0.9, 0.98), eps 1e-8,
    # batch 4096 as the benchmark's other methods.
    # Temperature init 0.07 as CLIP (the DeCLIP repo initialises its FILIP temperature to ln(1/0.07) as well).
    defaults = dict(lr=5e-4, batch=4096, weight_decay=0.5, betas=(0.9, 0.98), eps=1e-8, logit_scale_init=1 / 0.07)
    # the pooled features' projections (visual.proj or the ResNet's attnpool, text_projection) get no gradient
    find_unused_parameters = True

    def __init__(self, model, embed_dim=256, keep_fraction=1.0, half_gather=False, chunk_size=None):
        super().__init__(model)
        # the paper's token heads: one linear map per modality into a shared 256-d token space
        self.image_head = nn.Linear(image_token_width(model), embed_dim)
        self.text_head = nn.Linear(model.transformer_width, embed_dim)
        # keep_fraction = 1 (off) by default, unlike the paper's 25%: the selection approximates the loss to save
        # all_gather traffic and interaction compute at batches of 10k+ over many GPUs; at our scales gathering all
        # 256-d tokens is cheap next to the encoders, and early in training the selection would rest on the
        # similarities of a random network. Half precision before the gather (half_gather=True: float16, which for
        # unit vectors keeps 3 more mantissa bits than bfloat16) is off for the same reason: exact by default.
        self.keep_fraction, self.chunk_size = keep_fraction, chunk_size
        self.gather_dtype = torch.float16 if half_gather else None

    def image_tokens(self, images):  # (B, 3, R, R) -> (B, P, d), unnormalised; no class token
        # ViT patch tokens after ln_post; the DeCLIP repo's ViT returns them before ln_post (only its class token
        # goes through it)
        return self.image_head(self.model.image_features(images)[1])

    def text_tokens(self, text):  # (B, L) -> (B, L, d) unnormalised, (B, L) mask of the caption's tokens
        return self.text_head(self.model.text_features(text)[1]), text_padding_mask(text)

    def features(self, batch):
        image_tokens = self.image_tokens(batch["image"])  # (B, P, d): P' patches with patch dropout
        text_tokens, text_mask = self.text_tokens(batch["text"])  # (B, L, d), (B, L)
        return {"image_tokens": image_tokens, "text_tokens": text_tokens, "text_mask": text_mask}

    def loss(self, features):
        logit_scale = self.model.logit_scale.exp()  # s
        loss = filip_loss(features["image_tokens"], features["text_tokens"], features["text_mask"], logit_scale,
                          self.keep_fraction, self.gather_dtype, self.chunk_size)
        return loss, {"filip": loss.detach(), "logit_scale": logit_scale.detach()}

    # --- zero-shot classification and retrieval with the same token-wise similarity ---------------------------------

    def embed_images(self, images):
        return F.normalize(self.image_tokens(images).float(), dim=-1)  # (N, P, d)

    def embed_texts(self, tokens):
        text_tokens, text_mask = self.text_tokens(tokens)
        return F.normalize(text_tokens.float(), dim=-1), text_mask  # (M, L, d), (M, L)

    def embed_classes(self, tokens):
        """(C, T, L) prompts -> ((C, T, L, d) tokens, (C, T, L) mask): every template is kept. A class has no
        single vector to average, so the ensemble happens in `similarity`, as the mean over the T templates of the
        image→text token-wise similarity (our reading of the paper's prompt ensemble; the DeCLIP repo
        instead averages the templates' token features position by position, padding included)."""
        C, T, L = tokens.shape
        text_tokens, text_mask = self.embed_texts(tokens.reshape(C * T, L))
        return text_tokens.reshape(C, T, L, -1), text_mask.reshape(C, T, L)

    @torch.no_grad()
    def similarity(self, image_embeddings, text_embeddings):
        """(N, P, d) images vs texts ((M, L, d), (M, L)) -> (N, M), or vs classes ((C, T, L, d), (C, T, L)) -> (N, C).
        The score is s^I, image→text (the paper's zero-shot classification score; for retrieval it serves both
        directions, as CLIP's cosine does), times a fixed 100 as CLIP's zero-shot evaluation."""
        text_tokens, text_mask = text_embeddings
        if text_tokens.dim() == 4:  # classes: average the similarity over the templates
            C, T, L, d = text_tokens.shape
            sim = image_to_text_similarity(image_embeddings, text_tokens.reshape(C * T, L, d),
                                           text_mask.reshape(C * T, L), self.chunk_size)  # (N, C·T)
            return 100.0 * sim.reshape(-1, C, T).mean(dim=2)  # (N, C)
        return 100.0 * image_to_text_similarity(image_embeddings, text_tokens, text_mask, self.chunk_size)  # (N, M)


Method = FILIP
