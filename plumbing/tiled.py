"""
Tiled contrastive losses: every method's batch × batch logits, computed and differentiated tile by tile, so that a
batch of N pairs never holds an N × N (or B × N) matrix (Inf-CL: Cheng et al. 2024, "Breaking the Memory Barrier").

The method files keep their losses as a reader learns them and hand them here only past a size (`needed`: the logits
would exceed LIMIT_MB), so small runs and the quick start execute the plain lines. Each of those losses is a sum over
the rows (and columns) of logits l = score(queries, keys), where score is s · the dot product of unit vectors (CLIP,
SigLIP with its bias b, SLIP, DeCLIP) or s · FILIP's token-wise similarity, and each row needs only a few numbers:

    InfoNCE   CE_i = lse_i − l_{i,y_i},  lse_i = log Σ_j exp(l_ij)     ∂CE_i/∂l_ij = exp(l_ij − lse_i) − [j = y_i]
    sigmoid   Σ_j softplus(l_ij) − l_{i,y_i}                           ∂/∂l_ij     = σ(l_ij) − [j = y_i]

Forward: visit the logits in tiles of TILE × TILE and keep, per row (and per column: CLIP's text→image rows, SimCLR's
b-views, are its columns), a running log-sum-exp, log Σ_{a ∪ b} = logaddexp(lse_a, lse_b), and the positive's logit; the
sigmoid loss only sums. Backward: visit the tiles again, recompute each from its rows and columns of the features, form
its ∂L/∂l from those statistics, and let autograd of that tile alone send it on (for a dot product: G·K to the queries,
Gᵀ·Q to the keys, Σ G ∘ l / s to s). Held at any time: the features and their gradients, O(N·D), the statistics, O(N),
and a few tiles, O(TILE²), whatever N. The price: each tile's logits are computed twice. Not the sigmoid's: its ∂L/∂l of
a tile needs that tile alone, so the forward's one visit also sends it back, and keeps the gradients.

Under DDP the method files gather with gradient as before and pass their local rows against the gathered ones: the
keys' gradients flow back through the gather. The logits are float32, autocast or not, as in the method files.
"""

import os

import torch
import torch.nn.functional as F

from plumbing.runlog import fail


def limit_mb(value):
    """$TILED_LOSS_MB: past this many MiB of float32 logits a loss is tiled (0: always, inf: never); unset: 256"""
    try:
        limit = float(256 if value in (None, "") else value)
    except ValueError:
        limit = float("nan")
    if not limit >= 0:  # (NaN too)
        fail(f"TILED_LOSS_MB={value!r}: give the MiB of logits past which a loss is tiled, a number >= 0 (0: always)")
    return limit


LIMIT_MB = limit_mb(os.environ.get("TILED_LOSS_MB"))  # (the tests set it to 0: always)
TILE = 2048  # TILE × TILE logits: 16 MiB (4096's 64 are slower on a CPU: docs/speed.md); FILIP: TILE tokens a side


def needed(rows, cols):
    """Would a (rows, cols) float32 matrix of logits exceed LIMIT_MB? Then the method files tile their loss."""
    return rows * cols * 4 > LIMIT_MB * 2**20


def _blocks(n, size):
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def _positives(labels, cols):
    """(rows, columns) inside a tile of the columns `cols` (a slice) where the rows' label columns fall."""
    rows = ((labels >= cols.start) & (labels < cols.stop)).nonzero()[:, 0]
    return rows, labels[rows] - cols.start


def _scaled_dot(queries, keys, scale, bias=None):  # (b, D), (c, D), s -> (b, c): the plain forms' (s · q) @ kᵀ
    logits = (scale * queries) @ keys.T
    return logits if bias is None else logits + bias  # SigLIP's + b


# ---------------------------------------------------------------------------------------------------------------------
# The two reductions: what a tile adds to the forward's statistics, and what ∂L/∂l of a tile is


class _InfoNCE:
    """Softmax cross-entropy of the rows of an (M, N) matrix of logits, row i against its label column y_i (−1: the
    row has no term), and likewise of its columns against their label rows (col_labels; None: rows only). The loss
    is the mean over the labelled rows, or ½ (mean over labelled rows + mean over labelled columns).
    exclude: (M,) a column each row leaves out of its softmax (SimCLR: the view itself, the plain form's −1e9), or
    None; the matrix has no such entry, for the columns' softmax either."""
    local = False  # ∂CE/∂l of a tile needs the log-sum-exps of whole rows: known after the forward only

    def __init__(self, M, N, tile, row_labels, col_labels=None, exclude=None):
        self.labels, self.exclude = {"row": row_labels, "col": col_labels}, exclude
        rows, cols = _blocks(M, tile[0]), _blocks(N, tile[1])
        # a tile is visited when it holds part of a labelled row or column; which do is known before the loop
        self.wanted = {(axis, s.start): labels is not None and bool((labels[s] >= 0).any())
                       for axis, labels, blocks in (("row", row_labels, rows), ("col", col_labels, cols))
                       for s in blocks}
        self.tiles = [(r, c) for r in rows for c in cols if self.wanted["row", r.start] or self.wanted["col", c.start]]
        like = row_labels.new_empty((), dtype=torch.float32)
        self.lse = {"row": like.new_full((M,), -float("inf")), "col": like.new_full((N,), -float("inf"))}
        self.positive = {"row": like.new_zeros(M), "col": like.new_zeros(N)}  # l_{i,y_i}
        # ∂loss/∂CE of each row (column): 1 / (labelled rows · directions), 0 for a row without a term
        labelled = {axis: labels >= 0 for axis, labels in self.labels.items() if labels is not None}
        self.weight = {axis: kept.float() / int(kept.sum()) / len(labelled) for axis, kept in labelled.items()}

    def directions(self, l, r, c):
        """(axis, its slice, the tile as rows of that axis, its positives (i, j)) of each direction the tile serves."""
        if self.exclude is not None:
            columns = torch.arange(c.start, c.stop, device=l.device)  # (c,)
            l = l.masked_fill(columns[None, :] == self.exclude[r, None], -float("inf"))  # exp(−inf) = 0: left out
        for axis, own, other, tile in (("row", r, c, l), ("col", c, r, l.T)):  # a column is a row of lᵀ
            if self.wanted[axis, own.start]:
                yield axis, own, tile, *_positives(self.labels[axis][own], other)

    def forward(self, l, r, c):
        for axis, own, tile, i, j in self.directions(l, r, c):
            self.lse[axis][own] = torch.logaddexp(self.lse[axis][own], tile.logsumexp(dim=1))
            self.positive[axis][own.start + i] = tile[i, j]

    def value(self):
        # Σ weight · CE over the labelled rows (columns); the others' statistics may be partial (−inf): left out
        return sum(torch.where(w > 0, self.lse[axis] - self.positive[axis], 0) @ w for axis, w in self.weight.items())

    def gradient(self, l, r, c):
        """∂loss/∂l of the tile: Σ over its rows (columns) of weight · (softmax − one-hot of the label)."""
        grad = None
        for axis, own, tile, i, j in self.directions(l, r, c):
            softmax = torch.sub(tile, self.lse[axis][own, None]).exp_()  # (own, other): each row's softmax
            softmax[i, j] -= 1
            softmax *= self.weight[axis][own, None]
            if grad is None:
                grad = softmax if axis == "row" else softmax.T
            else:
                grad.T.add_(softmax)  # the columns' share, onto the rows'
        return grad


class _Sigmoid:
    """Σ_ij softplus(l_ij) − Σ_i l_{i,y_i} over an (M, N) matrix of logits: SigLIP's −Σ log σ(z · l) with z = +1 at
    the positives (labels: (M,) each row's positive column, or None: negatives only), −1 elsewhere."""
    local = True  # ∂/∂l_ij = σ(l_ij) − [j = y_i]: the tile alone

    def __init__(self, M, N, tile, labels=None):
        self.labels, self.total = labels, 0.0
        self.tiles = [(r, c) for r in _blocks(M, tile[0]) for c in _blocks(N, tile[1])]

    def forward(self, l, r, c):
        self.total = self.total + F.softplus(l).sum()
        if self.labels is not None:
            i, j = _positives(self.labels[r], c)
            self.total = self.total - l[i, j].sum()

    def value(self):
        return torch.as_tensor(self.total, dtype=torch.float32)

    def gradient(self, l, r, c):
        grad = torch.sigmoid(l)  # softplus' = σ
        if self.labels is not None:
            i, j = _positives(self.labels[r], c)
            grad[i, j] -= 1
        return grad


# ---------------------------------------------------------------------------------------------------------------------
# The tiles, forward and backward


class _Tiled(torch.autograd.Function):
    """loss (an _InfoNCE or _Sigmoid) of the logits l = score(*queries[rows], *keys[cols], *shared), tile by tile.
    tensors: n_queries tensors of M rows, then n_keys of N rows (FILIP: tokens, and the captions' masks), then the
    tensors every tile shares (s, b). The backward recomputes each tile with autograd, on that tile's slices alone; a
    loss.local loss (the sigmoid: ∂L/∂l of a tile needs the tile only) takes them at the forward's one visit instead."""

    @staticmethod
    def forward(ctx, loss, score, n_queries, n_keys, *tensors):
        ctx.loss, ctx.score, ctx.split = loss, score, (n_queries, n_keys)
        ctx.eager = loss.local and any(ctx.needs_input_grad[4:])
        ctx.save_for_backward(*(() if ctx.eager else tensors))
        if ctx.eager:
            ctx.grads = _through_tiles(loss, score, tensors, ctx.split, ctx.needs_input_grad[4:], first_visit=True)
        else:
            with torch.autocast(tensors[0].device.type, enabled=False):  # float32 logits, as the plain forms
                for r, c in loss.tiles:
                    loss.forward(score(*_slices(tensors, ctx.split, r, c)), r, c)
        return loss.value().to(tensors[0].device)

    @staticmethod
    def backward(ctx, grad_loss):
        if torch.is_grad_enabled():  # create_graph=True: this backward is not differentiable; say so, give no number
            raise RuntimeError("a tiled loss has no double backward; set TILED_LOSS_MB above its logits' size")
        grads = ctx.grads if ctx.eager else \
            _through_tiles(ctx.loss, ctx.score, ctx.saved_tensors, ctx.split, ctx.needs_input_grad[4:])
        return None, None, None, None, *(None if g is None else g * grad_loss for g in grads)


def _slices(tensors, split, r, c):
    n_queries, n_keys = split
    return [t[r] for t in tensors[:n_queries]] + [t[c] for t in tensors[n_queries:n_queries + n_keys]] + \
        list(tensors[n_queries + n_keys:])


def _through_tiles(loss, score, tensors, split, wants, first_visit=False):
    """Each tile's logits l, with autograd on its slices alone, and its ∂L/∂l (loss.gradient) sent back through them
    -> the gradients of `tensors` (None where not `wants`); at the first visit (eager forward) loss.forward too."""
    grads = [torch.zeros_like(t) if want else None for t, want in zip(tensors, wants)]
    n_queries, n_keys = split
    with torch.autocast(tensors[0].device.type, enabled=False):  # float32 logits, as the plain forms
        for r, c in loss.tiles:
            parts = [p.detach().requires_grad_(want) for p, want in zip(_slices(tensors, split, r, c), wants)]
            with torch.enable_grad():
                l = score(*parts)  # (b, c)
            if first_visit:
                loss.forward(l.detach(), r, c)
            inputs = [k for k, p in enumerate(parts) if p.requires_grad]
            part_grads = torch.autograd.grad(l, [parts[k] for k in inputs], loss.gradient(l.detach(), r, c))
            for k, g in zip(inputs, part_grads):
                grads[k][r if k < n_queries else c if k < n_queries + n_keys else ...] += g  # shared (s, b): the whole
    return grads


# ---------------------------------------------------------------------------------------------------------------------
# The losses of the method files, by tiles


@torch.compiler.disable  # a loop over tiles, eagerly; torch.compile splits its graph here
def infonce(rows, cols, scale, local, exclude=None):
    """The symmetric InfoNCE of ONE matrix l = (s · rows) colsᵀ, by tiles: the rows `local` against every column,
    each positive at its own index, and the columns `local` against every row, a tile visited only where it holds one
    of them (one rank: every tile once, for both directions). clip.clip_loss: rows, cols the gathered (N, D) unit
    images and texts; slip.simclr_loss: [k_a; k_b] and [k_b; k_a], each view itself left out (exclude: (N,) a column
    each row leaves out, or None). local: (B,) this rank's indices. -> ½ (mean CE of the rows + mean CE of columns)."""
    N = rows.shape[0]
    labels = torch.full((N,), -1, dtype=torch.long, device=rows.device)  # (N,): own index at local rows, else −1
    labels[local] = local
    loss = _InfoNCE(N, cols.shape[0], (TILE, TILE), labels, labels, exclude)
    return _Tiled.apply(loss, _scaled_dot, 1, 1, rows, cols, torch.as_tensor(scale, device=rows.device))


@torch.compiler.disable
def cross_entropy(queries, keys, scale, labels):
    """F.cross_entropy((scale · queries) @ keysᵀ, labels) by tiles, rows only: (M, D) queries, (N, D) keys, (M,)
    labels (declip.nn_loss: the local images against the gathered neighbours)."""
    loss = _InfoNCE(queries.shape[0], keys.shape[0], (TILE, TILE), labels)
    return _Tiled.apply(loss, _scaled_dot, 1, 1, queries, keys, scale)


@torch.compiler.disable
def sigmoid_loss(image, text, logit_scale, logit_bias, positives_on_diagonal):
    """siglip._sigmoid_block by tiles: Σ_ij softplus(l_ij) − Σ_i l_ii (the latter where positives_on_diagonal),
    l = (s · x) yᵀ + b, of (B, D) unit vectors x (images) and y (texts)."""
    B = image.shape[0]
    labels = torch.arange(B, device=image.device) if positives_on_diagonal else None
    loss = _Sigmoid(B, text.shape[0], (TILE, TILE), labels)
    loss.local = torch.is_grad_enabled()  # the gradients at the forward's visit only where a backward may come
    s, b = (torch.as_tensor(x, device=image.device) for x in (logit_scale, logit_bias))  # (a number, as plain takes)
    return _Tiled.apply(loss, _scaled_dot, 1, 1, image, text, s, b)


@torch.compiler.disable
def filip_loss(image_to_text, text_to_image, image_tokens, text_tokens, text_mask, image_keys, text_keys,
               text_key_mask, logit_scale, labels):
    """filip.filip_loss's two cross-entropies by tiles of the (B, N) similarities: image_to_text(patches, words, mask)
    and text_to_image(words, mask, patches) are filip.py's block functions (B, ·, d) × (c, ·, d) -> (B, c); the local
    (B, ·, d) tokens are the queries, the gathered (N, ·, d) keys the columns; labels (B,) the own global indices.
    A tile holds TILE tokens of each side, so its token interaction is TILE² similarities."""
    B, N, P, L = image_tokens.shape[0], text_keys.shape[0], image_tokens.shape[1], text_tokens.shape[1]
    logit_scale = torch.as_tensor(logit_scale, device=image_tokens.device)
    Pk, Lk = image_keys.shape[1], text_keys.shape[1]  # fewer than P, L with keep_fraction < 1
    i2t = _Tiled.apply(_InfoNCE(B, N, (max(1, TILE // P), max(1, TILE // Lk)), labels),
                       lambda x, y, mask, s: s * image_to_text(x, y, mask), 1, 2,
                       image_tokens, text_keys, text_key_mask, logit_scale)
    t2i = _Tiled.apply(_InfoNCE(B, N, (max(1, TILE // L), max(1, TILE // Pk)), labels),
                       lambda y, mask, x, s: s * text_to_image(y, mask, x), 2, 1,
                       text_tokens, text_mask, image_keys, logit_scale)
    return (i2t + t2i) / 2


@torch.compiler.disable
@torch.no_grad()
def argmax(queries, keys, valid=None):
    """(M, D), (N, D) -> (M,): each row's column of the largest q · k (the first of equals, as torch.argmax), among
    keys[:valid] only when valid is given (DeCLIP's filled queue slots), without the (M, N) matrix."""
    M, N = queries.shape[0], keys.shape[0]
    best = queries.new_full((M,), -float("inf"), dtype=torch.float32)
    index = torch.zeros(M, dtype=torch.long, device=queries.device)
    with torch.autocast(queries.device.type, enabled=False):  # float32: bf16 would blur near-ties
        for r in _blocks(M, TILE):
            for c in _blocks(N, TILE):
                similarity = queries[r].float() @ keys[c].float().T  # (b, c)
                if valid is not None:
                    columns = torch.arange(c.start, c.stop, device=keys.device)
                    similarity = similarity.masked_fill(columns[None, :] >= valid, -float("inf"))
                value, column = similarity.max(dim=1)
                better = value > best[r]  # strictly: an earlier tile keeps its equal maximum
                best[r] = torch.where(better, value, best[r])
                index[r] = torch.where(better, column + c.start, index[r])
    return index
