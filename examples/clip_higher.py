"""Asymmetric "clip-higher" bounds (DAPO, Yu et al., 2025): the clipped surrogate with the
ratio kept in ``[1 - eps_low, 1 + eps_high]``, ``eps_high >= eps_low``, so that unlikely actions
with a positive advantage can still grow. The variant ``clip-higher``.

Named ``clip_epsilon_low`` / ``clip_epsilon_high``, the parameters are also the loss's clip
bounds (they give its ``clip_fraction``). The cross-parameter check refuses
``clip_epsilon_high < clip_epsilon_low`` with the range checks, before anything runs. Run it
with ``--plugin examples/clip_higher.py``.
"""

import torch

from klppo_bench.variants import surrogate


def high_not_below_low(p):
    if p["clip_epsilon_high"] < p["clip_epsilon_low"]:
        return (f"clip_epsilon_high={p['clip_epsilon_high']} is below clip_epsilon_low="
                f"{p['clip_epsilon_low']}; allowed: clip_epsilon_high >= clip_epsilon_low")
    return None


@surrogate(name="clip-higher", params={"clip_epsilon_low": 0.2, "clip_epsilon_high": 0.28},
           description="clipped surrogate with bounds [1 - 0.2, 1 + 0.28] (DAPO) (example)",
           check=high_not_below_low)
def clip_higher(ratio, advantage, *, clip_epsilon_low, clip_epsilon_high):
    clipped = ratio.clamp(1 - clip_epsilon_low, 1 + clip_epsilon_high)
    return torch.minimum(ratio * advantage, clipped * advantage)
