"""dmkd-bench harness: the engine that runs, measures and records continual-learning methods."""

__version__ = "0.1.0"
