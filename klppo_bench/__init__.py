"""klppo-bench: a pluggable comparison suite for PPO loss variants on torchrl."""

__version__ = "0.1.0"

__all__ = ["load_curves", "load_runs", "normalized_scores", "plot_curves", "make_report",
           "score_matrices", "__version__"]


def __getattr__(name: str):
    """The results API (``kb.load_runs``...), imported on first use: the command line starts
    without importing pandas, so it answers a bad command line, or Ctrl-C, at once."""
    if name in __all__:
        from klppo_bench import api

        return getattr(api, name)
    raise AttributeError(f"module 'klppo_bench' has no attribute {name!r}")
