"""How a study scales here: trials per hour with 1 and 2 Optuna workers, and what Ray Tune adds per trial.

Each scenario runs a fresh study through the real CLI (`autocompress search --n-trials 0` creates and seeds it,
then `autocompress worker --n-workers K` or `autocompress search --backend ray --concurrency K` runs it) and
reads the trial timestamps back from the study:

- trials_per_hour_wall: complete trials / wall time of the command (process start, model load, cluster start
  included); trials_per_hour_window: complete trials / (last trial end - first trial start), and
  seconds_per_trial, its inverse: the steady pace, gaps between trials included;
- median_trial_s: median wall time of a trial as the study records it (ask to tell), median_compute_s: median
  stitch + evaluation time measured inside it, median_overhead_s: median of their difference per trial (the
  storage round trips of the trial's attributes, ask and tell); bookkeeping_share: the part of the trials'
  summed wall time spent outside stitch and evaluation.

Ray's cost per trial is mostly outside ask..tell (Tune's scheduling loop between one trial's end and the next
ask), so the figure for it is seconds_per_trial with Ray minus without, one trial at a time.

The default workloads are the tests' tiny random Llama (2 blocks, hidden 64) with 32 fitness windows (trials
so short that overheads dominate) and with 512 (compute dominates); `--config` runs any study config instead.
Every process computes with one thread (OMP_NUM_THREADS=1, what Ray gives a 1-CPU trial), so 2 workers use 2
cores where 1 uses one. Results go to results/benchmarks/scaling.csv (a workload's rows replace its earlier ones).

    python benchmarks/scaling.py [--n-trials 40] [--fitness 32 512] [--config SPACE.yaml] [--storage URL]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path

import optuna
import pandas as pd
import torch
import yaml
from optuna.trial import TrialState

from autocompress.record import TrialRecord

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CLI = [sys.executable, "-c", "from autocompress.cli import main; main()"]
POSTGRES_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
TINY = "tiny random Llama (2 blocks, hidden 64, vocab 256)"


def tiny_config(folder: Path, fitness: int) -> Path:
    """The tests' tiny model and a random-word corpus in `folder`, and a search space over them."""
    from transformers import LlamaForCausalLM

    from tests.conftest import random_text, tiny_llama_config, tiny_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(folder / "model")
    tiny_tokenizer().save_pretrained(folder / "model")
    corpus = folder / "corpus.txt"
    corpus.write_text(random_text(30000, seed=1))
    config = {
        "model": {"name": str(folder / "model"), "device": "cpu"},
        "data": {"source": "files", "files": [str(corpus)], "seq_len": 32, "calibration": 8, "fitness": fitness},
        "compression": {"pruning": "wanda", "quantization": "rtn", "group_size": 32},
        "search": {"sparsity": [0.0, 0.2, 0.4, 0.6], "bits": [4, 8, 16], "seed": 0},
    }
    path = folder / "space.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def postgres_reachable() -> bool:
    try:
        import sqlalchemy

        with sqlalchemy.create_engine(POSTGRES_URL).connect():
            return True
    except Exception:
        return False


def run(command: list[str]) -> float:
    """Run a CLI command with one thread per process, as each worker or Ray trial gets (OMP_NUM_THREADS=1)."""
    began = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command[3:])} failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - began


def figures(study: optuna.Study, wall_s: float) -> dict:
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    seconds = [(trial.datetime_complete - trial.datetime_start).total_seconds() for trial in trials]
    compute = [TrialRecord.of(trial).stitch_s + TrialRecord.of(trial).eval_s for trial in trials]
    window = (
        max(trial.datetime_complete for trial in trials) - min(trial.datetime_start for trial in trials)
    ).total_seconds()
    return {
        "n_trials": len(trials),
        "wall_s": round(wall_s, 1),
        "trials_per_hour_wall": round(len(trials) / wall_s * 3600),
        "trials_per_hour_window": round(len(trials) / window * 3600),
        "seconds_per_trial": round(window / len(trials), 3),
        "median_trial_s": round(statistics.median(seconds), 3),
        "median_compute_s": round(statistics.median(compute), 3),
        "median_overhead_s": round(statistics.median(s - c for s, c in zip(seconds, compute, strict=True)), 3),
        "bookkeeping_share": round(1 - sum(compute) / sum(seconds), 3),
    }


def scenario(space: Path, out: Path, storage: str, backend: str, workers: int, n_trials: int) -> dict:
    name = f"scaling-{backend}{workers}-{uuid.uuid4().hex[:6]}"
    common = ["--study", name, "--results", str(out), "--storage", storage]
    run([*CLI, "search", str(space), *common, "--n-trials", "0", "--quiet"])  # create and seed; not timed
    load = os.getloadavg()[0]
    if backend == "optuna":
        command = [*CLI, "worker", *common, "--n-workers", str(workers), "--n-trials", str(n_trials), "--quiet"]
    else:
        command = [*CLI, "search", str(space), *common, "--n-trials", str(n_trials), "--quiet"]
        command += ["--backend", "ray", "--concurrency", str(workers), "--cpus-per-trial", "1"]
    wall = run(command)
    study = optuna.load_study(study_name=name, storage=storage)
    row = {"backend": backend, "workers": workers} | figures(study, wall) | {"load_avg_1m_at_start": round(load, 2)}
    if storage.startswith("postgresql"):
        optuna.delete_study(study_name=name, storage=storage)
    print(row, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="a study config YAML (default: the tests' tiny model)")
    parser.add_argument(
        "--fitness", type=int, nargs="+", default=[32, 512], help="fitness windows of the tiny model's trials"
    )
    parser.add_argument("--n-trials", type=int, default=40, help="complete trials per scenario")
    parser.add_argument("--storage", help=f"study storage (default: {POSTGRES_URL} if reachable, else SQLite)")
    parser.add_argument("--skip-ray", action="store_true")
    parser.add_argument("--csv", default=str(ROOT / "results" / "benchmarks" / "scaling.csv"))
    args = parser.parse_args()

    scenarios = [("optuna", 1), ("optuna", 2)] + ([] if args.skip_ray else [("ray", 1), ("ray", 2)])
    rows = []
    with tempfile.TemporaryDirectory(prefix="scaling-") as folder:
        folder = Path(folder)
        storage = args.storage or (POSTGRES_URL if postgres_reachable() else f"sqlite:///{folder / 'studies.db'}")
        if args.config:
            workloads = [
                (f"{yaml.safe_load(Path(args.config).read_text())['model']['name']} ({args.config})", Path(args.config))
            ]
        else:
            workloads = [
                (
                    f"{TINY}; {fitness} fitness windows of 32 tokens; wanda + rtn, 4 sparsity x 3 bit levels per block",
                    tiny_config(folder / f"fitness-{fitness}", fitness),
                )
                for fitness in args.fitness
            ]
        for described, space in workloads:
            for backend, workers in scenarios:
                row = scenario(space, folder / "results", storage, backend, workers, args.n_trials)
                rows.append({"model": described} | row)

    frame = pd.DataFrame(rows)
    frame["threads_per_trial"] = 1
    frame["storage"] = "postgresql" if storage.startswith("postgresql") else storage.split(":")[0]
    frame["cpu_cores"] = os.cpu_count()
    frame["date"] = datetime.now().strftime("%Y-%m-%d %H:%M")
    for described, group in frame.groupby("model", sort=False):
        local = group[(group["backend"] == "optuna") & (group["workers"] == 1)]
        ray = group[(group["backend"] == "ray") & (group["workers"] == 1)]
        if len(local) and len(ray):
            added = float(ray["seconds_per_trial"].iloc[0] - local["seconds_per_trial"].iloc[0])
            print(f"{described}: Ray Tune adds {added:.3f} s per trial (one trial at a time)")
    Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
    if Path(args.csv).is_file():  # the rows of other workloads stay
        earlier = pd.read_csv(args.csv)
        frame = pd.concat([earlier[~earlier["model"].isin(frame["model"])], frame], ignore_index=True)
    frame.to_csv(args.csv, index=False)
    print(frame.drop(columns=["model"]).to_string(index=False))
    print(f"wrote {args.csv}")


if __name__ == "__main__":
    main()
