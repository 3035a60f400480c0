"""The search layer: maps Optuna trials to plans and reports what evaluation measured."""

from autocompress.search.space import SearchSpace
from autocompress.search.study import StudyLocation, run_search

__all__ = ["SearchSpace", "StudyLocation", "run_search"]
