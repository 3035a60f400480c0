"""Searched students against hand-picked ones, and knowledge distillation against plain cross-entropy training,
under one fixed compute budget, on the embedded model (SmolLM2-135M on CPython's documentation).

Every student trains for the same budget: `steps` optimizer steps of `batch` windows of `seq_len` tokens (the
budget is printed and written beside every row). Then it is judged on held-out tokens it never saw (perplexity,
and KL to the dense teacher) beside its honest size (fp16 bytes, as a fraction of the dense teacher's).

- searched: a small student search (`search.student`, Pareto objective, median pruner), a handful of trials over
  depth and MLP width; its students as the study measured them (held-out figures re-measured for each).
- hand-picked, of the sizes people pick by hand: every other decoder block kept (depth halved), and the MLP width
  halved (every block kept); beside them, half the depth with the blocks chosen by influence (Minitron's cut).
  Each trained twice from the same cut initialization: KD from the teacher, and plain next-token cross-entropy
  on the same tokens.
- the cut students before any training, and the dense teacher, for reference.

    .venv/bin/python benchmarks/students.py --quick    # a few minutes: tiny pools, a few steps
    .venv/bin/python benchmarks/students.py            # the full run (about 40 minutes on 2 idle CPU cores)
    .venv/bin/python benchmarks/students.py --parts hand-picked   # one part; its rows merge into the CSV

Writes results/benchmarks/students.csv and students.png (students-quick.* with --quick). Studies and caches live
in results/students-bench[-quick]/ (not committed); a rerun resumes the search and reuses distilled students.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd
import torch
from filelock import FileLock
from matplotlib.figure import Figure

from autocompress.config import Config
from autocompress.distillation import Importance, build_student, distill, evaluate_kd
from autocompress.metrics import evaluate
from autocompress.models import unit_names
from autocompress.plan import StudentArchitecture
from autocompress.record import TrialRecord
from autocompress.search import StudyLocation, run_search
from autocompress.search.objective import student_dense_bytes
from autocompress.search.space import SearchSpace
from autocompress.session import CompressionSession
from autocompress.students import distillation_options, teacher_shape

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Settings:
    mode: str
    seq_len: int
    steps: int
    batch: int
    calibration: int  # training windows (the calibration pool)
    fitness: int
    heldout: int
    trials: int
    report_every: int
    learning_rate: float

    @property
    def budget_tokens(self) -> int:
        return self.steps * self.batch * self.seq_len


QUICK = Settings(
    "quick",
    seq_len=32,
    steps=4,
    batch=2,
    calibration=48,
    fitness=4,
    heldout=8,
    trials=2,
    report_every=2,
    learning_rate=3e-4,
)
FULL = Settings(
    "full",
    seq_len=64,
    steps=24,
    batch=4,
    calibration=300,
    fitness=8,
    heldout=24,
    trials=3,
    report_every=8,
    learning_rate=3e-4,
)


def study_config(settings: Settings) -> Config:
    """The embedded default model and text, a student search over depth and MLP width, no other compression."""
    return Config.model_validate(
        {
            "data": {
                "seq_len": settings.seq_len,
                "calibration": settings.calibration,
                "fitness": settings.fitness,
                "heldout": settings.heldout,
                "batch_size": settings.batch,
            },
            "search": {
                "sparsity": [0.0],
                "bits": [16],
                "seeds": "none",
                "n_trials": settings.trials,
                "student": {
                    "num_layers": {"low": 16, "high": 22, "step": 2},
                    "intermediate_size": [768, 1024],
                    "distillation": {
                        "steps": settings.steps,
                        "batch_size": settings.batch,
                        "learning_rate": settings.learning_rate,
                        "report_every": settings.report_every,
                        "pruner": "median",
                        "startup_trials": 1,
                        "importance_windows": 16,
                    },
                },
            },
        }
    )


def hand_picked(teacher_config, importance: Importance) -> dict[str, tuple[StudentArchitecture, Importance]]:
    """The students people pick by hand, each with the importance its cut follows: every other block (blocks
    0, 2, 4, ... whatever they do), the MLP width halved (channels by activation), and for comparison the same
    depth as every other block but the blocks chosen by block influence (Minitron's depth cut)."""
    shape = teacher_shape(teacher_config)
    half_depth = StudentArchitecture(num_layers=shape["num_layers"] // 2)
    alternate = torch.tensor([1.0 - index % 2 for index in range(shape["num_layers"])])
    return {
        "every other block": (half_depth, replace(importance, blocks=alternate)),
        "half MLP width": (StudentArchitecture(intermediate_size=shape["intermediate_size"] // 2), importance),
        "half depth, most influential blocks": (half_depth, importance),
    }


def judged(session: CompressionSession, model, dense_bytes: int, shape: dict[str, int]) -> dict[str, float]:
    """Held-out perplexity and KL to the teacher, and the fp16 size of a student."""
    session.restore_dense()
    reference = session.reference("heldout")
    metrics = evaluate(model, session.pools.heldout, reference=reference, batch_size=session.batch_size)
    size = student_dense_bytes(session.model.config, shape)
    return {"heldout_ppl": metrics.ppl, "heldout_kl": metrics.kl, "size_bytes": size, "size_ratio": size / dense_bytes}


ROW_KEY = ["kind", "student", "training"]
TRAININGS = {"kd": {"loss": "kd"}, "kd+ce": {"loss": "kd", "ce_weight": 1.0}, "ce": {"loss": "ce"}}


def recorded(out: Path, rows: list[dict], lock: Path) -> pd.DataFrame:
    """The CSV's rows with `rows` in place of those of the same key: parts run apart (or again) add up."""
    with FileLock(lock):
        frame = pd.DataFrame(rows)
        if out.is_file():
            earlier = pd.read_csv(out)
            keys = set(map(tuple, frame[ROW_KEY].to_numpy().tolist()))
            kept = earlier[[tuple(key) not in keys for key in earlier[ROW_KEY].to_numpy().tolist()]]
            frame = pd.concat([kept, frame], ignore_index=True)
        rank = frame["kind"].map({"teacher": 0, "searched": 1, "hand-picked": 2})
        frame = frame.assign(rank=rank).sort_values(["rank", "student"], kind="stable").drop(columns="rank")
        frame.to_csv(out, index=False, float_format="%.6g")
        return frame


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few minutes: tiny pools, a few steps")
    parser.add_argument(
        "--parts",
        default="search,hand-picked",
        help="search (the teacher and searched students), hand-picked (KD and CE): run apart, their rows merge",
    )
    parser.add_argument(
        "--hand-picked", action="append", help="a hand-picked student to train, by name; repeatable (default: all)"
    )
    parser.add_argument(
        "--trainings",
        default=",".join(TRAININGS),
        help="hand-picked students' trainings: kd (KL to the teacher), kd+ce (plus the labels' cross-entropy, "
        "weight 1), ce (labels alone)",
    )
    parser.add_argument("--work", type=Path, help="study and caches (default: results/students-bench[-quick])")
    parser.add_argument("--out", type=Path, help="CSV (default: results/benchmarks/students[-quick].csv)")
    args = parser.parse_args(argv)
    parts = set(args.parts.split(","))
    trainings = args.trainings.split(",")
    if not set(trainings) <= set(TRAININGS):
        parser.error(f"--trainings: choose from {', '.join(TRAININGS)}; got {args.trainings!r}")
    if not parts or not parts <= {"search", "hand-picked"}:
        parser.error(f"--parts: choose from search, hand-picked; got {args.parts!r}")
    settings = QUICK if args.quick else FULL
    suffix = "-quick" if args.quick else ""
    work = args.work or ROOT / "results" / f"students-bench{suffix}"
    out = args.out or ROOT / "results" / "benchmarks" / f"students{suffix}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()

    def log(line: str) -> None:
        print(f"[{time.perf_counter() - began:7.0f} s] {line}", flush=True)

    config = study_config(settings)
    log(
        f"budget per student: {settings.steps} steps x {settings.batch} windows x {settings.seq_len} tokens "
        f"= {settings.budget_tokens:,} tokens"
    )
    location = StudyLocation.resolve("students", work)
    study = None
    if "search" in parts:
        study = run_search(config, location, n_trials=settings.trials, progress=False)
        log(f"search: {len(study.trials)} trials")

    session = CompressionSession(config, cache_dir=location.cache_dir)
    dense_bytes = session.dense_bytes
    teacher = session.model
    rows: list[dict] = []
    common = {"budget_steps": settings.steps, "budget_batch": settings.batch, "budget_seq_len": settings.seq_len}

    def add(kind: str, name: str, training: str, shape: dict[str, int], figures: dict, **extra: object) -> None:
        rows.append({"kind": kind, "student": name, "training": training, **shape, **figures, **common, **extra})
        log(f"{kind} / {name} / {training}: {figures}")
        recorded(out, rows, work / "csv.lock")  # after every row: a partial run leaves its figures

    if study is not None:
        teacher_figures = judged(session, teacher, dense_bytes, teacher_shape(teacher.config))
        add("teacher", "dense SmolLM2-135M", "none", teacher_shape(teacher.config), teacher_figures)
        space = SearchSpace(config, unit_names(teacher, config.compression.granularity))
        for trial in study.trials:
            if TrialRecord.of(trial).architecture is None:
                continue
            shape = TrialRecord.of(trial).architecture
            name = f"trial {trial.number}: {shape['num_layers']} blocks, MLP {shape['intermediate_size']}"
            if trial.state.name != "COMPLETE":
                stopped_at = TrialRecord.of(trial).pruned_at_step
                training = f"kd, stopped by the pruner at step {stopped_at}"
                add("searched", name, training, shape, {}, fitness_kl=TrialRecord.of(trial).partial_loss)
                continue
            measured = session.measure(space.plan_from_params(trial.params), pool="heldout")  # the cached student
            figures = {
                "heldout_ppl": measured.metrics.ppl,
                "heldout_kl": measured.metrics.kl,
                "size_bytes": measured.size.total_bytes,
                "size_ratio": measured.size.ratio,
            }
            add("searched", name, "kd", shape, figures, fitness_kl=TrialRecord.of(trial).loss)

    if "hand-picked" in parts:
        importance = session.trainer.importance()
        options = distillation_options(config.search.student.distillation, settings.seq_len)
        for name, (architecture, cut_by) in hand_picked(teacher.config, importance).items():
            if args.hand_picked and name not in args.hand_picked:
                continue
            shape = architecture.resolved(teacher.config)
            initial = build_student(teacher, architecture, cut_by)
            add("hand-picked", name, "none (cut only)", shape, judged(session, initial, dense_bytes, shape))
            for training in trainings:
                student = build_student(teacher, architecture, cut_by)  # the same initialization each time
                distill(student, teacher, session.pools.calibration, replace(options, **TRAININGS[training]))
                fitness_kl = evaluate_kd(student, teacher, session.pools.fitness, settings.batch)
                figures = judged(session, student, dense_bytes, shape)
                add("hand-picked", name, training, shape, figures, fitness_kl=fitness_kl)

    frame = recorded(out, rows, work / "csv.lock")
    plot(frame, out.with_suffix(".png"), settings)
    log(f"wrote {out} and {out.with_suffix('.png')}")


def plot(frame: pd.DataFrame, path: Path, settings: Settings) -> None:
    figure = Figure(figsize=(7.5, 4.5))
    axes = figure.subplots()
    styles = {
        ("searched", "kd"): ("tab:green", "^", "searched, KD"),
        ("hand-picked", "kd"): ("tab:blue", "o", "hand-picked, KD"),
        ("hand-picked", "kd+ce"): ("tab:purple", "D", "hand-picked, KD + cross-entropy"),
        ("hand-picked", "ce"): ("tab:orange", "s", "hand-picked, cross-entropy"),
        ("hand-picked", "none (cut only)"): ("tab:gray", "x", "hand-picked, cut, untrained"),
    }
    for (kind, training), (color, marker, label) in styles.items():
        part = frame[(frame["kind"] == kind) & (frame["training"] == training)].dropna(subset=["heldout_ppl"])
        if len(part):
            axes.scatter(part["size_ratio"], part["heldout_ppl"], color=color, marker=marker, s=36, label=label)
        if training == "kd":  # each student named once, beside its KD point
            for row in part.drop_duplicates(subset=["size_ratio", "heldout_ppl"]).itertuples():  # a reused student
                axes.annotate(
                    row.student,
                    (row.size_ratio, row.heldout_ppl),
                    fontsize=6,
                    xytext=(4, 3),
                    textcoords="offset points",
                )
    teacher = frame[frame["kind"] == "teacher"]
    if len(teacher):
        ppl = teacher["heldout_ppl"].iloc[0]
        axes.axhline(ppl, color="black", linewidth=0.8, linestyle="--", label="dense teacher")
    axes.set_yscale("log")
    axes.set_xlabel("size (fraction of the dense teacher's fp16 bytes)")
    axes.set_ylabel("held-out perplexity")
    axes.set_title(
        f"students at one budget: {settings.steps} steps x {settings.batch} x {settings.seq_len} tokens",
        fontsize=10,
    )
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
