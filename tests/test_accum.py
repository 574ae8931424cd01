"""Exact gradient accumulation (train.forward_backward): K micro-batches give the loss, the logs, every gradient and
every buffer of the whole batch, for every method, in one process and on 2 gloo ranks under DDP; patch dropout draws
the same patches in both passes; a ResNet's BatchNorm counts each micro-batch once."""

import copy
import importlib
import warnings
import weakref

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

import data
import train
from model import compiled, create_model
from plumbing import distributed, samples
from plumbing.synthetic import SyntheticCaptions
from plumbing.tokenizer import get_tokenizer
from ranks import assert_close_at_scale, run_distributed
from scripts import bench

# small heads and queues, as tests/test_train.py
METHOD_KWARGS = {"clip": {}, "siglip": {}, "slip": dict(mlp_dim=64, min_bn_batch=4),
                 "declip": dict(queue_size=64, proj_dim=32, pred_dim=16, min_bn_batch=4), "filip": {},
                 "defilip": dict(queue_size=64, proj_dim=32, pred_dim=16, min_bn_batch=4)}


def _method(name, model="tiny-vit", **model_kwargs):
    torch.manual_seed(0)
    method = importlib.import_module(name).Method(create_model(model, **model_kwargs), **METHOD_KWARGS[name])
    if hasattr(method, "enqueue"):  # DeCLIP's queue holds entries, so that its NN term is on
        method.enqueue(F.normalize(torch.randn(20, method.queue.shape[1]), dim=-1))
    return method


def _batch(method, n=8):
    # the method's own transform on synthetic samples: every view its loss reads, DeCLIP's MLM masks included
    return bench.synthetic_batch(method, n, torch.device("cpu"), seed=0)


def _split(batch, k):
    n = len(batch["text"]) // k
    return [{key: v[i * n:(i + 1) * n] for key, v in batch.items()} for i in range(k)]


def _step(method, batches, seed=0, train_model=None, **kwargs):
    """train.forward_backward -> (loss, logs, {name: gradient}, {name: buffer})."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # BatchNorm heads over small batches
        train_model = method if train_model is None else train_model  # (a compiled module has no truth value)
        loss, logs = train.forward_backward(method, train_model, batches, seed, **kwargs)
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in method.named_parameters()}
    return loss, {k: v.item() for k, v in logs.items()}, grads, {n: b.clone() for n, b in method.named_buffers()}


def _assert_same_gradients(actual, expected):
    """Every parameter's gradient, None where expected is None. Biases right before a BatchNorm have a gradient of 0
    but for rounding (~1e-7 of the others here): each gradient is compared at least at 1e-6 of the largest entry."""
    scale = max(g.abs().max().item() for g in expected.values() if g is not None)
    for name, grad in expected.items():
        assert (actual[name] is None) == (grad is None), name
        if grad is not None:
            assert_close_at_scale(actual[name], grad, floor=1e-6 * scale)


def _assert_same_step(actual, expected):
    loss, logs, grads, buffers = actual
    torch.testing.assert_close(loss, expected[0], rtol=1e-5, atol=1e-6)
    assert logs == pytest.approx(expected[1], rel=1e-5, abs=1e-6)
    _assert_same_gradients(grads, expected[2])
    for name, buffer in expected[3].items():  # DeCLIP's queue, SLIP's and DeCLIP's BatchNorm running statistics
        torch.testing.assert_close(buffers[name], buffer, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("name,checkpointing", [(m, False) for m in METHOD_KWARGS] + [("clip", True)])
def test_four_micro_batches_give_the_whole_batch(name, checkpointing):
    method = _method(name)
    if checkpointing:
        method.model.set_grad_checkpointing()
    batch = _batch(method)
    whole = _step(copy.deepcopy(method), [batch])
    if name in ("declip", "defilip"):  # every term is on: the queue has entries, the masks chose tokens
        assert whole[1]["nn"] > 0 and whole[1]["mlm"] > 0
    _assert_same_step(_step(copy.deepcopy(method), _split(batch, 4)), whole)


# --- 2 gloo ranks × 2 micro-batches, under train.py's DDP, against one process × 1 -------------------------------------


def _rank_steps(rank, world, states, batches):
    results = {}
    for name, state in states.items():
        method = _method(name)
        method.load_state_dict(state)
        ddp = distributed.wrap_ddp(method, "cpu")
        B = len(batches[name]["text"]) // world
        local = {k: v[rank * B:(rank + 1) * B] for k, v in batches[name].items()}
        results[name] = _step(method, _split(local, 2), train_model=ddp, no_sync=ddp.no_sync)
    return results


@pytest.fixture(scope="module")
def two_ranks():
    """Every method's step on 2 ranks × 2 micro-batches of 2 (one spawn for all), and on one process × 8."""
    states, batches, alone = {}, {}, {}
    for name in METHOD_KWARGS:
        method = _method(name)
        states[name], batches[name] = copy.deepcopy(method.state_dict()), _batch(method)
        alone[name] = _step(method, [batches[name]])  # changes the method's buffers (queue, running statistics)
    return run_distributed(_rank_steps, 2, states, batches), alone


@pytest.mark.parametrize("name", list(METHOD_KWARGS))
def test_two_ranks_with_accumulation_equal_one_process(two_ranks, name):
    ranks, alone = two_ranks
    loss, logs, grads, buffers = alone[name]
    rank_logs = [r[name][1] for r in ranks]
    # each rank's loss is its rows' share (their mean is the global loss), and so are the logs train.py averages
    torch.testing.assert_close(torch.stack([r[name][0] for r in ranks]).mean(), loss, rtol=1e-5, atol=1e-6)
    assert {k: sum(r[k] for r in rank_logs) / 2 for k in logs if k != "queue"} == pytest.approx(
        {k: v for k, v in logs.items() if k != "queue"}, rel=1e-5, abs=1e-6)
    for r in ranks:  # DDP averaged the gradients: every rank holds the single-process ones
        _assert_same_gradients(r[name][2], grads)
    for n, buffer in buffers.items():
        if "queue" not in n:  # DeCLIP's queue is per rank: each holds its own captions
            torch.testing.assert_close(ranks[0][name][3][n], buffer, rtol=1e-4, atol=1e-6, msg=n)


# --- randomness and BatchNorm inside the features ------------------------------------------------------------------


def _reference(method, batches, seed):
    """The loss of the concatenated features of micro-batches run with their graph, micro-batch i after
    torch.manual_seed(samples.seed_of(seed, i)) as forward_backward draws them, and its backward."""
    parts = []
    for i, batch in enumerate(batches):
        torch.manual_seed(samples.seed_of(seed, i))
        parts.append(method.features(batch))
    loss, logs = method.loss({k: torch.cat([p[k] for p in parts]) for k in parts[0]})
    loss.backward()
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in method.named_parameters()}
    return loss.detach(), {k: v.item() for k, v in logs.items()}, grads, {n: b.clone() for n, b in method.named_buffers()}


@pytest.mark.parametrize("name", ["clip", "filip"])
def test_patch_dropout_drops_the_same_patches_in_both_passes(name):
    """The second pass recomputes each micro-batch's features with the first pass's random draws, so the gradient is
    that of the loss the step reports (FILIP's token-wise loss then sees the kept patches only)."""
    method = _method(name, patch_dropout=0.5)
    batches = _split(_batch(method), 4)
    expected = _reference(copy.deepcopy(method), batches, seed=7)
    _assert_same_step(_step(copy.deepcopy(method), batches, seed=7), expected)
    without = copy.deepcopy(method)
    without.model.visual.patch_dropout = 0.0
    assert abs(_step(without, batches, seed=7)[0] - expected[0]) > 1e-3  # the patches dropped mattered


@pytest.mark.parametrize("checkpointing", [False, True])
def test_resnet_batchnorm_normalises_each_micro_batch_and_counts_it_once(checkpointing):
    """A ResNet's own BatchNorm is the one thing in the features that is not per sample: it normalises each
    micro-batch with that micro-batch's statistics (as open_clip), and its running statistics take each micro-batch
    once, in the first pass: neither the second pass nor checkpointing's recomputation counts it again."""
    method = _method("clip", "tiny-rn")
    if checkpointing:
        method.model.set_grad_checkpointing()
    batches = _split(_batch(method), 4)
    expected = _reference(copy.deepcopy(method), batches, seed=0)
    actual = _step(copy.deepcopy(method), batches)
    _assert_same_step(actual, expected)
    for name, buffer in expected[3].items():
        assert torch.equal(actual[3][name], buffer), name
    assert expected[3]["model.visual.bn1.num_batches_tracked"] == 4


# --- compiled (train.py --compile) ---------------------------------------------------------------------------------


def _compiled_step(method, batches, seed, backend):
    torch._dynamo.reset()
    model = compiled(method) if backend == "inductor" else torch.compile(method, backend=backend)
    return _step(method, batches, seed, train_model=model)


@pytest.mark.parametrize("name,backend", [("clip", "inductor")] + [(m, "aot_eager") for m in METHOD_KWARGS])
def test_compiled_accumulation_gives_the_eager_step(name, backend):
    """--compile --grad-accum 4 --patch-dropout 0.5: the first pass runs eagerly, the second compiled, and both must
    drop the same patches. Inductor drew them from its own generator (a relative gradient error of 0.1) until
    model.compiled asked it for eager's (fallback_random). Every method's graph runs through Dynamo and AOTAutograd
    (aot_eager: seconds); inductor's code generation (a minute per model on 2 cores) for CLIP: patch dropout is the only
    randomness inside any method's graph. The tolerance is _assert_same_step's: compiled CLIP differs from eager by
    1.3e-6 of the largest gradient here (eager vs float64: 4e-6)."""
    method = _method(name, vision_layers=1, transformer_layers=1, patch_dropout=0.5)
    batches = _split(_batch(method), 4)
    expected = _step(copy.deepcopy(method), batches, seed=7)
    _assert_same_step(_compiled_step(copy.deepcopy(method), batches, 7, backend), expected)
    without = copy.deepcopy(method)
    without.model.visual.patch_dropout = 0.0
    assert abs(_step(without, batches, seed=7)[0] - expected[0]) > 1e-3  # the patches dropped mattered


def test_a_compiled_resnet_trains_with_checkpointing():
    """Dynamo refused the ResNet stage checkpoint's context_fn (InternalTorchDynamoError at step 1); compiled, a
    ResNet with checkpointing and accumulation gives the eager step and counts each micro-batch in its BatchNorm
    statistics once (aot_eager; inductor too, to 8e-6 of the largest gradient, in 2.5 minutes here: not in the
    suite)."""
    method = _method("clip", "tiny-rn")
    method.model.set_grad_checkpointing()
    batches = _split(_batch(method), 4)
    expected = _step(copy.deepcopy(method), batches)
    actual = _compiled_step(copy.deepcopy(method), batches, 0, "aot_eager")
    _assert_same_step(actual, expected)
    assert actual[3]["model.visual.bn1.num_batches_tracked"] == 4


def test_micro_batches_wait_as_the_stream_hands_them_and_reach_the_device_one_at_a_time(monkeypatch):
    """train.py keeps a step's K micro-batches as the stream hands them (uint8 images) and each pass of forward_backward
    moves and normalises them one at a time (data.on_device): the step is bit for bit the step on micro-batches
    normalised beforehand, and at most two micro-batches of float images (the one in use, the next) live at once, not
    K. SLIP: three image views per micro-batch."""
    method = _method("slip")
    transform = method.transform(get_tokenizer("clip"))
    dataset = SyntheticCaptions("train", image_size=method.model.image_resolution)
    torch.manual_seed(0)
    host = torch.utils.data.default_collate([transform(*dataset[i]) for i in range(8)])
    assert {k for k, v in host.items() if v.dtype == torch.uint8} == {"image", "image_a", "image_b"}
    micro_batches = _split(host, 4)
    # normalised beforehand, independently: torchvision's float conversion and OpenAI's mean and std (methods.md)
    normalise = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(
        (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))])
    expected = _step(copy.deepcopy(method), [{k: normalise(v) if v.dtype == torch.uint8 else v for k, v in b.items()}
                                             for b in micro_batches])

    alive, most, to_device = weakref.WeakSet(), [0], data.to_device

    def counted(batch, device):
        moved = to_device(batch, device)
        alive.add(moved["image"])
        most[0] = max(most[0], len(alive))
        return moved
    monkeypatch.setattr(data, "to_device", counted)
    loss, logs, grads, buffers = _step(method, micro_batches)
    assert most[0] == 2  # 4 when the 4 micro-batches were moved before the step
    assert torch.equal(loss, expected[0]) and logs == expected[1]
    assert all(torch.equal(grads[n], g) for n, g in expected[2].items() if g is not None)
    assert all(torch.equal(buffers[n], b) for n, b in expected[3].items())


def test_with_many_micro_batches_on_a_cpu_each_pass_gives_malloc_s_free_heap_back(monkeypatch):
    """data.on_device calls memory.release_freed before each pass of 16 or more micro-batches on a CPU (the waiting
    batches fragment the heap: docs/speed.md), never with fewer (it would cost time for nothing); and release_freed
    gives back what malloc holds free past keep_mb, as the process's resident memory shows."""
    from plumbing import memory
    calls = []
    monkeypatch.setattr(memory, "release_freed", lambda: calls.append(len(calls)))
    batch = {"image": torch.zeros(1, 3, 2, 2, dtype=torch.uint8)}
    for k, expected in ((15, 0), (16, 16), (40, 40)):
        calls.clear()
        assert len(list(data.on_device([batch] * k, "cpu"))) == k and len(calls) == expected, (k, calls)
    monkeypatch.undo()
    held = [bytearray(1000) for _ in range(300_000)]  # 300 MB in small blocks: malloc's heap, not mmap
    held.clear()
    before = memory.process_memory("VmRSS")
    memory.release_freed(keep_mb=64)
    assert memory.process_memory("VmRSS") < before - 100, before
