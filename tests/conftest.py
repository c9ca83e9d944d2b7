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
