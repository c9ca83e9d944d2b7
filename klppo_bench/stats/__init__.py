"""Statistics over the results store: scores, normalization, rliable aggregates.

Reads the store only (``klppo_bench.store``), except the random-policy score, which the suite
measures itself (:mod:`klppo_bench.stats.random_policy`).
"""

from klppo_bench.stats.aggregate import (
    METRICS,
    aggregate_table,
    curve_estimates,
    interval_estimate,
    pack,
    performance_profiles,
    poi_table,
    probability_of_improvement,
    seeded,
)
from klppo_bench.stats.random_policy import measure_random_score, random_scores
from klppo_bench.stats.scores import (
    collect_runs,
    load_reference_scores,
    minmax_constants,
    normalize,
    score_table,
)

__all__ = [
    "METRICS", "aggregate_table", "curve_estimates", "interval_estimate", "pack",
    "performance_profiles", "poi_table", "probability_of_improvement", "seeded",
    "measure_random_score", "random_scores", "collect_runs", "load_reference_scores",
    "minmax_constants", "normalize", "score_table",
]
