"""
DeFILIP: DeCLIP plus FILIP's token-wise loss (the DeCLIP benchmark's combination; released code Sense-GVT/DeCLIP,
prototype/model/defilip.py, prototype/solver/defilip_solver.py, experiments/defilip_experiments/yfcc15m/*/config.yaml).

    L = L_DeCLIP + 0.2 · L_FILIP(x_a, t_m)

L_DeCLIP is declip.py's loss, unchanged. L_FILIP is filip.py's token-wise InfoNCE between the patch tokens of the
first image view x_a and the tokens of the masked caption t_m (the views DeCLIP already encodes: no extra encoder
pass), through FILIP's own 256-d heads and its own temperature s' = exp(t'), init 1/0.07, t' clamped to [3, 6] as
DeCLIP's t (released: logit_scale_dense; s' has no ≤ 100 clamp there, so none here). The released model also scores
the other three view pairs, but only under an option (dense_aug) that its config leaves off.

Where we differ from the released code, we differ as filip.py does (see there): padding is masked rather than scored,
every token is gathered by default (the released code keeps the top 16 by summed similarity: keep_fraction is our
option for it), and ViT patch tokens are taken after ln_post.

Zero-shot classification and retrieval use DeCLIP's (CLIP's) pooled embeddings, as the released evaluation does (its
token-wise evaluation is switched off), so a DeFILIP checkpoint loads into OpenAI's code with meaningful embeddings.
"""

import math

import torch
import torch.nn as nn

from declip import DeCLIP
from filip import filip_loss, image_token_width, text_padding_mask


class DeFILIP(DeCLIP):
    # the released config's optimiser and schedule are DeCLIP's (AdamW wd 0.1, betas (0.9, 0.98), eps 1e-8, peak lr
    # 1e-3): DeCLIP.defaults, inherited

    def __init__(self, model, filip_weight=0.2, filip_dim=256, keep_fraction=1.0, half_gather=False, chunk_size=None,
                 **declip_kwargs):
        super().__init__(model, **declip_kwargs)
        self.filip_weight = filip_weight
        # FILIP's token heads (released: image_mapping, text_mapping) and its temperature t'
        self.image_head = nn.Linear(image_token_width(model), filip_dim)
        self.text_head = nn.Linear(model.transformer_width, filip_dim)
        self.logit_scale_filip = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # named *logit_scale*: no decay
        self.keep_fraction, self.chunk_size = keep_fraction, chunk_size
        self.gather_dtype = torch.float16 if half_gather else None

    def features(self, batch):
        # DeCLIP's encoder passes, then FILIP's heads on tokens they already computed: image_a's patches, the masked
        # caption's words (which keeps the original's layout, SOT and EOT in place, so its padding is the original's)
        features = super().features(batch, keep_tokens=True)
        features["image_tokens"] = self.image_head(features.pop("image_a_tokens"))  # (B, P, 256)
        features["text_tokens"] = self.text_head(features.pop("text_tokens"))  # (B, L, 256)
        features["text_mask"] = text_padding_mask(batch["text"])  # (B, L)
        return features

    def loss(self, features):
        loss, logs = super().loss(features)  # L_DeCLIP
        logit_scale_filip = self.logit_scale_filip.exp()  # s'
        loss_filip = filip_loss(features["image_tokens"], features["text_tokens"], features["text_mask"],
                                logit_scale_filip, self.keep_fraction, self.gather_dtype, self.chunk_size)
        loss = loss + self.filip_weight * loss_filip
        return loss, {**logs, "filip": loss_filip.detach(), "logit_scale_filip": logit_scale_filip.detach()}

    @torch.no_grad()
    def post_step(self):
        super().post_step()  # t to [3, 6]
        self.logit_scale_filip.clamp_(3.0, 6.0)  # released: the same clamp on logit_scale_dense


Method = DeFILIP
