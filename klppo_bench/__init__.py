"""klppo-bench: a pluggable comparison suite for PPO loss variants on torchrl."""

__version__ = "0.1.0"

from klppo_bench.api import (  # noqa: E402 -- the results API, importable as kb.load_runs
    load_curves,
    load_runs,
    normalized_scores,
    plot_curves,
    report,
    score_matrices,
)

__all__ = ["load_curves", "load_runs", "normalized_scores", "plot_curves", "report",
           "score_matrices", "__version__"]
