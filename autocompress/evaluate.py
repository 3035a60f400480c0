"""What `autocompress evaluate` runs: the verdict on a written model, held-out perplexity, size on disk, load time
and generation speed, beside its dense base model."""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Any

import torch

from autocompress.config import DataConfig, ModelConfig
from autocompress.errors import UserError
from autocompress.metrics import TokenValues, dense_reference, evaluate, gap_closed, paired_difference
from autocompress.models import EMBEDDED_MODEL, check_consent, embedded_model_folder, load_model, resolve_device
from autocompress.targets import target_judging, target_of_result
from autocompress.targets.artifact import MANIFEST_FILE, artifact_bytes, load, read_manifest

NEW_TOKENS = 32  # generated per throughput measurement
PROMPT_TOKENS = 16
# the keys (heldout_ + key) of TokenValues.statistics's figures against the dense base that evaluate reports
DIVERGENCE_KEYS = ("mean_kld", "kld_99_9", "median_kld", "same_top_p", "rms_dp")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def generation_speed(model, prompt: torch.Tensor, new_tokens: int = NEW_TOKENS) -> float:
    """Tokens per second of greedy generate() producing exactly `new_tokens` after `prompt` (after a warm-up)."""
    device = next(model.parameters()).device
    prompt = prompt.to(device)
    config = model.generation_config
    pad = config.pad_token_id if config.pad_token_id is not None else config.eos_token_id
    if isinstance(pad, list):
        pad = pad[0]
    options = {"do_sample": False, "pad_token_id": pad, "attention_mask": torch.ones_like(prompt)}
    model.generate(prompt, max_new_tokens=2, min_new_tokens=2, **options)
    _synchronize(device)
    began = time.perf_counter()
    output = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **options)
    _synchronize(device)
    return (output.shape[1] - prompt.shape[1]) / (time.perf_counter() - began)


def _model_weights_bytes(name: str) -> int | None:
    """Bytes of the base model's weight files as they are stored (safetensors, or the GGUF file)."""
    try:
        if name == EMBEDDED_MODEL:
            folder = embedded_model_folder()
        elif name.endswith(".gguf"):
            return Path(name).expanduser().stat().st_size
        elif Path(name).expanduser().is_dir():
            folder = Path(name).expanduser()
        else:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(name, local_files_only=True))
        return sum(file.stat().st_size for file in folder.glob("*.safetensors")) or None
    except Exception:  # a hub model not in the local cache, an unreadable folder: the figure is left out
        return None


def _figures(
    model, tokens: torch.Tensor, batch_size: int, new_tokens: int, reference: torch.Tensor | None = None
) -> tuple[dict[str, float], TokenValues]:
    values = TokenValues()
    metrics = evaluate(model, tokens, reference, batch_size=batch_size, values=values)
    prompt = tokens[:1, : min(PROMPT_TOKENS, tokens.shape[1] // 2)]
    figures = {"heldout_ppl": metrics.ppl, **divergence_figures(values)}
    return figures | {"tokens_per_s": generation_speed(model, prompt, new_tokens)}, values


def divergence_figures(values: TokenValues) -> dict[str, float]:
    """The statistics llama-perplexity --kl-divergence headlines, under evaluate's keys (empty without a dense
    reference)."""
    if not values.against_dense:
        return {}
    statistics = values.statistics()
    return {f"heldout_{key}": statistics[key] for key in DIVERGENCE_KEYS}


def comparison(values: TokenValues, other: TokenValues) -> dict[str, Any]:
    """One model against another on the same windows: paired per-window differences (first minus other) of the
    NLL per token and, against the dense base, of the KLD per token, with bootstrap 95% intervals; the share of the
    other's perplexity gap to the dense base that the first closes; the windows where the first is better."""
    nll = paired_difference(values.window_nll(), other.window_nll())
    result: dict[str, Any] = {"windows": nll["windows"], "nll_per_token": nll}
    if values.against_dense and other.against_dense:
        result["kld_per_token"] = paired_difference(values.window_kld(), other.window_kld())
        result |= gap_closed(values.window_nll(), other.window_nll(), values.window_dense_nll())
    return result


def evaluate_artifact(
    path: Path | str,
    data: DataConfig | None = None,
    device: str | None = None,
    new_tokens: int = NEW_TOKENS,
    dense: bool = True,
    against: Path | str | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Held-out perplexity, KL statistics to the dense base, size on disk, load time and generation speed of an
    artifact, and of its dense base. A file another target's runtime judges (a GGUF file, or an export folder holding
    one: llama.cpp) is run there instead (on `threads`), beside the search's predictions. With `against`, another
    artifact (or another file of that runtime, beside one) is scored on the same windows, under "against", and
    "comparison" holds the paired per-window differences."""
    from autocompress.data import token_pools

    judge = target_judging(path)  # a target whose own runtime judges its files (llama.cpp for GGUF)
    if judge is not None:
        other = None if against is None else Path(against)
        return judge.evaluate(Path(path), data, device, new_tokens, dense, against=other, threads=threads)
    judged = None if against is None else target_judging(against)
    if judged is not None:
        raise UserError(f"--against {against}: a {judged.runtime} file compares with another, not with {path}")
    path = Path(path)
    manifest = read_manifest(path)
    if against is not None:
        read_manifest(against)  # refused before anything loads
    provenance = manifest.get("provenance", {})
    if data is None:
        if "data" not in provenance:
            raise UserError(f"{path / MANIFEST_FILE}: no data config in the provenance; pass --data CONFIG.yaml")
        data = DataConfig.model_validate(provenance["data"])
    base = ModelConfig.model_validate(provenance["base_model"]) if "base_model" in provenance else None
    with_dense = dense and base is not None
    if with_dense:  # before anything loads
        check_consent(base, f"the artifact's {MANIFEST_FILE}")
    target = resolve_device(device or (base.device if base else "auto"))

    dense_result: dict[str, Any] = {}
    tokens = reference = None
    if with_dense:  # first, so that the artifacts are scored against its log-probabilities (one model at a time)
        began = time.perf_counter()
        dense_model, tokenizer = load_model(**base.model_copy(update={"device": str(target)}).model_dump())
        dense_load_s = time.perf_counter() - began
        tokens = token_pools(data, tokenizer).heldout
        reference = dense_reference(dense_model, tokens, data.batch_size)
        figures, _ = _figures(dense_model, tokens, data.batch_size, new_tokens)
        dense_result = {
            "dense_heldout_ppl": figures["heldout_ppl"],
            "dense_size_on_disk_bytes": _model_weights_bytes(base.name),
            "dense_fp16_bytes": provenance.get("dense_bytes"),
            "dense_load_s": dense_load_s,
            "dense_tokens_per_s": figures["tokens_per_s"],
        }
        del dense_model
        gc.collect()

    def measured(folder: Path) -> tuple[dict[str, Any], TokenValues]:
        nonlocal tokens
        began = time.perf_counter()
        model, tokenizer = load(folder, device=target)
        load_s = time.perf_counter() - began
        if tokens is None:
            if tokenizer is None:
                raise UserError(f"{folder}: the artifact holds no tokenizer, so it cannot be evaluated on text")
            tokens = token_pools(data, tokenizer).heldout
        figures, values = _figures(model, tokens, data.batch_size, new_tokens, reference)
        del model
        gc.collect()
        return {
            "size_on_disk_bytes": artifact_bytes(folder),
            "folder_bytes": sum(file.stat().st_size for file in folder.iterdir() if file.is_file()),
            "load_s": load_s,
            **figures,
        }, values

    figures, values = measured(path)
    result: dict[str, Any] = {
        "path": str(path),
        "study": provenance.get("study"),
        "trial": provenance.get("trial"),
        "device": str(target),
        "heldout_windows": int(tokens.shape[0]),
        "heldout_tokens": int(tokens.numel()),
        "new_tokens": new_tokens,
        "accounted_bytes": provenance.get("accounted_bytes"),
        **figures,
    }
    if against is not None:
        other_figures, other_values = measured(Path(against))
        result["against"] = {"path": str(against), **other_figures}
        result["comparison"] = comparison(values, other_values)
    return result | dense_result


# evaluate's rows of llama-perplexity --kl-divergence's figures: label, key, format
DIVERGENCE_ROWS = (
    ("mean KLD", "heldout_mean_kld", ".5f"),
    ("99.9% KLD", "heldout_kld_99_9", ".5f"),
    ("median KLD", "heldout_median_kld", ".5f"),
    ("same top p", "heldout_same_top_p", ".2%"),
    ("RMS Δp", "heldout_rms_dp", ".3%"),
)


def cell(figures: dict[str, Any], key: str | None, form: str) -> str:
    value = figures.get(key) if key else None
    return "" if value is None else format(value, form)


def comparison_lines(result: dict[str, Any], name: str) -> list[str]:
    """`comparison`'s figures in words: the first model minus the one `--against` names."""
    compared = result.get("comparison")
    if compared is None:
        return []
    windows = compared["windows"]
    lines = [
        f"{name} minus --against on the same {windows} windows (paired; bootstrap 95% interval over windows):",
    ]
    for label, key, better in (("NLL per token", "nll_per_token", "better"), ("KLD per token", "kld_per_token", "")):
        if key in compared:
            delta = compared[key]
            lines.append(
                f"  {label:22}{delta['delta']:+.5f}  [{delta['ci_low']:+.5f}, {delta['ci_high']:+.5f}]  "
                f"{better or 'lower'} on {delta['windows_lower']} of {windows} windows"
            )
    if "gap_closed" in compared:
        lines.append(
            f"  {'gap closed':22}{compared['gap_closed']:+.1%}  [{compared['gap_closed_ci_low']:+.1%}, "
            f"{compared['gap_closed_ci_high']:+.1%}]  of --against's perplexity gap to the dense base"
        )
    return lines


def evaluation_lines(result: dict[str, Any]) -> list[str]:
    """The figures of `evaluate_artifact` as an aligned table: artifact beside dense."""
    judge = target_of_result(result)
    if judge is not None:
        return judge.evaluation_lines(result)

    rows = [
        ("held-out perplexity", "heldout_ppl", ".3f"),
        *DIVERGENCE_ROWS,
        ("size on disk (bytes)", "size_on_disk_bytes", ",d"),
        ("load time (s)", "load_s", ".2f"),
        ("generation (tokens/s)", "tokens_per_s", ".1f"),
    ]
    other = result.get("against")
    lines = [f"{'':24}{'artifact':>16}{'--against' if other else '':>16}{'dense':>16}"]
    for label, key, form in rows:
        dense_key = None if (label, key, form) in DIVERGENCE_ROWS else f"dense_{key}"  # the dense base is 0 there
        columns = [cell(result, key, form), cell(other or {}, key, form), cell(result, dense_key, form)]
        lines.append(f"{label:24}" + "".join(f"{column:>16}" for column in columns))
    if result.get("dense_fp16_bytes"):
        lines.append(f"{'dense in fp16 (bytes)':24}{'':>32}{result['dense_fp16_bytes']:>16,d}")
    lines.append(
        f"({result['heldout_windows']} held-out windows, {result['heldout_tokens']} tokens; "
        f"{result['new_tokens']} new tokens per generate(); on {result['device']})"
    )
    return lines + comparison_lines(result, "artifact")
