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
from autocompress.metrics import evaluate
from autocompress.models import EMBEDDED_MODEL, check_consent, embedded_model_folder, load_model, resolve_device
from autocompress.targets.artifact import MANIFEST_FILE, artifact_bytes, load, read_manifest

NEW_TOKENS = 32  # generated per throughput measurement
PROMPT_TOKENS = 16


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


def _figures(model, tokens: torch.Tensor, batch_size: int, new_tokens: int) -> dict[str, float]:
    metrics = evaluate(model, tokens, batch_size=batch_size)
    prompt = tokens[:1, : min(PROMPT_TOKENS, tokens.shape[1] // 2)]
    return {"heldout_ppl": metrics.ppl, "tokens_per_s": generation_speed(model, prompt, new_tokens)}


def evaluate_artifact(
    path: Path | str,
    data: DataConfig | None = None,
    device: str | None = None,
    new_tokens: int = NEW_TOKENS,
    dense: bool = True,
) -> dict[str, Any]:
    """Held-out perplexity, size on disk, load time and generation speed of an artifact, and of its dense base.
    A GGUF file (or an export folder holding one) is run in llama.cpp instead, beside the search's predictions."""
    from autocompress.data import token_pools
    from autocompress.targets.gguf.evaluation import evaluate_gguf, gguf_file

    if gguf_file(path) is not None:
        return evaluate_gguf(path, data, device, new_tokens, dense)
    path = Path(path)
    manifest = read_manifest(path)
    provenance = manifest.get("provenance", {})
    if data is None:
        if "data" not in provenance:
            raise UserError(f"{path / MANIFEST_FILE}: no data config in the provenance; pass --data CONFIG.yaml")
        data = DataConfig.model_validate(provenance["data"])
    base = ModelConfig.model_validate(provenance["base_model"]) if "base_model" in provenance else None
    if dense and base is not None:  # before anything loads
        check_consent(base, f"the artifact's {MANIFEST_FILE}")
    target = resolve_device(device or (base.device if base else "auto"))

    began = time.perf_counter()
    model, tokenizer = load(path, device=target)
    load_s = time.perf_counter() - began
    if tokenizer is None:
        raise UserError(f"{path}: the artifact holds no tokenizer, so it cannot be evaluated on text")
    tokens = token_pools(data, tokenizer).heldout
    result: dict[str, Any] = {
        "path": str(path),
        "study": provenance.get("study"),
        "trial": provenance.get("trial"),
        "device": str(target),
        "heldout_windows": int(tokens.shape[0]),
        "heldout_tokens": int(tokens.numel()),
        "new_tokens": new_tokens,
        "size_on_disk_bytes": artifact_bytes(path),
        "folder_bytes": sum(file.stat().st_size for file in path.iterdir() if file.is_file()),
        "accounted_bytes": provenance.get("accounted_bytes"),
        "load_s": load_s,
        **_figures(model, tokens, data.batch_size, new_tokens),
    }
    del model
    gc.collect()
    if not dense or base is None:
        return result
    began = time.perf_counter()
    dense_model, _ = load_model(**base.model_copy(update={"device": str(target)}).model_dump())
    dense_load_s = time.perf_counter() - began
    figures = _figures(dense_model, tokens, data.batch_size, new_tokens)
    result |= {
        "dense_heldout_ppl": figures["heldout_ppl"],
        "dense_size_on_disk_bytes": _model_weights_bytes(base.name),
        "dense_fp16_bytes": provenance.get("dense_bytes"),
        "dense_load_s": dense_load_s,
        "dense_tokens_per_s": figures["tokens_per_s"],
    }
    return result


def evaluation_lines(result: dict[str, Any]) -> list[str]:
    """The figures of `evaluate_artifact` as an aligned table: artifact beside dense."""
    if result.get("runtime") == "llama.cpp":
        from autocompress.targets.gguf.evaluation import gguf_evaluation_lines

        return gguf_evaluation_lines(result)

    def cell(key: str, form: str) -> str:
        value = result.get(key)
        return "" if value is None else format(value, form)

    rows = [
        ("held-out perplexity", "heldout_ppl", ".3f"),
        ("size on disk (bytes)", "size_on_disk_bytes", ",d"),
        ("load time (s)", "load_s", ".2f"),
        ("generation (tokens/s)", "tokens_per_s", ".1f"),
    ]
    lines = [f"{'':24}{'artifact':>16}{'dense':>16}"]
    for label, key, form in rows:
        lines.append(f"{label:24}{cell(key, form):>16}{cell('dense_' + key, form):>16}")
    if result.get("dense_fp16_bytes"):
        lines.append(f"{'dense in fp16 (bytes)':24}{'':>16}{result['dense_fp16_bytes']:>16,d}")
    lines.append(
        f"({result['heldout_windows']} held-out windows, {result['heldout_tokens']} tokens; "
        f"{result['new_tokens']} new tokens per generate(); on {result['device']})"
    )
    return lines
