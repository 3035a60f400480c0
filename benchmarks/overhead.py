"""What one trial costs in Optuna bookkeeping on autocompress's search path, against trial count and parameter count.

A trial here runs everything the local backend's trial runs except the model: `study.optimize` with the runner's
callbacks (MaxTrialsCallback over finished trials, StopAfterFailures, the progress bar as `autocompress search`
shows it without --quiet), the study's own sampler (`search.study.sampler_for`), storage opened as a study opens
it (`search.storage.open_storage`, heartbeats on for SQLite and PostgreSQL), and the real `Objective`: its
`SearchSpace.plan_for` suggests every unit's sparsity and bits, and its `TrialWriter` writes the record's user
attributes. Only `CompressionSession.measure` is replaced, by one returning made-up figures at once, so what is
left is bookkeeping: sampler, storage, plan validation, record writing, callbacks.

The search space is the demo's (search_spaces/smollm2-demo.yaml: 5 sparsity x 4 bit levels, two objectives):
60 parameters are its 30 blocks x (sparsity, bits); 240 are 120 per-Linear units (`granularity: linear`). Each
study is created as `open_study` creates one (config recorded, uniform seeds enqueued), then pre-filled with
complete trials of the same shape and user attributes (`study.add_trials` in memory; for SQLite and PostgreSQL
the same rows inserted in bulk into Optuna's tables, which add_trials would take hours to write) up to each
trial count, where a window of real trials is timed after a few untimed warm-up trials. Each window's trials
stay in the study, so the next sampler's window at that count starts a window later (`trials_in_study`).

Columns: ms_per_trial is the window's wall time per trial (mean; ms_per_trial_p50 the median trial), split into
ms_storage, time inside the study's storage methods from wherever they are called (suggest, tell, the sampler's
reads, callbacks, the record's writes); ms_sampler, time inside the sampler's methods less their storage reads;
ms_objective, the objective's own Python (plan building and validation, record checks); ms_progress_bar, the
progress bar's own Python (it summarizes every scored trial after each one; --quiet turns that off); ms_callbacks,
the other callbacks' own Python; and ms_other, the rest: Optuna's loop itself (ask/tell logic, starting and joining the
heartbeat thread). Only the main thread is timed (a heartbeat thread's write shows in ms_per_trial through the
join, not in ms_storage); the timing wrappers add about ms_instrumentation. storage_calls_per_trial counts calls
into the storage (not its calls to itself); repeats is the number of trials timed; load_avg_1m the machine's
load when the window began. flatness is ms_per_trial over that of the smallest count of the same storage, sampler
and params (the row of the largest count holds the figure to judge); storage_flatness the same for ms_storage.

Rows of sampler `generations` (engine `generations`) time `search.generations` instead: a budget study of 210
per-Linear units (one sparsity parameter each, SmolLM2's shapes for the groups), pre-filled with trials as
generations record them, then `--generations-window` whole generations of `GenerationSearch` with its default
offspring, stages and survivors, each plan's score made up at once. ms_per_evaluation is the window's wall time per
score (one plan on one stage's windows), the figure the 10 ms target is about; ms_per_trial and its sections are per
recorded trial there; evaluations_per_trial how many scores one stored trial stands for; evaluation_flatness is
ms_per_evaluation over the smallest count's. For trials rows, one trial is one evaluation. A run replaces the CSV's
rows of the storages, samplers and parameter counts it measures and keeps the others, each with its own date.

    python benchmarks/overhead.py [--quick] [--counts 100 1000 3000 10000] [--params 60 240]
        [--storages memory sqlite postgresql] [--samplers random tpe] [--window 50] [--max-window-s 20]
        [--deadline-min 24] [--max-rows 1000000] [--postgres URL] [--csv PATH]
        [--generation-params 210] [--generations-window 10]

Every study is measured at one count before any study moves to the next, so --deadline-min (no new point after
it; default 24 minutes) cuts the largest counts rather than a storage. A window holds --window trials, fewer
(down to --min-window) where the warm-up trial's pace says it would take over --max-window-s seconds. A SQLite
or PostgreSQL point whose study would hold more than --max-rows parameter rows (10,000 trials of 60 parameters
fit, 3,000 of 240) is skipped, saying why: Optuna reads every trial back into its cache once, which took 20-40 s
per 1,000 trials of 240 parameters here. PostgreSQL is skipped, saying why, when its server cannot be reached;
its study gets a unique name and is deleted afterwards. Results go to results/benchmarks/overhead.csv, written
after every point; --quick (1-2 minutes: 5-trial windows at 100 and 300 trials of 60 parameters) writes
results/benchmarks/overhead-quick.csv.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import enum
import functools
import inspect
import io
import json
import math
import os
import platform
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import optuna
import pandas as pd
import torch
from optuna.distributions import CategoricalDistribution, distribution_to_json
from optuna.trial import TrialState

from autocompress.allocation import BudgetGrid, uniform_allocation
from autocompress.config import Config, load_config
from autocompress.measurement import Measurement
from autocompress.metrics import Metrics
from autocompress.record import StudyRecord, record_created, record_creation, record_unit_sizes, seed_attrs
from autocompress.search.driver import FINISHED, ProgressBar, StopAfterFailures
from autocompress.search.evolution import level_switches
from autocompress.search.generations import GenerationSearch
from autocompress.search.objective import Objective
from autocompress.search.space import SearchSpace
from autocompress.search.storage import open_storage
from autocompress.search.study import sampler_for, study_pruner
from autocompress.size import SizeReport

ROOT = Path(__file__).resolve().parents[1]
POSTGRES_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
DEMO = ROOT / "search_spaces" / "smollm2-demo.yaml"
BLOCKS = 30  # SmolLM2-135M's decoder blocks, the demo's units
LINEARS = [f"self_attn.{name}" for name in ("q_proj", "k_proj", "v_proj", "o_proj")]
LINEARS += [f"mlp.{name}" for name in ("gate_proj", "up_proj", "down_proj")]
SAMPLER_METHODS = (
    "infer_relative_search_space",
    "sample_relative",
    "sample_independent",
    "before_trial",
    "after_trial",
)
SECTIONS = ("sampler", "storage", "objective", "callbacks", "progress_bar")
DENSE_BYTES = 269_060_736  # SmolLM2-135M in 16 bits; only a scale for the made-up sizes
SEQ_LEN = 256
GENERATION_LEVELS = [0.3, 0.4, 0.5, 0.6, 0.7]


class Profiler:
    """Exclusive time per section: a call inside another (storage inside the sampler) is charged to the inner one
    alone. Only the main thread is timed."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)  # entered from outside the section
        self.wrapped = 0  # every timed call, nested ones included
        self.stack: list[list] = []
        self.main = threading.main_thread()

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()
        self.wrapped = 0

    def wrap(self, section: str, function):
        @functools.wraps(function)
        def timed(*args, **kwargs):
            if threading.current_thread() is not self.main:
                return function(*args, **kwargs)
            now = time.perf_counter()
            if self.stack:
                outer = self.stack[-1]
                self.seconds[outer[0]] += now - outer[1]
            if not self.stack or self.stack[-1][0] != section:  # calls from outside the section
                self.calls[section] += 1
            self.wrapped += 1
            self.stack.append([section, now])
            try:
                return function(*args, **kwargs)
            finally:
                now = time.perf_counter()
                name, since = self.stack.pop()
                self.seconds[name] += now - since
                if self.stack:
                    self.stack[-1][1] = now

        return timed

    def instrument(self, obj, section: str, names=None) -> None:
        """Replace `obj`'s methods (all public and private ones of its class, or `names`) by timed ones."""
        if names is None:
            names = [
                name for name, member in inspect.getmembers(type(obj), inspect.isfunction) if not name.startswith("__")
            ]
        for name in names:
            setattr(obj, name, self.wrap(section, getattr(obj, name)))

    def cost_per_call(self, calls: int = 20000) -> float:
        """Seconds one timing wrapper adds to a call (calibrated on a no-op, nested once as storage calls are)."""
        inner = self.wrap("calibration", lambda: None)
        outer = self.wrap("calibration", inner)
        began = time.perf_counter()
        for _ in range(calls):
            outer()
        wrapped = time.perf_counter() - began
        began = time.perf_counter()
        for _ in range(calls):
            (lambda: None)()
        plain = time.perf_counter() - began
        self.reset()
        return max(0.0, (wrapped - plain) / (2 * calls))


class TrivialSession:
    """Stands in for CompressionSession in the real Objective: made-up figures at once, nothing compressed."""

    def __init__(self, fitness_windows: int, seed: int) -> None:
        self.pools = SimpleNamespace(fitness=torch.zeros((fitness_windows, SEQ_LEN), dtype=torch.long))
        self.last_stitch_s = 0.0
        self.dense_bytes = DENSE_BYTES
        self.rng = random.Random(seed)

    def trains(self, _plan) -> bool:
        return False

    def measure(self, plan, pool="fitness", stages=None, on_stage=None, on_report=None, start=0) -> Measurement:
        end = len(self.pools.fitness) if stages is None else stages[-1]
        tokens = (end - start) * SEQ_LEN
        metrics = Metrics(ce=2.0 + self.rng.random(), kl=self.rng.random(), tokens_per_s=1e4, n_tokens=tokens)
        size = SizeReport(int(DENSE_BYTES * self.rng.uniform(0.2, 1.0)), DENSE_BYTES, {})
        return Measurement(size, metrics, stitch_s=0.0, eval_s=0.0, stages=((end, metrics),))


def space_for(params: int, sampler: str) -> tuple[object, SearchSpace]:
    """The demo's config and a search space of `params` parameters (two per unit)."""
    config = load_config(DEMO)
    units_wanted = params // 2
    if units_wanted <= BLOCKS:
        granularity, units = "block", [f"model.layers.{block}" for block in range(units_wanted)]
    else:
        granularity = "linear"
        units = [f"model.layers.{block}.{linear}" for block in range(BLOCKS) for linear in LINEARS][:units_wanted]
        if len(units) < units_wanted:
            raise SystemExit(f"at most {2 * BLOCKS * len(LINEARS)} parameters (every Linear of 30 blocks)")
    compression = config.compression.model_copy(update={"granularity": granularity})
    search = config.search.model_copy(update={"sampler": sampler})
    config = config.model_copy(update={"compression": compression, "search": search})
    return config, SearchSpace(config, units)


def generations_space(params: int) -> tuple[Config, SearchSpace]:
    """A budget study over `params` per-Linear units (one sparsity parameter each: 210 are every Linear of the 30
    blocks) at an average sparsity of 0.5, run in generations with their default offspring, stages and survivors."""
    config, space = space_for(2 * params, "random")
    data = config.model_dump(mode="json")
    data["search"] |= {
        "sparsity": GENERATION_LEVELS,
        "bits": [4],
        "sampler": "evolution",
        "budget": {"sparsity": 0.5},
        "generations": {},
        "baselines": [],
    }
    config = Config.model_validate(data)
    return config, SearchSpace(config, space.units)


def unit_weights(unit: str) -> int:
    """Weights of a SmolLM2-135M Linear (hidden 576, key/value 192, MLP 1536): the groups level switches keep."""
    name = unit.rsplit(".", 1)[-1]
    return {"k_proj": 576 * 192, "v_proj": 576 * 192, "q_proj": 576 * 576, "o_proj": 576 * 576}.get(name, 576 * 1536)


def made_up_trial(space: SearchSpace, rng: random.Random) -> tuple[dict, list[float], dict]:
    """Params, values and user attributes of a complete trial as the Objective records one."""
    params = {}
    for unit in space.units:
        params[f"{unit}.sparsity"] = rng.choice(space.sparsity_levels)
        params[f"{unit}.bits"] = rng.choice(space.bit_levels)
    return params, *made_up_figures(rng)


def made_up_figures(rng: random.Random) -> tuple[list[float], dict]:
    """Objective values and record fields of a complete trial."""
    kl, ratio = rng.random(), rng.uniform(0.2, 1.0)
    ce = 2.0 + rng.random()
    attrs = {
        "loss": kl,
        "kl": kl,
        "ce": ce,
        "ppl": math.exp(ce),
        "size_bytes": int(DENSE_BYTES * ratio),
        "size_ratio": ratio,
        "objective": kl + ratio,
        "stitch_s": rng.uniform(0.5, 2.0),
        "eval_s": rng.uniform(2.0, 6.0),
        "forward_s": rng.uniform(2.0, 6.0),
    }
    return [kl, ratio], attrs


def made_up_generation_trial(grid: BudgetGrid, rng: random.Random) -> tuple[dict, list[float], dict]:
    """Params, values and user attributes of a trial a generation records: a plan at the budget, its stage losses."""
    levels = level_switches(
        {unit: grid.index(level) for unit, level in uniform_allocation(grid).items()}, grid, rng, 10
    )
    params = {f"{unit}.sparsity": grid.level(index) for unit, index in levels.items()}
    values, attrs = made_up_figures(rng)
    stages = [[1, values[0] * 1.1], [4, values[0] * 1.05], [16, values[0]]]
    return params, values, attrs | {"stage_losses": stages, "parent": 0, "generation_evaluations": 20}


def distributions_of(space: SearchSpace) -> dict[str, CategoricalDistribution]:
    out = {}
    for unit in space.units:
        out[f"{unit}.sparsity"] = CategoricalDistribution(space.sparsity_levels)
        if len(space.bit_levels) > 1:
            out[f"{unit}.bits"] = CategoricalDistribution(space.bit_levels)
    return out


def prefill_memory(study: optuna.Study, space: SearchSpace, count: int, rng: random.Random, make=None) -> None:
    distributions = distributions_of(space)
    make = make or functools.partial(made_up_trial, space)
    trials = []
    for _ in range(count):
        params, values, attrs = make(rng)
        trials.append(
            optuna.trial.create_trial(params=params, distributions=distributions, values=values, user_attrs=attrs)
        )
    study.add_trials(trials)


def prefill_rdb(
    study: optuna.Study, space: SearchSpace, count: int, rng: random.Random, make=None, chunk: int = 500
) -> None:
    """The rows `study.add_trials` would write for `count` complete trials, inserted in bulk: add_trials writes a
    trial's parameters one query pair at a time (hours for 10,000 trials of 240 parameters)."""
    import sqlalchemy
    from optuna.storages._rdb import models

    backend = study._storage._backend
    distributions = distributions_of(space)
    make = make or functools.partial(made_up_trial, space)
    as_json = {name: distribution_to_json(distribution) for name, distribution in distributions.items()}
    trials_table = models.TrialModel.__table__
    finite = models.TrialValueModel.TrialValueType.FINITE
    with backend.engine.begin() as connection:
        start = connection.execute(
            sqlalchemy.select(sqlalchemy.func.count()).where(trials_table.c.study_id == study._study_id)
        ).scalar_one()
    for first in range(0, count, chunk):
        made = [make(rng) for _ in range(min(chunk, count - first))]
        now = datetime.now(UTC).replace(tzinfo=None)
        numbers = range(start + first, start + first + len(made))
        with backend.engine.begin() as connection:
            connection.execute(
                trials_table.insert(),
                [
                    {
                        "number": number,
                        "study_id": study._study_id,
                        "state": TrialState.COMPLETE,
                        "datetime_start": now,
                        "datetime_complete": now,
                    }
                    for number in numbers
                ],
            )
            ids = dict(
                connection.execute(
                    sqlalchemy.select(trials_table.c.number, trials_table.c.trial_id).where(
                        trials_table.c.study_id == study._study_id, trials_table.c.number >= numbers[0]
                    )
                ).all()
            )
            param_rows, value_rows, attr_rows = [], [], []
            for number, (params, values, attrs) in zip(numbers, made, strict=True):
                trial_id = ids[number]
                for name, value in params.items():
                    internal = distributions[name].to_internal_repr(value)
                    param_rows.append(
                        {
                            "trial_id": trial_id,
                            "param_name": name,
                            "param_value": internal,
                            "distribution_json": as_json[name],
                        }
                    )
                for objective, value in enumerate(values):
                    value_rows.append(
                        {"trial_id": trial_id, "objective": objective, "value": value, "value_type": finite}
                    )
                for key, value in attrs.items():
                    attr_rows.append({"trial_id": trial_id, "key": key, "value_json": json.dumps(value)})
            insert_rows(connection, models.TrialParamModel.__table__, param_rows)
            insert_rows(connection, models.TrialValueModel.__table__, value_rows)
            insert_rows(connection, models.TrialUserAttributeModel.__table__, attr_rows)
    held = len(study.get_trials(deepcopy=False))
    if held != start + count:
        raise SystemExit(f"pre-filling left {held} trials in the study, not {start + count}")


def insert_rows(connection, table, rows: list[dict]) -> None:
    """Rows into `table` in one statement: COPY on PostgreSQL (executemany there is several times slower), an
    executemany elsewhere."""
    if connection.dialect.name != "postgresql":
        connection.execute(table.insert(), rows)
        return
    columns = list(rows[0])
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    for row in rows:
        writer.writerow([value.name if isinstance(value, enum.Enum) else value for value in row.values()])
    buffer.seek(0)
    cursor = connection.connection.driver_connection.cursor()
    cursor.copy_expert(f"COPY {table.name} ({', '.join(columns)}) FROM STDIN WITH (FORMAT csv)", buffer)


def create_study(kind: str, url: str | None, config, space: SearchSpace, name: str) -> optuna.Study:
    """A study as `search.study.open_study` creates one: its storage, directions, sampler, pruner, recorded config
    and uniform seeds."""
    search = config.search
    if kind == "memory":
        storage = optuna.storages.InMemoryStorage()
    else:
        storage = open_storage(url, search.heartbeat_interval, search.grace_period)
    study = optuna.create_study(
        storage=storage,
        study_name=name,
        directions=["minimize", "minimize"] if search.objective == "pareto" else ["minimize"],
        sampler=sampler_for(config, search.seed),
        pruner=study_pruner(config),
    )
    record_creation(study, config, space.units)
    for params in space.seeds():
        study.enqueue_trial(params, user_attrs=seed_attrs(), skip_if_exists=True)
    record_created(study, space.fingerprint())
    return study


def run_window(study, objective, profiler: Profiler, n_trials: int, max_trials: int) -> dict:
    """Run `n_trials` trials through `study.optimize` as the runner does; their wall times and the sections."""
    ended: list[float] = []

    def mark(_study, _trial) -> None:
        ended.append(time.perf_counter())

    with contextlib.redirect_stderr(io.StringIO()):  # the progress bar draws, as without --quiet, into nothing
        bar = ProgressBar(study, max_trials, enabled=True)
    callbacks = [
        profiler.wrap("callbacks", optuna.study.MaxTrialsCallback(max_trials, states=FINISHED)),
        profiler.wrap("callbacks", StopAfterFailures(5)),
        profiler.wrap("progress_bar", bar),
        mark,
    ]
    before = len(study.get_trials(deepcopy=False))
    profiler.reset()
    began = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):
        study.optimize(
            profiler.wrap("objective", objective), n_trials=n_trials, catch=(Exception,), callbacks=callbacks
        )
    wall = time.perf_counter() - began
    seconds, calls, wrapped = dict(profiler.seconds), dict(profiler.calls), profiler.wrapped
    bar.close()
    trials = study.get_trials(deepcopy=False)[before:]
    failed = [trial for trial in trials if trial.state != TrialState.COMPLETE]
    if failed:
        raise SystemExit(f"trial {failed[0].number} ended {failed[0].state.name}: {failed[0].system_attrs}")
    durations = [b - a for a, b in zip([began, *ended[:-1]], ended, strict=True)]
    return {
        "trials": len(durations),
        "wall": wall,
        "durations": durations,
        "seconds": seconds,
        "calls": calls,
        "wrapped": wrapped,
    }


class Bench:
    """One study of one storage and parameter count, measured at growing trial counts."""

    def __init__(self, kind: str, url: str | None, params: int, samplers: list[str], args, per_call: float) -> None:
        self.kind, self.url, self.samplers, self.args, self.per_call = kind, url, samplers, args, per_call
        config, self.space = space_for(params, samplers[0])
        self.params = 2 * len(self.space.units)
        self.name = f"overhead-{kind}-{params}-{uuid.uuid4().hex[:8]}"
        self.study = create_study(kind, url, config, self.space, self.name)
        self.profiler = Profiler()
        self.profiler.instrument(self.study._storage, "storage")
        self.rng = random.Random(0)
        self.make = None  # made_up_trial
        self.configs = {sampler: space_for(params, sampler)[0] for sampler in samplers}
        self.objectives = {
            sampler: Objective(config, TrivialSession(8, seed=1), self.space, max_bytes=None)
            for sampler, config in self.configs.items()
        }
        seeds = len(self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
        if seeds:  # the uniform seeds run first in a real study too; untimed
            run_window(self.study, self.objectives[samplers[0]], self.profiler, seeds, 10**9)

    def held(self) -> int:
        return len(self.study.get_trials(deepcopy=False))

    def fill_to(self, count: int) -> None:
        missing = count - self.held()
        if missing > 0:
            began = time.perf_counter()
            if self.kind == "memory":
                prefill_memory(self.study, self.space, missing, self.rng, self.make)
            else:
                prefill_rdb(self.study, self.space, missing, self.rng, self.make)
            print(f"  pre-filled {missing} trials in {time.perf_counter() - began:.1f} s", flush=True)

    def point(self, count: int, sampler: str) -> dict:
        """The window of trials timed at `count` trials with `sampler`, after its warm-up trials."""
        args = self.args
        self.fill_to(count - args.warmup)
        config = self.configs[sampler]
        self.study.sampler = sampler_for(config, config.search.seed + count)
        self.profiler.instrument(self.study.sampler, "sampler", SAMPLER_METHODS)
        objective = self.objectives[sampler]
        # warm-up: the sampler's first look at the study and the caches; its pace sizes the window
        warm = run_window(self.study, objective, self.profiler, args.warmup, 10**9)
        pace = max(warm["durations"][-1], 1e-6)
        window = max(args.min_window, min(args.window, int(args.max_window_s / pace)))
        held = self.held()
        load = os.getloadavg()[0]
        result = run_window(self.study, objective, self.profiler, window, 10**9)
        n = result["trials"]
        ms = {section: 1000 * result["seconds"].get(section, 0.0) / n for section in SECTIONS}
        total = 1000 * result["wall"] / n
        row = {
            "storage": self.kind,
            "sampler": sampler,
            "params": self.params,
            "trials_in_study": held,
            "ms_per_trial": round(total, 2),
            "ms_per_trial_p50": round(1000 * statistics.median(result["durations"]), 2),
            "ms_sampler": round(ms["sampler"], 2),
            "ms_storage": round(ms["storage"], 2),
            "ms_objective": round(ms["objective"], 2),
            "ms_callbacks": round(ms["callbacks"], 2),
            "ms_progress_bar": round(ms["progress_bar"], 2),
            "ms_other": round(total - sum(ms.values()), 2),
            "storage_calls_per_trial": round(result["calls"].get("storage", 0) / n, 1),
            "ms_instrumentation": round(1000 * self.per_call * result["wrapped"] / n, 2),
            "repeats": n,
            "load_avg_1m": round(load, 2),
            "engine": "trials",
            "evaluations_per_trial": 1.0,
            "ms_per_evaluation": round(total, 2),
        }
        print(
            f"  {self.kind:<10} {sampler:<6} {self.params:>3} params {held:>6} trials: {total:8.1f} ms/trial "
            f"(sampler {ms['sampler']:.1f}, storage {ms['storage']:.1f}, objective {ms['objective']:.1f}, "
            f"callbacks {ms['callbacks']:.1f}, bar {ms['progress_bar']:.1f}; {n} trials timed; load {load:.1f})",
            flush=True,
        )
        return row

    def close(self) -> None:
        """Delete a PostgreSQL study: its trials' rows in bulk first (optuna.delete_study deletes them one by one,
        minutes for a million rows), then the study."""
        if self.kind != "postgresql":
            return
        import sqlalchemy
        from optuna.storages._rdb import models

        trials = models.TrialModel.__table__
        ids = sqlalchemy.select(trials.c.trial_id).where(trials.c.study_id == self.study._study_id)
        children = [
            models.TrialParamModel,
            models.TrialValueModel,
            models.TrialUserAttributeModel,
            models.TrialSystemAttributeModel,
            models.TrialIntermediateValueModel,
            models.TrialHeartbeatModel,
        ]
        with self.study._storage._backend.engine.begin() as connection:
            for model in children:
                table = model.__table__
                connection.execute(table.delete().where(table.c.trial_id.in_(ids)))
            connection.execute(trials.delete().where(trials.c.study_id == self.study._study_id))
        optuna.delete_study(study_name=self.name, storage=self.url)


class GenerationsBench(Bench):
    """A budget study per Linear run in generations (`search.generations`): the same storage, pre-filled with
    trials as generations record them, timed over whole generations of `GenerationSearch` with made-up scores."""

    def __init__(self, kind: str, url: str | None, params: int, args, per_call: float) -> None:
        self.kind, self.url, self.samplers, self.args, self.per_call = kind, url, ["generations"], args, per_call
        self.config, self.space = generations_space(params)
        self.params = len(self.space.units)
        self.name = f"overhead-{kind}-generations-{params}-{uuid.uuid4().hex[:8]}"
        self.study = create_study(kind, url, self.config, self.space, self.name)
        record_unit_sizes(self.study, {unit: unit_weights(unit) for unit in self.space.units})
        self.profiler = Profiler()
        self.profiler.instrument(self.study._storage, "storage")
        self.rng = random.Random(0)
        grid = BudgetGrid(self.space.units, GENERATION_LEVELS, 0.5, StudyRecord.of(self.study).unit_sizes)
        self.make = functools.partial(made_up_generation_trial, grid)
        self.session = TrivialSession(16, seed=1)

    def point(self, count: int, sampler: str) -> dict:
        """`--generations-window` generations timed at `count` trials, after one untimed (the search's first read
        of the study, as a resumed search makes it, and the caches)."""
        self.fill_to(count)
        objective = Objective(self.config, self.session, self.space, max_bytes=None)
        search = GenerationSearch(self.study, objective, seed=count)
        self.profiler.instrument(search, "sampler", ["read_study", "parent", "offspring"])
        self.profiler.instrument(search, "objective", ["score", "record"])
        search.read_study()
        search.generation(math.inf)
        held = self.held()
        load = os.getloadavg()[0]
        evaluations, recorded = search.evaluations, search.recorded
        self.profiler.reset()
        began = time.perf_counter()
        for _ in range(self.args.generations_window):
            search.read_study()
            search.generation(math.inf)
        wall = time.perf_counter() - began
        evaluations, recorded = search.evaluations - evaluations, search.recorded - recorded
        seconds, calls = dict(self.profiler.seconds), dict(self.profiler.calls)
        ms = {section: 1000 * seconds.get(section, 0.0) / recorded for section in SECTIONS}
        total = 1000 * wall / recorded
        row = {
            "storage": self.kind,
            "sampler": "generations",
            "params": self.params,
            "trials_in_study": held,
            "ms_per_trial": round(total, 2),
            "ms_per_trial_p50": None,
            "ms_sampler": round(ms["sampler"], 2),
            "ms_storage": round(ms["storage"], 2),
            "ms_objective": round(ms["objective"], 2),
            "ms_callbacks": 0.0,
            "ms_progress_bar": 0.0,
            "ms_other": round(total - sum(ms.values()), 2),
            "storage_calls_per_trial": round(calls.get("storage", 0) / recorded, 1),
            "ms_instrumentation": round(1000 * self.per_call * self.profiler.wrapped / recorded, 2),
            "repeats": recorded,
            "load_avg_1m": round(load, 2),
            "engine": "generations",
            "evaluations_per_trial": round(evaluations / recorded, 2),
            "ms_per_evaluation": round(1000 * wall / evaluations, 2),
        }
        print(
            f"  {self.kind:<10} generations {self.params:>3} params {held:>6} trials: "
            f"{row['ms_per_evaluation']:6.2f} ms/evaluation, {total:6.1f} ms per recorded trial (storage "
            f"{ms['storage']:.1f}, sampler {ms['sampler']:.1f}, objective {ms['objective']:.1f}); {evaluations} "
            f"evaluations, {recorded} trials; load {load:.1f}",
            flush=True,
        )
        return row


def postgres_reason(url: str) -> str | None:
    """Why PostgreSQL cannot be used, or None when it can."""
    try:
        import sqlalchemy

        with sqlalchemy.create_engine(url).connect():
            return None
    except Exception as error:
        return str(error).splitlines()[0]


def with_flatness(frame: pd.DataFrame) -> pd.DataFrame:
    """`flatness`: each point's ms_per_trial over the smallest count's, per storage, sampler and params (the
    largest count's row holds the figure the issue asks for); `storage_flatness` likewise for ms_storage."""
    frame = frame.copy()
    key = ["storage", "sampler", "params"]
    columns = ["ms_per_trial", "ms_storage", "ms_per_evaluation"]
    first = frame.sort_values("trials_in_study").groupby(key)[columns].transform("first")
    frame["flatness"] = (frame["ms_per_trial"] / first["ms_per_trial"].loc[frame.index]).round(2)
    frame["storage_flatness"] = (frame["ms_storage"] / first["ms_storage"].loc[frame.index]).round(2)
    frame["evaluation_flatness"] = (frame["ms_per_evaluation"] / first["ms_per_evaluation"].loc[frame.index]).round(2)
    return frame


def write(rows: list[dict], out: Path, started: float, earlier: pd.DataFrame) -> pd.DataFrame:
    """This run's rows, and the earlier rows of the CSV for storages, samplers and parameter counts it did not
    measure (each row keeps the date of its run)."""
    frame = with_flatness(pd.DataFrame(rows))
    frame["cpu_cores"] = os.cpu_count()
    frame["machine"] = f"{platform.machine()} {platform.processor() or platform.system()}".strip()
    frame["optuna"] = optuna.__version__
    frame["date"] = datetime.now().strftime("%Y-%m-%d %H:%M")
    frame["run_minutes"] = round((time.perf_counter() - started) / 60, 1)
    if not earlier.empty:
        earlier = earlier.assign(engine=earlier.get("engine", pd.Series("trials", index=earlier.index)))
        earlier["engine"] = earlier["engine"].fillna("trials")
        key = ["storage", "sampler", "params"]
        measured = set(frame[key].itertuples(index=False, name=None))
        kept = earlier[[row not in measured for row in earlier[key].itertuples(index=False, name=None)]]
        frame = pd.concat([kept, frame], ignore_index=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out, index=False)
    return frame


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: 60 parameters, 5-trial windows at 100, 300")
    parser.add_argument("--counts", type=int, nargs="+", help="trial counts (default 100 1000 3000 10000)")
    parser.add_argument("--params", type=int, nargs="+", help="parameters per trial, even (default 60 240)")
    parser.add_argument("--storages", nargs="+", default=["memory", "sqlite", "postgresql"])
    parser.add_argument(
        "--samplers", nargs="*", default=["random", "tpe"], help="from random, tpe, nsga2, gp (none: no trials rows)"
    )
    parser.add_argument(
        "--generation-params",
        type=int,
        nargs="*",
        default=[210],
        help="per-Linear units of the generations studies (one parameter each; none: no generations rows)",
    )
    parser.add_argument("--generations-window", type=int, default=10, help="generations timed per point")
    parser.add_argument("--window", type=int, help="timed trials per point (default 50)")
    parser.add_argument("--min-window", type=int, default=3, help="timed trials per point at the least")
    parser.add_argument("--max-window-s", type=float, default=20.0, help="shorten a window expected to take longer")
    parser.add_argument("--warmup", type=int, default=1, help="untimed trials before each window")
    parser.add_argument("--deadline-min", type=float, default=24.0, help="time no new point after this many minutes")
    parser.add_argument("--postgres", default=os.environ.get("AUTOCOMPRESS_POSTGRES", POSTGRES_URL))
    parser.add_argument(
        "--max-rows",
        type=int,
        default=1_000_000,
        help="SQLite/PostgreSQL: skip trial counts whose pre-filled study holds more parameter rows than this",
    )
    parser.add_argument("--csv", help="default results/benchmarks/overhead.csv (overhead-quick.csv with --quick)")
    args = parser.parse_args()
    counts = args.counts or ([100, 300] if args.quick else [100, 1000, 3000, 10000])
    args.params = args.params or ([60] if args.quick else [60, 240])
    args.window = args.window or (5 if args.quick else 50)
    if args.quick:
        args.warmup = 1
        args.min_window = min(args.min_window, args.window)
    out = Path(args.csv or ROOT / "results" / "benchmarks" / ("overhead-quick.csv" if args.quick else "overhead.csv"))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    import warnings

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

    # a killed run (timeout, Ctrl-C) still deletes its PostgreSQL study
    signal.signal(
        signal.SIGTERM, lambda *_: sys.exit(f"stopped by SIGTERM after {time.perf_counter() - started:.0f} s")
    )
    started = time.perf_counter()
    per_call = Profiler().cost_per_call()
    print(f"timing wrappers add about {per_call * 1e6:.2f} us per timed call", flush=True)
    deadline = started + 60 * args.deadline_min
    earlier = pd.read_csv(out) if out.is_file() else pd.DataFrame()
    rows: list[dict] = []
    benches: list[Bench] = []
    with tempfile.TemporaryDirectory(prefix="overhead-") as folder:
        try:
            for kind in args.storages:
                url = args.postgres if kind == "postgresql" else None
                if kind == "postgresql" and (reason := postgres_reason(url)) is not None:
                    print(f"skipping PostgreSQL: {url} cannot be reached ({reason})", flush=True)
                    continue
                for params in args.params if args.samplers else []:
                    if kind == "sqlite":
                        url = f"sqlite:///{Path(folder) / f'overhead-{params}.db'}"
                    benches.append(Bench(kind, url, params, args.samplers, args, per_call))
                for params in args.generation_params:
                    if kind == "sqlite":
                        url = f"sqlite:///{Path(folder) / f'overhead-generations-{params}.db'}"
                    benches.append(GenerationsBench(kind, url, params, args, per_call))
            # every study at one count before any at the next: a deadline cuts the largest counts, not a storage
            for count in counts:
                print(f"{count} trials:", flush=True)
                for bench in benches:
                    if bench.kind != "memory" and count * bench.params > args.max_rows:
                        print(
                            f"  {bench.kind} {bench.params} params: not pre-filled to {count} trials, "
                            f"{count * bench.params:,} parameter rows is over --max-rows {args.max_rows:,} "
                            "(Optuna reads every row back into its cache once: minutes here)",
                            flush=True,
                        )
                        continue
                    for sampler in bench.samplers:
                        if time.perf_counter() > deadline:
                            print(f"  {bench.kind} {bench.params} params {sampler}: past --deadline-min", flush=True)
                            continue
                        rows.append(bench.point(count, sampler))
                        write(rows, out, started, earlier)
        finally:
            for bench in benches:
                bench.close()
    frame = write(rows, out, started, earlier)
    shown = ["storage", "sampler", "params", "trials_in_study", "ms_per_trial", "ms_sampler", "ms_storage"]
    shown += [
        "ms_objective",
        "ms_callbacks",
        "ms_progress_bar",
        "ms_other",
        "storage_calls_per_trial",
        "repeats",
        "flatness",
        "ms_per_evaluation",
        "evaluation_flatness",
    ]
    print(frame[shown].to_string(index=False))
    print(f"{(time.perf_counter() - started) / 60:.1f} minutes; wrote {out}")


if __name__ == "__main__":
    main()
