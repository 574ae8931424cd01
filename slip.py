"""
SLIP: Self-supervision meets Language-Image Pre-training (Mu et al. 2021).

CLIP's loss on one view of each image, plus SimCLR on two other views of the same image:

    L = L_CLIP(Î, T̂) + ssl_scale · L_SimCLR(z_a, z_b),      ssl_scale = 1

    z = h(f(x))                     f: the image encoder's pooled feature BEFORE the CLIP projection (ViT: the class
                                    token after ln_post), h: an MLP  width → 4096 → 4096 → 256 with BatchNorm + ReLU
    q = ẑ = z / ‖z‖,  τ = 0.1
    L_SimCLR = ½ [ CE([q_a k_bᵀ, q_a k_aᵀ − 1e9·I] / τ, y) + CE([q_b k_aᵀ, q_b k_bᵀ − 1e9·I] / τ, y) ]

i.e. NT-Xent: each view must find the other view of its own image among the 2N − 1 other views of the batch
(the −1e9 removes the trivial match with itself), y = own index. The image encoder runs three times per step
(the CLIP view and the two SimCLR views); the text encoder once.

Distributed: as CLIP (clip.py), each rank scores its B rows against the N = W·B gathered keys (gathered with
gradient, labels = own global index), so with DDP's averaging the gradients are those of one process on the
whole batch. SLIP's released CLIP term differs: it gathers the other ranks' features WITHOUT gradient
(utils.all_gather_batch), so its DDP gradient is not the single-process one (LaCLIP issue #6); only its SimCLR term
gathers with gradient. Ours gathers both with gradient: the exact gradient of the loss as written.

Logs: clip (L_CLIP), ssl (L_SimCLR), ssl_acc (fraction of a-views whose most similar b-view is their own), logit_scale.

BatchNorm and small batches. The MLP's BatchNorm normalises with statistics over the batch, so both its noise and
how much one sample's output depends on the others grow as the batch shrinks; SLIP's authors saw chance-level
accuracy with a per-GPU batch of 8 and gradient accumulation (facebookresearch/SLIP issue #7). Our choices:
  * distributed.GlobalBatchNorm computes the statistics over the GLOBAL batch (all ranks, gathered with gradient), as
    SLIP's nn.SyncBatchNorm does, so W ranks × B samples behave exactly like one process with W·B samples (tested).
    It runs on CPU/gloo too, where torch's SyncBatchNorm refuses, and convert_sync_batchnorm leaves it alone.
  * The head runs in the loss, on the whole batch, so train.py's --grad-accum enlarges the BatchNorm batch and the
    SimCLR negatives as it does CLIP's: K micro-batches of n are one batch of K·n (tested), where SLIP's released
    --update-freq accumulation normalises and contrasts each micro-batch on its own.
  * It warns once when that global batch is below `min_bn_batch` (32).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.transforms import v2

import data
from clip import CLIP
from model import ModifiedResNet
from plumbing import tiled
from plumbing.distributed import GlobalBatchNorm, all_gather, rank_and_world

# ---------------------------------------------------------------------------------------------------------------------
# Augmentation: one CLIP view and two SimCLR views per image


def ssl_augmentation(image_size, scale):
    """SimCLR's (and MoCo v2's) augmentation: image (PIL, uint8 tensor or samples.Jpeg) -> uint8 (3, R, R) tensor, which
    the training process normalises on the device (data.normalise). Two deliberate differences from SLIP's datasets:
    bicubic crops (SLIP: torchvision's bilinear default) and OpenAI's normalisation constants (SLIP: ImageNet's), so
    every view matches what the CLIP model sees at evaluation."""
    # SimCLR sets the blur kernel to ~10% of the image side (odd); SLIP blurs with PIL's radius-σ filter at 224 px.
    # σ stays in pixels (0.1-2), so at small resolutions (7 px kernel at 64 px) the largest σ are truncated.
    kernel_size = max(3, int(0.1 * image_size) // 2 * 2 + 1)
    return v2.Compose([
        data.RandomResizedCrop(image_size, scale),  # torchvision's, bicubic; a JPEG decoded at the size it needs
        v2.RandomApply([v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1)], p=0.8),
        v2.RandomGrayscale(p=0.2),
        v2.RandomApply([v2.GaussianBlur(kernel_size, sigma=(0.1, 2.0))], p=0.5),
        v2.RandomHorizontalFlip(),
        *data.TO_UINT8,  # normalised on the device (data.normalise)
    ])


class Transform:
    """(image, caption) -> {"image", "image_a", "image_b": (3, R, R), "text": (L,)}. Picklable for workers.
    All randomness comes from torch's RNG, which train.py seeds per sample."""

    def __init__(self, image_size, tokenizer, context_length):
        # SLIP's CLIP view: RandomResizedCrop(scale 0.5-1), no flip, no colour (SLIP uses bilinear here; we use the
        # bicubic of data.train_transform, as our CLIP does)
        self.image = data.train_transform(image_size, scale=(0.5, 1.0))
        self.ssl = ssl_augmentation(image_size, scale=(0.08, 1.0))  # two independent draws per image
        self.tokenizer = tokenizer
        self.context_length = context_length

    def __call__(self, image, caption):
        return {"image": self.image(image), "image_a": self.ssl(image), "image_b": self.ssl(image),
                "text": self.tokenizer(caption, self.context_length)[0]}


# ---------------------------------------------------------------------------------------------------------------------
# The loss


def simclr_loss(z_a, z_b, temperature=0.1):
    """NT-Xent of the local rows against the global batch (SLIP's SIMCLRLoss).

    z_a, z_b: (B, E) local head outputs of the two views, unnormalised. Returns (loss, accuracy): the mean over local
    rows of ½(CE_a + CE_b), and the fraction of rows whose a-view picks its own b-view among all b-views (for logs).
    """
    # float32 logits: under autocast, matmuls run in bf16 even on float32 inputs, so autocast is switched off here
    with torch.autocast(z_a.device.type, enabled=False):
        q_a = F.normalize(z_a.float(), dim=-1)  # (B, E)
        q_b = F.normalize(z_b.float(), dim=-1)  # (B, E)
        k_a = all_gather(q_a)  # (N, E) with gradient: negatives from every rank
        k_b = all_gather(q_b)  # (N, E)
        rank, _ = rank_and_world()
        B, N = q_a.shape[0], k_a.shape[0]
        labels = torch.arange(B, device=q_a.device) + rank * B  # (B,) own index in the global batch
        # a paper-sized batch on one rank (e.g. --grad-accum): (B, 2N) logits past tiled.LIMIT_MB are never built. By
        # tiles of ONE matrix [k_a; k_b] [k_b; k_a]ᵀ / τ, without logits_ba = logits_abᵀ: a-view i's row and b-view i's
        # column hold the positive at (i, i), the view itself at i ± N (left out); this rank's are loss_a's and loss_b's
        if tiled.needed(B, 2 * N):
            itself = (torch.arange(2 * N, device=q_a.device) + N) % (2 * N)  # (2N,) each row's own view's column
            loss = tiled.infonce(torch.cat([k_a, k_b]), torch.cat([k_b, k_a]), 1 / temperature, labels, exclude=itself)
            return loss, (tiled.argmax(q_a, k_b) == labels).float().mean()
        self_mask = F.one_hot(labels, N) * 1e9  # (B, N): a view must not find itself
        logits_aa = q_a @ k_a.T / temperature - self_mask  # (B, N)
        logits_bb = q_b @ k_b.T / temperature - self_mask  # (B, N)
        logits_ab = q_a @ k_b.T / temperature  # (B, N): the positive is at the own index
        logits_ba = q_b @ k_a.T / temperature  # (B, N)
        loss_a = F.cross_entropy(torch.cat([logits_ab, logits_aa], dim=1), labels)  # over (B, 2N)
        loss_b = F.cross_entropy(torch.cat([logits_ba, logits_bb], dim=1), labels)
        accuracy = (logits_ab.argmax(dim=1) == labels).float().mean()  # as SLIP logs it (there in %)
    return (loss_a + loss_b) / 2, accuracy.detach()


# ---------------------------------------------------------------------------------------------------------------------
# The method


class SLIP(CLIP):
    # SLIP's ViT recipe (main.py): AdamW lr 3e-3, wd 0.1, betas (0.9, 0.98), eps 1e-8, batch 4096
    defaults = dict(lr=3e-3, batch=4096, weight_decay=0.1, betas=(0.9, 0.98), eps=1e-8, logit_scale_init=1 / 0.07)

    def __init__(self, model, ssl_scale=1.0, ssl_temperature=0.1, mlp_dim=4096, ssl_emb_dim=256, min_bn_batch=32):
        super().__init__(model)
        self.ssl_scale, self.ssl_temperature = ssl_scale, ssl_temperature
        # the head reads the pooled feature before the CLIP projection: ViT width, or D for a ResNet, whose attnpool
        # already ends in its projection (so there the head shares the CLIP embedding)
        width = model.embed_dim if isinstance(model.visual, ModifiedResNet) else model.vision_width
        self.image_mlp = nn.Sequential(
            nn.Linear(width, mlp_dim), GlobalBatchNorm(mlp_dim, min_batch=min_bn_batch), nn.ReLU(inplace=True),
            nn.Linear(mlp_dim, mlp_dim), GlobalBatchNorm(mlp_dim, min_batch=min_bn_batch), nn.ReLU(inplace=True),
            nn.Linear(mlp_dim, ssl_emb_dim),
        )

    def transform(self, tokenizer):
        return Transform(self.model.image_resolution, tokenizer, self.model.context_length)

    def features(self, batch):
        """CLIP's two embeddings, and the pooled image features f(x) of the two SimCLR views, before the head: the
        head's BatchNorm mixes the batch, so the head runs in the loss."""
        return {**super().features(batch),  # "image", "text": (B, D)
                "image_a": self.model.image_features(batch["image_a"])[0],  # (B, width)
                "image_b": self.model.image_features(batch["image_b"])[0]}  # (B, width)

    def loss(self, features):
        # CLIP on the mildly cropped view, exactly as clip.py: logs {"clip", "logit_scale"}. Gathered with gradient,
        # where SLIP's release gathers without (see the module docstring)
        loss_clip, logs = super().loss(features)
        # SimCLR on the two strongly augmented views: the head on each view's batch separately (as SLIP: each
        # BatchNorm sees one view's batch), then NT-Xent
        z_a, z_b = self.image_mlp(features["image_a"]), self.image_mlp(features["image_b"])  # (B, 256) each
        loss_ssl, ssl_accuracy = simclr_loss(z_a, z_b, self.ssl_temperature)
        loss = loss_clip + self.ssl_scale * loss_ssl
        return loss, {**logs, "ssl": loss_ssl.detach(), "ssl_acc": ssl_accuracy}

    # post_step (clamp s to [1, 100], as SLIP's main.py) and the zero-shot interface are CLIP's


Method = SLIP
