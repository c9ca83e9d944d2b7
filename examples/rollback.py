"""Truly PPO's rollback clipping (Wang et al., 2019, "Truly Proximal Policy Optimization"),
PPO-RB, as one formula: the variant ``rollback``.

Outside the clip range the clipped surrogate has zero gradient, so nothing pulls the ratio
back once it is out; rollback clipping gives the objective a slope ``-alpha`` there instead
(the paper's eq. 8):

    F(r) = -alpha r + (1 + alpha)(1 - eps)   if r <= 1 - eps
    F(r) = -alpha r + (1 + alpha)(1 + eps)   if r >= 1 + eps
    F(r) = r                                 otherwise;       L = min(r A, F(r) A)

Run it with ``--plugin examples/rollback.py``.
"""

import torch

from klppo_bench.variants import Param, surrogate


@surrogate(name="rollback",
           params={"clip_epsilon": 0.2,
                   "rollback_alpha": Param(0.3, float, "rollback slope alpha", low=0.0)},
           description="Truly PPO's rollback clipping (PPO-RB, alpha 0.3) (example)")
def rollback(ratio, advantage, *, clip_epsilon, rollback_alpha):
    low, high = 1 - clip_epsilon, 1 + clip_epsilon
    rolled = -rollback_alpha * ratio + (1 + rollback_alpha) * torch.where(ratio <= low, low, high)
    rolled = torch.where((ratio <= low) | (ratio >= high), rolled, ratio)
    return torch.minimum(ratio * advantage, rolled * advantage)
