"""A study's outputs: trials.csv, frontier.csv, pareto.png, allocation.png and report.md."""

from __future__ import annotations

import base64
import html
import io
import tempfile
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path

import optuna
import pandas as pd
from matplotlib.figure import Figure

from autocompress.config import Config
from autocompress.files import write_atomically, write_text_atomically
from autocompress.frontier import FrontierPoint, frontier_points
from autocompress.plan import parse_level
from autocompress.record import StudyLocation, StudyRecord, TrialRecord, trial_records
from autocompress.students import ARCHITECTURE_COLUMNS, architecture_columns
from autocompress.targets import DEFAULT_TARGET, target_named

TRIAL_COLUMNS = ["loss", "kl", "ce", "ppl", "size_bytes", "size_ratio", "objective", "stitch_s", "eval_s"]
SPEED_COLUMNS = ["predicted_decode_tps", "predicted_prompt_tps", "speed_ratio"]  # where the study predicts speed


def trials_frame(records: list[TrialRecord]) -> pd.DataFrame:
    """Every trial: number, state, seconds, per-unit values, and what evaluation measured (and predicted speed,
    where the study predicts it)."""
    columns = TRIAL_COLUMNS + (SPEED_COLUMNS if any(record.predicted_decode_tps for record in records) else [])
    rows = []
    for record in records:
        row = {"number": record.number, "state": record.state.name, "seconds": record.duration_s}
        row |= {column: getattr(record, column) for column in columns}
        row |= {"seed": record.seed, "baseline": record.baseline, "fail_reason": record.fail_reason}
        if record.architecture is not None:  # a study with students: every trial's shape, the teacher's too
            row["student"] = record.student
            row |= architecture_columns(record.architecture)
        row |= record.params
        rows.append(row)
    return pd.DataFrame(rows)


ALLOCATION_FIELDS = ("sparsity", "bits", "format")  # the per-unit parameters a plan's trial holds


def allocation_summary(params: Mapping[str, float | int | str]) -> str:
    """How many units take each level, per field: e.g. 'format nf4×18 int4-g128×12; sparsity 0.3×30'."""
    parts = []
    for field in ALLOCATION_FIELDS:
        counts = Counter(_level_text(value) for key, value in params.items() if key.endswith(f".{field}"))
        if counts:
            parts.append(f"{field} " + " ".join(f"{level}×{count}" for level, count in counts.most_common()))
    return "; ".join(parts)


def _level_text(value: float | int | str) -> str:
    return value if isinstance(value, str) else f"{value:g}"


def methods_text(config: Config, open_code: str, close_code: str | None = None) -> str:
    """The study's methods in one line, names marked as code (Markdown's backticks or HTML's tags)."""
    close_code = open_code if close_code is None else close_code
    compression = config.compression

    def code(text: str) -> str:
        return f"{open_code}{text}{close_code}"

    own = target_named(compression.target).describe(compression, code)
    if own is not None:
        return own
    target = "" if compression.target == DEFAULT_TARGET else f"target {code(compression.target)}; "
    return (
        f"{target}pruning {code(compression.pruning)} ({compression.pattern}), quantization "
        f"{code(compression.quantization)} (group size {compression.group_size}), per {compression.granularity}"
    )


def dense_form(config: Config) -> str:
    """What the dense bytes are as the study's target counts them (every parameter in 16 bits, an F16 file...)."""
    return target_named(config.compression.target).dense_form


def ranking_text(search, symbols: bool = False) -> str:
    """The frontier's ranking: α·Loss + β·Size, − γ·Speed where speed is an objective (with the weights, or their
    symbols)."""
    weights = ("α", "β", "γ") if symbols else (f"{search.alpha:g}", f"{search.beta:g}", f"{search.gamma:g}")
    text = f"{weights[0]}·Loss + {weights[1]}·Size"
    return text + (f" − {weights[2]}·Speed" if search.speed_objective else "")


def frontier_frame(
    points: list[FrontierPoint], params_of: Mapping[int, Mapping], per_unit: bool = True
) -> pd.DataFrame:
    """The frontier's figures, each member's allocation in brief, architecture columns when its study has
    students and, with `per_unit`, every unit's level."""
    columns = ["trial", "loss", "size_bytes", "size_ratio"]
    columns += ["predicted_decode_tps", "speed_ratio"] if any(point.predicted_decode_tps for point in points) else []
    columns += ["objective", "heldout_ppl", "heldout_kl", "is_seed", "baseline"]
    with_students = any(point.architecture for point in points)
    rows = []
    for point in points:
        params = params_of[point.trial]
        row = {column: getattr(point, column) for column in columns} | {"allocation": allocation_summary(params)}
        if with_students:
            row |= {"student": point.is_student} | architecture_columns(point.architecture or {})
        rows.append(row | (dict(params) if per_unit else {}))
    empty = [*columns, "allocation", *(["student", *ARCHITECTURE_COLUMNS] if with_students else [])]
    return pd.DataFrame(rows, columns=None if rows else empty)


def plot_pareto(trials: pd.DataFrame, points: list[FrontierPoint], path: Path, loss_name: str, dense: str) -> None:
    """Loss against size, the frontier in red; beside it, where the study predicts speed, loss against the predicted
    decode tokens/s (the frontier's projections)."""
    complete = trials[trials["state"] == "COMPLETE"]
    speed = "predicted_decode_tps" in complete and complete["predicted_decode_tps"].notna().any()
    figure = Figure(figsize=(12.5, 4.5) if speed else (7, 4.5))
    axes = figure.subplots(1, 2 if speed else 1)
    panels = [("size_ratio", f"size (fraction of the dense bytes {dense})")]
    panels += [("predicted_decode_tps", "predicted decode tokens/s")] if speed else []
    for axis, (column, label) in zip(axes if speed else [axes], panels, strict=True):
        _pareto_panel(axis, complete, points, column, label, loss_name)
    figure.tight_layout()
    write_atomically(path, lambda temporary: figure.savefig(temporary, dpi=120, format="png"))


def _pareto_panel(axes, complete: pd.DataFrame, points: list[FrontierPoint], column: str, label: str, loss_name: str):
    """One projection: every complete trial's loss against `column`, seeds marked, the frontier in red."""
    no_students = pd.Series(False, index=complete.index)
    students = complete["student"].fillna(False).astype(bool) if "student" in complete else no_students
    sampled = complete[~complete["seed"] & ~students]
    seeds = complete[complete["seed"] & ~students]
    axes.scatter(sampled[column], sampled["loss"], s=14, color="tab:gray", alpha=0.6, label="trials")
    if students.any():
        axes.scatter(
            complete[students][column],
            complete[students]["loss"],
            s=22,
            marker="^",
            color="tab:green",
            alpha=0.8,
            label="distilled students",
        )
    axes.scatter(
        seeds[column],
        seeds["loss"],
        s=40,
        marker="s",
        facecolors="none",
        edgecolors="tab:blue",
        label="seeds (uniform plans, baselines, presets)",
    )
    for _, seed in seeds[seeds["baseline"].notna()].iterrows():
        axes.annotate(
            seed["baseline"], (seed[column], seed["loss"]), fontsize=7, xytext=(3, 3), textcoords="offset points"
        )
    field = "size_ratio" if column == "size_ratio" else "predicted_decode_tps"
    front = sorted(points, key=lambda point: getattr(point, field))
    xs, ys = [getattr(point, field) for point in front], [point.loss for point in front]
    if field == "size_ratio":  # on size alone the frontier is a staircase; its speed projection is a scatter
        axes.step(xs, ys, where="post", color="tab:red", linewidth=1)
    axes.scatter(xs, ys, s=24, color="tab:red", label="frontier")
    axes.set_xlabel(label)
    axes.set_ylabel(f"loss ({loss_name} to dense, fitness tokens)")
    if (complete["loss"] > 0).all() and len(complete) and complete["loss"].max() / complete["loss"].min() > 50:
        axes.set_yscale("log")
    axes.grid(alpha=0.3)
    axes.legend()


def allocation_frame(params_of: Mapping[int, Mapping], trial_numbers: list[int], field: str) -> pd.DataFrame:
    """Per-unit values of `field` (sparsity, bits or format) for the given trials: units down, trials across."""
    columns = {}
    for number in trial_numbers:
        params = params_of[number]
        columns[f"#{number}"] = {
            key.removesuffix(f".{field}"): value for key, value in params.items() if key.endswith(f".{field}")
        }
    return pd.DataFrame(columns)


def plot_allocation(params_of: Mapping[int, Mapping], points: list[FrontierPoint], path: Path) -> bool:
    """Heatmaps of per-unit sparsity and bit-width or format for a few frontier members; False when nothing
    varies. Formats are coloured by rank of bits (then name), their names on the colour bar."""
    chosen = [point.trial for point in sorted(points, key=lambda point: point.size_ratio)]
    if len(chosen) > 6:
        chosen = [chosen[round(index * (len(chosen) - 1) / 5)] for index in range(6)]
    frames = {field: allocation_frame(params_of, chosen, field) for field in ALLOCATION_FIELDS}
    frames = {field: frame for field, frame in frames.items() if not frame.empty}
    if not frames:
        return False
    height = 0.9 + 0.18 * max(map(len, frames.values()))
    figure = Figure(figsize=(4 + 2.5 * len(frames), height))
    axes = figure.subplots(1, len(frames), squeeze=False)
    for axis, (field, frame) in zip(axes[0], frames.items(), strict=True):
        names: list[str] = []
        if field == "format":
            names = sorted(set(frame.stack()), key=lambda name: (parse_level(name).bits, name))
            rank = {name: index for index, name in enumerate(names)}
            values = frame.map(rank.get).to_numpy(dtype=float)
        else:
            values = frame.to_numpy(dtype=float)
        image = axis.imshow(values, aspect="auto", cmap="viridis" if field == "sparsity" else "viridis_r")
        axis.set_title(field)
        axis.set_xticks(range(frame.shape[1]), frame.columns)
        axis.set_yticks(
            range(frame.shape[0]),
            [unit.rsplit(".", 1)[-1] if len(frame) > 40 else unit for unit in frame.index],
            fontsize=6,
        )
        colorbar = figure.colorbar(image, ax=axis)
        if names:
            colorbar.set_ticks(range(len(names)), labels=names)
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
            if value is None:
                cells.append("")
            elif isinstance(value, float):
                cells.append("" if pd.isna(value) else f"{value:.4g}")
            else:
                cells.append(str(value))
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join([header, rule, *rows])


def compact_allocation(params: Mapping[str, float | int | str]) -> list[str]:
    """One line per field listing every unit's value in order, instead of one line per parameter."""
    lines = []
    student = {key.removeprefix("student."): value for key, value in params.items() if key.startswith("student.")}
    if student:
        lines.append("- student: " + ", ".join(f"{dimension} {value}" for dimension, value in student.items()))
    for field in ALLOCATION_FIELDS:
        values = [value for key, value in params.items() if key.endswith(f".{field}")]
        if values:
            lines.append(f"- {field} per unit: " + ", ".join(map(_level_text, values)))
    return lines or ["- every unit at the space's single level"]


class StudyOutputs:
    """A study as its outputs show it: its record, every trial's record, and the frontier ranked by its α, β."""

    def __init__(self, study: optuna.Study) -> None:
        self.study = StudyRecord.of(study)
        self.records = trial_records(study)
        self.params_of = {record.number: record.params for record in self.records}
        search = self.config.search
        self.max_bytes = self.study.max_bytes()
        self.min_tps = self.study.min_tps()
        self.points = frontier_points(
            self.study, self.records, self.max_bytes, search.alpha, search.beta, min_tps=self.min_tps
        )
        self.trials = trials_frame(self.records)
        self.dense_ppl = None if self.study.dense_heldout is None else self.study.dense_heldout.ppl

    @property
    def config(self) -> Config:
        return self.study.config

    @property
    def complete(self) -> pd.DataFrame:
        return self.trials[self.trials["state"] == "COMPLETE"] if len(self.trials) else self.trials


def write_outputs(study: optuna.Study, location: StudyLocation) -> None:
    """Write every output of the study into its folder; safe to call at any time, again and again."""
    outputs = StudyOutputs(study)
    config, trials, points = outputs.config, outputs.trials, outputs.points
    out = location.out_dir
    out.mkdir(parents=True, exist_ok=True)
    search = config.search
    dense_bytes, max_bytes = outputs.study.dense_bytes, outputs.max_bytes
    write_atomically(out / "trials.csv", lambda temporary: trials.to_csv(temporary, index=False))
    frontier = frontier_frame(points, outputs.params_of)
    write_atomically(out / "frontier.csv", lambda temporary: frontier.to_csv(temporary, index=False))
    if not len(outputs.complete):
        return
    plot_pareto(trials, points, out / "pareto.png", search.loss, dense_form(config))
    has_allocation = plot_allocation(outputs.params_of, points, out / "allocation.png")

    counts = trials["state"].value_counts().to_dict()
    dense_ppl = outputs.dense_ppl
    best = points[0] if points else None
    lines = [
        f"# Study `{location.name}`",
        "",
        f"- model: `{config.model.name}`; data: `{config.data.source}` "
        f"({config.data.seq_len}-token windows: {config.data.calibration} calibration, "
        f"{config.data.fitness} fitness, {config.data.heldout} held-out)",
        f"- methods: {methods_text(config, '`')}",
        "- trials: " + ", ".join(f"{count} {state.lower()}" for state, count in sorted(counts.items())),
        f"- objective: {search.objective} over [{', '.join(search.objectives)}]; loss: {search.loss} to the dense "
        f"model on fitness tokens; ranking by {ranking_text(search)} "
        f"(Size as a fraction of the dense bytes {dense_form(config)}"
        + ("; Speed as a multiple of the dense model's predicted decode tokens/s)" if search.speed_objective else ")"),
        f"- dense model: {dense_bytes:,} bytes {dense_form(config)}"
        + (f", held-out perplexity {dense_ppl:.3f}" if dense_ppl else ""),
    ]
    if max_bytes is not None:
        lines.append(f"- size limit: {max_bytes:,} bytes; trials above it are not on the frontier")
    speed = outputs.study.speed
    if speed is not None:
        lines.append(
            f"- speed: decode tokens/s predicted by {target_named(config.compression.target).runtime}'s speed table on "
            f"{speed.threads} thread(s) (the dense model: {speed.dense_decode_tps:,.1f})"
            + (
                ""
                if outputs.min_tps is None
                else f"; floor {outputs.min_tps:,.1f} ({search.min_speed}), slower trials are not on the frontier"
            )
        )
    if best is not None:
        plan_params = outputs.params_of[best.trial]
        lines += [
            "",
            f"## Best plan by {ranking_text(search, symbols=True)}",
            "",
            f"Trial {best.trial}: loss {best.loss:.4f}, {best.size_bytes:,} bytes ({best.size_ratio:.1%} of dense), "
            + ("" if best.predicted_decode_tps is None else f"{best.predicted_decode_tps:,.1f} tokens/s predicted, ")
            + f"objective {best.objective:.4f}"
            + (f", held-out perplexity {best.heldout_ppl:.3f}" if best.heldout_ppl else "")
            + (f" (the seed {best.baseline})" if best.baseline else " (a uniform seed)" if best.is_seed else ""),
            "",
            *compact_allocation(plan_params),
        ]
    lines += [
        "",
        "## Frontier (held-out figures on tokens the search never saw)",
        "",
        markdown_table(frontier_frame(points, outputs.params_of, per_unit=False)),
        "",
        "![Pareto frontier](pareto.png)",
    ]
    if has_allocation:
        lines += ["", "## Per-unit allocation of frontier members", "", "![allocation](allocation.png)"]
    write_text_atomically(out / "report.md", "\n".join(lines) + "\n")


# --- report.html: one self-contained page (images embedded as base64 PNG) ------------------------------------


def png_base64(figure: Figure, dpi: int = 110) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, dpi=dpi, format="png")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def plot_history(trials: pd.DataFrame, alpha: float, beta: float, loss_name: str) -> Figure | None:
    """α·Loss + β·Size of each complete trial by trial number with the best so far; beside it, the loss of each
    trial coloured by its size."""
    complete = trials[trials["state"] == "COMPLETE"].dropna(subset=["loss", "size_ratio"]) if len(trials) else trials
    if not len(complete):
        return None
    complete = complete.sort_values("number")
    objective = alpha * complete["loss"] + beta * complete["size_ratio"]
    seeds = complete["seed"].astype(bool)
    figure = Figure(figsize=(10, 3.6))
    left, right = figure.subplots(1, 2)
    left.scatter(complete["number"][~seeds], objective[~seeds], s=14, color="tab:gray", label="sampled")
    left.scatter(
        complete["number"][seeds],
        objective[seeds],
        s=30,
        marker="s",
        facecolors="none",
        edgecolors="tab:blue",
        label="seeds",
    )
    left.step(complete["number"], objective.cummin(), where="post", color="tab:red", label="best so far")
    left.set_ylabel(f"{alpha:g}·Loss + {beta:g}·Size")
    left.set_title("objective by trial")
    left.legend(fontsize=8)
    points = right.scatter(complete["number"], complete["loss"], s=18, c=complete["size_ratio"], cmap="viridis")
    figure.colorbar(points, ax=right, label="size (fraction of dense)")
    right.set_ylabel(f"loss ({loss_name} to dense)")
    right.set_title("loss by trial")
    if (complete["loss"] > 0).all() and complete["loss"].max() / complete["loss"].min() > 50:
        right.set_yscale("log")
    for axes in (left, right):
        axes.set_xlabel("trial")
        axes.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def plot_sensitivity(profile: dict) -> Figure | None:
    units = [unit for unit in profile.get("units", profile["values"]) if unit in profile["values"]]
    if not units:
        return None
    values = [profile["values"][unit] for unit in units]
    figure = Figure(figsize=(max(6, 0.22 * len(units) + 2), 3.8))
    axes = figure.subplots()
    axes.bar(range(len(units)), values, color="tab:purple")
    labels = [unit.removeprefix("model.layers.") for unit in units]
    axes.set_xticks(range(len(units)), labels, rotation=90, fontsize=6 if len(units) > 40 else 8)
    setting = profile["setting"]
    axes.set_ylabel(f"{profile['loss']} to dense (fitness tokens)")
    axes.set_title(
        f"sensitivity: each unit alone at sparsity {setting['sparsity']:g}, "
        + (f"{setting['bits']} bits" if "bits" in setting else setting["format"])
        + ", the rest dense"
    )
    if min(values) > 0 and max(values) / min(values) > 50:
        axes.set_yscale("log")
    axes.grid(alpha=0.3, axis="y")
    figure.tight_layout()
    return figure


def _file_base64(render: Callable[[Path], object]) -> str | None:
    """Let `render(path)` draw into a temporary PNG (the report's own plot functions), and return it as base64."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "figure.png"
        drawn = render(path)
        if drawn is False or not path.is_file():
            return None
        return base64.b64encode(path.read_bytes()).decode("ascii")


def write_html_report(study: optuna.Study, location: StudyLocation, sensitivity: dict | None = None) -> Path:
    """report.html beside report.md: the frontier plot, per-unit allocations, trial history, sensitivity profile,
    and the frontier table; one file, nothing loaded from elsewhere."""
    outputs = StudyOutputs(study)
    config, trials, points, complete = outputs.config, outputs.trials, outputs.points, outputs.complete
    out = location.out_dir
    out.mkdir(parents=True, exist_ok=True)
    search = config.search
    dense_bytes, dense_ppl = outputs.study.dense_bytes, outputs.dense_ppl

    sections: list[tuple[str, str | None, str]] = []  # (title, base64 PNG, caption)
    if len(complete):
        sections.append(
            (
                "Pareto frontier",
                _file_base64(lambda path: plot_pareto(trials, points, path, search.loss, dense_form(config))),
                "Every complete trial by size and loss; the frontier in red.",
            )
        )
        sections.append(
            (
                "Per-unit allocation of frontier members",
                _file_base64(lambda path: plot_allocation(outputs.params_of, points, path)),
                "Sparsity and bit-width each unit gets, frontier members from smallest to largest.",
            )
        )
        history = plot_history(trials, search.alpha, search.beta, search.loss)
        sections.append(
            ("Trial history", png_base64(history) if history else None, "Objective and loss by trial number.")
        )
    if sensitivity:
        figure = plot_sensitivity(sensitivity)
        sections.append(
            (
                "Per-unit sensitivity",
                png_base64(figure) if figure else None,
                "How far the model moves when only one unit is compressed at the search's most aggressive level.",
            )
        )

    summary = [
        f"model <code>{html.escape(config.model.name)}</code>; data <code>{config.data.source}</code> "
        f"({config.data.seq_len}-token windows: {config.data.calibration} calibration, {config.data.fitness} "
        f"fitness, {config.data.heldout} held-out)",
        f"methods: {methods_text(config, '<code>', '</code>')}",
        "trials: "
        + ", ".join(f"{count} {state.lower()}" for state, count in sorted(trials["state"].value_counts().items()))
        if len(trials)
        else "trials: none yet",
        f"ranking by {search.alpha:g}·Loss + {search.beta:g}·Size "
        f"(Size as a fraction of the dense bytes {dense_form(config)})",
    ]
    if dense_bytes is not None:
        summary.append(
            f"dense model: {dense_bytes:,} bytes {dense_form(config)}"
            + (f", held-out perplexity {dense_ppl:.3f}" if dense_ppl else "")
        )
    if points:
        best = points[0]
        summary.append(
            f"best plan: trial {best.trial}, loss {best.loss:.4f}, {best.size_bytes:,} bytes "
            f"({best.size_ratio:.1%} of dense)"
            + (f", held-out perplexity {best.heldout_ppl:.3f}" if best.heldout_ppl else "")
            + f" &mdash; export it with <code>autocompress export --study {html.escape(location.name)} "
            "--pick best --out DIR</code>"
        )

    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>autocompress study {html.escape(location.name)}</title>",
        "<style>body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
        "img{max-width:100%;border:1px solid #ddd}table{border-collapse:collapse;font-size:0.9em}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}code{background:#f4f4f4;padding:0 3px}"
        "figcaption{color:#555;font-size:0.9em}</style></head><body>",
        f"<h1>Study <code>{html.escape(location.name)}</code></h1>",
        "<ul>" + "".join(f"<li>{line}</li>" for line in summary) + "</ul>",
    ]
    for title, image, caption in sections:
        parts.append(f"<h2>{html.escape(title)}</h2>")
        if image is None:
            parts.append("<p>Nothing to show yet.</p>")
        else:
            parts.append(
                f'<figure><img alt="{html.escape(title)}" src="data:image/png;base64,{image}">'
                f"<figcaption>{html.escape(caption)}</figcaption></figure>"
            )
    frontier = frontier_frame(points, outputs.params_of, per_unit=False)
    parts += [
        "<h2>Frontier (held-out figures on tokens the search never saw)</h2>",
        frontier.to_html(index=False, float_format=lambda value: f"{value:.4g}", na_rep="", border=0),
        "</body></html>",
    ]
    path = out / "report.html"
    write_text_atomically(path, "\n".join(parts) + "\n")
    return path
