"""DeCLIP: SimSiam, MLM masking and loss, the nearest-neighbour queue and loss against direct computations, EDA, the
transform, a forward/backward on a tiny model, the temperature clamp, and 2 gloo processes against one process."""

import pickle
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import declip
from declip import MASK, DeCLIP, eda, mask_tokens, mlm_loss, mlm_per_sample, nn_loss, random_deletion, random_swap, \
    simsiam_loss, synonym_replacement
from model import create_model
from plumbing import distributed, synthetic
from plumbing.tokenizer import get_tokenizer
from ranks import assert_close_at_scale, run_distributed

SOT, EOT = 49406, 49407


def _text(B, L=24, seed=0, lengths=None):  # 24: the tiny configs' context
    """Well-formed captions: SOT, ordinary ids in [1, SOT), EOT, zero padding."""
    g = torch.Generator().manual_seed(seed)
    text = torch.zeros(B, L, dtype=torch.long)
    for i in range(B):
        n = int(torch.randint(1, L - 1, (), generator=g)) if lengths is None else lengths[i]
        text[i, 0], text[i, n + 1] = SOT, EOT
        text[i, 1:n + 1] = torch.randint(1, SOT, (n,), generator=g)
    return text


def _batch(B=8, seed=0, resolution=64, mlm_probability=0.15):
    """DeCLIP's views drawn directly: two images, the caption masked as the transform masks it, and an EDA caption."""
    g = torch.Generator().manual_seed(seed)
    images = {k: torch.randn(B, 3, resolution, resolution, generator=g) for k in ("image_a", "image_b")}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text, mlm_labels = mask_tokens(_text(B, seed=seed), mlm_probability)
    return {**images, "text": text, "mlm_labels": mlm_labels, "text_eda": _text(B, seed=seed + 1)}


def _method(name="tiny-vit", **kwargs):
    kwargs = {"queue_size": 64, "proj_dim": 32, "pred_dim": 16, **kwargs}
    return DeCLIP(create_model(name), **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# SimSiam


def test_simsiam_matches_direct_computation_and_stops_gradient():
    g = torch.Generator().manual_seed(0)
    p_a, p_b, z_a, z_b = (torch.randn(6, 5, generator=g, dtype=torch.float64).requires_grad_(True) for _ in range(4))
    loss = simsiam_loss(p_a, p_b, z_a, z_b)
    direct = 0.0
    for i in range(6):
        direct -= 0.5 * (p_a[i] @ z_b[i] / (p_a[i].norm() * z_b[i].norm())).item() / 6
        direct -= 0.5 * (p_b[i] @ z_a[i] / (p_b[i].norm() * z_a[i].norm())).item() / 6
    assert abs(loss.item() - direct) < 1e-6
    grads = torch.autograd.grad(loss, (p_a, z_a, z_b), allow_unused=True)
    assert grads[0] is not None and grads[1] is None and grads[2] is None  # stop-gradient on the z side
    assert simsiam_loss(z_a, z_b, z_b, z_a).item() == pytest.approx(-1.0)  # p = the other view's z: perfect


# ---------------------------------------------------------------------------------------------------------------------
# MLM


def test_mask_tokens_statistics_and_layout():
    torch.manual_seed(0)
    text = _text(4000, L=32, seed=1)
    ids, labels = mask_tokens(text, probability=0.15)
    position = torch.arange(32)
    eot = text.argmax(-1, keepdim=True)
    maskable = (position > 0) & (position < eot)
    chosen = labels != -100
    # never SOT, EOT or padding; labels are the original ids exactly where chosen
    assert not (chosen & ~maskable).any()
    assert torch.equal(labels[chosen], text[chosen]) and (labels[~chosen] == -100).all()
    # rates: 15% of the caption tokens; of those 80% [MASK], 10% random, 10% unchanged
    rate = chosen.sum() / maskable.sum()
    assert abs(rate.item() - 0.15) < 0.005
    n = chosen.sum().item()
    to_mask = ids == MASK
    assert not (to_mask & ~chosen).any()
    assert abs(to_mask.sum().item() / n - 0.8) < 0.01
    changed = chosen & ~to_mask & (ids != text)  # random replacements (a random id equal to the original is rare)
    kept = chosen & ~to_mask & (ids == text)
    assert abs(changed.sum().item() / n - 0.1) < 0.01 and abs(kept.sum().item() / n - 0.1) < 0.01
    # nothing else changes, random ids stay ordinary (below SOT), and the EOT position is unchanged
    assert torch.equal(ids[~chosen], text[~chosen])
    assert (ids[changed] >= 0).all() and (ids[changed] < SOT).all()
    assert torch.equal(ids.argmax(-1), text.argmax(-1))


def test_mask_tokens_short_captions():
    text = _text(3, L=8, lengths=[1, 2, 6])
    torch.manual_seed(0)
    ids, labels = mask_tokens(text, probability=1.0)  # everything maskable is chosen
    assert torch.equal(labels != -100, torch.tensor([[0, 1, 0, 0, 0, 0, 0, 0], [0, 1, 1, 0, 0, 0, 0, 0],
                                                     [0, 1, 1, 1, 1, 1, 1, 0]], dtype=torch.bool))


def test_masked_caption_embeds_mask_where_marked():
    """[MASK] is the method's own vector, not a vocabulary row: the masked caption's encoding is the text encoder
    run on the token embeddings with mask_embedding at the MASK positions, pooled at the original EOT."""
    torch.manual_seed(0)
    method = _method()
    text = _text(3)
    ids = text.clone()
    ids[:, 1] = MASK
    pooled, tokens = method.masked_text_features(ids)
    embeddings = method.model.token_embedding(text)
    embeddings[:, 1] = method.mask_embedding
    expected = method.model.text_features(text, embeddings=embeddings)
    torch.testing.assert_close(pooled, expected[0])
    torch.testing.assert_close(tokens, expected[1])


def test_mlm_loss_matches_direct_computation():
    torch.manual_seed(0)
    head = nn.Linear(6, 11)
    tokens = torch.randn(3, 5, 6)
    labels = torch.full((3, 5), -100)
    labels[0, 1], labels[0, 3], labels[0, 4], labels[2, 2] = 4, 7, 2, 10  # 4 tokens of 3 captions
    sums, counts = mlm_per_sample(head, tokens, labels)
    ce = {(b, t): -torch.log_softmax(head(tokens[b, t]), -1)[y] for (b, t), y in
          (((0, 1), 4), ((0, 3), 7), ((0, 4), 2), ((2, 2), 10))}
    torch.testing.assert_close(sums, torch.stack([ce[0, 1] + ce[0, 3] + ce[0, 4], torch.tensor(0.0), ce[2, 2]]))
    assert counts.tolist() == [3, 0, 1]
    # the mean over the batch's chosen tokens, not over captions
    torch.testing.assert_close(mlm_loss(sums, counts), sum(ce.values()) / 4)
    # no chosen token: a zero loss that still reaches the head (DDP needs every parameter in the graph)
    empty = mlm_loss(*mlm_per_sample(head, tokens, torch.full((3, 5), -100)))
    assert empty.item() == 0.0
    empty.backward()
    assert head.weight.grad is not None and head.weight.grad.abs().sum() == 0


@pytest.mark.parametrize("tokens_dtype", [torch.float32, torch.bfloat16])
def test_mlm_logits_are_float32_under_autocast(tokens_dtype):
    """The README's promise: every loss computes its logits in float32, also under bf16 autocast (as on a GPU)."""
    torch.manual_seed(0)
    head = nn.Linear(64, 1000)
    tokens = torch.randn(4, 9, 64).to(tokens_dtype)
    labels = torch.randint(0, 1000, (4, 9)).masked_fill(torch.rand(4, 9) < 0.5, -100)
    seen = []
    head.register_forward_hook(lambda module, inputs, output: seen.append(output))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sums, _ = mlm_per_sample(head, tokens, labels)
    chosen = labels != -100
    expected = F.linear(tokens[chosen].float(), head.weight, head.bias)  # float32, no autocast
    assert seen[0].dtype == torch.float32
    torch.testing.assert_close(seen[0], expected, rtol=0, atol=0)
    torch.testing.assert_close(sums, mlm_per_sample(head, tokens.float(), labels)[0], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------------
# The nearest-neighbour queue and loss


def test_queue_fifo_and_wrap_around():
    method = _method(queue_size=5)
    unit = F.normalize(torch.randn(12, 128), dim=-1)
    method.enqueue(unit[:3])
    assert method.queue_filled.item() == 3 and method.queue_ptr.item() == 3
    torch.testing.assert_close(method.queue[:3], unit[:3])
    assert (method.queue[3:] == 0).all()
    method.enqueue(unit[3:7])  # wraps: slots 3, 4, then 0, 1 (the oldest, rows 0 and 1, are overwritten)
    assert method.queue_filled.item() == 5 and method.queue_ptr.item() == 2
    torch.testing.assert_close(method.queue, unit[[5, 6, 2, 3, 4]])
    method.enqueue(unit[7:12])  # a full lap
    torch.testing.assert_close(method.queue, unit[[10, 11, 7, 8, 9]])
    big = F.normalize(torch.randn(7, 128), dim=-1)
    method.enqueue(big)  # larger than the queue: as if written one by one from slot 2: its newest 5 survive
    assert method.queue_ptr.item() == (2 + 7) % 5
    torch.testing.assert_close(method.queue, big[[3, 4, 5, 6, 2]])


def test_nearest_neighbour_only_among_filled_slots():
    method = _method(queue_size=6)
    entries = F.normalize(torch.randn(3, 128), dim=-1)
    method.enqueue(entries)
    queries = F.normalize(torch.randn(5, 128), dim=-1)
    queries[0] = -entries.sum(0) / entries.sum(0).norm()  # negative cosine with every entry: zeros would win
    found = method.nearest_neighbour(queries)
    expected = entries[(queries @ entries.T).argmax(1)]
    torch.testing.assert_close(found, expected)


def test_nn_loss_matches_direct_computation():
    g = torch.Generator().manual_seed(0)
    image = torch.randn(5, 8, generator=g)
    neighbours = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    s = torch.tensor(20.0)
    direct = 0.0
    for i in range(5):
        logits = torch.stack([s * F.normalize(image[i], dim=0) @ neighbours[j] for j in range(5)])
        direct -= torch.log_softmax(logits, 0)[i] / 5
    torch.testing.assert_close(nn_loss(image, neighbours, s), direct)


def test_forward_looks_up_before_enqueueing():
    torch.manual_seed(0)
    method = _method(queue_size=40)
    batch = _batch(B=4, mlm_probability=0.0)  # unmasked: the captions are encoded as they are below
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, logs = method(batch)  # step 1: empty queue, the NN term is off; then 2B captions are enqueued
        assert logs["nn"].item() == 0.0 and method.queue_filled.item() == 8
        queue_before = method.queue.clone()
        _, logs = method(batch)  # step 2: the same captions; their neighbours are last step's entries
    text = F.normalize(method.model.encode_text(batch["text"]), dim=-1).detach()
    text_eda = F.normalize(method.model.encode_text(batch["text_eda"]), dim=-1).detach()
    image_a, image_b = method.model.encode_image(batch["image_a"]), method.model.encode_image(batch["image_b"])
    filled = queue_before[:8]
    nn_text, nn_eda = filled[(text @ filled.T).argmax(1)], filled[(text_eda @ filled.T).argmax(1)]
    s = method.model.logit_scale.exp()
    expected = (nn_loss(image_a, nn_text, s) + nn_loss(image_a, nn_eda, s) + nn_loss(image_b, nn_text, s)
                + nn_loss(image_b, nn_eda, s)) / 4
    torch.testing.assert_close(logs["nn"], expected.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(method.queue[8:16], torch.cat([text, text_eda]), rtol=1e-4, atol=1e-5)
    method.eval()
    with torch.no_grad():
        method(batch)
    assert method.queue_filled.item() == 16  # an evaluation forward leaves the queue alone


def test_queue_is_in_the_checkpoint():
    method = _method(queue_size=8)
    method.enqueue(F.normalize(torch.randn(3, 128), dim=-1))
    state = {k: v for k, v in method.state_dict().items() if not k.startswith("model.")}  # train.py's "method"
    assert {"queue", "queue_ptr", "queue_filled"} <= set(state)
    other = _method(queue_size=8)
    other.load_state_dict(method.state_dict())
    assert torch.equal(other.queue, method.queue) and other.queue_ptr.item() == 3


# ---------------------------------------------------------------------------------------------------------------------
# EDA and the transform


def test_eda_operations():
    torch.manual_seed(0)
    words = "a large red circle on the left.".split()
    replaced = synonym_replacement(words)
    changed = [(w, r) for w, r in zip(words, replaced) if w != r]
    assert len(changed) == 1  # n = 1
    (w, r), = changed
    core = w.rstrip(".")
    assert r.rstrip(".") in declip.SYNONYMS[core] and r.endswith(".") == w.endswith(".")  # punctuation kept
    assert synonym_replacement("of the a".split()) == ["of", "the", "a"]  # stopwords have no synonyms
    swapped = random_swap(words)
    assert sorted(swapped) == sorted(words) and sum(a != b for a, b in zip(swapped, words)) == 2
    assert random_swap(["one"]) == ["one"]
    torch.manual_seed(0)
    deleted = [random_deletion(words * 100) for _ in range(5)]
    assert all(0.85 < len(d) / 700 < 0.95 for d in deleted)  # p = 0.1
    assert random_deletion(["word"]) == ["word"]
    assert all(eda("circle").strip() for _ in range(20))  # never empty


def test_synonym_table_covers_the_synthetic_captions():
    vocabulary = (list(synthetic.COLOURS) + synthetic.SHAPES + list(synthetic.SIZES) + list(synthetic.POSITIONS) + synthetic.COUNTS
                  + [b for b in synthetic.BACKGROUNDS])
    vocabulary += [s + ("es" if s == "cross" else "s") for s in synthetic.SHAPES]
    assert not [w for w in vocabulary if w not in declip.SYNONYMS]
    dataset = synthetic.SyntheticCaptions("train", size=200)
    torch.manual_seed(0)
    changed = sum(synonym_replacement(dataset[i][1].split()) != dataset[i][1].split() for i in range(200))
    assert changed == 200  # every synthetic caption has a replaceable word


def test_transform_views_and_pickling():
    method = _method(mlm_probability=0.5)
    tokenizer = get_tokenizer("clip")
    transform = pickle.loads(pickle.dumps(method.transform(tokenizer)))
    image = Image.new("RGB", (70, 70), (40, 200, 40))
    caption = "a small green triangle at the top of a large blue square"
    torch.manual_seed(0)
    out = transform(image, caption)
    assert set(out) == {"image_a", "image_b", "text", "mlm_labels", "text_eda"}
    assert out["image_a"].shape == out["image_b"].shape == (3, 64, 64)
    L = method.model.context_length
    assert out["text"].shape == out["mlm_labels"].shape == out["text_eda"].shape == (L,)
    assert out["text"].dtype == out["mlm_labels"].dtype == torch.long
    # the caption masked as BERT: the chosen tokens' original ids in mlm_labels, [MASK] (or a swap) in their place
    original = tokenizer(caption, L)[0]
    chosen = out["mlm_labels"] != -100
    assert chosen.any() and torch.equal(out["mlm_labels"][chosen], original[chosen])
    assert torch.equal(out["text"][~chosen], original[~chosen]) and (out["text"][chosen] == MASK).any()
    torch.manual_seed(0)
    again = transform(image, caption)
    # torch's RNG only: train.py's per-sample seeding gives each sample the same masks whatever the ranks or
    # micro-batches, and on a resume
    assert all(torch.equal(out[k], again[k]) for k in out)


# ---------------------------------------------------------------------------------------------------------------------
# The method


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-rn"])
def test_forward_backward_tiny_model(name):
    torch.manual_seed(0)
    method = _method(name)
    assert method.defaults["lr"] == 1e-3 and method.defaults["weight_decay"] == 0.1
    assert method.defaults["eps"] == 1e-8 and method.defaults["betas"] == (0.9, 0.98)
    batch = _batch(B=8, mlm_probability=0.5)  # many masked tokens, so [MASK] is surely used
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        method(batch)  # fills the queue, so the NN term is on in the step we check
        loss, logs = method(batch)
    assert set(logs) == {"clip", "simsiam", "mlm", "nn", "logit_scale", "queue"}
    assert torch.isfinite(loss) and all(torch.isfinite(v) and v.dim() == 0 for v in logs.values())
    assert logs["nn"] > 0 and logs["mlm"] > 0
    torch.testing.assert_close(loss.detach(), 0.4 * logs["clip"] + 0.2 * (logs["simsiam"] + logs["mlm"] + logs["nn"]))
    method.zero_grad()
    loss.backward()
    for name, p in method.named_parameters():
        assert p.grad is not None, name  # DDP's find_unused_parameters=False holds
    for module in (method.projector, method.predictor, method.mlm_head):
        for p in module.parameters():
            assert p.grad.abs().sum() > 0
    assert method.mask_embedding.grad.abs().sum() > 0


@pytest.mark.parametrize("t", [4.0, 5.0])
def test_clamped_exp_is_the_released_data_clamp(t):
    """The released forward: s = exp(t), then s.data clamped to ≤ 100: the value is clamped, the gradient stays
    exp(t)'s."""
    ours, released = torch.tensor(t, requires_grad=True), torch.tensor(t, requires_grad=True)
    s_ours = declip.clamped_exp(ours, 100.0)
    s_released = released.exp()
    s_released.data = s_released.data.clamp(max=100)
    (3 * s_ours).backward()
    (3 * s_released).backward()
    assert s_ours.item() == s_released.item() == min(torch.tensor(t).exp().item(), 100.0)
    assert ours.grad.item() == released.grad.item() == pytest.approx(3 * torch.tensor(t).exp().item())


def test_temperature_keeps_its_gradient_above_the_clamp():
    """t = 5 > ln 100: s is clamped to 100, yet the loss still moves t (else it would freeze there for good)."""
    torch.manual_seed(0)
    method = _method()
    with torch.no_grad():
        method.model.logit_scale.fill_(5.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        method(_batch(B=8))  # fills the queue: the NN term uses s too
        loss, logs = method(_batch(B=8, seed=1))
    assert logs["logit_scale"].item() == 100.0
    loss.backward()
    assert method.model.logit_scale.grad.abs().item() > 1e-6


def test_logit_scale_clamps():
    method = _method()
    with torch.no_grad():
        method.model.logit_scale.fill_(2.0)
    method.post_step()
    assert method.model.logit_scale.item() == 3.0
    with torch.no_grad():
        method.model.logit_scale.fill_(7.0)
    method.post_step()
    assert method.model.logit_scale.item() == 6.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, logs = method(_batch(B=4))
    assert logs["logit_scale"].item() == pytest.approx(100.0)  # exp(6) clamped to 100 in the forward


def _rank_declip(rank, world, state, batch):
    method = _method()
    method.load_state_dict(state)
    B = batch["text"].shape[0] // world
    local = {k: v[rank * B:(rank + 1) * B] for k, v in batch.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss, logs = method(local)
    loss.backward()
    grads = {n: p.grad for n, p in method.named_parameters() if n in _CHECKED}
    return loss.detach(), logs, grads


_CHECKED = ("projector.0.weight", "projector.1.weight", "predictor.3.weight", "mlm_head.weight", "mask_embedding",
            "model.visual.conv1.weight", "model.visual.proj", "model.text_projection", "model.logit_scale")


def test_declip_distributed_equals_one_process():
    """2 ranks × 4 = one process × 8: the 4 CLIP losses, SimSiam with GlobalBatchNorm, the NN term (every rank given
    the same queue, so the neighbours agree) and MLM, the mean over the global batch's chosen tokens (the masks come
    with the batch, as from the transform)."""
    torch.manual_seed(0)
    method = _method()
    method.enqueue(F.normalize(torch.randn(20, 128), dim=-1))
    state = method.state_dict()
    batch = _batch(B=8, mlm_probability=0.3)
    # the ranks' halves hold different numbers of chosen tokens: a per-rank mean would not be the global one
    per_rank = (batch["mlm_labels"] != -100).reshape(2, -1).sum(1)
    assert per_rank[0] != per_rank[1]
    full = _rank_declip(0, 1, state, batch)
    assert full[1]["nn"] > 0 and full[1]["mlm"] > 0
    results = run_distributed(_rank_declip, 2, state, batch)
    torch.testing.assert_close(torch.stack([r[0] for r in results]).mean(), full[0], rtol=1e-5, atol=1e-6)
    for key in ("clip", "simsiam", "nn", "mlm"):
        torch.testing.assert_close(torch.stack([r[1][key] for r in results]).mean(), full[1][key], rtol=1e-5, atol=1e-6)
    for name in _CHECKED:
        assert_close_at_scale((results[0][2][name] + results[1][2][name]) / 2, full[2][name])


def _rank_queue_under_ddp(rank, world, state, batch):
    method = _method()
    method.load_state_dict(state)
    ddp = distributed.wrap_ddp(method, "cpu")
    B = batch["text"].shape[0] // world
    local = {k: v[rank * B:(rank + 1) * B] for k, v in batch.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(2):
            ddp(local)[0].backward()
    return method.queue.clone(), int(method.queue_filled)


def test_queue_stays_per_rank_under_train_ddp():
    """train.py's DDP wrapper leaves each rank's queue alone: after two steps it holds that rank's own captions,
    exactly what one process fed the same local batches holds (a buffer sync from rank 0 would put rank 0's there)."""
    torch.manual_seed(0)
    state = _method().state_dict()
    batch = _batch(B=8)
    results = run_distributed(_rank_queue_under_ddp, 2, state, batch)
    B = 4  # per rank
    for rank, (queue, filled) in enumerate(results):
        alone = _method()
        alone.load_state_dict(state)
        local = {k: v[rank * B:(rank + 1) * B] for k, v in batch.items()}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(2):
                alone(local)
        assert filled == int(alone.queue_filled) == 2 * 2 * B  # two steps × (caption + EDA caption) × B
        torch.testing.assert_close(queue, alone.queue)
    assert not torch.allclose(results[0][0][:4 * B], results[1][0][:4 * B])
