"""klppo-bench: a pluggable comparison suite for PPO loss variants on torchrl."""

__version__ = "0.1.0"
