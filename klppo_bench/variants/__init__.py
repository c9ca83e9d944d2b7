"""Loss-variant registry; see :mod:`klppo_bench.variants.registry`."""

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
from klppo_bench.variants.variant import Variant

__all__ = [
    "ALIASES", "COMMON", "ENTRY_POINT_GROUP", "BetaSchedule", "JointNormal", "JointNormalMC",
    "Param", "Variant", "all_variants", "describe_source", "get_variant", "load_plugins",
    "register", "variant_rows", "variant_source",
]
