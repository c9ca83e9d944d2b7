"""The PPO paper's Table 1 numbers, matched to the settings of a report.

Schulman et al. 2017, "Proximal Policy Optimization Algorithms", Table 1: average normalized
score over 7 MuJoCo tasks (-v1, 3 seeds each, 1M timesteps; random policy = 0, best setting = 1
per task). A setting gets the paper's number only when it is the paper's row: the built-in
variant, the row's parameter at the paper's value and every other parameter at its default
(the built-ins' defaults are the paper's setup)."""

from __future__ import annotations

import math
from collections.abc import Mapping

from klppo_bench.stats.scores import as_float
from klppo_bench.variants.builtin import BUILTINS

# (variant, {parameter: value}) -> average normalized score in the paper's Table 1
PAPER_TABLE1: tuple[tuple[str, Mapping[str, float], float], ...] = (
    ("no-clip", {}, -0.39),
    ("clip", {"clip_epsilon": 0.1}, 0.76),
    ("clip", {"clip_epsilon": 0.2}, 0.82),
    ("clip", {"clip_epsilon": 0.3}, 0.70),
    ("klpen-adaptive", {"dtarg": 0.003}, 0.68),
    ("klpen-adaptive", {"dtarg": 0.01}, 0.74),
    ("klpen-adaptive", {"dtarg": 0.03}, 0.71),
    ("klpen-fixed", {"beta": 0.3}, 0.62),
    ("klpen-fixed", {"beta": 1.0}, 0.71),
    ("klpen-fixed", {"beta": 3.0}, 0.72),
    ("klpen-fixed", {"beta": 10.0}, 0.69),
)
PAPER_COLUMN = "PPO paper (-v1)"
_DEFAULTS = {v.name: {**{k: p.default for k, p in v.params.items()}, **v.pinned}
             for v in BUILTINS}


def _same(value: str, expected) -> bool:
    a, b = as_float(value), as_float(expected)
    if not (math.isnan(a) or math.isnan(b)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    return str(value) == str(expected)


def paper_score(variant: str, params: Mapping[str, str]) -> float:
    """The paper's Table 1 score of the setting (``variant`` with its recorded ``params``,
    values as strings), or NaN when the setting is not one of the paper's rows."""
    defaults = _DEFAULTS.get(variant)
    if defaults is None:
        return float("nan")
    for name, row, score in PAPER_TABLE1:
        if name != variant:
            continue
        expected = {**defaults, **row}
        if set(params) <= set(expected) and all(_same(params[k], expected[k]) for k in params):
            return score
    return float("nan")
