"""Loss-variant registry; see :mod:`klppo_bench.variants.registry`.

A new objective is one decorated formula (:func:`surrogate`, :mod:`.surrogate`) or a
:class:`Variant` on a torchrl loss class passed to :func:`register`; ``docs/objectives.md``
walks through both.
"""

from klppo_bench.variants.beta import BetaSchedule
from klppo_bench.variants.common import ALIASES, COMMON
from klppo_bench.variants.distributions import JointNormal, JointNormalMC
from klppo_bench.variants.params import Param
from klppo_bench.variants.registry import (
    ENTRY_POINT_GROUP,
    all_variants,
    describe_source,
    get_variant,
    load_plugins,
    register,
    variant_rows,
    variant_source,
)
from klppo_bench.variants.surrogate import surrogate, surrogate_variant
from klppo_bench.variants.variant import Variant

__all__ = [
    "ALIASES", "COMMON", "ENTRY_POINT_GROUP", "BetaSchedule", "JointNormal", "JointNormalMC",
    "Param", "Variant", "all_variants", "describe_source", "get_variant", "load_plugins",
    "register", "surrogate", "surrogate_variant", "variant_rows", "variant_source",
]
