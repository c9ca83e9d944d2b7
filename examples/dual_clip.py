"""Dual-Clip PPO (Ye et al., 2020, "Mastering Complex Control in MOBA Games with Deep RL") as
one formula: the variant ``dual-clip``.

For a negative advantage the clipped surrogate ``min(r A, clip(r, 1-eps, 1+eps) A)`` is
unbounded below as the ratio ``r`` grows; Dual-Clip bounds it by ``c A`` (``c > 1``).
``dual_clip_fraction`` (the share of samples where that bound is active) is recorded as
``extra/dual_clip_fraction``. Run it with ``--plugin examples/dual_clip.py``;
``experiments/dual_clip.yaml`` compares it with ``clip`` (``dual_clip_c`` is a buffer, so its
two settings train as lanes of one batched job). The same objective as a ``ClipPPOLoss``
subclass is ``tests/plugins/dual_clip_subclass.py``.
"""

import torch

from klppo_bench.variants import Param, surrogate


@surrogate(name="dual-clip",
           params={"clip_epsilon": 0.2,
                   "dual_clip_c": Param(3.0, float, "dual clip bound c", low=1.0, low_open=True)},
           description="Dual-Clip PPO: clipped surrogate, negative advantages bounded by c*A "
                       "(example)")
def dual_clip(ratio, advantage, *, clip_epsilon, dual_clip_c):
    clipped = torch.minimum(ratio * advantage,
                            ratio.clamp(1 - clip_epsilon, 1 + clip_epsilon) * advantage)
    bounded = torch.maximum(clipped, dual_clip_c * advantage)
    negative = advantage < 0
    return torch.where(negative, bounded, clipped), {
        "dual_clip_fraction": negative & (bounded > clipped)}
