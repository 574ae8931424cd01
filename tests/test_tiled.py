"""plumbing/tiled.py: the tiled losses equal the plain lines of every method (loss, logs and every gradient: features,
temperatures, SigLIP's bias, the heads), in one process and on 2 gloo ranks, with train.forward_backward's
accumulation, and the papers' formulas written out. The threshold is lowered to 0 so that the tests reach the tiled
path at small sizes, with small tiles whose edges fall inside the batch; every test counts the tiled calls, so it
fails if the plain path ran instead."""

import collections
import copy
import importlib
import math
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import declip
import filip
import siglip
import slip
from clip import clip_loss
from model import create_model
from plumbing import tiled
from ranks import assert_close_at_scale, run_distributed
from test_accum import METHOD_KWARGS, _assert_same_gradients, _assert_same_step, _batch, _method, _rank_steps, \
    _split, _step
from test_clip import slow_clip_loss
from test_filip import _inputs as filip_inputs, _loop_loss as filip_loop_loss
from test_slip import textbook_nt_xent

# a dot-product tile of 3 × 3 cuts the batch of 8 (4 per rank) inside; FILIP's tiles hold TILE tokens of each side:
# 130 tokens are 2 images of 64 patches or 5 captions of 24 tokens (tiny-vit)
TILES = {"clip": 3, "siglip": 3, "slip": 3, "declip": 3, "filip": 130, "defilip": 130}
# the tiled calls of one loss of each method (SigLIP: per block; SLIP and DeCLIP: the argmax of the accuracy or queue)
CALLS = {"clip": {"infonce": 1}, "siglip": {"sigmoid_loss": 1}, "filip": {"filip_loss": 1},
         "slip": {"infonce": 2, "argmax": 1},
         "declip": {"infonce": 4, "cross_entropy": 4, "argmax": 2},
         "defilip": {"infonce": 4, "cross_entropy": 4, "argmax": 2, "filip_loss": 1}}


def count_calls(setattr_):
    """Wrap tiled's public functions (through setattr_: monkeypatch's, or setattr in a worker) -> Counter of calls."""
    calls = collections.Counter()
    for name in ("infonce", "cross_entropy", "sigmoid_loss", "filip_loss", "argmax"):
        def counted(*args, _function=getattr(tiled, name), _name=name, **kwargs):
            calls[_name] += 1
            return _function(*args, **kwargs)
        setattr_(tiled, name, counted)
    return calls


@pytest.fixture
def calls(monkeypatch):
    """Tiled from 0 MiB on, with 3 × 3 tiles (a test may set TILE again); -> the Counter of tiled calls."""
    monkeypatch.setattr(tiled, "LIMIT_MB", 0.0)
    monkeypatch.setattr(tiled, "TILE", 3)
    return count_calls(monkeypatch.setattr)


def plain(monkeypatch):
    monkeypatch.setattr(tiled, "LIMIT_MB", math.inf)


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def _grads(loss, tensors):
    return torch.autograd.grad(loss, tensors, allow_unused=True)


# --- the losses against the papers' formulas written out --------------------------------------------------------------


@pytest.mark.parametrize("tile", [1, 2, 4, 5, 11, 64])
def test_clip_matches_direct_computation_and_plain(calls, monkeypatch, tile):
    monkeypatch.setattr(tiled, "TILE", tile)
    g = torch.Generator().manual_seed(0)
    image, text, t = torch.randn(11, 16, generator=g), torch.randn(11, 16, generator=g), torch.tensor(2.5)
    ours = _leaves(image, text, t)
    loss = clip_loss(ours[0], ours[1], ours[2].exp())
    assert calls == {"infonce": 1}
    torch.testing.assert_close(loss.double(), slow_clip_loss(image.double(), text.double(), t.exp().double()),
                               rtol=1e-6, atol=1e-6)
    theirs = _leaves(image, text, t)
    plain(monkeypatch)
    expected = clip_loss(theirs[0], theirs[1], theirs[2].exp())
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
    for a, b in zip(_grads(loss, ours), _grads(expected, theirs)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_siglip_matches_direct_formula(calls):
    g = torch.Generator().manual_seed(0)
    image, text = torch.randn(7, 8, generator=g), torch.randn(7, 8, generator=g)
    s, b = torch.tensor(5.0), torch.tensor(-2.0)
    loss = siglip.siglip_loss(image, text, s, b)
    assert calls == {"sigmoid_loss": 1}
    x, y = F.normalize(image.double(), dim=-1), F.normalize(text.double(), dim=-1)
    z = 2 * torch.eye(7, dtype=torch.float64) - 1
    direct = -F.logsigmoid(z * (s * x @ y.T + b)).sum() / 7
    torch.testing.assert_close(loss.double(), direct, rtol=1e-6, atol=1e-6)


def test_simclr_matches_textbook_formula(calls):
    g = torch.Generator().manual_seed(0)
    z_a, z_b = torch.randn(10, 8, generator=g), torch.randn(10, 8, generator=g)
    loss, accuracy = slip.simclr_loss(z_a, z_b, temperature=0.1)
    assert calls == {"infonce": 1, "argmax": 1}
    torch.testing.assert_close(loss.double(), textbook_nt_xent(z_a, z_b, 0.1), rtol=1e-5, atol=1e-6)
    q_a, q_b = F.normalize(z_a, dim=-1), F.normalize(z_b, dim=-1)
    assert float(accuracy) == float(((q_a @ q_b.T).argmax(1) == torch.arange(10)).float().mean())


def test_nn_loss_matches_direct_computation(calls):
    g = torch.Generator().manual_seed(0)
    image, neighbours, s = torch.randn(5, 8, generator=g), F.normalize(torch.randn(5, 8, generator=g), dim=-1), 20.0
    loss = declip.nn_loss(image, neighbours, torch.tensor(s))
    assert calls == {"cross_entropy": 1}
    x = F.normalize(image.double(), dim=-1)
    direct = F.cross_entropy(s * x @ neighbours.double().T, torch.arange(5))
    torch.testing.assert_close(loss.double(), direct, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("tile", [7, 20, 1000])  # 1 image × 2 captions (5 × 7 tokens) of a tile, 2 × 4, the whole
def test_filip_matches_loop_value_and_gradients(calls, monkeypatch, tile):
    monkeypatch.setattr(tiled, "TILE", tile)
    image, text, ids, t = filip_inputs()
    mask = filip.text_padding_mask(ids)
    ours = _leaves(image, text, t)
    loss = filip.filip_loss(ours[0], ours[1], mask, ours[2].exp())
    assert calls == {"filip_loss": 1}
    reference = _leaves(image, text, t)
    expected = filip_loop_loss(reference[0], reference[1], mask.sum(1).tolist(), reference[2])
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    for a, b in zip(_grads(loss, ours), _grads(expected, reference)):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("keep_fraction,half_gather", [(0.5, False), (1.0, True)])
def test_filip_options_tiled_equal_plain(calls, monkeypatch, keep_fraction, half_gather):
    """The top tokens as keys (fewer key tokens than query tokens: the tiles count them apart) and float16 keys."""
    monkeypatch.setattr(tiled, "TILE", 12)
    image, text, ids, t = (x.float() for x in filip_inputs(L=9))
    mask, gather_dtype = filip.text_padding_mask(ids), torch.float16 if half_gather else None
    ours, theirs = _leaves(image, text, t), _leaves(image, text, t)
    loss = filip.filip_loss(ours[0], ours[1], mask, ours[2].exp(), keep_fraction, gather_dtype)
    assert calls == {"filip_loss": 1}
    plain(monkeypatch)
    expected = filip.filip_loss(theirs[0], theirs[1], mask, theirs[2].exp(), keep_fraction, gather_dtype)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    for a, b in zip(_grads(loss, ours), _grads(expected, theirs)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("valid", [None, 0, 5, 13])
def test_argmax_takes_the_first_of_equals_among_valid_columns(calls, valid):
    """Small integers: every dot product is exact, so ties are real, inside a tile and across tiles."""
    g = torch.Generator().manual_seed(0)
    queries = torch.randint(-1, 2, (20, 4), generator=g).float()
    keys = torch.randint(-1, 2, (13, 4), generator=g).float()
    similarity = queries @ keys.T
    if valid is not None:
        similarity = similarity.masked_fill(torch.arange(13) >= valid, -math.inf)
    assert (similarity == similarity.amax(1, keepdim=True)).sum(1).gt(1).sum() > 5  # many rows with ties
    assert torch.equal(tiled.argmax(queries, keys, valid if valid is None else torch.tensor(valid)),
                       similarity.argmax(1))


@pytest.mark.parametrize("filled", [0, 5, 13])
def test_nearest_neighbour_equals_plain(calls, monkeypatch, filled):
    torch.manual_seed(0)
    method = declip.DeCLIP(create_model("tiny-vit"), queue_size=13, proj_dim=8, pred_dim=8)
    method.enqueue(F.normalize(torch.randn(filled, method.queue.shape[1]), dim=-1))
    queries = F.normalize(torch.randn(7, method.queue.shape[1]), dim=-1)
    found = method.nearest_neighbour(queries)
    assert calls == {"argmax": 1}
    plain(monkeypatch)
    assert torch.equal(found, method.nearest_neighbour(queries))
    assert (found == 0).all() == (filled == 0)  # an empty queue: zero vectors, as the plain lines


def test_float32_under_autocast(calls):
    g = torch.Generator().manual_seed(0)
    image, text, s, b = torch.randn(8, 64, generator=g), torch.randn(8, 64, generator=g), torch.tensor(50.0), \
        torch.tensor(-5.0)
    exact = clip_loss(image, text, s), siglip.siglip_loss(image, text, s, b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = clip_loss(image, text, s), siglip.siglip_loss(image, text, s, b)
    assert calls == {"infonce": 2, "sigmoid_loss": 2}
    for a, e in zip(autocast, exact):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, e)


def test_the_switch_and_its_environment_variable(monkeypatch):
    """256 MiB by default (issue 30), $TILED_LOSS_MB else; a setting that is not a number >= 0 stops with one line."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for value in ("abc", "-1", "nan", "256MB"):
        p = subprocess.run([sys.executable, "-c", "import clip"], cwd=root, capture_output=True, text=True,
                           env={**os.environ, "TILED_LOSS_MB": value})
        assert p.returncode == 1 and p.stderr.strip().splitlines() == [
            f"error: TILED_LOSS_MB={value!r}: give the MiB of logits past which a loss is tiled, a number >= 0 "
            f"(0: always)"], p.stderr
    try:
        monkeypatch.delenv("TILED_LOSS_MB", raising=False)
        importlib.reload(tiled)
        # 256 MiB: a (8192, 8192) float32 matrix is still plain, one more row is tiled
        assert not tiled.needed(8192, 8192) and tiled.needed(8193, 8192)
        monkeypatch.setenv("TILED_LOSS_MB", "1")
        importlib.reload(tiled)
        assert tiled.LIMIT_MB == 1 and not tiled.needed(512, 512) and tiled.needed(513, 512)
        assert tiled.limit_mb("") == 256 and tiled.limit_mb("inf") == math.inf  # set to nothing: unset; inf: never
    finally:
        monkeypatch.delenv("TILED_LOSS_MB", raising=False)
        importlib.reload(tiled)


# --- every method: tiled = plain, one process, as the loss alone and through train.forward_backward ------------------


def _loss_and_gradients(method, features):
    """method.loss on leaf copies of the features -> (loss, logs, gradients of the float features and parameters)."""
    leaves = {k: v.detach().clone().requires_grad_(v.is_floating_point()) for k, v in features.items()}
    loss, logs = method.loss(leaves)
    params = {n: p for n, p in method.named_parameters() if p.requires_grad}
    inputs = {**{k: v for k, v in leaves.items() if v.requires_grad}, **params}
    grads = dict(zip(inputs, _grads(loss, list(inputs.values()))))
    return loss.detach(), {k: v.item() for k, v in logs.items()}, {k: g for k, g in grads.items() if g is not None}


@pytest.mark.parametrize("name", list(METHOD_KWARGS))
def test_every_method_tiled_equals_plain(calls, monkeypatch, name):
    """The loss alone: its value, logs and the gradients of every feature (the encoders' outputs) and of every
    parameter it reaches (temperatures, SigLIP's bias, SLIP's and DeCLIP's heads, FILIP's)."""
    monkeypatch.setattr(tiled, "TILE", TILES[name])
    method = _method(name)
    with torch.no_grad():
        features = method.features(_batch(method))
    loss, logs, grads = _loss_and_gradients(copy.deepcopy(method), features)
    assert calls == CALLS[name]
    plain(monkeypatch)
    expected = _loss_and_gradients(copy.deepcopy(method), features)
    assert calls == CALLS[name]  # the plain lines this time
    torch.testing.assert_close(loss, expected[0], rtol=1e-6, atol=1e-6)
    assert logs == pytest.approx(expected[1], rel=1e-6, abs=1e-6)
    assert grads.keys() == expected[2].keys() and len(grads) > 2
    # at 1e-6 of each gradient's largest entry; a bias right before a BatchNorm has a gradient of 0 but for rounding:
    # at 1e-6 of the largest entry of all (as test_accum)
    scale = max(g.abs().max().item() for g in expected[2].values())
    for key, grad in expected[2].items():
        assert_close_at_scale(grads[key], grad, rel=1e-6, floor=1e-6 * scale)


@pytest.mark.parametrize("name", list(METHOD_KWARGS))
def test_accumulation_tiled_equals_the_plain_whole_batch(calls, monkeypatch, name):
    """train.forward_backward with 4 micro-batches on the tiled path = one plain step on the whole batch."""
    monkeypatch.setattr(tiled, "TILE", TILES[name])
    method = _method(name)
    batch = _batch(method)
    tiled_step = _step(copy.deepcopy(method), _split(batch, 4))
    assert calls == CALLS[name]  # the loss of the whole batch, once
    plain(monkeypatch)
    _assert_same_step(tiled_step, _step(copy.deepcopy(method), [batch]))


# --- 2 gloo ranks × 2 micro-batches, tiled, under DDP, against one plain process -------------------------------------


def _tiled_rank_steps(rank, world, states, batches):
    tiled.LIMIT_MB = 0.0
    calls = count_calls(setattr)
    results = {}
    for name in states:
        tiled.TILE = TILES[name]
        calls.clear()
        step = _rank_steps(rank, world, {name: states[name]}, {name: batches[name]})[name]
        results[name] = (*step, dict(calls))
    return results


@pytest.fixture(scope="module")
def two_ranks():
    states, batches, alone = {}, {}, {}
    with pytest.MonkeyPatch.context() as patch:
        plain(patch)
        for name in METHOD_KWARGS:
            method = _method(name)
            states[name], batches[name] = copy.deepcopy(method.state_dict()), _batch(method)
            alone[name] = _step(method, [batches[name]])
    return run_distributed(_tiled_rank_steps, 2, states, batches), alone


@pytest.mark.parametrize("name", list(METHOD_KWARGS))
def test_two_ranks_tiled_with_accumulation_equal_one_plain_process(two_ranks, name):
    ranks, alone = two_ranks
    loss, logs, grads, _ = alone[name]
    # SigLIP: the own block and the other rank's, each tiled
    expected_calls = {"sigmoid_loss": 2} if name == "siglip" else CALLS[name]
    for r in ranks:
        assert r[name][4] == expected_calls
        _assert_same_gradients(r[name][2], grads)  # DDP averaged them: every rank holds the single-process ones
    torch.testing.assert_close(torch.stack([r[name][0] for r in ranks]).mean(), loss, rtol=1e-5, atol=1e-6)
    rank_logs = [r[name][1] for r in ranks]
    assert {k: sum(r[k] for r in rank_logs) / 2 for k in logs if k != "queue"} == pytest.approx(
        {k: v for k, v in logs.items() if k != "queue"}, rel=1e-5, abs=1e-6)


def test_bench_loss_sweep_measures_plain_and_tiled():
    """scripts/bench_loss.py --sweep: a line per loss, both peaks and times, and the same loss plain and tiled."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    argv = ["--sweep", "--sizes", "32", "--repeats", "2", "--embed-dim", "8", "--ssl-dim", "8", "--tokens", "2",
            "--queue-size", "64", "--device", "cpu"]
    p = subprocess.run([sys.executable, os.path.join(root, "scripts", "bench_loss.py"), *argv], capture_output=True,
                       text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert p.returncode == 0, p.stderr
    measured = r"[\d,]+ MiB [\d.e-]+ s \(.*\)"  # peak, time (spread)
    lines = re.findall(rf"^loss-sweep (\w+) +N +32 \| plain matrices [\d,]+ MiB \| plain {measured} \| "
                       rf"tiled {measured} \| tiled/plain time [\d.]+ \| loss plain ([\d.]+) tiled ([\d.]+)$",
                       p.stdout, re.M)
    assert [name for name, _, _ in lines] == ["clip", "siglip", "slip", "declip", "filip"], p.stdout
    for _, plain_loss, tiled_loss in lines:
        assert float(plain_loss) == pytest.approx(float(tiled_loss), rel=1e-5)
    for flags, words in ((["--sizes", "8,"], "--sizes '8,': batches N of 1 or more"),
                         (["--sizes", "0"], "--sizes '0': batches N of 1 or more"),
                         (["--losses", "clip,clipp"], "--losses 'clip,clipp': unknown 'clipp'")):
        p = subprocess.run([sys.executable, os.path.join(root, "scripts", "bench_loss.py"), "--sweep", *flags],
                           capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
        assert p.returncode == 1 and p.stderr.strip().splitlines() == [p.stderr.strip()] and words in p.stderr, p.stderr


def test_what_the_plain_forms_take_the_tiles_take(calls, monkeypatch):
    """A hostile round's cases: s and b as numbers (SigLIP, FILIP), a forward under no_grad or inference_mode with
    parameters that want gradients (the sigmoid's eager gradients only where a backward may come), and a double
    backward, which the tiles' backward cannot give: it raises, where a wrong number would pass."""
    monkeypatch.setattr(tiled, "TILE", TILES["filip"])  # (the dot products' 7 × 7 in one tile)
    g = torch.Generator().manual_seed(0)
    image, text = torch.randn(7, 8, generator=g), torch.randn(7, 8, generator=g)
    s, b = torch.tensor(5.0, requires_grad=True), torch.tensor(-2.0, requires_grad=True)
    tiled_loss = siglip.siglip_loss(image, text, s, b)
    assert siglip.siglip_loss(image, text, 5.0, -2.0).item() == pytest.approx(tiled_loss.item(), rel=1e-6)
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            assert siglip.siglip_loss(image, text, s, b).item() == pytest.approx(tiled_loss.item(), rel=1e-6)
    image_tokens, text_tokens, ids, _ = filip_inputs()
    mask = filip.text_padding_mask(ids)
    assert filip.filip_loss(image_tokens, text_tokens, mask, 10.0).item() == pytest.approx(
        filip.filip_loss(image_tokens, text_tokens, mask, torch.tensor(10.0)).item(), rel=1e-6)
    features = torch.randn(6, 8, generator=g, requires_grad=True)
    loss = clip_loss(features, torch.randn(6, 8, generator=g), torch.tensor(10.0))
    with pytest.raises(RuntimeError, match="a tiled loss has no double backward"):
        torch.autograd.grad(loss, features, create_graph=True)


