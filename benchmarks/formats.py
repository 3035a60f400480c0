"""Number formats against integer grids on the embedded model, and a searched per-block mix at INT4-g128's size.

Uniform rows: every Linear at one level, INT4-g128 (GPTQ in the full run, RTN in the quick one: the integer
baseline in groups of 128, since the embedded GGUF's weights already lie on a 4-bit grid in groups of 32 that
INT4-g32 would reproduce for free), INT3-g128, NF4 (blocks of 64, and of 128), MXFP4, NVFP4 and FP8 E4M3 (one
float16 scale per row); the number formats round to nearest. The searched row: one study over per-block levels
(`search.formats`: every level above but MXFP4, which measured worse than NF4 at the same size), with the
size limit `search.max_size` at uniform INT4-g128's bytes; after a fixed number of trials (its uniform seeds,
one per level, included), the feasible trial with the lowest fitness KL (possibly a uniform seed), and beside
it the best feasible plan the sampler proposed. Every row is judged on held-out tokens.

    .venv/bin/python benchmarks/formats.py --quick     # a few minutes: RTN, short windows, few trials
    .venv/bin/python benchmarks/formats.py             # the full run (about half an hour on 2 CPU cores)

Writes results/benchmarks/formats[-quick].csv and .png. The study and its caches (calibration statistics, the
layer-variant database) live in results/formats-bench[-quick]/ (not committed); a rerun resumes them.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, replace
from pathlib import Path

import optuna
import pandas as pd
import torch
from allocation import heldout_ppl, prepare_run  # a sibling benchmark's helpers
from matplotlib.figure import Figure
from optuna.trial import FrozenTrial, TrialState

from autocompress.config import Config
from autocompress.models import unit_names
from autocompress.plan import CompressionPlan
from autocompress.record import StudyLocation, StudyRecord, TrialRecord
from autocompress.report import allocation_summary
from autocompress.search.driver import FINISHED
from autocompress.search.objective import Objective
from autocompress.search.space import SearchSpace
from autocompress.search.study import open_study, prepare_study
from autocompress.session import CompressionSession
from autocompress.size import model_size

BASELINE = "int4-g128"  # the uniform level whose size the searched mix must not exceed
UNIFORM_LEVELS = ("int3-g128", "int4-g128", "nf4-g128", "nf4", "mxfp4", "nvfp4", "fp8-e4m3")
SEARCH_LEVELS = tuple(level for level in UNIFORM_LEVELS if level != "mxfp4")


@dataclass(frozen=True)
class Settings:
    mode: str
    integer_method: str  # the quantizer of the int<b> levels
    seq_len: int
    calibration: int
    fitness: int
    heldout: int
    trials: int  # finished trials, the uniform seeds (one per level) included


FULL = Settings(mode="full", integer_method="gptq", seq_len=256, calibration=16, fitness=4, heldout=12, trials=60)
QUICK = Settings(mode="quick", integer_method="rtn", seq_len=128, calibration=4, fitness=2, heldout=4, trials=10)


def study_config(settings: Settings, max_size: int | None = None) -> Config:
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
            "compression": {"quantization": settings.integer_method, "group_size": 128, "granularity": "block"},
            "search": {
                "formats": list(SEARCH_LEVELS),
                "max_size": max_size,
                "objective": "pareto",
                "loss": "kl",
                "sampler": "tpe",
                "seed": 0,
                "seeds": "levels",
                "database": "on",  # each level of each Linear computed once; a trial loads the blocks it changes
            },
        }
    )


def figures(session: CompressionSession, space: SearchSpace, params: dict) -> dict:
    """Size of a plan (whole model, and its compressed Linears in bits per weight) and its held-out perplexity."""
    plan = space.plan_from_params(params)
    size = model_size(session.model, plan)
    weights = sum(weight.numel() for weight in session.dense_weights.values())
    return {
        "heldout_ppl": heldout_ppl(session, space, params),
        "size_bytes": size.total_bytes,
        "size_ratio": size.ratio,
        "linear_bytes": sum(size.per_layer.values()),
        "linear_bits_per_weight": 8 * sum(size.per_layer.values()) / weights,
    }


def uniform_level(trial: FrozenTrial, space: SearchSpace) -> str | None:
    """The level every unit of a uniform seed trial takes; None for a mixed plan."""
    levels = {space.plan_from_params(trial.params).setting(unit, unit).level.name for unit in space.units}
    return levels.pop() if len(levels) == 1 else None


def run(settings: Settings, work: Path, log) -> pd.DataFrame:
    began = time.perf_counter()
    location = StudyLocation.resolve("formats", work)
    session = CompressionSession(study_config(settings), cache_dir=location.cache_dir, progress=True)
    units = unit_names(session.model, "block")
    baseline = CompressionPlan.uniform(format=BASELINE, **session.config.compression.plan_options())
    limit = model_size(session.model, baseline).total_bytes
    config = study_config(settings, max_size=limit)
    space = SearchSpace(config, units)
    study, _ = open_study(config, location, space, config.search.seed)
    prepare_study(study, session, space, location)  # builds the layer-variant database: every level of every Linear
    setup_s = time.perf_counter() - began
    log(f"setup {setup_s:.0f} s; size limit {limit:,} bytes (uniform {BASELINE})")
    searched = time.perf_counter()
    if len(study.get_trials(deepcopy=False, states=FINISHED)) < settings.trials:
        study.optimize(
            Objective(config, session, space, StudyRecord.of(study).max_bytes()),
            catch=(Exception,),
            callbacks=[optuna.study.MaxTrialsCallback(settings.trials, states=FINISHED)],
        )
    search_s = time.perf_counter() - searched
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    feasible = [trial for trial in complete if TrialRecord.of(trial).size_bytes <= limit]
    best = min(feasible, key=lambda trial: (TrialRecord.of(trial).loss, trial.number))
    log(f"search: {len(complete)} complete trials, {len(feasible)} within the limit, {search_s:.0f} s")

    common = {"mode": settings.mode, "integer_method": settings.integer_method, "size_limit_bytes": limit}
    dense = {"row": "dense", "level": "fp16", "trial": None, "fitness_kl": 0.0}
    rows = [dense | figures(session, space, space.dense_params())]
    seeds = {uniform_level(trial, space): trial for trial in complete if TrialRecord.of(trial).seed}
    for level in UNIFORM_LEVELS:
        trial = seeds.get(level)
        params = trial.params if trial else space.uniform_params(0.0, level)
        fitness_kl = TrialRecord.of(trial).loss if trial else session.measure(space.plan_from_params(params)).metrics.kl
        row = {"row": f"uniform {level}", "level": level, "trial": trial.number if trial else None}
        rows.append(row | {"fitness_kl": fitness_kl} | figures(session, space, params))
        log(f"uniform {level}: held-out ppl {rows[-1]['heldout_ppl']:.3f}")
    sampled = [trial for trial in feasible if not TrialRecord.of(trial).seed]
    best_sampled = min(sampled, key=lambda trial: (TrialRecord.of(trial).loss, trial.number), default=None)
    # The searched mix may be a uniform seed; the best plan the sampler itself proposed is shown beside it.
    for name, trial in (("searched mix", best), ("best sampled mix", best_sampled)):
        if trial is None:
            continue
        row = {"row": name, "level": allocation_summary(trial.params), "trial": trial.number}
        rows.append(row | {"fitness_kl": TrialRecord.of(trial).loss} | figures(session, space, trial.params))
        log(f"{name} (trial {trial.number}): held-out ppl {rows[-1]['heldout_ppl']:.3f}; {rows[-1]['level']}")
    extra = {
        "searched_is_uniform_seed": bool(TrialRecord.of(best).seed),
        "trials_complete": len(complete),
        "trials_within_limit": len(feasible),
        "seq_len": settings.seq_len,
        "calibration_windows": settings.calibration,
        "fitness_tokens": settings.fitness * settings.seq_len,
        "heldout_tokens": settings.heldout * settings.seq_len,
        "granularity": "block",
        "units": len(units),
        "setup_s": setup_s,
        "search_s": search_s,
        "wall_s": time.perf_counter() - began,
        "threads": torch.get_num_threads(),
    }
    return pd.DataFrame([common | row | extra for row in rows])


def plot(frame: pd.DataFrame, path: Path) -> None:
    figure = Figure(figsize=(7, 4.5))
    axes = figure.subplots()
    dense = frame[frame["row"] == "dense"].iloc[0]
    compressed = frame[frame["row"] != "dense"]
    mixes = ("searched mix", "best sampled mix")
    colors = ["tab:red" if row in mixes else "tab:blue" for row in compressed["row"]]
    axes.scatter(compressed["linear_bits_per_weight"], compressed["heldout_ppl"], color=colors)
    for index, (_, row) in enumerate(compressed.sort_values("heldout_ppl").iterrows()):
        label = row["row"] if row["row"] in mixes else row["level"]
        offset = (6, 10 - 8 * (index % 4))  # the 4-bit levels crowd one spot: stagger their labels
        axes.annotate(label, (row["linear_bits_per_weight"], row["heldout_ppl"]), fontsize=8, xytext=offset,
                      textcoords="offset points")  # fmt: skip
    axes.axhline(dense["heldout_ppl"], color="black", linestyle="--", linewidth=1, label="dense (16 bits)")
    limit_bits = frame[frame["level"] == BASELINE]["linear_bits_per_weight"].iloc[0]
    axes.axvline(limit_bits, color="tab:gray", linestyle=":", linewidth=1, label=f"size of uniform {BASELINE}")
    axes.set_xlabel("bits per weight of the compressed Linears (scales included)")
    axes.set_ylabel("held-out perplexity")
    axes.set_yscale("log")
    axes.set_title(f"Formats on SmolLM2-135M ({frame['mode'].iloc[0]} run, integer grids: "
                   f"{frame['integer_method'].iloc[0].upper()})")  # fmt: skip
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few minutes: RTN, short windows, few trials")
    parser.add_argument("--trials", type=int, help="finished trials, seeds included (default: 60 full, 10 quick)")
    parser.add_argument("--work", type=Path, help="study and caches (default: results/formats-bench[-quick])")
    parser.add_argument("--out", type=Path, help="CSV (default: results/benchmarks/formats[-quick].csv)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: a shared machine)")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    if args.trials:
        settings = replace(settings, trials=args.trials)
    work, out, log = prepare_run("formats", args.quick, args.work, args.out, args.threads)
    log(f"{settings.mode} run: {settings}")
    frame = run(settings, work, log)
    frame.to_csv(out, index=False, float_format="%.6g")
    plot(frame, out.with_suffix(".png"))
    log(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
