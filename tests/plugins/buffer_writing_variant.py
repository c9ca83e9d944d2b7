"""Test plugin: ``counting-clip``, clipped PPO whose forward counts its calls in a buffer
through ``.data`` (fine eagerly; a write that ``torch.func.vmap`` cannot run)."""

import dataclasses

import torch
from torchrl.objectives import ClipPPOLoss

from klppo_bench.variants import get_variant, register


class CountingClipLoss(ClipPPOLoss):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, tensordict):
        self.calls.data += 1
        return super().forward(tensordict)


COUNTING_CLIP = register(dataclasses.replace(
    get_variant("clip"), name="counting-clip", loss_class=CountingClipLoss,
    description="test only: clipped PPO that writes a buffer's .data in forward"))
