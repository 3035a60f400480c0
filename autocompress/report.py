"""A study's outputs: trials.csv, frontier.csv, pareto.png, allocation.png and report.md."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import optuna
import pandas as pd
from matplotlib.figure import Figure

from autocompress.config import Config, parse_size
from autocompress.frontier import DENSE_HELDOUT_KEY, FrontierPoint, frontier_points

if TYPE_CHECKING:
    from autocompress.search.study import StudyLocation

TRIAL_COLUMNS = ["loss", "kl", "ce", "ppl", "size_bytes", "size_ratio", "objective", "stitch_s", "eval_s"]


def write_atomically(path: Path, write: Callable[[str], None]) -> None:
    """Let `write` fill a temporary file beside `path`, then rename it: a reader never sees half an output."""
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(descriptor)
    os.chmod(temporary, 0o644)
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def trials_frame(study: optuna.Study) -> pd.DataFrame:
    """Every trial: number, state, seconds, per-unit values, and what evaluation measured."""
    rows = []
    for trial in study.get_trials(deepcopy=False):
        seconds = None
        if trial.datetime_start and trial.datetime_complete:
            seconds = (trial.datetime_complete - trial.datetime_start).total_seconds()
        row = {"number": trial.number, "state": trial.state.name, "seconds": seconds}
        row |= {column: trial.user_attrs.get(column) for column in TRIAL_COLUMNS}
        row["seed"] = bool(trial.user_attrs.get("seed", False))
        row["fail_reason"] = trial.user_attrs.get("fail_reason", "")
        row |= dict(trial.params)
        rows.append(row)
    return pd.DataFrame(rows)


def frontier_frame(points: list[FrontierPoint]) -> pd.DataFrame:
    columns = ["trial", "loss", "size_bytes", "size_ratio", "objective", "heldout_ppl", "heldout_kl", "is_seed"]
    return pd.DataFrame([{column: getattr(point, column) for column in columns} for point in points], columns=columns)


def plot_pareto(trials: pd.DataFrame, points: list[FrontierPoint], path: Path, loss_name: str) -> None:
    complete = trials[trials["state"] == "COMPLETE"]
    figure = Figure(figsize=(7, 4.5))
    axes = figure.subplots()
    sampled = complete[~complete["seed"]]
    seeds = complete[complete["seed"]]
    axes.scatter(sampled["size_ratio"], sampled["loss"], s=14, color="tab:gray", alpha=0.6, label="trials")
    axes.scatter(
        seeds["size_ratio"],
        seeds["loss"],
        s=40,
        marker="s",
        facecolors="none",
        edgecolors="tab:blue",
        label="uniform seeds",
    )
    front = sorted(points, key=lambda point: point.size_ratio)
    axes.step([p.size_ratio for p in front], [p.loss for p in front], where="post", color="tab:red", linewidth=1)
    axes.scatter([p.size_ratio for p in front], [p.loss for p in front], s=24, color="tab:red", label="frontier")
    axes.set_xlabel("size (fraction of dense fp16 bytes)")
    axes.set_ylabel(f"loss ({loss_name} to dense, fitness tokens)")
    if (complete["loss"] > 0).all() and len(complete) and complete["loss"].max() / complete["loss"].min() > 50:
        axes.set_yscale("log")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    write_atomically(path, lambda temporary: figure.savefig(temporary, dpi=120, format="png"))


def allocation_frame(study: optuna.Study, trial_numbers: list[int], field: str) -> pd.DataFrame:
    """Per-unit values of `field` (sparsity or bits) for the given trials: units down, trials across."""
    columns = {}
    for number in trial_numbers:
        params = study.trials[number].params
        columns[f"#{number}"] = {
            key.removesuffix(f".{field}"): value for key, value in params.items() if key.endswith(f".{field}")
        }
    return pd.DataFrame(columns)


def plot_allocation(study: optuna.Study, points: list[FrontierPoint], path: Path) -> bool:
    """Heatmaps of per-unit sparsity and bits for a few frontier members; False when nothing varies."""
    chosen = [point.trial for point in sorted(points, key=lambda point: point.size_ratio)]
    if len(chosen) > 6:
        chosen = [chosen[round(index * (len(chosen) - 1) / 5)] for index in range(6)]
    frames = {field: allocation_frame(study, chosen, field) for field in ("sparsity", "bits")}
    frames = {field: frame for field, frame in frames.items() if not frame.empty}
    if not frames:
        return False
    height = 0.9 + 0.18 * max(map(len, frames.values()))
    figure = Figure(figsize=(4 + 2.5 * len(frames), height))
    axes = figure.subplots(1, len(frames), squeeze=False)
    for axis, (field, frame) in zip(axes[0], frames.items(), strict=True):
        image = axis.imshow(
            frame.to_numpy(dtype=float), aspect="auto", cmap="viridis_r" if field == "bits" else "viridis"
        )
        axis.set_title(field)
        axis.set_xticks(range(frame.shape[1]), frame.columns)
        axis.set_yticks(
            range(frame.shape[0]),
            [unit.rsplit(".", 1)[-1] if len(frame) > 40 else unit for unit in frame.index],
            fontsize=6,
        )
        figure.colorbar(image, ax=axis)
    figure.suptitle("per-unit allocation of frontier members (smallest to largest)")
    figure.tight_layout()
    write_atomically(path, lambda temporary: figure.savefig(temporary, dpi=110, format="png"))
    return True


def markdown_table(frame: pd.DataFrame) -> str:
    header = "| " + " | ".join(frame.columns) + " |"
    rule = "|" + "---|" * len(frame.columns)
    rows = []
    for _, row in frame.iterrows():
        cells = []
        for value in row:
            if isinstance(value, float):
                cells.append("" if pd.isna(value) else f"{value:.4g}")
            else:
                cells.append(str(value))
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join([header, rule, *rows])


def write_outputs(study: optuna.Study, location: StudyLocation, config: Config) -> None:
    """Write every output of the study into its folder; safe to call at any time, again and again."""
    out = location.out_dir
    out.mkdir(parents=True, exist_ok=True)
    search = config.search
    trials = trials_frame(study)
    dense_bytes = None
    complete = trials[trials["state"] == "COMPLETE"] if len(trials) else trials
    if len(complete):
        first = complete.iloc[0]
        dense_bytes = int(first["size_bytes"] / first["size_ratio"])
    max_bytes = None if search.max_size is None or dense_bytes is None else parse_size(search.max_size, dense_bytes)
    points = frontier_points(study, max_bytes, search.alpha, search.beta)
    write_atomically(out / "trials.csv", lambda temporary: trials.to_csv(temporary, index=False))
    frontier = frontier_frame(points)
    write_atomically(out / "frontier.csv", lambda temporary: frontier.to_csv(temporary, index=False))
    if not len(complete):
        return
    plot_pareto(trials, points, out / "pareto.png", search.loss)
    has_allocation = plot_allocation(study, points, out / "allocation.png")

    counts = trials["state"].value_counts().to_dict()
    dense_ppl = study.user_attrs.get(DENSE_HELDOUT_KEY, {}).get("ppl")
    best = points[0] if points else None
    lines = [
        f"# Study `{location.name}`",
        "",
        f"- model: `{config.model.name}`; data: `{config.data.source}` "
        f"({config.data.seq_len}-token windows: {config.data.calibration} calibration, "
        f"{config.data.fitness} fitness, {config.data.heldout} held-out)",
        f"- methods: pruning `{config.compression.pruning}` ({config.compression.pattern}), quantization "
        f"`{config.compression.quantization}` (group size {config.compression.group_size}), "
        f"per {config.compression.granularity}",
        "- trials: " + ", ".join(f"{count} {state.lower()}" for state, count in sorted(counts.items())),
        f"- objective: {search.objective}; loss: {search.loss} to the dense model on fitness tokens; "
        f"ranking by {search.alpha:g}·Loss + {search.beta:g}·Size (Size as a fraction of dense fp16 bytes)",
        f"- dense model: {dense_bytes:,} bytes in fp16"
        + (f", held-out perplexity {dense_ppl:.3f}" if dense_ppl else ""),
    ]
    if max_bytes is not None:
        lines.append(f"- size limit: {max_bytes:,} bytes; trials above it are not on the frontier")
    if best is not None:
        plan_params = study.trials[best.trial].params
        lines += [
            "",
            "## Best plan by α·Loss + β·Size",
            "",
            f"Trial {best.trial}: loss {best.loss:.4f}, {best.size_bytes:,} bytes ({best.size_ratio:.1%} of dense), "
            f"objective {best.objective:.4f}"
            + (f", held-out perplexity {best.heldout_ppl:.3f}" if best.heldout_ppl else "")
            + (" (a uniform seed)" if best.is_seed else ""),
            "",
            "```",
            *(f"{key}: {value}" for key, value in plan_params.items()),
            "```",
        ]
    lines += [
        "",
        "## Frontier (held-out figures on tokens the search never saw)",
        "",
        markdown_table(frontier),
        "",
        "![Pareto frontier](pareto.png)",
    ]
    if has_allocation:
        lines += ["", "## Per-unit allocation of frontier members", "", "![allocation](allocation.png)"]
    text = "\n".join(lines) + "\n"
    write_atomically(out / "report.md", lambda temporary: Path(temporary).write_text(text, encoding="utf-8"))
