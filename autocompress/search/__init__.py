"""The search layer: maps Optuna trials to plans and reports what evaluation measured."""

from autocompress.record import StudyLocation
from autocompress.search.runner import run_search
from autocompress.search.space import SearchSpace

__all__ = ["SearchSpace", "StudyLocation", "run_search"]
