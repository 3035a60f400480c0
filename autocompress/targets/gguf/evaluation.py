"""`autocompress evaluate model.gguf`: the exported file judged by the runtime that ships it, beside what the search
predicted for it.

The search scored a plan with transformers on our own reconstruction of llama.cpp's blocks; the user runs the file
in llama.cpp. So this loads the file in llama.cpp (llama-cpp-python) and scores the study's held-out windows, the
same windows the study's held-out figures used (the base model's tokenizer on the data config the file records,
every predicted token scored), reporting llama.cpp's perplexity, its KL to the dense base model run in
transformers, and its generation speed; the file's `autocompress.provenance` supplies the study's predictions
(fitness and held-out figures, accounted bytes) to put beside them.
"""

from __future__ import annotations

import gc
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from autocompress.config import DataConfig, ModelConfig, describe_validation_error
from autocompress.data import token_pools
from autocompress.errors import UserError
from autocompress.evaluate import (
    DIVERGENCE_ROWS,
    cell,
    comparison,
    comparison_lines,
    divergence_figures,
    generation_speed,
)
from autocompress.gguf_reader import read_gguf
from autocompress.metrics import TokenValues, dense_reference, evaluate
from autocompress.models import check_consent, load_model, resolve_device
from autocompress.targets.artifact import MANIFEST_FILE
from autocompress.targets.gguf.file import GGUF_FILE, PROVENANCE_KEY
from autocompress.targets.gguf.llama_cpp import LlamaCppModel, llama_cpp_available
from autocompress.targets.gguf.speed import file_speed

PROMPT_TOKENS = 16


def gguf_file(path: Path | str) -> Path | None:
    """The GGUF file `path` names: the file itself, or the model.gguf of a `--format gguf` export folder (one
    without our artifact's manifest); None for neither."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and (path / GGUF_FILE).is_file() and not (path / MANIFEST_FILE).is_file():
        return path / GGUF_FILE
    return None


def read_provenance(path: Path) -> dict[str, Any]:
    """What the exporter recorded in the file (study, trial, data config, base model, predicted figures), read
    from a validated header (`read_gguf`); a UserError for a file or a provenance that is malformed."""
    text = read_gguf(path).fields.get(PROVENANCE_KEY)
    if text is None:
        return {}
    try:
        provenance = json.loads(text) if isinstance(text, str) else None
    except ValueError:
        provenance = None
    if not isinstance(provenance, dict):
        raise UserError(f"{path}: its {PROVENANCE_KEY} is not a JSON object")
    return provenance


def _predicted(provenance: dict[str, Any]) -> dict[str, Any]:
    """The search's figures for this file: held-out (when the frontier was re-evaluated) and fitness ones."""
    heldout = provenance.get("heldout") or {}
    metrics = provenance.get("metrics") or {}
    predicted = {
        "predicted_heldout_ppl": heldout.get("ppl"),
        "predicted_heldout_kl": heldout.get("kl"),
        "predicted_fitness_kl": metrics.get("kl"),
        "predicted_fitness_ppl": metrics.get("ppl"),
        "accounted_bytes": provenance.get("accounted_bytes"),
    }
    dense = provenance.get("dense_heldout") or {}
    if dense.get("ppl") is not None:
        predicted["predicted_dense_heldout_ppl"] = dense["ppl"]
    return predicted


def evaluate_gguf(
    path: Path | str,
    data: DataConfig | None = None,
    device: str | None = None,
    new_tokens: int = 32,
    dense: bool = True,
    n_threads: int | None = None,
    against: Path | str | None = None,
) -> dict[str, Any]:
    """llama.cpp's held-out perplexity, KL statistics to the dense base model and tokens/s for a GGUF file, beside
    the search's predictions and the dense model's own figures (transformers, on `device`).

    With `against` (another GGUF file of the same vocabulary), that file is scored on the same windows too, under
    "against", and "comparison" holds the paired per-window differences of the first file minus the other."""
    file = gguf_file(path)
    if file is None:
        raise UserError(f"{path}: not a .gguf file nor a folder holding {GGUF_FILE}")
    other = None if against is None else gguf_file(against)
    if against is not None and other is None:
        raise UserError(f"--against {against}: not a .gguf file nor a folder holding {GGUF_FILE}")
    provenance = read_provenance(file)  # the files checked before anything else is
    recorded = provenance or (read_provenance(other) if other is not None else {})  # a preset file records none
    source = file if provenance or other is None else other
    try:
        if data is None:
            if "data" not in recorded:
                raise UserError(f"{source}: no data config in its autocompress.provenance; pass --data CONFIG.yaml")
            data = DataConfig.model_validate(recorded["data"])
        if "base_model" not in recorded:
            raise UserError(f"{source}: no base model in its {PROVENANCE_KEY}, so its windows cannot be tokenized")
        base = ModelConfig.model_validate(recorded["base_model"])
    except ValidationError as error:
        raise UserError(f"{source}: its {PROVENANCE_KEY}: {describe_validation_error(error)}") from error
    check_consent(base, f"{source}'s {PROVENANCE_KEY}")  # the file names the model to load: it must not run code
    unavailable = llama_cpp_available()
    if unavailable is not None:
        raise UserError(f"evaluate {file}: {unavailable}")
    target = resolve_device(device or base.device)
    dense_model, tokenizer = load_model(**base.model_copy(update={"device": str(target)}).model_dump())
    tokens = token_pools(data, tokenizer).heldout
    reference = dense_reference(dense_model, tokens, data.batch_size) if dense or other is not None else None
    prompt = tokens[0, : min(PROMPT_TOKENS, tokens.shape[1] // 2)].tolist()

    measured, values = llama_cpp_figures(file, tokens, reference, n_threads, prompt, new_tokens)
    result: dict[str, Any] = {
        "path": str(file),
        "runtime": "llama.cpp",
        "study": provenance.get("study"),
        "trial": provenance.get("trial"),
        "device": "llama.cpp (its own build's device)",
        "heldout_windows": int(tokens.shape[0]),
        "heldout_tokens": int(tokens.numel()),
        "new_tokens": new_tokens,
        **measured,
        **_predicted(provenance),
        **file_speed(file, n_threads, progress=lambda text: print(text, file=sys.stderr)),
    }
    if other is not None:
        other_measured, other_values = llama_cpp_figures(other, tokens, reference, n_threads, prompt, new_tokens)
        result["against"] = {"path": str(other), **other_measured}
        result["comparison"] = comparison(values, other_values)
    if dense:
        dense_prompt = torch.tensor([prompt])
        result |= {
            "dense_heldout_ppl": evaluate(dense_model, tokens, batch_size=data.batch_size).ppl,
            "dense_tokens_per_s": generation_speed(dense_model, dense_prompt, new_tokens),
            "dense_device": str(target),
            "dense_fp16_bytes": recorded.get("dense_bytes"),
        }
    del dense_model
    gc.collect()
    return result


def llama_cpp_figures(
    file: Path,
    tokens: torch.Tensor,
    reference: torch.Tensor | None,
    n_threads: int | None = None,
    prompt: list[int] | None = None,
    new_tokens: int = 0,
) -> tuple[dict[str, Any], TokenValues]:
    """One GGUF file run in llama.cpp on the windows: its size, load time, perplexity and KL statistics to the
    reference, and its per-token values; with a `prompt`, its speed generating `new_tokens` after it too."""
    prompt = prompt or []
    began = time.perf_counter()
    runtime = LlamaCppModel(file, n_ctx=max(tokens.shape[1], len(prompt) + new_tokens), n_threads=n_threads)
    load_s = time.perf_counter() - began
    values = TokenValues()
    try:
        if reference is not None and runtime.n_vocab != reference.shape[-1]:
            raise UserError(
                f"{file}: a vocabulary of {runtime.n_vocab} tokens, the base model's has {reference.shape[-1]}; "
                "files compare only on the same tokens"
            )
        metrics = runtime.evaluate(tokens, reference, values)
        speed = {"tokens_per_s": runtime.generation_speed(prompt, new_tokens)} if prompt else {}
    finally:
        runtime.close()
    figures = {
        "size_on_disk_bytes": file.stat().st_size,
        "load_s": load_s,
        "heldout_ppl": math.exp(metrics.ce),
        "heldout_kl": metrics.kl,
        **divergence_figures(values),
        **speed,
    }
    return figures, values


def gguf_evaluation_lines(result: dict[str, Any]) -> list[str]:
    """`evaluate_gguf`'s figures as a table: llama.cpp's measurement (and the --against file's), the search's
    prediction, the dense model; then the paired comparison with the --against file."""
    rows = [
        ("held-out perplexity", "heldout_ppl", "predicted_heldout_ppl", "dense_heldout_ppl", ".3f"),
        ("held-out KL to dense", "heldout_kl", "predicted_heldout_kl", None, ".5f"),
        *((label, key, None, None, form) for label, key, form in DIVERGENCE_ROWS),
        ("size (bytes)", "size_on_disk_bytes", "accounted_bytes", "dense_fp16_bytes", ",d"),
        ("generation (tokens/s)", "tokens_per_s", None, "dense_tokens_per_s", ".1f"),
        ("prompt (tokens/s)", "measured_prompt_tps", "predicted_prompt_tps", None, ".1f"),
        ("decode (tokens/s)", "measured_decode_tps", "predicted_decode_tps", None, ".1f"),
        ("load time (s)", "load_s", None, None, ".2f"),
    ]
    other = result.get("against")
    header = ["llama.cpp", *(["--against"] if other else []), "predicted", "dense"]
    lines = [f"{'':24}" + "".join(f"{name:>16}" for name in header)]
    for label, measured, predicted, dense, form in rows:
        columns = [cell(result, measured, form)]
        columns += [cell(other, measured, form)] if other else []
        columns += [cell(result, predicted, form), cell(result, dense, form)]
        lines.append(f"{label:24}" + "".join(f"{column:>16}" for column in columns))
    if "measured_decode_tps" in result:
        errors = (
            f"; predicted decode {result['decode_tps_error']:+.1%}, prompt {result['prompt_tps_error']:+.1%} off"
            if "decode_tps_error" in result
            else f"; {result.get('speed_note')}"
        )
        lines.append(
            f"(prompt and decode: llama.cpp's median of {result['speed_runs']} runs on {result['threads']} thread(s), "
            f"a {result['speed_prompt_tokens']}-token prompt then {result['speed_decode_tokens']} tokens{errors})"
        )
    if result.get("predicted_fitness_kl") is not None:
        lines.append(f"(the search's fitness KL for this plan: {result['predicted_fitness_kl']:.5f})")
    lines.append(
        f"({result['heldout_windows']} held-out windows, {result['heldout_tokens']} tokens, every one scored; "
        f"{result['new_tokens']} new tokens per generation; the dense model in transformers on "
        f"{result.get('dense_device')}; KLD, same top p and RMS Δp as llama-perplexity --kl-divergence defines "
        "them, over every predicted token)"
    )
    return lines + comparison_lines(result, Path(result["path"]).name)
