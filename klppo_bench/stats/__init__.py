"""Statistics over the results store: scores, normalization, rliable aggregates.

Reads the store only (``klppo_bench.store``), except the random-policy score, which the suite
measures itself (:mod:`klppo_bench.stats.random_policy`).
"""

from klppo_bench.stats.aggregate import (
    METRICS,
    aggregate_table,
    best_and_tied,
    curve_estimates,
    interval_estimate,
    pack,
    performance_profiles,
    poi_table,
    probability_of_improvement,
    seeded,
    tied_with,
)
from klppo_bench.stats.random_policy import measure_random_score, random_scores
from klppo_bench.stats.scores import (
    collect_runs,
    load_reference_scores,
    minmax_constants,
    normalize,
    read_runs,
    score_table,
)

__all__ = [
    "METRICS", "aggregate_table", "best_and_tied", "curve_estimates", "interval_estimate",
    "pack", "performance_profiles", "poi_table", "probability_of_improvement", "seeded",
    "tied_with", "measure_random_score", "random_scores", "collect_runs",
    "load_reference_scores", "minmax_constants", "normalize", "read_runs", "score_table",
]
