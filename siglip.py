"""
SigLIP: Sigmoid Loss for Language Image Pre-Training (Zhai et al. 2023).

CLIP's softmax over the batch is replaced by an independent binary classification of every (image, text) pair:
is this the matching caption or not?

    logits_ij = s · x̂_i · ŷ_jᵀ + b              s = exp(t'), t' learnable, init ln 10;  b learnable, init −10
    z_ij      = 1 if i = j else −1              (z = 2I − 1)
    L_SigLIP  = −(1/|B|) Σ_i Σ_j log σ(z_ij · logits_ij)

There is no normalisation over the batch, so each pair's term needs only its own two embeddings. The bias starts at
−10 because almost all pairs are negatives: with b = 0 the initial loss would be dominated by the |B|² − |B|
negatives and the first steps would spend themselves pushing everything apart (paper §3.2).

Distributed (paper §3.3, "chunked" implementation): with W ranks each holding B = N/W pairs, the image features stay
on their rank and the text features travel. A rank first scores its own B×B block (z = 2I − 1), then receives the
other ranks' text chunks one after another and scores each against its images with z = −1 (they hold only
negatives). The chunks move between neighbours with point-to-point sends inside autograd Functions whose backward
sends the gradient back the way the features came, and each block is recomputed in the backward rather than kept,
so each rank only ever holds B×B logits instead of the N×N (or B×N) matrix. As in open_clip's
`SigLipLoss(dist_impl="bidir")`, a round sends to the left and right neighbours at once, (W−1)//2 such rounds plus
one one-way round when W−1 is odd cover every other rank exactly once.

Each rank's loss is the sum of its W blocks divided by its local B: summed over ranks that is W · L_SigLIP (the paper
divides by the global |B| = W·B), and DDP's gradient averaging divides the W back out, so the parameter gradients
are exactly those of one process holding the whole global batch.
"""

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from clip import CLIP
from plumbing import tiled
from plumbing.distributed import rank_and_world

# ---------------------------------------------------------------------------------------------------------------------
# Moving text chunks between neighbouring ranks, with gradient


def _send_recv(sends, recvs):
    """Post point-to-point sends [(tensor, peer)] and receives [(shape_like, peer)] together and wait for all of them;
    returns the received tensors. Posting them in one batch means no rank blocks on a send its peer has not reached."""
    buffers = [torch.empty_like(like) for like, _ in recvs]
    ops = [dist.P2POp(dist.isend, tensor.contiguous(), peer) for tensor, peer in sends]
    ops += [dist.P2POp(dist.irecv, buffer, peer) for buffer, (_, peer) in zip(buffers, recvs)]
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    return buffers


class NeighbourExchange(torch.autograd.Function):
    """Send `to_left` to the left neighbour and `to_right` to the right one; return (from_left, from_right), what the
    neighbours sent us. The backward is the same exchange on the gradients: what came from the left goes back to the
    left, and what arrives from the right is the gradient of what we had sent to the right (and vice versa)."""

    @staticmethod
    def forward(ctx, left, right, to_left, to_right):
        ctx.left, ctx.right = left, right
        # the left neighbour's to_right becomes our from_left (same shape on every rank: equal local batches).
        # Receiving from the right first pairs the messages correctly even when left = right (W = 2): messages
        # between two ranks arrive in the order they were posted, and a neighbour posts its to_left first.
        from_right, from_left = _send_recv([(to_left, left), (to_right, right)], [(to_left, right), (to_right, left)])
        return from_left, from_right

    @staticmethod
    def backward(ctx, grad_from_left, grad_from_right):
        grad_to_left, grad_to_right = NeighbourExchange.apply(ctx.left, ctx.right, grad_from_left, grad_from_right)
        return None, None, grad_to_left, grad_to_right


class ShiftRight(torch.autograd.Function):
    """One-way round: send `to_right` to the right neighbour, return what the left neighbour sent. Backward: the
    gradient goes back to the left, and the gradient of what we sent arrives from the right."""

    @staticmethod
    def forward(ctx, left, right, to_right):
        ctx.left, ctx.right = left, right
        (from_left,) = _send_recv([(to_right, right)], [(to_right, left)])
        return from_left

    @staticmethod
    def backward(ctx, grad_from_left):
        # the same shift with the roles of left and right swapped
        return None, None, ShiftRight.apply(ctx.right, ctx.left, grad_from_left)


# ---------------------------------------------------------------------------------------------------------------------
# The loss


def _sigmoid_block(image_features, text_features, logit_scale, logit_bias, positives_on_diagonal):
    """−Σ log σ(z · logits) over one B×B block; z = 2I − 1 for a rank's own block, −1 for another rank's texts.
    With −log σ(−x) = softplus(x) and −log σ(x) = softplus(x) − x this is Σ_ij softplus(logits_ij), minus
    Σ_i logits_ii where the positives are: z is never built, and the backward keeps one B×B tensor, not three."""
    # one rank holding many pairs (e.g. --grad-accum): a block past tiled.LIMIT_MB is never built, the same sum by
    # tiles (plumbing/tiled.py)
    if tiled.needed(image_features.shape[0], text_features.shape[0]):
        return tiled.sigmoid_loss(image_features, text_features, logit_scale, logit_bias, positives_on_diagonal)
    # float32 logits: autocast would run this matmul in bf16 even on float32 inputs, and s·cos + b, of order ±10,
    # would carry errors of ~0.05
    with torch.autocast(image_features.device.type, enabled=False):
        logits = (logit_scale * image_features) @ text_features.T + logit_bias  # (B, B)
    loss = F.softplus(logits).sum()
    if positives_on_diagonal:
        loss = loss - logits.diagonal().sum()
    return loss


def siglip_loss(image_features, text_features, logit_scale, logit_bias):
    """Pairwise sigmoid loss of the local images against the texts of the whole global batch.

    image_features, text_features: (B, D) local, unnormalised (normalised here).
    logit_scale: the multiplier s = exp(t'), a scalar tensor (already exponentiated, as clip_loss and open_clip).
    logit_bias: the bias b, a scalar tensor.
    Returns this rank's sum over its B×N pairs divided by the local B (see the module docstring for DDP).
    """
    # float32 features and logits (see _sigmoid_block), whatever the autocast dtype of the encoders
    image_features = F.normalize(image_features.float(), dim=-1)  # (B, D)
    text_features = F.normalize(text_features.float(), dim=-1)  # (B, D)
    B = image_features.shape[0]
    own = _sigmoid_block(image_features, text_features, logit_scale, logit_bias, positives_on_diagonal=True)
    return (own + _other_ranks(image_features, text_features, logit_scale, logit_bias)) / B


@torch.compiler.disable  # the point-to-point sends run eagerly; torch.compile splits its graph here
def _other_ranks(image_features, text_features, logit_scale, logit_bias):
    """The sum of the negatives-only blocks of our (B, D) images against the other W − 1 ranks' (B, D) texts, which
    arrive round by round (0 when W = 1). Each block is checkpointed: its B×B logits are freed after the forward and
    recomputed in the backward, so the rank holds one block at a time instead of W − 1 (the chunks, (B, D) each,
    stay). open_clip keeps every block for the backward: (W − 1)·B² floats, the B×N it set out to avoid."""
    def block(texts):  # (B, D) texts of another rank -> scalar
        if tiled.needed(len(image_features), len(texts)):  # tiles are recomputed in the backward: no checkpoint
            return _sigmoid_block(image_features, texts, logit_scale, logit_bias, False)
        return checkpoint(_sigmoid_block, image_features, texts, logit_scale, logit_bias, False, use_reentrant=False)

    rank, world = rank_and_world()
    left, right = (rank - 1) % world, (rank + 1) % world
    loss = image_features.new_zeros(())
    # after round k we hold the texts of ranks rank−k (from the left) and rank+k (from the right)
    to_left = to_right = text_features
    for _ in range((world - 1) // 2):
        from_left, from_right = NeighbourExchange.apply(left, right, to_left, to_right)
        loss = loss + block(from_left) + block(from_right)
        to_left, to_right = from_right, from_left  # pass each chunk on in the direction it was travelling
    if (world - 1) % 2:
        # one chunk is left, the texts of rank rank + W//2 = rank − W//2: one more step to the right reaches everyone
        loss = loss + block(ShiftRight.apply(left, right, to_right))
    return loss


# ---------------------------------------------------------------------------------------------------------------------
# The method (augmentation: CLIP's, one view per image and one caption)


class SigLIP(CLIP):
    # Optimiser: the paper's from-scratch SigLIP recipe (and big_vision's SigLIP configs): Adam with β2 = 0.95
    # instead of 0.999, which the paper found to stabilise large-batch training, lr 1e-3, weight decay 1e-4.
    # big_vision's weight decay is decoupled *and not multiplied by the learning rate* (optax add_decayed_weights
    # after scale(lr)), whereas torch's AdamW multiplies it by lr: 1e-4 there is 1e-4 / 1e-3 = 0.1 here.
    # eps 1e-8 is optax's scale_by_adam default. The larger models of the paper use Adafactor; we use AdamW for all.
    # One setting for every encoder (big_vision trains ViTs only; no "resnet" entry). The paper's batch: 32k.
    defaults = dict(lr=1e-3, batch=32768, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, logit_scale_init=10.0)
    # --pretrained: a CLIP file's s ≈ 100 would scale sigmoid logits (with a bias of -10) far from SigLIP's init of 10
    pretrained_temperature = False

    @staticmethod
    def decays(name, param):
        # big_vision decays only kernels (its optimiser's default wd_mults: ".*/kernel$"): the weights of dense and
        # conv layers, and the projections (dense kernels there). Embedding tables (flax's "embedding",
        # "pos_embedding", "cls"), gains, biases, t' and b are not decayed. In our model every parameter of 2-D or
        # more that is not a kernel is named *embedding (token, positional, attention-pool positional).
        return param.ndim >= 2 and "embedding" not in name

    def __init__(self, model):
        super().__init__(model)
        # the temperature t' is the model's logit_scale (train.py fills it with ln(logit_scale_init) = ln 10); the
        # bias is SigLIP's own parameter, saved with the method's state (a scalar: no weight decay, see decays)
        self.logit_bias = nn.Parameter(torch.tensor(-10.0))

    # features: CLIP's, the (B, D) image and text embeddings

    def loss(self, features):
        logit_scale = self.model.logit_scale.exp()  # s
        loss = siglip_loss(features["image"], features["text"], logit_scale, self.logit_bias)
        logs = {"siglip": loss.detach(), "logit_scale": logit_scale.detach(), "logit_bias": self.logit_bias.detach()}
        return loss, logs

    # post_step: CLIP's clamp of t' to [0, ln 100], as open_clip does for SigLIP (the paper does not clamp).
    # Zero-shot and retrieval: CLIP's cosine similarity. The model's score s·cos + b is an increasing function of the
    # cosine, so every ranking (argmax, recall@k) is the same.


Method = SigLIP
