"""FILIP's token-wise loss: against a loop-by-loop computation, chunked = unchunked, padding changes nothing, 2 gloo
processes = 1 process, the top-fraction option, and the zero-shot interface on tiny models."""

import math

import pytest
import torch
import torch.nn.functional as F

from filip import FILIP, filip_loss, image_to_text_similarity, select_tokens, text_padding_mask, \
    text_to_image_similarity
from ranks import run_distributed

EOT = 49407


def _inputs(N=6, P=5, L=7, d=4, seed=0):
    """Random unnormalised tokens and ids with captions of varying length (SOT, words, EOT, then pad 0)."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(N, P, d, generator=g, dtype=torch.float64)
    text = torch.randn(N, L, d, generator=g, dtype=torch.float64)
    ids = torch.zeros(N, L, dtype=torch.long)
    for i in range(N):
        n = 2 + i % (L - 1)  # 2..L tokens, SOT and EOT included
        ids[i, 0], ids[i, 1 : n - 1], ids[i, n - 1] = 49406, torch.randint(0, 1000, (n - 2,), generator=g), EOT
    return image, text, ids, torch.tensor(math.log(10.0), dtype=torch.float64)


def _loop_loss(image, text, lengths, t, image_keys=None, text_keys=None, key_lengths=None):
    """The paper's formulas written out pair by pair (keys default to all tokens of the pair)."""
    image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    image_keys = image if image_keys is None else image_keys
    text_keys = text if text_keys is None else text_keys
    key_lengths = lengths if key_lengths is None else key_lengths
    N = image.shape[0]
    s_i = torch.zeros(N, N, dtype=image.dtype)
    s_t = torch.zeros(N, N, dtype=image.dtype)
    for i in range(N):
        for j in range(N):
            # image i -> caption j: each patch of i, its best word among j's valid (key) words; mean over patches
            s_i[i, j] = torch.stack([max(x @ y for y in text_keys[j, : key_lengths[j]]) for x in image[i]]).mean()
            # caption i -> image j: each valid word of i, its best patch of j; mean over the words
            s_t[i, j] = torch.stack([max(y @ x for x in image_keys[j]) for y in text[i, : lengths[i]]]).mean()
    labels = torch.arange(N)
    return (F.cross_entropy(t.exp() * s_i, labels) + F.cross_entropy(t.exp() * s_t, labels)) / 2


def _leaves(*tensors):
    return [x.clone().requires_grad_(True) for x in tensors]


def test_padding_mask_is_by_position_not_id():
    ids = torch.tensor([[49406, 0, 5, EOT, 0, 0], [49406, EOT, 0, 0, 0, 0]])  # id 0 is "!" inside the first caption
    expected = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(text_padding_mask(ids), expected)


def test_matches_loop_value_and_gradients():
    image, text, ids, t = _inputs()
    mask = text_padding_mask(ids)
    ours = _leaves(image, text, t)
    loss = filip_loss(ours[0], ours[1], mask, ours[2].exp())
    loss.backward()
    reference = _leaves(image, text, t)
    expected = _loop_loss(reference[0], reference[1], mask.sum(1).tolist(), reference[2])
    expected.backward()
    # the loss runs in float32 (as under autocast), the loop in float64
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    for a, r in zip(ours, reference):
        torch.testing.assert_close(a.grad.double(), r.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk_size", [1, 2, 4])
def test_chunked_equals_unchunked(chunk_size):
    image, text, ids, t = _inputs()
    mask = text_padding_mask(ids)
    whole, chunked = _leaves(image, text, t), _leaves(image, text, t)
    a = filip_loss(whole[0], whole[1], mask, whole[2].exp(), chunk_size=10**6)
    b = filip_loss(chunked[0], chunked[1], mask, chunked[2].exp(), chunk_size=chunk_size)
    a.backward()
    b.backward()
    torch.testing.assert_close(a, b)
    for x, y in zip(whole, chunked):
        torch.testing.assert_close(x.grad, y.grad)
    # the similarity functions themselves, without autograd (the eval path)
    x, y = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    with torch.no_grad():
        torch.testing.assert_close(image_to_text_similarity(x, y, mask, chunk_size),
                                   image_to_text_similarity(x, y, mask))
        torch.testing.assert_close(text_to_image_similarity(y, mask, x, chunk_size),
                                   text_to_image_similarity(y, mask, x))


def test_padding_changes_nothing():
    image, text, ids, t = _inputs()
    mask = text_padding_mask(ids)
    noisy_text = torch.where(mask[:, :, None], text, 100 * torch.randn_like(text))  # garbage at every pad position
    clean, noisy = _leaves(image, text, t), _leaves(image, noisy_text, t)
    a = filip_loss(clean[0], clean[1], mask, clean[2].exp())
    b = filip_loss(noisy[0], noisy[1], mask, noisy[2].exp())
    a.backward()
    b.backward()
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(clean[0].grad, noisy[0].grad)
    torch.testing.assert_close(clean[1].grad, noisy[1].grad)
    assert torch.all(noisy[1].grad[~mask] == 0)  # padding receives no gradient


def test_select_tokens_keeps_the_best_matching_tokens_of_the_own_pair():
    image, text, ids, _ = _inputs(L=9)
    mask = text_padding_mask(ids)
    x, y = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    kept_image, kept_text, kept_mask = select_tokens(x, y, mask, keep_fraction=0.4)
    assert kept_image.shape[1] == math.ceil(0.4 * 5) and kept_text.shape[1] == math.ceil(0.4 * 9)
    for i in range(x.shape[0]):
        n = int(mask[i].sum())
        sim = x[i] @ y[i, :n].T  # (P, n) own pair, valid words only
        best_patches = sim.amax(1).topk(kept_image.shape[1]).indices
        torch.testing.assert_close(kept_image[i], x[i, best_patches])
        # words: the best-matching valid words first; padding only to fill up, and then masked
        k = kept_text.shape[1]
        best_words = sim.amax(0).topk(min(k, n)).indices
        torch.testing.assert_close(kept_text[i, : min(k, n)], y[i, best_words])
        assert kept_mask[i].tolist() == [True] * min(k, n) + [False] * (k - min(k, n))


def test_keep_fraction_uses_the_selected_tokens_as_keys():
    image, text, ids, t = _inputs()
    mask = text_padding_mask(ids)
    # keep everything: a permutation of the tokens, the same loss
    torch.testing.assert_close(filip_loss(image, text, mask, t.exp(), keep_fraction=1.0),
                               filip_loss(image, text, mask, t.exp(), keep_fraction=0.999))
    # keep 40%: queries keep all tokens, keys are the selected ones (the loop with explicit keys)
    kept_image, kept_text, kept_mask = select_tokens(F.normalize(image, dim=-1), F.normalize(text, dim=-1), mask, 0.4)
    # the kept text tokens are sorted valid-first, so the valid keys are a prefix of length kept_mask.sum()
    expected = _loop_loss(image, text, mask.sum(1).tolist(), t, kept_image, kept_text, kept_mask.sum(1).tolist())
    torch.testing.assert_close(filip_loss(image, text, mask, t.exp(), keep_fraction=0.4).double(), expected,
                               rtol=1e-5, atol=1e-6)


def test_half_precision_gather_is_close():
    image, text, ids, t = _inputs()
    mask = text_padding_mask(ids)
    exact = filip_loss(image, text, mask, t.exp())
    half = filip_loss(image, text, mask, t.exp(), gather_dtype=torch.float16)
    assert 0 < abs(float(exact) - float(half)) < 1e-2  # rounded (the keys did travel in float16), but close


def test_float32_under_autocast():
    image, text, ids, t = (x.float() if x.is_floating_point() else x for x in _inputs())
    mask = text_padding_mask(ids)
    exact = filip_loss(image, text, mask, t.exp())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = filip_loss(image, text, mask, t.exp())  # float32 tokens in: no rounding anywhere
    torch.testing.assert_close(autocast, exact)


def test_backward_keeps_no_token_interaction_tensor():
    # every chunk is checkpointed: nothing of size B·N·P·L (or one chunk of it) is saved for the backward
    image, text, ids, t = _inputs(N=8, P=6, L=7, d=4)
    image, text, t = _leaves(image, text, t)
    mask = text_padding_mask(ids)
    saved = []

    def pack(x):
        saved.append(x.numel())
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        loss = filip_loss(image, text, mask, t.exp(), chunk_size=2)
    loss.backward()
    assert max(saved) <= max(image.numel(), text.numel())  # the token features themselves, at most
    assert image.grad is not None and text.grad is not None


def _distributed_loss(rank, world, image, text, mask, t):
    B = image.shape[0] // world
    local = slice(rank * B, (rank + 1) * B)
    results = []
    for keep_fraction in (1.0, 0.5):
        leaves = _leaves(image[local], text[local], t)
        loss = filip_loss(leaves[0], leaves[1], mask[local], leaves[2].exp(), keep_fraction=keep_fraction,
                          chunk_size=3)
        loss.backward()
        results.append((loss.detach(), *(x.grad for x in leaves)))
    return results


def test_two_processes_equal_one():
    world = 2
    image, text, ids, t = _inputs(N=8)
    mask = text_padding_mask(ids)
    per_rank = run_distributed(_distributed_loss, world, image, text, mask, t)
    for i, keep_fraction in enumerate((1.0, 0.5)):  # the top-fraction selection does not depend on the split
        single = _leaves(image, text, t)
        global_loss = filip_loss(single[0], single[1], mask, single[2].exp(), keep_fraction=keep_fraction)
        global_loss.backward()
        losses, image_grads, text_grads, t_grads = zip(*(rank_results[i] for rank_results in per_rank))
        # mean of the rank losses = the global loss; the local features get every rank's gradient through the
        # gather's backward, and DDP averages: the single-process gradient is that sum / W
        torch.testing.assert_close(torch.stack(losses).mean(), global_loss.detach())
        torch.testing.assert_close(torch.cat(image_grads) / world, single[0].grad)
        torch.testing.assert_close(torch.cat(text_grads) / world, single[1].grad)
        torch.testing.assert_close(torch.stack(t_grads).mean(), single[2].grad)


# ---------------------------------------------------------------------------------------------------------------------
# the method on tiny models


def _captions(n, L, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(n, L, dtype=torch.long)
    for i in range(n):
        k = 3 + i % 4
        ids[i, 0], ids[i, 1 : k - 1], ids[i, k - 1] = 49406, torch.randint(1, 1000, (k - 2,), generator=g), EOT
    return ids


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-rn"])
def test_method_forward_and_eval_interface(name):
    import model as model_module
    torch.manual_seed(0)
    model = model_module.create_model(name)
    method = FILIP(model)
    R, L = model.image_resolution, model.context_length
    images, ids = torch.randn(4, 3, R, R), _captions(4, L)

    loss, logs = method({"image": images, "text": ids})
    assert set(logs) == {"filip", "logit_scale"} and torch.isfinite(loss)
    loss.backward()
    assert method.image_head.weight.grad is not None and method.text_head.weight.grad is not None
    assert model.text_projection.grad is None  # unused by FILIP's loss: hence find_unused_parameters
    assert FILIP.find_unused_parameters

    method.eval()
    with torch.no_grad():
        image_emb = method.embed_images(images)
        text_emb = method.embed_texts(ids)
        P = (R // 8) ** 2 if name == "tiny-vit" else (R // 32) ** 2  # ViT: patches of 8 px; ResNet: the R/32 grid
        assert image_emb.shape == (4, P, 256)
        assert text_emb[0].shape == (4, L, 256) and text_emb[1].shape == (4, L)
        assert method.similarity(image_emb, text_emb).shape == (4, 4)

        C, T = 3, 2
        prompts = _captions(C * T, L, seed=1).reshape(C, T, L)
        class_emb = method.embed_classes(prompts)
        assert class_emb[0].shape == (C, T, L, 256) and class_emb[1].shape == (C, T, L)
        scores = method.similarity(image_emb, class_emb)
        assert scores.shape == (4, C)
        # the prompt ensemble averages the image→text similarity over the templates
        per_template = method.similarity(image_emb, method.embed_texts(prompts.reshape(C * T, L)))  # (4, C·T)
        torch.testing.assert_close(scores, per_template.reshape(4, C, T).mean(2))
        # batch-first: embedding in two halves and concatenating (as eval_zeroshot.py does) changes nothing
        halves = [method.embed_texts(ids[:2]), method.embed_texts(ids[2:])]
        joined = tuple(torch.cat(parts) for parts in zip(*halves))
        torch.testing.assert_close(method.similarity(image_emb, joined), method.similarity(image_emb, text_emb))
