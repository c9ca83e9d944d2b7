"""Shared test helpers: tiny budgets so the whole suite stays within minutes on 2 cores."""

from __future__ import annotations


import pytest
import torch

torch.set_num_threads(1)

# A run of 2 iterations x 256 steps, 2 epochs of 4 minibatches: ~2-4 s on one core.
TINY = {
    "train.steps_per_iter": 256,
    "train.epochs": 2,
    "eval.every": 0,
    "eval.episodes": 1,
}
TINY_FRAMES = 512


@pytest.fixture
def tiny():
    return dict(TINY)


@pytest.fixture
def fresh_registry(monkeypatch):
    """The variant registry as it is now (built-ins registered), restored after the test:
    variants, their sources, loaded plugins, entry-point state and warnings shown."""
    from klppo_bench.variants import registry

    registry.all_variants()
    for name in ("_REGISTRY", "_SOURCES", "_LOADED_PLUGINS"):
        monkeypatch.setattr(registry, name, type(getattr(registry, name))(getattr(registry, name)))
    monkeypatch.setattr(registry, "_WARNED", set())
    monkeypatch.setattr(registry, "_ENTRY_POINTS_LOADED", registry._ENTRY_POINTS_LOADED)
    return registry


@pytest.fixture
def one_ray_cluster_at_a_time(tmp_path_factory):
    """``make test`` runs two pytest-xdist workers. Two local Ray clusters starting at once on a
    2-core machine can miss Ray's own start-up timeouts (its dashboard agent waits ~15 s), so
    the tests that start one take a file lock shared by the workers of this session."""
    import fcntl
    import os

    if not os.environ.get("PYTEST_XDIST_WORKER"):
        yield
        return
    lock = tmp_path_factory.getbasetemp().parent / "ray-cluster.lock"  # shared by the workers
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
