"""A large vocabulary's cost, phase by phase: a `target: gguf` study of Gemma-3-270m (262,144 tokens) beside one of
SmolLM2-135M (49,152) on the same windows.

Each phase runs as a size-budget study runs it, through the session's own calls, and is timed with the process's
peak resident memory during it (the kernel's high-water mark, reset before each phase through
/proc/self/clear_refs):

- load: the model (its `.gguf` conversion cached beforehand: `--warm` converts it), the pools, the target;
- calibration: the importance matrix of llama.cpp's quantizers (the input norms of every Linear, the head's too);
- blocks: every tensor quantized into the study's types, kept on disk (the levels restricted to Q4_K_M's own
  types and their fallbacks, so that this phase stays minutes on a loaded host);
- reference: the dense model's log-probabilities on the fitness windows, stored;
- first trial: a plan scored from the dense model (every tensor decoded);
- trial: a plan differing from the last in a tenth of its units, as a generation's offspring do;
- heldout dense, heldout member: held-out judging (`search.heldout.heldout_figures`): the dense model's
  perplexity, then one frontier member's (its reference on the held-out windows computed in the first).

    benchmarks/vocab.py run --model /path/gemma-3-270m-q4_k_m.gguf --as after --json /tmp/gemma-after.json
    benchmarks/vocab.py table --before /tmp/gemma-before.json /tmp/smollm-before.json \
        --after /tmp/gemma-after.json /tmp/smollm-after.json

`run` measures one model with whatever `autocompress` is first on the path (run "before" with a checkout of the
earlier code on PYTHONPATH); `table` writes results/benchmarks/vocab.csv, one row per model and phase: wall seconds, the
process's CPU seconds (all its threads; on a host shared with other jobs the steadier figure) and the load average of
the host during each phase, and prints a Gemma trial's cost in SmolLM2 trials.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from autocompress.config import Config
from autocompress.search.heldout import heldout_figures
from autocompress.search.space import SearchSpace
from autocompress.session import CompressionSession

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "results" / "benchmarks" / "vocab.csv"
FORMATS = ["q4_k", "q5_0", "q6_k", "q8_0"]  # Q4_K_M's types and their fallbacks for rows of 640 or 576
COLUMNS = [  # (CSV column, figure of a run, decimals)
    ("seconds", "seconds", 2),
    ("peak_rss_mb", "peak_rss_mb", 0),
    ("cpu_seconds", "cpu_seconds", 2),
    ("load", "load_average", 1),
    ("stitch_seconds", "stitch_seconds", 2),  # of a trial: swapping the plan's weights in
    ("eval_seconds", "eval_seconds", 2),  # of a trial: scoring the fitness windows
]
AIM = 3.0  # a Gemma trial costs at most this many SmolLM2 trials on the same windows


def study_config(model: str, calibration: int = 32, heldout: int = 16) -> Config:
    """The main job's data (search_spaces/smollm2-q4km.yaml) and target, on `model`; fewer calibration or held-out
    windows make those phases shorter on a loaded host (the fitness windows, which a trial scores, stay 8)."""
    return Config.model_validate(
        {
            "model": {"name": model, "dtype": "float32", "device": "cpu"},
            "data": {
                "source": "pydoc",
                "seq_len": 256,
                "calibration": calibration,
                "fitness": 8,
                "heldout": heldout,
                "batch_size": 4,
                "seed": 0,
            },
            "compression": {"target": "gguf", "quantization": "rtn", "granularity": "linear"},
            "search": {"sparsity": [0.0], "formats": FORMATS, "objective": "pareto", "seeds": "none"},
        }
    )


def peak_rss_mb() -> float:
    """The process's resident high-water mark since the last `reset_peak_rss`, in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / 10**6
    raise RuntimeError("no VmHWM in /proc/self/status")


def reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def timed_phase(
    phases: dict[str, dict[str, float]], name: str, work: Callable[[], Any], save: Callable[[], None]
) -> Any:
    reset_peak_rss()
    began, cpu_began, load = time.perf_counter(), time.process_time(), os.getloadavg()[0]
    result = work()
    phases[name] = {
        "seconds": time.perf_counter() - began,
        "cpu_seconds": time.process_time() - cpu_began,
        "peak_rss_mb": peak_rss_mb(),
        "load_average": (load + os.getloadavg()[0]) / 2,
    }
    figures = phases[name]
    save()  # phase by phase: a run stopped on a loaded host keeps what it measured
    print(
        f"{name}: {figures['seconds']:.1f} s ({figures['cpu_seconds']:.1f} CPU s, load {figures['load_average']:.1f}), "
        f"peak RSS {figures['peak_rss_mb']:,.0f} MB",
        flush=True,
    )
    return result


def neighbour(space: SearchSpace, params: dict[str, Any], share: float, seed: int) -> dict[str, Any]:
    """`params` with a share of its units moved to another level they may take."""
    rng = random.Random(seed)
    changed = dict(params)
    keys = [key for key in params if len(space.distribution_of(key).choices) > 1]
    for key in rng.sample(keys, max(1, round(share * len(keys)))):
        changed[key] = rng.choice([level for level in space.distribution_of(key).choices if level != params[key]])
    return changed


def run(config: Config, label: str, cache: Path, out: Path) -> None:
    """Measure every phase of one model, writing the figures to `out` after each."""
    phases: dict[str, dict[str, float]] = {}
    data = config.data
    figures: dict[str, Any] = {
        "model": Path(config.model.name).name,
        "label": label,
        "windows": f"{data.calibration}/{data.fitness}/{data.heldout}",
        "phases": phases,
    }

    def save() -> None:
        out.write_text(json.dumps(figures, indent=1))

    timed = functools.partial(timed_phase, phases, save=save)
    session = timed("load", lambda: CompressionSession(config, cache_dir=cache))
    figures["vocab"] = session.model.config.vocab_size
    space = SearchSpace(config, session.units, session.unit_levels())
    timed("calibration", session.weights.prepare)
    timed("blocks", lambda: session.weights.precompute(session.unit_levels(), False))
    timed("reference", lambda: session.reference("fitness"))
    first = space.uniform_params(0.0, "q5_0")
    second = neighbour(space, first, 0.1, seed=0)
    for name, params in (("first trial", first), ("trial", second)):
        measured = timed(name, lambda params=params: session.measure(space.plan_from_params(params)))
        phases[name] |= {"stitch_seconds": measured.stitch_s, "eval_seconds": measured.eval_s}
        save()
    timed("heldout dense", lambda: heldout_figures(session, space, None))
    timed("heldout member", lambda: heldout_figures(session, space, second))


def table(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per model and phase, a phase a run did not reach left empty."""
    rows = []
    runs = {(run["model"], run["label"]): run for run in [*before, *after]}
    for model in dict.fromkeys(model for model, _ in runs):
        early, late = (runs.get((model, label), {"phases": {}}) for label in ("before", "after"))
        vocab = early.get("vocab", late.get("vocab"))
        for phase in dict.fromkeys([*early["phases"], *late["phases"]]):
            windows = early.get("windows", late.get("windows"))
            row = {"model": model, "vocab": vocab, "windows": windows, "phase": phase}
            for column, key, digits in COLUMNS:
                for label, figures in (("before", early), ("after", late)):
                    value = figures["phases"].get(phase, {}).get(key)
                    row[f"{column}_{label}"] = None if value is None else round(value, digits)
            rows.append(row)
    return pd.DataFrame(rows)


def trial_ratio(frame: pd.DataFrame, column: str) -> float | None:
    """A trial of the largest vocabulary in trials of the smallest; None unless both were measured."""
    trials = frame[(frame.phase == "trial") & frame[column].notna()].sort_values("vocab")
    if len(trials) < 2:
        return None
    return float(trials[column].iloc[-1] / trials[column].iloc[0])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    measure = commands.add_parser("run", help="measure one model's phases")
    measure.add_argument("--model", required=True, help="a .gguf file, or smollm2-135m")
    measure.add_argument("--as", dest="label", choices=["before", "after"], required=True)
    measure.add_argument("--json", type=Path, required=True, help="where the figures go")
    measure.add_argument("--cache", type=Path, help="the study caches (default: a fresh temporary folder)")
    measure.add_argument("--threads", type=int, default=1)
    measure.add_argument("--calibration", type=int, default=32, help="calibration windows (default 32)")
    measure.add_argument("--heldout", type=int, default=16, help="held-out windows (default 16)")
    tabulate = commands.add_parser("table", help="write results/benchmarks/vocab.csv from runs' figures")
    tabulate.add_argument("--before", type=Path, nargs="+", required=True)
    tabulate.add_argument("--after", type=Path, nargs="+", required=True)
    tabulate.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    if args.command == "run":
        if args.model.endswith(".gguf") and not Path(args.model).is_file():
            parser.error(f"--model: no file {args.model}")
        torch.set_num_threads(args.threads)
        with tempfile.TemporaryDirectory(prefix="vocab-") as scratch:
            config = study_config(args.model, args.calibration, args.heldout)
            run(config, args.label, args.cache or Path(scratch), args.json)
        return 0
    for path in [*args.before, *args.after]:
        if not path.is_file():
            parser.error(f"no file {path}")
    frame = table(*([json.loads(path.read_text()) for path in paths] for paths in (args.before, args.after)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(args.out, index=False)
    print(frame.to_string(index=False))
    for column in ("cpu_seconds_before", "cpu_seconds_after", "seconds_before", "seconds_after"):
        ratio = trial_ratio(frame, column)
        if ratio is None:
            print(f"{column}: a trial was not measured on both models")
            continue
        verdict = "met" if ratio <= AIM else "not met"
        print(f"{column}: a trial of the larger vocabulary costs {ratio:.2f}x the smaller's (aim <= {AIM}x: {verdict})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
