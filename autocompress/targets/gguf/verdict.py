"""The verdict of a gguf study searched under a preset's size (`budget: {size: q4_k_m}`): llama.cpp's judgement of the
searched file against the preset's, the way the field reports it.

After the search (and on `report`), three files are written into results/<study>/verdict/ and scored by llama.cpp on
the study's held-out windows (`evaluation.evaluate_gguf`, as `autocompress evaluate A.gguf --against B.gguf` does):

- the searched file: the recorded plan under the budget with the lowest fitness loss, exported (`export_trial`);
- the preset's file: our reproduction of `llama-quantize --imatrix` with that preset: llama.cpp's type for each
  tensor (`presets.preset_types`, through the study's own preset seed) and its block bytes, the study's calibration
  windows as the importance matrix; `results/benchmarks/gguf.csv` shows these tensors byte-identical to llama.cpp's;
- the F16 base, every matrix in F16 as llama.cpp's converter stores it.

`verdict.md` and `verdict.csv` hold the table `preset | searched | gap closed | 95% CI` (the share of the preset's
perplexity gap to the dense base that the searched file closes, bootstrap over windows:
`metrics.gap_closed`) with each file's size, held-out perplexity and KL statistics; `verdict.png` plots them.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autocompress.errors import UserError

if TYPE_CHECKING:
    import optuna
    import torch

    from autocompress.record import StudyLocation, TrialRecord

VERDICT_DIR = "verdict"
F16_FILE = "base-f16.gguf"
CSV_FIELDS = (
    "file",
    "path",
    "trial",
    "seed",
    "size_bytes",
    "heldout_ppl",
    "heldout_mean_kld",
    "heldout_kld_99_9",
    "heldout_median_kld",
    "heldout_same_top_p",
    "heldout_rms_dp",
    "delta_nll_per_token",
    "delta_ci_low",
    "delta_ci_high",
    "windows_better",
    "windows",
    "gap_closed",
    "gap_closed_ci_low",
    "gap_closed_ci_high",
    "verdict",
)


def budget_preset(config) -> str | None:
    """The llama.cpp preset a study's size budget names, or None (no budget, or one in bytes or a fraction)."""
    from autocompress.targets.gguf.preset_sizes import preset_names

    budget = config.search.budget
    size = None if budget is None else budget.size
    return size.lower() if isinstance(size, str) and size.lower() in preset_names() else None


def write_verdict(study: optuna.Study, location: StudyLocation) -> list[str]:
    """Write (or, when the chosen trial has not changed, reread) the study's verdict; the table's lines to print.
    Nothing for a study whose budget names no preset."""
    from autocompress.record import StudyRecord, trial_records
    from autocompress.targets.gguf.llama_cpp import llama_cpp_available

    record = StudyRecord.of(study)
    preset = budget_preset(record.config)
    if preset is None:
        return []
    chosen = searched_trial(record, trial_records(study))
    # The study stands in each case below; only what its verdict needs is missing, said in one line.
    if chosen is None:
        ceiling = record.config.search.budget.max_bytes(record.dense_bytes, record.config)
        floor = record.min_tps()
        at = "" if floor is None else f" at {floor:,.1f} predicted tokens/s or more"
        return [
            f"no llama.cpp verdict against {preset.upper()}: no trial fit the budget's {ceiling:,} bytes{at} "
            "(search longer: the study resumes)"
        ]
    unreproducible = preset_refusal(record.config, preset)
    if unreproducible is not None:
        return [f"no llama.cpp verdict against {preset.upper()}: {unreproducible}"]
    unavailable = llama_cpp_available()
    if unavailable is not None:
        return [f"no llama.cpp verdict against {preset.upper()}: {unavailable}"]
    folder = location.out_dir / VERDICT_DIR
    rows = _read_rows(location.out_dir / "verdict.csv")
    files = [Path(row["path"]) for row in rows if row["path"]]
    if not rows or rows[-1]["trial"] != str(chosen.number) or not all(file.is_file() for file in files):
        rows = _judge(study, record, location, preset, chosen, folder)
        _write_csv(location.out_dir / "verdict.csv", rows)
        _plot(location.out_dir / "verdict.png", rows, preset)
    lines = verdict_lines(rows, preset, record.config)
    (location.out_dir / "verdict.md").write_text("\n".join(lines) + "\n")
    return lines


def searched_trial(record, records: list[TrialRecord]) -> TrialRecord | None:
    """The recorded plan under the budget's ceiling (and no slower than the speed floor, `search.min_speed`) with the
    lowest fitness loss (the first such on a tie); None when no complete trial is under it."""
    from autocompress.frontier import frontier_of

    ceiling = record.config.search.budget.max_bytes(record.dense_bytes, record.config)
    under = sorted(frontier_of(records, ceiling, record.min_tps()), key=lambda item: (item.loss, item.number))
    return under[0] if under else None


def preset_refusal(config, preset: str) -> str | None:
    """Why the study of `config` cannot reproduce llama.cpp's `preset` file (its levels lack a type the preset gives a
    tensor, or a unit holds tensors the preset types differently), from the model's config alone; None: it can, and
    the preset is among the study's seeds."""
    from autocompress.models import meta_model
    from autocompress.targets.gguf.weights import SEED_PRESETS, gguf_tensors, preset_levels, space_levels

    if preset not in SEED_PRESETS:
        return f"only llama.cpp's k-quant presets ({', '.join(SEED_PRESETS)}) are reproduced to judge against"
    model = meta_model(config.model)
    tensors = gguf_tensors(model, config.compression.granularity)
    _, reason = preset_levels(preset, tensors, model.config, space_levels(config))
    if reason is None:
        return None
    return f"the study cannot reproduce its file: {reason}; add that type to search.formats to be judged against it"


def preset_trial(study: optuna.Study, preset: str) -> TrialRecord:
    """The study's seed trial of llama.cpp's `preset`, its plan read even before it ran (`preset_refusal` says
    beforehand when there is none)."""
    from autocompress.record import TrialRecord, planned_params
    from autocompress.targets.gguf.weights import PRESET_BASELINE

    name = PRESET_BASELINE.format(preset=preset)
    for trial in study.get_trials(deepcopy=False):
        record = TrialRecord.of(trial)
        if record.baseline == name:
            return record.model_copy(update={"params": planned_params(trial)})
    raise UserError(f"study: {name} is not among its seeds, so the verdict has no preset file to judge against")


def _judge(
    study: optuna.Study, record, location: StudyLocation, preset: str, chosen: TrialRecord, folder: Path
) -> list[dict[str, Any]]:
    """Write the three files and score them in llama.cpp: rows for the F16 base, the preset, the searched file.

    One session of the study writes them all (one model load, the study's cached blocks); the dense model's
    log-probabilities on the held-out windows are computed once; each file is then run in llama.cpp on those windows,
    the figures `evaluate searched --against preset` reports, without its speed measurements (the verdict is
    about quality; `evaluate` times a file)."""
    from autocompress.evaluate import comparison
    from autocompress.export import export_trial
    from autocompress.metrics import evaluate
    from autocompress.session import CompressionSession
    from autocompress.targets.gguf.evaluation import llama_cpp_figures
    from autocompress.targets.gguf.file import GGUF_FILE

    name = preset.upper()
    reproduction = preset_trial(study, preset)
    session = CompressionSession(record.config, cache_dir=location.cache_dir)
    how = f"our reproduction of llama-quantize --imatrix {name} (llama.cpp's type per tensor, the study's imatrix)"
    export_trial(record, location, reproduction, folder / preset, "gguf", True, how, session)
    how = f"lowest fitness loss under the size budget of llama.cpp {name}'s file"
    export_trial(record, location, chosen, folder / "searched", "gguf", True, how, session)
    base = folder / F16_FILE
    _write_f16(session, record.config, location, base)
    tokens = session.pools.heldout
    reference = _dense_reference(record.config, tokens)
    searched, preset_file = folder / "searched" / GGUF_FILE, folder / preset / GGUF_FILE
    figures = {file: llama_cpp_figures(file, tokens, reference) for file in (base, preset_file, searched)}
    compared = comparison(figures[searched][1], figures[preset_file][1])
    dense_ppl = (
        record.dense_heldout.ppl  # the search judged the dense model on these windows
        if record.dense_heldout is not None
        else evaluate(session.model, tokens, batch_size=record.config.data.batch_size).ppl
    )
    delta = compared["nll_per_token"]
    return [
        {"file": "dense base (transformers)", "path": "", "heldout_ppl": dense_ppl},
        _row(f"F16 base ({base.name})", base, figures[base][0], None),
        _row(f"llama.cpp {name}, our reproduction", preset_file, figures[preset_file][0], reproduction.number),
        _row("searched", searched, figures[searched][0], chosen.number)
        | {
            "seed": chosen.baseline or ("uniform" if chosen.seed else ""),
            "delta_nll_per_token": delta["delta"],
            "delta_ci_low": delta["ci_low"],
            "delta_ci_high": delta["ci_high"],
            "windows_better": delta["windows_lower"],
            "windows": delta["windows"],
            "gap_closed": compared["gap_closed"],
            "gap_closed_ci_low": compared["gap_closed_ci_low"],
            "gap_closed_ci_high": compared["gap_closed_ci_high"],
            "verdict": outcome(delta["ci_low"], delta["ci_high"]),
        },
    ]


def _dense_reference(config, tokens: torch.Tensor) -> torch.Tensor:
    """The dense model's log-probabilities on the held-out windows, from the model as `evaluate` loads it (the
    session's resident model computes figures that differ from `evaluate --against`'s in the last digits)."""
    from autocompress.metrics import dense_reference
    from autocompress.models import load_model, resolve_device

    device = str(resolve_device(config.model.device))
    model, _ = load_model(**config.model.model_copy(update={"device": device}).model_dump())
    return dense_reference(model, tokens, config.data.batch_size)


def _write_f16(session, config, location: StudyLocation, path: Path) -> None:
    """The base model as an F16 GGUF (every matrix in F16, the rest in F32, as llama.cpp's converter stores it),
    naming the base model and the data so that `evaluate` can score it alone; written from the session's model,
    its dense weights restored."""
    from autocompress.targets.gguf.file import tokenizer_gguf, write_gguf_tensors

    session.restore_dense()
    metadata = {
        "base_model": config.model.model_dump(mode="json"),
        "data": config.data.model_dump(mode="json"),
        "study": location.name,
        "file": "the base model in F16",
    }
    write_gguf_tensors(
        session.model, session.tokenizer, {}, path, metadata, tokenizer_source=tokenizer_gguf(config.model)
    )


def _row(name: str, path: Path, figures: dict[str, Any], trial: int | None) -> dict[str, Any]:
    keys = [key for key in CSV_FIELDS if key.startswith("heldout_")]
    return {
        "file": name,
        "path": str(path),
        "trial": trial,
        "size_bytes": figures["size_on_disk_bytes"],
        **{key: figures.get(key) for key in keys},
    }


def outcome(ci_low: float, ci_high: float) -> str:
    """The verdict in words, from the 95% interval of the searched file's NLL per token minus the preset's."""
    if ci_high < 0:
        return "beats the preset"
    if ci_low > 0:
        return "loses to the preset"
    return "ties with the preset (the 95% interval spans zero)"


def verdict_lines(rows: list[dict[str, Any]], preset: str, config) -> list[str]:
    """verdict.md: the headline table, the verdict in one sentence, then each file's figures."""
    *_, reproduction, searched = rows
    name = preset.upper()
    gap, low, high = (float(searched[key]) for key in ("gap_closed", "gap_closed_ci_low", "gap_closed_ci_high"))
    windows = int(searched["windows"])
    seed = f" (seed: {searched['seed']})" if searched.get("seed") else ""
    lines = [
        f"# llama.cpp's verdict: the searched file against {name}",
        "",
        "| preset | searched | gap closed | 95% CI |",
        "|---|---|---|---|",
        f"| {name} (our reproduction): {_mb(reproduction)}, ppl {float(reproduction['heldout_ppl']):.3f} "
        f"| trial {searched['trial']}{seed}: {_mb(searched)}, ppl {float(searched['heldout_ppl']):.3f} "
        f"| {gap:+.1%} | [{low:+.1%}, {high:+.1%}] |",
        "",
        f"**The searched file {searched['verdict']}**: held-out NLL per token "
        f"{float(searched['delta_nll_per_token']):+.5f} [{float(searched['delta_ci_low']):+.5f}, "
        f"{float(searched['delta_ci_high']):+.5f}] against {name}'s, lower on {searched['windows_better']} of "
        f"{windows} windows.",
        *(
            [
                "",
                f"The searched file is a seed the search started from ({searched['seed']}): in the time it had, no "
                "generation found a plan with a lower fitness loss under the budget.",
            ]
            if searched.get("seed")
            else []
        ),
        "",
        "| file | size (bytes) | held-out ppl | mean KLD | 99.9% KLD | same top p |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['file']} | {_cell(row, 'size_bytes', ',d')} | {_cell(row, 'heldout_ppl', '.3f')} "
            f"| {_cell(row, 'heldout_mean_kld', '.5f')} | {_cell(row, 'heldout_kld_99_9', '.5f')} "
            f"| {_cell(row, 'heldout_same_top_p', '.2%')} |"
        )
    lines += [
        "",
        f"All files run in llama.cpp on the study's {windows} held-out windows of {config.data.seq_len} tokens "
        "(every predicted token scored); KLD to the dense base model run in transformers. "
        f"{name} is our reproduction of `llama-quantize --imatrix` with that preset (llama.cpp's type for each "
        "tensor and its block bytes, the study's calibration windows as the importance matrix), not a file "
        "llama-quantize wrote. Gap closed: the share of its perplexity gap to the dense base that the searched file "
        "closes, with a paired bootstrap 95% interval over windows, as "
        f"`autocompress evaluate {_relative(searched['path'])} --against {_relative(reproduction['path'])}` "
        "reports it.",
    ]
    return lines


def _mb(row: dict[str, Any]) -> str:
    return f"{int(row['size_bytes']) / 1e6:.2f} MB"


def _cell(row: dict[str, Any], key: str, form: str) -> str:
    value = row.get(key)
    if value in (None, ""):
        return ""
    return format(int(value) if form.endswith("d") else float(value), form)


def _relative(path: str) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return path


def _read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    return rows if len(rows) == 4 and list(rows[0]) == list(CSV_FIELDS) else []


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    temporary = path.with_name(f".{path.name}.partial")  # renamed into place: never half-written
    with temporary.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows([{key: row.get(key) for key in CSV_FIELDS} for row in rows])
    temporary.replace(path)


def _plot(path: Path, rows: list[dict[str, Any]], preset: str) -> None:
    """Held-out perplexity against file size for the three files, the dense base as a line; the searched file's
    gap closed in the title."""
    from matplotlib.figure import Figure

    dense, *files = rows
    searched = files[-1]
    figure = Figure(figsize=(6.5, 4.2))
    axes = figure.subplots()
    colours = ("tab:gray", "tab:blue", "tab:green")
    for row, colour in zip(files, colours, strict=True):
        size, ppl = int(row["size_bytes"]) / 1e6, float(row["heldout_ppl"])
        axes.scatter([size], [ppl], s=60, color=colour, label=f"{row['file']}: {ppl:.3f}")
    axes.axhline(float(dense["heldout_ppl"]), color="black", linestyle=":", label="dense base (transformers)")
    axes.set_xlabel("file size (MB)")
    axes.set_ylabel("held-out perplexity (llama.cpp)")
    gap, low, high = (float(searched[key]) for key in ("gap_closed", "gap_closed_ci_low", "gap_closed_ci_high"))
    verdict = searched["verdict"].split(" (")[0]
    axes.set_title(
        f"searched {verdict}: {gap:+.1%} [{low:+.1%}, {high:+.1%}] of {preset.upper()}'s gap closed", fontsize=10
    )
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
