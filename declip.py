"""
DeCLIP: Supervision Exists Everywhere: A Data Efficient Contrastive Language-Image Pre-training Paradigm
(Li et al. 2021; released code Sense-GVT/DeCLIP, prototype/model/declip.py and prototype/solver/declip_solver.py).

CLIP's loss over several views of each pair, plus three supervisions found inside the data itself (weights of the
released configs):

    L = 0.4 · L_MVS  +  0.2 · L_ISS  +  0.2 · L_TSS  +  0.2 · L_NNS

    L_MVS  multi-view: two image views x_a, x_b (MoCo v2 augmentation) × two text views (the masked caption t_m, as
           the released code, and an EDA caption t_e): the mean of the 4 CLIP losses L_CLIP(x, t).
    L_ISS  image self-supervision, SimSiam on the projected (unnormalised) image embeddings e_a, e_b:
           z = g(e) (projector D → 1024 → 1024 → 1024), p = h(z) (predictor 1024 → 512 → 1024),
           L_ISS = −½ [cos(p_a, sg(z_b)) + cos(p_b, sg(z_a))]                          (sg: stop-gradient)
    L_TSS  text self-supervision, masked language modelling: 15% of the caption's tokens are chosen (80% → [MASK],
           10% → a random token, 10% unchanged) and a linear head over the vocabulary must recover them from the
           final token features: L_TSS = CE over the chosen positions (their mean over the batch).
    L_NNS  nearest-neighbour supervision: a FIFO queue of past (normalised, detached) text embeddings; each
           caption's nearest neighbour NN(t) in it (top-1 cosine) is another positive for the image, image→text only:
           L_NNS = mean over x ∈ {x_a, x_b}, t ∈ {t_m, t_e} of CE(s · x̂ NN(t̂)ᵀ, y).

The paper writes (1 − α − β − γ) L_CLIP + α (L_ISS + L_TSS) + β L_MVS + γ L_NNS with α = β = γ = 0.2; the released
configs, followed here, put the 0.4 on the mean of the four multi-view CLIP losses (the plain pairing is one of them)
and have no separate CLIP term. One step runs the image encoder twice (x_a, x_b) and the text encoder twice (t_m,
which serves both the CLIP views and the MLM, and t_e).

Per sample (features): the four encoder passes and the MLM head's cross-entropy at each caption's chosen tokens. What
mixes the batch (loss): the CLIP terms, the SimSiam heads with their BatchNorm, the NN term and its queue (looked up
and filled once per step), and the MLM mean. The random MLM masks are drawn per sample in the transform, so a step
masks the same tokens whatever the number of ranks or micro-batches (train.py --grad-accum), and on a resume.

Distributed: the CLIP terms are clip.py's clip_loss (local rows against gathered features, with gradient), the NN
term gathers the neighbours of every rank's captions, the SimSiam heads use distributed.GlobalBatchNorm, and the MLM
term is the mean over the chosen tokens of the global batch: with DDP's averaging those equal one process on the whole
batch. The released code divides every term by the world size because its communication library SUMS gradients; DDP
averages them, so we omit that division. Its MLM term is a mean per GPU. Each rank keeps its own queue (train.py's
DDP has broadcast_buffers=False).

The released benchmark (its YFCC-15M tables, for every method: CLIP, SLIP, FILIP, DeCLIP) freezes the ViT's
patch-embedding conv at its random init. `train.py --freeze-patch-embed` does the same; it is off by default, as
CLIP's, SLIP's and open_clip's training train it.

Logs: clip (mean of the 4 CLIP losses), simsiam, mlm, nn, logit_scale (s as used), queue (fraction of the queue filled).
"""

import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from clip import CLIP, clip_loss
from plumbing import tiled
from plumbing.distributed import GlobalBatchNorm, all_gather, rank_and_world
from plumbing.synonyms import SYNONYMS
from slip import ssl_augmentation

# ---------------------------------------------------------------------------------------------------------------------
# Text augmentation: EDA (Wei & Zou 2019), one of three operations per caption, offline


def synonym_replacement(words, n=1):
    """Replace every occurrence of n randomly chosen words that have an entry in SYNONYMS by one of its synonyms.
    Differs from EDA: SYNONYMS is a small built-in table (plumbing/synonyms.py), not WordNet, to stay offline."""
    def core(word):  # "(Circle." -> ("(", "Circle", ".")
        return re.match(r"^(\W*)(.*?)(\W*)$", word).groups()

    candidates = sorted({core(w)[1].lower() for w in words} & SYNONYMS.keys())
    words = list(words)
    for k in torch.randperm(len(candidates))[:n].tolist():
        target = candidates[k]
        options = SYNONYMS[target]
        synonym = options[torch.randint(len(options), ()).item()]
        for i, w in enumerate(words):
            before, word, after = core(w)
            if word.lower() == target:
                words[i] = before + synonym + after
    return words


def random_swap(words, n=1):
    """Swap two random words, n times."""
    words = list(words)
    for _ in range(n):
        if len(words) < 2:
            break
        i, j = torch.randperm(len(words))[:2].tolist()  # two different positions (EDA retries up to 3 times)
        words[i], words[j] = words[j], words[i]
    return words


def random_deletion(words, p=0.1):
    """Delete each word with probability p; keep one random word when all would go."""
    if len(words) <= 1:
        return list(words)
    keep = (torch.rand(len(words)) >= p).tolist()
    kept = [w for w, k in zip(words, keep) if k]
    return kept or [words[torch.randint(len(words), ()).item()]]


def eda(caption):
    """One of synonym replacement (n=1), random swap (n=1) and random deletion (p=0.1), uniformly, as the released
    code with textaugment's EDA (random insertion is not used). torch's RNG, which train.py seeds per sample."""
    operation = [synonym_replacement, random_swap, random_deletion][torch.randint(3, ()).item()]
    return " ".join(operation(caption.split()))


class Transform:
    """(image, caption) -> {"image_a", "image_b": (3, R, R), "text", "mlm_labels", "text_eda": (L,)}: "text" is the
    caption masked as BERT (mask_tokens: MASK at the [MASK] positions), "mlm_labels" the ids its MLM head must recover.
    Picklable for workers."""

    def __init__(self, image_size, tokenizer, context_length, mlm_probability):
        # MoCo v2's augmentation (the released MOCOV2 transform): RandomResizedCrop(scale 0.2-1), colour jitter p 0.8,
        # grayscale p 0.2, Gaussian blur p 0.5, flip; two independent draws per image
        self.image = ssl_augmentation(image_size, scale=(0.2, 1.0))
        self.tokenizer = tokenizer
        self.context_length, self.mlm_probability = context_length, mlm_probability

    def __call__(self, image, caption):
        # the released code applies EDA and the masking inside the model's forward; here they are per sample, in the
        # DataLoader workers, with torch's RNG, which train.py seeds per sample: the same views whatever the number of
        # ranks or micro-batches, and on a resume
        masked, labels = mask_tokens(self.tokenizer(caption, self.context_length), self.mlm_probability)  # (1, L) each
        return {"image_a": self.image(image), "image_b": self.image(image), "text": masked[0], "mlm_labels": labels[0],
                "text_eda": self.tokenizer(eda(caption), self.context_length)[0]}


# ---------------------------------------------------------------------------------------------------------------------
# The losses


def simsiam_loss(p_a, p_b, z_a, z_b):
    """SimSiam (Chen & He 2021): −½ [cos(p_a, sg z_b) + cos(p_b, sg z_a)], mean over local rows. (B, E) each."""
    return -(F.cosine_similarity(p_a.float(), z_b.detach().float(), dim=-1).mean()
             + F.cosine_similarity(p_b.float(), z_a.detach().float(), dim=-1).mean()) / 2


MASK = -1  # [MASK] in a masked caption: not a vocabulary id (see DeCLIP.masked_text_features)


def mask_tokens(text, probability=0.15):
    """BERT's masking of captions.

    text: (B, L) ids laid out as data.py's tokenizers do: SOT at position 0, EOT at argmax (EOT is the largest id and
    SOT = EOT − 1, the two ids above the ordinary vocabulary), padding after. Each caption token (never SOT, EOT or
    padding) is chosen with `probability`; a chosen token becomes [MASK] with p 0.8, a random ordinary token with
    p 0.1, and stays unchanged with p 0.1.
    Returns ids (B, L), the masked caption (MASK at the [MASK] positions, the random replacements in), and labels
    (B, L): the original id where chosen, −100 elsewhere. EOT stays where it was: the masked caption pools there.
    """
    B, L = text.shape
    position = torch.arange(L, device=text.device)  # (L,)
    eot = text.argmax(dim=-1, keepdim=True)  # (B, 1)
    maskable = (position > 0) & (position < eot)  # (B, L): the caption's own tokens
    chosen = (torch.rand(B, L, device=text.device) < probability) & maskable
    labels = torch.where(chosen, text, -100)
    r = torch.rand(B, L, device=text.device)
    to_mask = chosen & (r < 0.8)
    to_random = chosen & (r >= 0.8) & (r < 0.9)
    # random ids in [0, SOT): the ordinary vocabulary, so a replacement can never become a second EOT/SOT and move
    # the pooled position (the released code draws from the whole vocabulary, specials included)
    sot = text.max(dim=-1, keepdim=True).values - 1  # (B, 1)
    random_ids = torch.randint(1 << 62, (B, L), device=text.device) % sot  # (B, L) uniform in [0, SOT)
    ids = torch.where(to_random, random_ids, text).masked_fill(to_mask, MASK)
    return ids, labels


def mlm_per_sample(head, tokens, labels):
    """Each caption's masked-language-modelling cross-entropy of head(token features) against the original ids,
    summed over its chosen tokens, and their number: tokens (B, L, width) after ln_final, labels (B, L) with −100
    where nothing is to be predicted -> (B,) sums, (B,) counts. The mean over the batch is mlm_loss's."""
    chosen = labels != -100  # (B, L)
    # float32 logits: under autocast the head would run in bf16 (logits off by up to ~0.04), even on float32 inputs
    with torch.autocast(tokens.device.type, enabled=False):
        logits = head(tokens[chosen].float())  # (M, V): the vocabulary projection only where needed, not B·L·V
    cross_entropy = F.cross_entropy(logits, labels[chosen], reduction="none")  # (M,)
    sums = cross_entropy.new_zeros(labels.shape[0]).index_add(0, chosen.nonzero()[:, 0], cross_entropy)  # (B,)
    return sums, chosen.sum(dim=1)


def mlm_loss(sums, counts):
    """L_TSS: the mean cross-entropy over the chosen tokens of the global batch, from each local caption's (B,) sum and
    count. A rank's loss is W · (its sum) / (global count): DDP's averaging then gives the gradient of the global mean,
    and the mean of the rank losses is that mean. 0 (with a zero gradient for the head) when no token is chosen."""
    _, world = rank_and_world()
    return world * sums.sum() / all_gather(counts).sum().clamp(min=1)


def clamped_exp(t, max_value=100.0):
    """s = min(exp(t), max_value), with the gradient of exp(t) kept: ds/dt = exp(t) also above the clamp (a
    straight-through clamp). The released code clamps s through .data, which has exactly this value and gradient.
    A plain exp(t).clamp(max=100) would give ds/dt = 0 above ln 100: t, which post_step keeps in [3, 6], would stop
    moving once it crossed 4.605 and never come back."""
    s = t.exp()
    return s.clamp(max=max_value).detach() + (s - s.detach())  # value: the clamp's; gradient: exp's


def nn_loss(image_features, nn_text_features, logit_scale):
    """DeCLIP's L_NNS, one term: image→text InfoNCE of the (B, D) local images, unnormalised, against the N gathered
    neighbours of the captions ((B, D) per rank: unit vectors from the queue, constants); positive: its caption's."""
    image_features = F.normalize(image_features.float(), dim=-1)  # (B, D)
    all_nn = all_gather(nn_text_features.float())  # (N, D)
    B = image_features.shape[0]
    labels = torch.arange(B, device=image_features.device) + rank_and_world()[0] * B  # (B,) own global index
    if tiled.needed(B, all_nn.shape[0]):  # (B, N) logits past tiled.LIMIT_MB: the same cross-entropy by tiles
        return tiled.cross_entropy(image_features, all_nn, logit_scale.float(), labels)
    with torch.autocast(image_features.device.type, enabled=False):  # float32 logits (autocast would use bf16)
        return F.cross_entropy(logit_scale.float() * image_features @ all_nn.T, labels)


# ---------------------------------------------------------------------------------------------------------------------
# The method


class DeCLIP(CLIP):
    # released YFCC-15M configs (experiments/declip_experiments/yfcc15m/*/config.yaml): AdamW wd 0.1, betas
    # (0.9, 0.98), eps 1e-8, the same for the R50 and the ViT-B/32 (so no "resnet" entry); Cosine scheduler with
    # warmup_lr 1e-3 (the peak reached after 2,500 warmup steps from base_lr 1e-4), batch 4096 = 128 × 32 GPUs.
    # Weight decay: CLIP.decays (open_clip's rule). The released param_group_all (prototype/utils/misc.py) exempts by
    # layer type instead (biases of linear and conv layers, BatchNorm and LayerNorm parameters, logit_scale), so it
    # also decays three 1-D tensors that we do not: the ViT's class embedding, the [MASK] row of its token embedding
    # and nn.MultiheadAttention's in_proj_bias (not a Linear's bias).
    defaults = dict(lr=1e-3, batch=4096, weight_decay=0.1, betas=(0.9, 0.98), eps=1e-8, logit_scale_init=1 / 0.07)

    def __init__(self, model, queue_size=65536, proj_dim=1024, pred_dim=512, mlm_probability=0.15,
                 clip_weight=0.4, simsiam_weight=0.2, mlm_weight=0.2, nn_weight=0.2, min_bn_batch=32):
        super().__init__(model)
        self.mlm_probability = mlm_probability
        self.clip_weight, self.simsiam_weight, self.mlm_weight, self.nn_weight = (clip_weight, simsiam_weight,
                                                                                 mlm_weight, nn_weight)
        D, width = model.embed_dim, model.transformer_width

        def bn(dim):  # statistics over the global batch; the released heads use per-GPU nn.BatchNorm1d (batch 128)
            return GlobalBatchNorm(dim, min_batch=min_bn_batch)

        # SimSiam's projector (BN after all three linears, ReLU after the first two) and bottleneck predictor
        self.projector = nn.Sequential(nn.Linear(D, proj_dim), bn(proj_dim), nn.ReLU(inplace=True),
                                       nn.Linear(proj_dim, proj_dim), bn(proj_dim), nn.ReLU(inplace=True),
                                       nn.Linear(proj_dim, proj_dim), bn(proj_dim))
        self.predictor = nn.Sequential(nn.Linear(proj_dim, pred_dim), bn(pred_dim), nn.ReLU(inplace=True),
                                       nn.Linear(pred_dim, proj_dim))
        # [MASK]: the released code adds a token to the vocabulary; we keep the model's vocabulary in OpenAI's layout
        # (its checkpoints must load and save unchanged) and give this module its own learnable [MASK] vector, put
        # in place of the token embedding at masked positions (init as token_embedding: std 0.02; being 1-D it gets no
        # weight decay, where the released [MASK] row of the token embedding does)
        self.mask_embedding = nn.Parameter(0.02 * torch.randn(width))
        self.mlm_head = nn.Linear(width, model.vocab_size)  # [MASK] is never a target, so the vocabulary suffices
        # the nearest-neighbour queue: a ring buffer of unit text embeddings, filled from slot 0; persistent buffers,
        # so checkpoints carry it and a resume continues with the same neighbours
        self.register_buffer("queue", torch.zeros(queue_size, D))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))  # next slot to write
        self.register_buffer("queue_filled", torch.zeros((), dtype=torch.long))  # slots written so far (≤ size)

    def transform(self, tokenizer):
        return Transform(self.model.image_resolution, tokenizer, self.model.context_length, self.mlm_probability)

    # --- the text encoder with [MASK] -------------------------------------------------------------------------------

    def masked_text_features(self, ids):
        """model.text_features of a masked caption (B, L), with self.mask_embedding in place of the token embedding
        where ids == MASK. Returns (pooled (B, width), tokens (B, L, width)) after ln_final."""
        to_mask = ids == MASK  # (B, L)
        embeddings = self.model.token_embedding(ids.masked_fill(to_mask, 0))  # (B, L, width)
        embeddings = torch.where(to_mask[..., None], self.mask_embedding.to(embeddings.dtype), embeddings)
        # causal mask kept during MLM, as the released code: one text pass then serves both the MLM head and the
        # CLIP embedding of the masked caption (a bidirectional MLM would need a second pass, and the causal
        # encoder is the one zero-shot evaluation uses). Each masked token is predicted from its left context.
        return self.model.text_features(ids, causal=True, embeddings=embeddings)

    # --- the nearest-neighbour queue --------------------------------------------------------------------------------

    @torch.no_grad()
    def nearest_neighbour(self, x):
        """(B, D) unit vectors -> (B, D) their top-1 cosine neighbours in the queue's filled slots (zeros if none)."""
        if tiled.needed(x.shape[0], self.queue.shape[0]):  # (B, Q) cosines past tiled.LIMIT_MB: argmax by tiles
            return self.queue[tiled.argmax(x, self.queue, valid=self.queue_filled)]
        with torch.autocast(x.device.type, enabled=False):  # float32: bf16 cosines would blur near-ties
            similarity = x.float() @ self.queue.T  # (B, Q): cosine, both sides are unit vectors
        filled = torch.arange(self.queue.shape[0], device=x.device) < self.queue_filled  # (Q,) only written slots
        return self.queue[similarity.masked_fill(~filled, -torch.inf).argmax(dim=1)]  # (B, D)

    @torch.no_grad()
    def enqueue(self, x):
        """FIFO: write the (B, D) unit vectors at the pointer, overwriting the oldest entries once full."""
        Q, B = self.queue.shape[0], x.shape[0]
        x = x[-Q:]  # a batch larger than the queue: only its newest Q rows survive
        slots = (self.queue_ptr + B - x.shape[0] + torch.arange(x.shape[0], device=x.device)) % Q  # (min(B, Q),)
        self.queue[slots] = x.to(self.queue.dtype)
        self.queue_ptr.copy_((self.queue_ptr + B) % Q)
        self.queue_filled.copy_((self.queue_filled + B).clamp(max=Q))

    # --- per sample, then the batch ---------------------------------------------------------------------------------

    def features(self, batch, keep_tokens=False):
        """The step's four encoder passes, per sample -> dict: the (B, D) embeddings "text" (the masked caption, also
        a CLIP text view, as in the released code), "text_eda", "image_a", "image_b", and each caption's MLM
        cross-entropy summed over its chosen tokens, "mlm_sum" (B,), with their number "mlm_count" (B,).
        keep_tokens: also the final tokens of image_a, "image_a_tokens" (B, P, Wt), and of the masked caption,
        "text_tokens" (B, L, width), for a token-wise loss on top (defilip.py)."""
        pooled, tokens = self.masked_text_features(batch["text"])  # (B, width), (B, L, width)
        mlm_sum, mlm_count = mlm_per_sample(self.mlm_head, tokens, batch["mlm_labels"])  # (B,), (B,)
        pooled_a, tokens_a = self.model.image_features(batch["image_a"])  # (B, Wp), (B, P, Wt)
        features = dict(text=pooled @ self.model.text_projection, text_eda=self.model.encode_text(batch["text_eda"]),
                        image_a=self.model.image_projection(pooled_a),
                        image_b=self.model.encode_image(batch["image_b"]), mlm_sum=mlm_sum, mlm_count=mlm_count)
        if keep_tokens:
            features.update(image_a_tokens=tokens_a, text_tokens=tokens)
        return features

    def loss(self, features):
        """The DeCLIP loss on the features of the whole batch -> (loss, logs)."""
        text_features, text_eda_features = features["text"], features["text_eda"]  # (B, D) each
        image_a, image_b = features["image_a"], features["image_b"]  # (B, D) each

        # released: s = exp(t) clamped to ≤ 100 in the forward, t keeping its gradient (and t itself clamped to
        # [3, 6] after each step: post_step)
        logit_scale = clamped_exp(self.model.logit_scale, 100.0)

        # multi-view CLIP: 2 image views × 2 text views
        loss_clip = (clip_loss(image_a, text_features, logit_scale) + clip_loss(image_b, text_features, logit_scale)
                     + clip_loss(image_a, text_eda_features, logit_scale)
                     + clip_loss(image_b, text_eda_features, logit_scale)) / 4

        # image self-supervision: SimSiam on the projected, unnormalised image embeddings
        z_a, z_b = self.projector(image_a), self.projector(image_b)  # (B, 1024)
        p_a, p_b = self.predictor(z_a), self.predictor(z_b)  # (B, 1024)
        loss_simsiam = simsiam_loss(p_a, p_b, z_a, z_b)

        # text self-supervision: recover the chosen tokens from the final token features of the masked caption
        loss_mlm = mlm_loss(features["mlm_sum"], features["mlm_count"])

        # nearest neighbours of both captions, looked up BEFORE this batch is enqueued (else a caption would find
        # itself); the images' positives are their captions' neighbours, image→text only
        text_unit = F.normalize(text_features.detach().float(), dim=-1)  # (B, D)
        text_eda_unit = F.normalize(text_eda_features.detach().float(), dim=-1)  # (B, D)
        nn_text, nn_text_eda = self.nearest_neighbour(text_unit), self.nearest_neighbour(text_eda_unit)
        loss_nn = (nn_loss(image_a, nn_text, logit_scale) + nn_loss(image_a, nn_text_eda, logit_scale)
                   + nn_loss(image_b, nn_text, logit_scale) + nn_loss(image_b, nn_text_eda, logit_scale)) / 4
        # an empty queue (the first step) has no neighbours: the term is 0 until it holds entries (the released
        # memory bank starts full of random vectors instead). Every rank enqueues 2B per step, so all ranks agree.
        loss_nn = loss_nn * (self.queue_filled > 0)
        if self.training:  # an evaluation forward must not change the queue
            self.enqueue(torch.cat([text_unit, text_eda_unit]))

        loss = (self.clip_weight * loss_clip + self.simsiam_weight * loss_simsiam + self.mlm_weight * loss_mlm
                + self.nn_weight * loss_nn)
        return loss, {"clip": loss_clip.detach(), "simsiam": loss_simsiam.detach(), "mlm": loss_mlm.detach(),
                      "nn": loss_nn.detach(), "logit_scale": logit_scale.detach(),
                      "queue": self.queue_filled.float() / self.queue.shape[0]}

    @torch.no_grad()
    def post_step(self):
        # released configs: grad_clip type logit_scale_param_value, value 3, max_value 6: t is clamped to [3, 6]
        # around every optimiser step (declip_solver.py); with the forward's s ≤ 100, s ∈ [e³ ≈ 20.1, 100]
        self.model.logit_scale.clamp_(3.0, 6.0)


Method = DeCLIP
