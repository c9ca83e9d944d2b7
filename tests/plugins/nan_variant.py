"""Test plugin: ``nan-clip``, clipped PPO whose objective is NaN (a run that diverges at once)."""

import dataclasses

from torchrl.objectives import ClipPPOLoss

from klppo_bench.variants import get_variant, register


class NaNClipLoss(ClipPPOLoss):
    def forward(self, tensordict):
        out = super().forward(tensordict)
        out.set("loss_objective", out.get("loss_objective") * float("nan"))
        return out


NAN_CLIP = register(dataclasses.replace(
    get_variant("clip"), name="nan-clip", loss_class=NaNClipLoss,
    description="test only: clipped PPO whose objective is NaN"))
