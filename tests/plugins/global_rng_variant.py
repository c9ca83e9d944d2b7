"""Test plugins the batched engine must refuse: ``dropout-clip`` draws from torch's global
generator inside its loss (``F.dropout`` has no generator argument); ``remembering-clip``
keeps a Python attribute it updates in ``forward``."""

import dataclasses

import torch.nn.functional as F
from torchrl.objectives import ClipPPOLoss

from klppo_bench.variants import get_variant, register


class DropoutClipLoss(ClipPPOLoss):
    def forward(self, tensordict):
        out = super().forward(tensordict)
        out.set("loss_objective", F.dropout(out["loss_objective"][None], 0.5)[0])
        return out


class RememberingClipLoss(ClipPPOLoss):
    calls = 0

    def forward(self, tensordict):
        self.calls = self.calls + 1
        return super().forward(tensordict)


register(dataclasses.replace(get_variant("clip"), name="dropout-clip",
                             loss_class=DropoutClipLoss, description="test only"))
register(dataclasses.replace(get_variant("clip"), name="remembering-clip",
                             loss_class=RememberingClipLoss, description="test only"))
