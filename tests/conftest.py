import os
import sys

import pytest

# the project is a set of top-level scripts, not a package: make them importable from the tests
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# deterministic cuBLAS (tests/test_cuda.py's exact resume); read when cuBLAS starts, so set before any test runs
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` need a GPU: without one they are deselected (reported as such), not skipped as passes."""
    import torch

    if torch.cuda.is_available():
        return
    deselected = [item for item in items if item.get_closest_marker("cuda")]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if not item.get_closest_marker("cuda")]


@pytest.fixture
def killed_while_saving(monkeypatch):
    """-> run(argv, step): train.main(argv), killed (KeyboardInterrupt) right after it writes step `step`'s checkpoint
    to ckpt.pt.tmp, before the next step's finite loss makes it ckpt.pt: a run killed in its last save."""
    import train
    from plumbing import checkpoint

    def run(argv, step):
        real_save = checkpoint.write

        def save_then_die(path, method, optimizer, at, meta):
            real_save(path, method, optimizer, at, meta)
            if at == step:
                raise KeyboardInterrupt

        with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
            patch.setattr(checkpoint, "write", save_then_die)
            train.main([str(a) for a in argv])
    return run
