"""Searched allocation against uniform, OWL and sensitivity allocations at matched budgets, on the embedded model.

For each budget (average sparsity 50/60/70% with a SparseGPT database; average bit-width 3.0/3.5 with a GPTQ
database, groups of 128 so the model's own 4-bit grid in groups of 32 does not make 4 bits free), one
budget-aware study (`search.budget`, the evolution sampler with staged fitness) runs a fixed number of trials,
its baselines (uniform, OWL, sensitivity) enqueued as its first trials. Then every allocation and the dense
model are judged on held-out tokens, and the trial overhead ratio is measured: the median wall time of a
complete trial over the time of bare forward passes of the dense model on the same fitness tokens.

    .venv/bin/python benchmarks/allocation.py --quick     # a few minutes: one budget per family, few trials
    .venv/bin/python benchmarks/allocation.py             # the full run (about two hours on 2 CPU cores)
    .venv/bin/python benchmarks/allocation.py --engines trials generations --search-seconds 780 \
        --budgets sparsity:0.6,sparsity:0.7              # both engines, the same search time per row (70 minutes)

`--engines` runs each budget with one Optuna trial per scored plan (trials: the evolution sampler, staged pruning)
and/or with `search.generations` (its defaults), each in a study of its own sharing the caches; rows are keyed by
budget and engine, with plans scored and stage scores per hour beside the figures.

Writes results/benchmarks/allocation.csv and allocation.png. Studies and caches (calibration statistics, the
layer-variant database, error profiles) live in results/allocation-bench/ (not committed); a rerun resumes them.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import optuna
import pandas as pd
import torch
from matplotlib.figure import Figure
from optuna.trial import TrialState

from autocompress.config import Config
from autocompress.models import compressible_linears, unit_names
from autocompress.record import StudyLocation, StudyRecord, TrialRecord
from autocompress.search.driver import FINISHED, ProgressBar
from autocompress.search.objective import Objective
from autocompress.search.runner import run_generations
from autocompress.search.space import SearchSpace
from autocompress.search.study import open_study, prepare_study
from autocompress.session import CompressionSession

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {("sparsity", 0.6): 0.40, ("sparsity", 0.7): 0.50, ("bits", 3.0): 0.30}  # gap closure the issue asks


@dataclass(frozen=True)
class Settings:
    mode: str
    seq_len: int
    calibration: int
    fitness: int
    heldout: int
    trials: int  # finished trials (complete + pruned) per budget, the 3 baselines included
    budgets: tuple[tuple[str, float], ...]
    sparsity_levels: tuple[float, ...]
    bit_levels: tuple[int, ...]
    granularity: dict[str, str]  # per budget dimension: decoder blocks or single Linears
    profile_windows: dict[str, int]  # fitness windows of the per-unit error profile, per dimension


FULL = Settings(
    mode="full",
    seq_len=256,
    calibration=32,
    fitness=12,
    heldout=16,
    trials=128,
    budgets=(("sparsity", 0.5), ("sparsity", 0.6), ("sparsity", 0.7), ("bits", 3.0), ("bits", 3.5)),
    sparsity_levels=(0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
    bit_levels=(2, 3, 4),
    # Per block, an average of 3 bits leaves only 2-bit/4-bit trades, and 2-bit blocks ruin this small model;
    # per Linear, the search can also trade between layers of one type (all q_proj, all down_proj...).
    granularity={"sparsity": "block", "bits": "linear"},
    profile_windows={"sparsity": 2, "bits": 1},
)
QUICK = Settings(
    mode="quick",
    seq_len=128,
    calibration=8,
    fitness=4,
    heldout=8,
    trials=16,
    budgets=(("sparsity", 0.6), ("bits", 3.0)),
    sparsity_levels=(0.5, 0.6, 0.7),
    bit_levels=(2, 3, 4),
    granularity={"sparsity": "block", "bits": "block"},
    profile_windows={"sparsity": 1, "bits": 1},
)


@dataclass(frozen=True)
class SharedCacheLocation(StudyLocation):
    """A study whose caches (statistics, variants, profiles) are shared with the other budgets' studies."""

    shared_cache: Path = Path()

    @property
    def cache_dir(self) -> Path:
        return self.shared_cache


def family_config(settings: Settings, dimension: str, target: float, engine: str = "trials") -> Config:
    sparsity = list(settings.sparsity_levels) if dimension == "sparsity" else [0.0]
    bits = list(settings.bit_levels) if dimension == "bits" else [16]
    return Config.model_validate(
        {
            "model": {"name": "smollm2-135m", "dtype": "float32", "device": "auto"},
            "data": {
                "source": "pydoc",
                "seq_len": settings.seq_len,
                "calibration": settings.calibration,
                "fitness": settings.fitness,
                "heldout": settings.heldout,
                "batch_size": 4,
                "seed": 0,
            },
            # One set of methods for both families, so both share one variant database.
            "compression": {
                "pruning": "sparsegpt",
                "quantization": "gptq",
                "granularity": settings.granularity[dimension],
                "group_size": 128,
            },
            "search": {
                "sparsity": sparsity,
                "bits": bits,
                "budget": {dimension: target},
                "objective": "pareto",
                "loss": "kl",
                "seed": 0,
                **({"stages": [0.25, 0.5, 1.0]} if engine == "trials" else {"generations": {}}),
                "database": "on",
                "profile_windows": settings.profile_windows[dimension],
            },
        }
    )


class BareForwardClock:
    """Times bare forward passes of a dense copy of the model over the fitness pool, in the trials' batches:
    before the search, after every `every`-th trial (the machine is shared, so its load drifts) and after."""

    def __init__(self, session: CompressionSession, every: int = 16) -> None:
        self.model = copy.deepcopy(session.model)
        for linear, dense in zip(compressible_linears(self.model), session.linears, strict=True):
            linear.module.weight.data.copy_(session.dense_weights[dense.name])
        self.tokens, self.batch = session.pools.fitness, session.batch_size
        self.every = every
        self.times: list[float] = []

    def measure(self) -> None:
        device = next(self.model.parameters()).device
        with torch.no_grad():
            began = time.perf_counter()
            for start in range(0, len(self.tokens), self.batch):
                self.model(self.tokens[start : start + self.batch].to(device), use_cache=False)
            self.times.append(time.perf_counter() - began)

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if trial.number % self.every == self.every - 1:
            self.measure()


def stage_scores_of(trial: optuna.trial.FrozenTrial) -> int:
    """Scores of a finished trial's plan on one stage's windows: the stages it recorded (a complete trial records
    the stages before the whole pool, the last one being its loss)."""
    record = TrialRecord.of(trial)
    return len(record.stage_losses) + (trial.state == TrialState.COMPLETE and record.generation_evaluations is None)


def median_or_none(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def heldout_ppl(session: CompressionSession, space: SearchSpace, params: dict) -> float:
    return session.measure(space.plan_from_params(params), pool="heldout").metrics.ppl


def run_budget(
    settings: Settings,
    work: Path,
    dimension: str,
    target: float,
    log,
    engine: str = "trials",
    search_seconds: float | None = None,
) -> dict:
    """One budget's study with `engine` (trials: one Optuna trial per scored plan, the evolution sampler and staged
    pruning; generations: `search.generations` with its defaults), run for `settings.trials` finished trials or,
    with `search_seconds`, for that long (the baselines included), then judged on held-out tokens."""
    config = family_config(settings, dimension, target, engine)
    name = f"{dimension}-{target:g}" if engine == "trials" else f"{dimension}-{target:g}-{engine}"
    location = SharedCacheLocation(
        name=name,
        out_dir=work / name,
        storage_url=f"sqlite:///{work / 'studies.db'}",
        shared_cache=work / "cache",
    )
    began = time.perf_counter()
    session = CompressionSession(config, cache_dir=location.cache_dir, progress=True)
    space = SearchSpace(config, unit_names(session.model, config.compression.granularity))
    study, _ = open_study(config, location, space, config.search.seed)
    prepared = time.perf_counter()
    prepare_study(study, session, space, location)  # database (shared, built once), baselines enqueued
    setup_s = time.perf_counter() - prepared
    objective = Objective(config, session, space, StudyRecord.of(study).max_bytes())
    clock = BareForwardClock(session)
    clock.measure()
    load_before = os.getloadavg()[0]
    searched = time.perf_counter()
    target_trials = 10**9 if search_seconds is not None else settings.trials
    finished = len(study.get_trials(deepcopy=False, states=FINISHED))
    plans_scored, stage_scores = finished, None
    if finished < target_trials and engine == "trials":
        study.optimize(
            objective,
            timeout=search_seconds,
            catch=(Exception,),
            callbacks=[optuna.study.MaxTrialsCallback(target_trials, states=FINISHED), clock],
        )
        plans_scored = len(study.get_trials(deepcopy=False, states=FINISHED)) - finished
        stage_scores = sum(map(stage_scores_of, study.get_trials(deepcopy=False, states=FINISHED)[finished:]))
    elif finished < target_trials:
        with contextlib.redirect_stderr(io.StringIO()):  # the bar draws into nothing
            bar = ProgressBar(study, target_trials, enabled=False)
        seeds = len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
        generations = run_generations(study, objective, target_trials, search_seconds, config.search.seed, bar)
        seed_scores = sum(map(stage_scores_of, study.get_trials(deepcopy=False, states=FINISHED)[finished:][:seeds]))
        plans_scored, stage_scores = seeds + generations.plans, seed_scores + generations.evaluations
    search_s = time.perf_counter() - searched
    trials = study.get_trials(deepcopy=False, states=FINISHED)
    complete = [trial for trial in trials if trial.state == TrialState.COMPLETE]
    baselines = {  # baselines that coincide (sensitivity may be uniform) share one trial
        name: trial for trial in complete for name in TrialRecord.of(trial).baselines
    }
    best = min(complete, key=lambda trial: (TrialRecord.of(trial).loss, trial.number))

    clock.measure()
    forward_s = statistics.median(clock.times)
    dense = heldout_ppl(session, space, space.uniform_params(0.0, 16))
    measured: dict[int, float] = {}
    for trial in [*baselines.values(), best]:
        if trial.number not in measured:
            measured[trial.number] = heldout_ppl(session, space, trial.params)
    figures = {key: measured[trial.number] for key, trial in baselines.items()}
    figures["searched"] = measured[best.number]
    seconds = [trial.duration.total_seconds() for trial in trials if trial.duration]
    complete_seconds = [trial.duration.total_seconds() for trial in complete if trial.duration]
    sampled = [trial for trial in complete if not TrialRecord.of(trial).seed]
    gap = (figures["uniform"] - figures["searched"]) / (figures["uniform"] - dense)
    database = StudyRecord.of(study).database or {}
    row = {
        "mode": settings.mode,
        "engine": engine,
        "family": "SparseGPT sparsity" if dimension == "sparsity" else "GPTQ bits (group 128)",
        "budget_dimension": dimension,
        "budget": target,
        "levels": " ".join(f"{level:g}" for level in config.search.levels(dimension)),
        "dense_ppl": dense,
        "uniform_ppl": figures["uniform"],
        "owl_ppl": figures["owl"],
        "sensitivity_ppl": figures["sensitivity"],
        "searched_ppl": figures["searched"],
        "gap_closure": gap,
        "gap_closure_target": TARGETS.get((dimension, target)),
        "searched_beats_uniform": figures["searched"] < figures["uniform"],
        "searched_beats_owl": figures["searched"] < figures["owl"],
        "searched_beats_sensitivity": figures["searched"] < figures["sensitivity"],
        "uniform_fitness_kl": TrialRecord.of(baselines["uniform"]).loss,
        "owl_fitness_kl": TrialRecord.of(baselines["owl"]).loss,
        "sensitivity_fitness_kl": TrialRecord.of(baselines["sensitivity"]).loss,
        "searched_fitness_kl": TrialRecord.of(best).loss,
        "searched_trial": best.number,
        "searched_is_baseline": " ".join(TrialRecord.of(best).baselines),
        "sensitivity_is_uniform": baselines["sensitivity"].number == baselines["uniform"].number,
        "owl_is_uniform": baselines["owl"].number == baselines["uniform"].number,
        "trial_budget": settings.trials,
        "trials_complete": len(complete),
        "trials_pruned": len(trials) - len(complete),
        "sampled_complete": len(sampled),
        "median_trial_s": statistics.median(seconds),
        "median_complete_trial_s": statistics.median(complete_seconds),
        "bare_forward_s": forward_s,
        "bare_forward_timings": len(clock.times),
        "overhead_ratio": statistics.median(complete_seconds) / forward_s,
        "overhead_ratio_all_trials": statistics.median(seconds) / forward_s,
        # The search's own complete trials (not the baselines, which stitch whole models from dense first).
        "overhead_ratio_sampled": median_or_none([t.duration.total_seconds() / forward_s for t in sampled]),
        # Each complete trial's wall time over its own forward passes (timed inside it, same machine load).
        "overhead_ratio_in_situ": median_or_none(
            [
                t.duration.total_seconds() / TrialRecord.of(t).forward_s
                for t in complete
                if TrialRecord.of(t).forward_s is not None
            ]
        ),
        "median_stitch_s": statistics.median(TrialRecord.of(t).stitch_s for t in complete),
        "median_eval_s": statistics.median(TrialRecord.of(t).eval_s for t in complete),
        "search_s": search_s,
        "search_seconds_budget": search_seconds,
        "load_avg_1m_before": load_before,  # the machine is shared: its load when the search began and ended
        "load_avg_1m_after": os.getloadavg()[0],
        "plans_scored": plans_scored,  # plans given a fitness score, on part of the pool or all of it
        "stage_scores": stage_scores,  # scores of a plan on one stage's windows
        "plans_per_hour": plans_scored / search_s * 3600 if search_s else None,
        "stage_scores_per_hour": stage_scores / search_s * 3600 if stage_scores and search_s else None,
        "setup_s": setup_s,
        "database_mib": database.get("bytes", 0) / 2**20,
        "seq_len": settings.seq_len,
        "calibration_windows": settings.calibration,
        "fitness_tokens": settings.fitness * settings.seq_len,
        "heldout_tokens": settings.heldout * settings.seq_len,
        "stages": " ".join(f"{fraction:g}" for fraction in config.search.stage_fractions()),
        "granularity": config.compression.granularity,
        "units": len(space.units),
        "profile_tokens": settings.profile_windows[dimension] * settings.seq_len,
        "threads": torch.get_num_threads(),
        "wall_s": time.perf_counter() - began,
    }
    log(
        f"{name}: dense {dense:.2f}  uniform {figures['uniform']:.2f}  owl {figures['owl']:.2f}  "
        f"sensitivity {figures['sensitivity']:.2f}  searched {figures['searched']:.2f}  gap closure {gap:.0%}  "
        f"overhead {row['overhead_ratio']:.2f}  ({len(complete)} complete / {len(trials)} trials, {plans_scored} "
        f"plans scored, {search_s:.0f} s)"
    )
    return row


def plot(frame: pd.DataFrame, path: Path) -> None:
    families = list(dict.fromkeys(frame["budget_dimension"]))
    figure = Figure(figsize=(5.5 * len(families), 4.2))
    axes = figure.subplots(1, len(families), squeeze=False)[0]
    methods = [("uniform_ppl", "uniform", "tab:gray"), ("owl_ppl", "OWL", "tab:blue")]
    methods += [("sensitivity_ppl", "sensitivity", "tab:green"), ("searched_ppl", "searched", "tab:red")]
    for axis, family in zip(axes, families, strict=True):
        rows = frame[frame["budget_dimension"] == family].reset_index(drop=True)
        width = 0.8 / len(methods)
        for offset, (column, label, color) in enumerate(methods):
            positions = [index + (offset - (len(methods) - 1) / 2) * width for index in range(len(rows))]
            axis.bar(positions, rows[column], width=width, label=label, color=color)
        axis.axhline(rows["dense_ppl"].iloc[0], color="black", linestyle="--", linewidth=1, label="dense")
        unit = "sparsity" if family == "sparsity" else "bits"
        ticks = [f"{budget:g} {unit}\n{engine}" for budget, engine in zip(rows["budget"], rows["engine"], strict=True)]
        axis.set_xticks(range(len(rows)), ticks)
        axis.set_ylabel("held-out perplexity")
        axis.set_yscale("log")
        axis.set_title(rows["family"].iloc[0])
        axis.grid(alpha=0.3, axis="y")
        axis.legend(fontsize=8)
    figure.suptitle(f"Allocations at matched budgets, SmolLM2-135M ({frame['mode'].iloc[0]} run)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def merged(earlier: pd.DataFrame, new: pd.DataFrame) -> pd.DataFrame:
    """The new rows, and the earlier ones of budgets not run again (a run of some budgets keeps the others)."""
    if earlier.empty:
        return new
    if "engine" not in earlier:  # rows from before there were two engines
        earlier = earlier.assign(engine="trials")
    key = ["budget_dimension", "budget", "engine"]
    again = set(new[key].itertuples(index=False, name=None))
    kept = earlier[[row not in again for row in earlier[key].itertuples(index=False, name=None)]]
    frame = pd.concat([kept, new], ignore_index=True)
    order = frame["budget_dimension"].map({"sparsity": 0, "bits": 1})
    frame = frame.assign(_order=order).sort_values(["_order", "budget", "engine"], kind="stable")
    return frame.drop(columns="_order").reset_index(drop=True)


def prepare_run(
    name: str, quick: bool, work: Path | None, out: Path | None, threads: int
) -> tuple[Path, Path, Callable[[str], None]]:
    """A benchmark run's work folder (studies, caches) and CSV path, both made, Optuna quiet, torch seeded on
    `threads` threads, and a log printing timestamped lines."""
    suffix = "-quick" if quick else ""
    work = work or ROOT / "results" / f"{name}-bench{suffix}"
    out = out or ROOT / "results" / "benchmarks" / f"{name}{suffix}.csv"
    work.mkdir(parents=True, exist_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    torch.manual_seed(0)
    torch.set_num_threads(threads)

    def log(line: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)

    return work, out, log


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few minutes: one budget per family, few trials")
    parser.add_argument("--trials", type=int, help="finished trials per budget (default: 160 full, 16 quick)")
    parser.add_argument("--budgets", help="e.g. 'sparsity:0.6,bits:3.0' (default: all of the mode)")
    parser.add_argument(
        "--engines",
        nargs="+",
        choices=["trials", "generations"],
        default=["trials"],
        help="trials: a trial per scored plan; generations: search.generations (both: side by side, one run)",
    )
    parser.add_argument(
        "--search-seconds", type=float, help="each study searches this long instead of for --trials trials"
    )
    parser.add_argument("--work", type=Path, help="studies and caches (default: results/allocation-bench[-quick])")
    parser.add_argument("--out", type=Path, help="CSV (default: results/benchmarks/allocation[-quick].csv)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: on a shared 2-core machine, 2 threads made SparseGPT 25x slower)",
    )
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    if args.trials:
        settings = Settings(**{**settings.__dict__, "trials": args.trials})
    if args.budgets:
        budgets = tuple((part.split(":")[0], float(part.split(":")[1])) for part in args.budgets.split(","))
        settings = Settings(**{**settings.__dict__, "budgets": budgets})
    work, out, log = prepare_run("allocation", args.quick, args.work, args.out, args.threads)
    log(f"{settings.mode} run: {settings}")
    earlier = pd.read_csv(out) if out.is_file() else pd.DataFrame()
    rows = []
    for dimension, target in settings.budgets:
        for engine in args.engines:
            rows.append(run_budget(settings, work, dimension, target, log, engine, args.search_seconds))
        frame = merged(earlier, pd.DataFrame(rows))
        frame.to_csv(out, index=False, float_format="%.6g")  # after every budget: a partial run leaves figures
        plot(frame, out.with_suffix(".png"))
    log(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
