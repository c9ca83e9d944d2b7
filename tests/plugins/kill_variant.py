"""Test plugin: ``sigkill-clip``, whose loss SIGKILLs its own process (a worker killed from
outside, as by the out-of-memory killer)."""

import dataclasses
import os
import signal

from torchrl.objectives import ClipPPOLoss

from klppo_bench.variants import get_variant, register


class SigkillLoss(ClipPPOLoss):
    def forward(self, tensordict):
        os.kill(os.getpid(), signal.SIGKILL)


SIGKILL_CLIP = register(dataclasses.replace(
    get_variant("clip"), name="sigkill-clip", loss_class=SigkillLoss,
    description="test only: the worker process kills itself"))
