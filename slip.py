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
  * GlobalBatchNorm (below) computes the statistics over the GLOBAL batch (all ranks, gathered with gradient), as
    SLIP's nn.SyncBatchNorm does, so W ranks × B samples behave exactly like one process with W·B samples (tested).
    It runs on CPU/gloo too, where torch's SyncBatchNorm refuses, and convert_sync_batchnorm leaves it alone.
  * It warns once when that global batch is below `min_bn_batch` (32).
  * Gradient accumulation does NOT enlarge the BatchNorm batch, nor the SimCLR negatives: each micro-batch is
    normalised with its own statistics and contrasted only within itself. Accumulating k micro-batches of n is not
    one batch of k·n; to get a larger BatchNorm/contrastive batch use more ranks or larger micro-batches.
"""

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.transforms import v2

import data
from clip import CLIP, all_gather, rank_and_world
from model import ModifiedResNet

# ---------------------------------------------------------------------------------------------------------------------
# Augmentation: one CLIP view and two SimCLR views per image


def ssl_augmentation(image_size, scale):
    """SimCLR's (and MoCo v2's) augmentation: image (PIL or uint8 tensor) -> normalised (3, R, R) tensor. Two deliberate
    differences from SLIP's datasets: bicubic crops (SLIP: torchvision's bilinear default) and OpenAI's
    normalisation constants (SLIP: ImageNet's), so every view matches what the CLIP model sees at evaluation."""
    # SimCLR sets the blur kernel to ~10% of the image side (odd); SLIP blurs with PIL's radius-σ filter at 224 px.
    # σ stays in pixels (0.1-2), so at small resolutions (7 px kernel at 64 px) the largest σ are truncated.
    kernel_size = max(3, int(0.1 * image_size) // 2 * 2 + 1)
    return v2.Compose([
        v2.RandomResizedCrop(image_size, scale=scale, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.RandomApply([v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1)], p=0.8),
        v2.RandomGrayscale(p=0.2),
        v2.RandomApply([v2.GaussianBlur(kernel_size, sigma=(0.1, 2.0))], p=0.5),
        v2.RandomHorizontalFlip(),
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(data.MEAN, data.STD),
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
# BatchNorm over the global batch (used by SLIP's SimCLR head and DeCLIP's SimSiam heads)


class GlobalBatchNorm(nn.Module):
    """BatchNorm1d over (B, C) features whose training statistics are those of the global batch, i.e. of all ranks
    together, like torch's SyncBatchNorm. Each rank sends (count, mean, sum of squared deviations) per channel,
    gathered WITH gradient (clip.all_gather), and merges them exactly (Chan et al.), so W ranks of B samples give the
    output and gradients of one process with W·B samples. Unlike nn.SyncBatchNorm it also runs on CPU (gloo), and it
    is no _BatchNorm, so nn.SyncBatchNorm.convert_sync_batchnorm leaves it as it is. Eval mode uses running
    statistics (momentum 0.1, unbiased variance), as nn.BatchNorm1d."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, min_batch=32):
        super().__init__()
        self.eps, self.momentum, self.min_batch = eps, momentum, min_batch
        self.weight = nn.Parameter(torch.ones(num_features))  # γ
        self.bias = nn.Parameter(torch.zeros(num_features))  # β
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.warned = False

    def forward(self, x):  # (B, C) -> (B, C)
        if not self.training:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        B, C = x.shape
        rank, world = rank_and_world()
        if B * world < 2:
            raise ValueError("BatchNorm needs more than one sample in the global batch when training")
        if B * world < self.min_batch and not self.warned and rank == 0:  # once, from one rank
            self.warned = True
            warnings.warn(
                f"BatchNorm over a global batch of only {B * world} samples (< {self.min_batch}): its statistics are "
                f"noisy and each output leans on few other samples; SLIP saw chance-level accuracy at per-GPU batch 8 "
                f"(SLIP issue #7). Use a larger per-step batch (more ranks or larger micro-batches); gradient "
                f"accumulation does not help, since every micro-batch is normalised on its own.")
        x32 = x.float()  # statistics in float32, also under bf16 autocast
        mean = x32.mean(dim=0)  # (C,) this rank's
        m2 = (x32 - mean).square().sum(dim=0)  # (C,) this rank's sum of squared deviations
        count = x32.new_full((1,), B)
        stats = all_gather(torch.cat([count, mean, m2])[None])  # (W, 1 + 2C), with gradient
        counts, means, m2s = stats[:, :1], stats[:, 1:C + 1], stats[:, C + 1:]  # (W, 1), (W, C), (W, C)
        N = counts.sum()
        global_mean = (counts * means).sum(dim=0) / N  # (C,)
        global_var = (m2s + counts * (means - global_mean).square()).sum(dim=0) / N  # (C,) biased, as BN normalises
        with torch.no_grad():
            self.running_mean.lerp_(global_mean, self.momentum)
            self.running_var.lerp_(global_var * N / (N - 1), self.momentum)  # unbiased, as nn.BatchNorm1d keeps
        y = (x32 - global_mean) * torch.rsqrt(global_var + self.eps) * self.weight + self.bias
        return y.to(x.dtype)


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

    def forward(self, batch):
        # CLIP on the mildly cropped view, exactly as clip.py: logs {"clip", "logit_scale"}. Gathered with gradient,
        # where SLIP's release gathers without (see the module docstring)
        loss_clip, logs = super().forward(batch)
        # SimCLR on the two strongly augmented views, each through the encoder and the head separately (as SLIP:
        # each BatchNorm sees one view's batch)
        z_a = self.image_mlp(self.model.image_features(batch["image_a"])[0])  # (B, 256)
        z_b = self.image_mlp(self.model.image_features(batch["image_b"])[0])  # (B, 256)
        loss_ssl, ssl_accuracy = simclr_loss(z_a, z_b, self.ssl_temperature)
        loss = loss_clip + self.ssl_scale * loss_ssl
        return loss, {**logs, "ssl": loss_ssl.detach(), "ssl_acc": ssl_accuracy}

    # post_step (clamp s to [1, 100], as SLIP's main.py) and the zero-shot interface are CLIP's


Method = SLIP
