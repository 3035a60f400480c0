"""A Ray worker setup hook for tests/test_faults.py: in every worker process it makes `compress.compress_weight`
raise on the calls, counted inside trials (`Objective.score`), listed in AUTOCOMPRESS_TEST_FAIL_AT, as a failure
at the k-th Linear of a trial would, and notes each injected fault in the file AUTOCOMPRESS_TEST_FAULT_LOG."""

from __future__ import annotations

import os

import autocompress.compress
from autocompress.search.objective import Objective


def fail_at_listed_calls() -> None:
    failing_calls = {int(call) for call in os.environ["AUTOCOMPRESS_TEST_FAIL_AT"].split(",")}
    real_compress, real_score = autocompress.compress.compress_weight, Objective.score
    state = {"in_trial": False, "calls": 0}

    def compress_weight(*args, **kwargs):
        if state["in_trial"]:
            state["calls"] += 1
            if state["calls"] in failing_calls:
                with open(os.environ["AUTOCOMPRESS_TEST_FAULT_LOG"], "a") as log:
                    log.write(f"{os.getpid()} {state['calls']}\n")
                raise RuntimeError("not positive definite (simulated)")
        return real_compress(*args, **kwargs)

    def score(self, *args, **kwargs):
        state["in_trial"] = True
        try:
            return real_score(self, *args, **kwargs)
        finally:
            state["in_trial"] = False

    autocompress.compress.compress_weight = compress_weight
    Objective.score = score
