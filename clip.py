"""
CLIP: Learning Transferable Visual Models From Natural Language Supervision (Radford et al. 2021).

For a batch of N (image, text) pairs, embed both, L2-normalise, and score every image against every text:

    logits = s · Î T̂ᵀ                      (N, N),  s = exp(t), t learnable, init ln(1/0.07), s <= 100
    L_CLIP = ½ [ CE(logits, y) + CE(logitsᵀ, y) ],   y = (0, 1, ..., N-1)

i.e. a symmetric InfoNCE: each image must pick its own caption among the N, and each caption its own image.

Distributed: with W ranks each holding B = N/W pairs, every rank scores its B local rows against the N gathered
rows (labels = own index in the global batch), the gather carrying gradient (distributed.all_gather, through which
every method's loss gathers). Each rank's loss is the mean over its own rows, so summing over ranks gives W·L_CLIP,
and DDP's gradient *averaging* divides that W back out: the parameter gradients equal those of one process holding
the whole global batch (open_clip's ClipLoss with local_loss=True, gather_with_grad=True). Memory per rank is B×N
logits, not N×N.

This file is also the method interface: every method module (siglip.py, slip.py, declip.py, filip.py, defilip.py)
subclasses `CLIP` and ends with `Method = <its class>`; train.py and eval_zeroshot.py only ever talk to that interface:

    Method.defaults                    optimiser defaults of the method (lr, weight_decay, betas, eps, logit_scale_init)
    Method.optimizer_defaults(config)  those defaults for one model config (CLIP: a ResNet's differ from a ViT's)
    Method.learning_rate(batch_size)   the peak lr at a global batch (the paper's, scaled down by √batch to a floor)
    Method.param_groups(module, wd)    AdamW groups: weight decay where Method.decays(name, parameter)
    Method(model)                      wraps a model.CLIPModel, adds the method's heads, buffers and parameters
    method.transform(tokenizer)        picklable (image, caption) -> dict of tensors: the views the loss needs
    method.features(batch) -> dict     the per-sample part of the step: encoders and per-sample heads on a collated
                                       batch of those views -> batch-first tensors, row i a function of sample i only
    method.loss(features) -> (loss, logs)   the part that mixes the batch: the paper's loss on the features of the
                                       whole (local) batch, gathering other ranks' rows as it needs; logs = components
    method(batch) -> (loss, logs)      method.loss(method.features(batch)), the training loss of a batch
    method.post_step()                 after every optimiser step (CLIP: clamp the temperature)
    method.embed_images / embed_texts / embed_classes / similarity      zero-shot classification and retrieval

The features/loss split is what makes train.py's --grad-accum exact (GradCache, see train.forward_backward): the
features of K micro-batches, concatenated, are those of the whole batch, and the loss runs once, on all of them. So
whatever mixes samples belongs to the loss: contrastive terms, BatchNorm heads, queues, means over the batch. The one
exception is a ResNet encoder's own BatchNorm, which normalises the batch it is given: under accumulation, a
micro-batch (as in open_clip)."""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
from plumbing import tiled
from plumbing.distributed import all_gather, rank_and_world

MIN_LR = 5e-4  # the learning-rate rule's floor (CLIP.learning_rate)
# the methods, by module name, each `Method` following this file's interface: train.py's --method, and checkpoints'
METHODS = ("clip", "siglip", "slip", "declip", "filip", "defilip")

# ---------------------------------------------------------------------------------------------------------------------
# Augmentation: one view per image, one caption


class Transform:
    """(image, caption) -> {"image": uint8 (3, R, R), "text": (L,)}; the image is a PIL image, a uint8 (3, H, W) tensor
    or a samples.Jpeg. The image is normalised on the device (data.to_device).
    A plain class so DataLoader workers can pickle it."""

    def __init__(self, image_size, tokenizer, context_length):
        # open_clip's CLIP recipe: RandomResizedCrop with scale 0.9-1.0, bicubic, OpenAI normalisation
        self.image = data.train_transform(image_size, scale=(0.9, 1.0))
        self.tokenizer = tokenizer
        self.context_length = context_length

    def __call__(self, image, caption):
        return {"image": self.image(image), "text": self.tokenizer(caption, self.context_length)[0]}


# ---------------------------------------------------------------------------------------------------------------------
# The loss


def clip_loss(image_features, text_features, logit_scale):
    """Symmetric InfoNCE of the local rows against the global batch.

    image_features, text_features: (B, D) local, unnormalised (normalised here).
    logit_scale: the multiplier s = exp(t), a scalar tensor (already exponentiated, as in open_clip).
    Returns the mean over local rows of ½(CE_image→text + CE_text→image); see the module docstring for DDP.
    """
    # float32 logits: bf16 would round logits near s = 100 by up to ~0.4, and autocast casts a matmul's inputs down
    # even when they are float32, hence switching it off rather than only calling .float()
    with torch.autocast(image_features.device.type, enabled=False):
        image_features = F.normalize(image_features.float(), dim=-1)  # (B, D)
        text_features = F.normalize(text_features.float(), dim=-1)  # (B, D)
        all_image_features = all_gather(image_features)  # (N, D)
        all_text_features = all_gather(text_features)  # (N, D)
        rank, _ = rank_and_world()
        B = image_features.shape[0]
        labels = torch.arange(B, device=image_features.device) + rank * B  # (B,) own index in the global batch
        # a paper-sized batch on one rank (e.g. --grad-accum): (B, N) logits past tiled.LIMIT_MB are never built; the
        # same loss by tiles of s·Î T̂ᵀ, keeping per-row and per-column log-sum-exps (plumbing/tiled.py)
        if tiled.needed(B, all_text_features.shape[0]):
            return tiled.infonce(all_image_features, all_text_features, logit_scale, labels)
        # s scales the (B, D) features, not the (B, N) product: one (B, N) tensor fewer kept for the backward
        logits_per_image = (logit_scale * image_features) @ all_text_features.T  # (B, N)
        logits_per_text = (logit_scale * text_features) @ all_image_features.T  # (B, N)
        return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


# ---------------------------------------------------------------------------------------------------------------------
# The method


class CLIP(nn.Module):
    # The CLIP paper's Adam settings, as open_clip_train/params.py's get_default_params applies them ("Params from
    # paper"): β2 0.98 and eps 1e-6 for a ViT, β2 0.999 and eps 1e-8 otherwise, i.e. for our ResNets ("resnet": what
    # a ResNet changes, see optimizer_defaults); lr 5e-4 and weight decay 0.2 are open_clip's defaults for both
    # batch: the global batch that lr was tuned at (OpenAI's 32,768; open_clip keeps 5e-4 from 256 to 32k pairs)
    defaults = dict(lr=5e-4, batch=32768, weight_decay=0.2, betas=(0.9, 0.98), eps=1e-6, logit_scale_init=1 / 0.07,
                    resnet=dict(betas=(0.9, 0.999), eps=1e-8))
    # DDP flag: a method whose loss leaves some model parameters without gradient sets this to True
    find_unused_parameters = False
    # train.py --pretrained: start from the file's temperature (plumbing/pretrained.py), as it has CLIP's meaning here
    pretrained_temperature = True

    def __init__(self, model):
        super().__init__()
        self.model = model  # model.CLIPModel: encoders, projections and the temperature t (model.logit_scale)

    def transform(self, tokenizer):
        return Transform(self.model.image_resolution, tokenizer, self.model.context_length)

    def features(self, batch):
        return {"image": self.model.encode_image(batch["image"]),  # (B, D)
                "text": self.model.encode_text(batch["text"])}  # (B, D)

    def loss(self, features):
        logit_scale = self.model.logit_scale.exp()  # s
        loss = clip_loss(features["image"], features["text"], logit_scale)
        return loss, {"clip": loss.detach(), "logit_scale": logit_scale.detach()}

    def forward(self, batch, feature_grads=None, param_grads=None):
        """method(batch) -> (loss, logs): the loss of the batch's features.

        method(batch, feature_grads, param_grads) -> a scalar: the second pass of train.py's exact gradient
        accumulation. feature_grads {key: (B, ...)} holds ∂L/∂features for this micro-batch's rows, L the loss of the
        whole batch; param_grads {name: ∂L/∂θ} the gradients of the loss's own parameters (temperature, heads), or
        None. The result Σ ⟨features, ∂L/∂features⟩ + Σ ⟨θ, ∂L/∂θ⟩ has the gradient that L sends through this
        micro-batch's features, plus ∂L/∂θ. Computed in this forward, so that DDP, which wraps it, sees every
        parameter that gets a gradient."""
        features = self.features(batch)
        if feature_grads is None:
            return self.loss(features)
        surrogate = sum((features[key] * grad).sum() for key, grad in feature_grads.items())
        params = dict(self.named_parameters())
        return surrogate + sum((params[name] * grad).sum() for name, grad in (param_grads or {}).items())

    @torch.no_grad()
    def post_step(self):
        # as OpenAI: keep s = exp(t) in [1, 100] so the logits cannot blow up (clamped after each optimiser step)
        self.model.logit_scale.clamp_(0, math.log(100))

    # --- zero-shot classification and retrieval: embeddings are batch-first tensors (or tuples of them) -------------

    def embed_images(self, images):
        return F.normalize(self.model.encode_image(images).float(), dim=-1)  # (B, D)

    def embed_texts(self, tokens):
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)  # (M, D)

    def embed_classes(self, tokens):
        """Prompt ensemble (OpenAI): (C, T, L) tokens of T templates per class -> (C, D): embed each template,
        normalise, average over templates, renormalise."""
        C, T, L = tokens.shape
        embeddings = self.embed_texts(tokens.reshape(C * T, L)).reshape(C, T, -1)  # (C, T, D)
        return F.normalize(embeddings.mean(dim=1), dim=-1)  # (C, D)

    def similarity(self, image_embeddings, text_embeddings):
        # a fixed scale of 100, as OpenAI's zero-shot evaluation (argmax and recall do not depend on it)
        return 100.0 * image_embeddings @ text_embeddings.T  # (N, M)


    # --- the optimiser: the method's AdamW settings and the learning-rate rule ------------------------------------

    @classmethod
    def optimizer_defaults(cls, model_config):
        """The method's defaults for a model.CONFIGS-style config: a ResNet (vision_layers a list of stage depths)
        takes the entries of defaults["resnet"] where the method's reference sets them apart; a method whose
        defaults have no "resnet" entry uses one setting for every encoder."""
        hp = dict(cls.defaults)
        resnet = hp.pop("resnet", {})
        if isinstance(model_config["vision_layers"], (list, tuple)):
            hp.update(resnet)
        return hp

    @classmethod
    def learning_rate(cls, batch_size):
        """-> (lr, how it was chosen): the peak lr for a global batch of batch_size pairs, the same rule for every
        method. Each method's lr is its paper's, tuned at defaults["batch"] pairs (4,096 to 32,768). An Adam-type
        optimiser's lr scales like √batch (Malladi et al. 2022), so a smaller batch B gets lr·√(B / batch), never more
        than lr, and never less than MIN_LR, CLIP's own lr: open_clip trains these encoders at 5e-4 from 256 to 32k
        pairs, so the rule tames the methods' large paper lrs (SLIP 3e-3, DeCLIP and SigLIP 1e-3) at small batches
        without starving the encoders. Chosen from runs at batch 128 (README, results): SLIP reads shape at 41.5% at
        the rule's 5.3e-4, 22.7% at its paper's 3e-3; DeCLIP and SigLIP do about as well at 5e-4 as at 1e-3."""
        lr, tuned_at = cls.defaults["lr"], cls.defaults["batch"]
        if lr <= MIN_LR:
            return lr, f"{cls.__name__}'s, kept at every batch"
        if batch_size >= tuned_at:
            return lr, f"{cls.__name__}'s at batch {tuned_at}"
        scaled = lr * math.sqrt(batch_size / tuned_at)
        rule = f"{cls.__name__}'s {lr:g} at batch {tuned_at} × √({batch_size}/{tuned_at})"
        return (scaled, rule) if scaled >= MIN_LR else (MIN_LR, f"{rule} = {scaled:.2g}, raised to {MIN_LR:g}")

    @staticmethod
    def decays(name, param):
        """Weight decay on this parameter? The CLIP paper decays "all weights that are not gains or biases"; this is
        open_clip_train/main.py's rule for it (SLIP's main.py has the same, DeCLIP's release nearly: see declip.py):
        no decay for anything below 2-D (gains, biases, the class embedding, the temperature) nor for names with bn,
        ln, bias or logit_scale in them. The token and positional embeddings ARE decayed."""
        return not (param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name)

    @classmethod
    def param_groups(cls, module, weight_decay):
        """AdamW's two parameter groups of a module's trainable parameters (train.py and scripts/bench.py pass the
        method itself; scripts/bench.py also open_clip's model): weight_decay where cls.decays(name, parameter), 0
        elsewhere. Frozen parameters (requires_grad False) are left out, so the optimiser never touches them."""
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        return [dict(params=[p for n, p in named if cls.decays(n, p)], weight_decay=weight_decay),
                dict(params=[p for n, p in named if not cls.decays(n, p)], weight_decay=0.0)]

Method = CLIP
