"""The compressed artifact: what a plan really stores, written to a folder and loaded back into a runnable model.

An artifact folder holds
- `model.safetensors`: for each compressed Linear `<name>`, the tensors its level's codec writes
  (`autocompress.codecs.encode_linear`, the same that size accounting counts):
  `<name>.codes` (uint8, the codes of the kept positions in row-major order, bit-packed at the layer's bit-width)
  when quantized, or `<name>.values` (the kept values in 16 bits) when only pruned;
  `<name>.mask` (uint8, the kept positions bit-packed one bit each) when pruned;
  `<name>.scale` (float16 [out, groups], or a number format's E8M0 / E4M3 bytes), for asymmetric grids
  `<name>.zero` (uint8, bit-packed at the bit-width), and a format's float32 `<name>.tensor_scale` when quantized.
  Every other tensor of the state dict is stored in 16 bits (bfloat16 for a bfloat16 model, else float16),
  tied tensors once.
- `manifest.json`: the format version, the plan, per-layer shapes and formats, the model config, provenance,
  package versions, and the sha256 of model.safetensors.
- `config.json`, `generation_config.json` and the tokenizer files, as Hugging Face writes them.

Only safetensors is read back, never pickle. `write_hf_folder` writes a plain dense Hugging Face folder instead
(with the plan and provenance in `autocompress.json`); `autocompress.targets.gguf` writes GGUF for llama.cpp.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedModel

from autocompress.codecs import CompressedLinear, decode_linear, encode_linear, resolve
from autocompress.errors import UserError
from autocompress.files import staged_write
from autocompress.models import compressible_linears, plain_copy, storage_dtype
from autocompress.plan import CompressionPlan, LayerCompression
from autocompress.provenance import json_default, package_versions
from autocompress.size import HALF_BYTES, linear_bytes
from autocompress.targets.base import ExportInput, Written
from autocompress.targets.linear import LinearTarget

FORMAT = "autocompress"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"
PROVENANCE_FILE = "autocompress.json"  # beside a plain Hugging Face folder


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _torch_dtype(name: str, where: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise UserError(f"{where}: unknown dtype {name!r}")
    return dtype


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _plain_config(model: PreTrainedModel):
    """The model's config, without a loading-time quantizer (GGUF) that the artifact's weights do not have."""
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


def _compressed_tensors(
    name: str, linear: nn.Linear, compressed: CompressedLinear, setting: LayerCompression, plan: CompressionPlan, store
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The stored tensors of one compressed Linear, as its level's codec encodes them, and its manifest entry."""
    if tuple(compressed.weight.shape) != tuple(linear.weight.shape):
        shapes = f"{tuple(compressed.weight.shape)} for a Linear of {tuple(linear.weight.shape)}"
        raise ValueError(f"{name}: a weight of {shapes}")
    try:
        tensors, entry = encode_linear(resolve(setting, plan), compressed, store)
    except ValueError as error:
        raise ValueError(f"{name}: {error}") from error
    return {f"{name}.{key}": value for key, value in tensors.items()}, entry


def _artifact_tensors(
    model: PreTrainedModel, plan: CompressionPlan, compressed: Mapping[str, CompressedLinear], store: torch.dtype
) -> tuple[dict[str, torch.Tensor], dict[str, dict], dict[str, str], list[str]]:
    """Everything model.safetensors holds; the per-layer manifest; tied names -> the name stored; dense names."""
    linears = {linear.name: linear for linear in compressible_linears(model)}
    unknown = sorted(set(compressed) - set(linears))
    if unknown:
        raise UserError(f"export: {unknown[0]!r} is not a compressible Linear of the model")
    for linear in linears.values():
        if not plan.setting(linear.name, linear.block).is_identity and linear.name not in compressed:
            raise UserError(
                f"export: the plan compresses {linear.name} but its stored form is missing; "
                "pass what apply_plan(..., keep=True) returns"
            )
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, dict] = {}
    for name, kept in compressed.items():
        setting = plan.setting(name, linears[name].block)
        layer_tensors, layers[name] = _compressed_tensors(name, linears[name].module, kept, setting, plan, store)
        tensors.update(layer_tensors)
    replaced = {f"{name}.weight" for name in compressed}
    tied: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    dense: list[str] = []
    for key, tensor in model.state_dict().items():
        if key in replaced:
            continue
        identity = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.shape)
        if tensor.numel() and identity in seen:
            tied[key] = seen[identity]
            continue
        seen[identity] = key
        if key in tensors:
            raise UserError(f"export: the state dict's {key!r} collides with a compressed tensor name")
        value = tensor.detach().cpu()
        tensors[key] = (value.to(store) if value.is_floating_point() else value).contiguous()
        dense.append(key)
    return tensors, layers, tied, dense


def is_our_provenance(record: object) -> bool:
    """Whether `record` (an autocompress.json) is what `export` writes beside a Hugging Face or compressed-tensors
    folder (its format, the base model and the versions that wrote it), not any JSON object of that name."""
    if not isinstance(record, dict):
        return False
    versions = record.get("versions")
    return (
        record.get("format") in ("hf", "compressed-tensors")
        and isinstance(record.get("base_model"), dict)
        and isinstance(versions, dict)
        and isinstance(versions.get("autocompress"), str)
    )


def written_by_us(folder: Path) -> bool:
    """Whether `folder` holds an earlier export and nothing else of note: our manifest.json (compressed),
    autocompress.json (a Hugging Face folder) or a model.gguf carrying our provenance, and no sub-folder."""
    from autocompress.targets.gguf.file import GGUF_FILE

    if any(path.is_dir() for path in folder.iterdir()):
        return False
    try:
        if (folder / MANIFEST_FILE).is_file():
            return json.loads((folder / MANIFEST_FILE).read_text()).get("format") == FORMAT
        if (folder / PROVENANCE_FILE).is_file():
            return is_our_provenance(json.loads((folder / PROVENANCE_FILE).read_text()))
        if (folder / GGUF_FILE).is_file():
            from autocompress.gguf_reader import read_gguf

            return "autocompress.provenance" in read_gguf(folder / GGUF_FILE).fields
    except (OSError, ValueError, AttributeError, UserError):  # unreadable, not JSON, not a JSON object, not GGUF
        return False
    return False


def prepare_out_dir(out_dir: Path | str, overwrite: bool) -> Path:
    """The absolute `out_dir`, checked before anything is computed: absent, empty, or (with `overwrite`) an
    earlier export of ours (`written_by_us`); any other folder is refused, so nothing else is ever deleted."""
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"export: {out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise UserError(f"export: {out_dir} exists and is not empty; choose another folder or overwrite")
        if not written_by_us(out_dir):
            raise UserError(
                f"export: {out_dir} is not an earlier export (no autocompress manifest, or it holds sub-folders); "
                "--overwrite replaces only those, so choose another folder"
            )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return out_dir


@torch.no_grad()
def export_compressed(
    model: PreTrainedModel,
    tokenizer,
    plan: CompressionPlan,
    compressed: Mapping[str, CompressedLinear],
    out_dir: Path | str,
    provenance: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the compressed artifact of `model` (compressed in place by `apply_plan(..., keep=True)`,
    which returned `compressed`) to `out_dir`; return its path.

    `provenance` (base model, study, trial, data, metrics...) is recorded as given in the manifest.
    """
    out_dir = prepare_out_dir(out_dir, overwrite)
    store = storage_dtype(model.dtype)
    tensors, layers, tied, dense = _artifact_tensors(model, plan, compressed, store)
    config = _plain_config(model)
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "dtype": _dtype_name(model.dtype),
        "storage_dtype": _dtype_name(store),
        "architecture": type(model).__name__,
        "plan": json.loads(plan.to_json()),
        "layers": layers,
        "dense": dense,
        "tied": tied,
        "config": json.loads(config.to_json_string(use_diff=False)),
        "provenance": dict(provenance or {}),
        "versions": package_versions(),
    }
    try:
        json.dumps(manifest, default=json_default)
    except (TypeError, ValueError) as error:
        raise UserError(f"export: the provenance is not JSON-serializable: {error}") from error

    def write(folder: Path) -> None:
        save_file(tensors, folder / WEIGHTS_FILE, metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
        (folder / WEIGHTS_FILE).chmod(0o644)  # safetensors writes it owner-only; an artifact is meant to be shared
        manifest["files"] = {
            WEIGHTS_FILE: {
                "sha256": sha256_file(folder / WEIGHTS_FILE),
                "bytes": (folder / WEIGHTS_FILE).stat().st_size,
            }
        }
        text = json.dumps(manifest, indent=2, default=json_default)
        (folder / MANIFEST_FILE).write_text(text + "\n")
        config.save_pretrained(folder)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)

    return staged_write(out_dir, write)


def write_hf_folder(
    model: PreTrainedModel,
    tokenizer,
    out_dir: Path | str,
    dtype: torch.dtype | str | None = None,
    overwrite: bool = False,
    provenance: Mapping[str, Any] | None = None,
) -> Path:
    """A plain Hugging Face folder (safetensors) of the model's dense weights in `dtype`, for tools that need one.

    With `provenance`, it is written beside the weights as `autocompress.json` (the folder stays a plain one).
    """
    out_dir = prepare_out_dir(out_dir, overwrite)
    if isinstance(dtype, str):
        dtype = _torch_dtype(dtype, "write_hf_folder")
    dense = model
    if hasattr(model.config, "quantization_config"):
        dense = plain_copy(model)  # save_pretrained refuses a model with a GGUF quantizer attached
    if dtype is not None and dtype != dense.dtype:
        dense = copy.deepcopy(dense) if dense is model else dense
        dense.to(dtype)
        dense.config.dtype = dtype

    def write(folder: Path) -> None:
        dense.save_pretrained(folder)  # safetensors, the default
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        if provenance is not None:
            text = json.dumps({"format": "hf", **provenance}, indent=2, default=json_default)
            (folder / PROVENANCE_FILE).write_text(text + "\n")

    return staged_write(out_dir, write)


def read_manifest(path: Path | str) -> dict[str, Any]:
    """The manifest of the artifact at `path`, checked for format and version."""
    file = Path(path) / MANIFEST_FILE
    if not file.is_file():
        raise UserError(f"{path}: not an autocompress artifact ({MANIFEST_FILE} is missing)")
    try:
        manifest = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{file}: unreadable manifest: {error}") from error
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"{file}: not an autocompress manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise UserError(f"{file}: unknown format version {version!r}; this autocompress reads {FORMAT_VERSION}")
    return manifest


def _tensor(tensors: Mapping[str, torch.Tensor], key: str, file: Path) -> torch.Tensor:
    if key not in tensors:
        raise UserError(f"{file}: missing tensor {key!r}")
    return tensors[key]


def rebuild_weight(
    name: str, entry: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], file: Path = Path(WEIGHTS_FILE)
) -> torch.Tensor:
    """The dense float32 weight of one compressed Linear, exactly as the compressed model computed with it."""
    prefix = f"{name}."
    own = {key.removeprefix(prefix): value for key, value in tensors.items() if key.startswith(prefix)}
    try:
        return decode_linear(own, entry)
    except KeyError as error:  # the codec names the tensor it misses
        raise UserError(f"{file}: missing tensor {prefix + error.args[0]!r}") from error
    except (ValueError, RuntimeError, IndexError) as error:
        raise UserError(f"{file}: the tensors of {name} do not fit its manifest entry: {error}") from error


def _no_init_weights():
    """transformers' context that skips random weight initialization, where this version has it."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers: initialize, only slower
        return contextlib.nullcontext()
    return no_init_weights()


def load(path: Path | str, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu"):
    """Load an artifact written by `export_compressed`: (model, tokenizer), the model dense and ready to generate.

    The model is in the dtype it was exported from unless `dtype` says otherwise.
    """
    path = Path(path)
    manifest = read_manifest(path)
    file = path / WEIGHTS_FILE
    if not file.is_file():
        raise UserError(f"{file}: missing")
    expected = manifest.get("files", {}).get(WEIGHTS_FILE, {}).get("sha256")
    actual = sha256_file(file)
    if actual != expected:
        raise UserError(f"{file}: checksum mismatch (the file is truncated or corrupted)")
    try:
        tensors = load_file(file)
    except (SafetensorError, OSError) as error:
        raise UserError(f"{file}: unreadable: {error}") from error

    if isinstance(dtype, str):
        dtype = _torch_dtype(dtype, "load")
    dtype = dtype or _torch_dtype(manifest["dtype"], str(path / MANIFEST_FILE))
    if not (path / "config.json").is_file():
        raise UserError(f"{path}: config.json is missing")
    try:
        config = AutoConfig.from_pretrained(path)
        with _no_init_weights():  # every weight is loaded below; random init would only cost time
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        model.tie_weights()  # skipped with the initialization
    except (OSError, ValueError, KeyError) as error:
        raise UserError(f"{path / 'config.json'}: cannot build the model: {error}") from error

    state: dict[str, torch.Tensor] = {}
    for key in manifest["dense"]:
        tensor = _tensor(tensors, key, file)
        state[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    for name, entry in manifest["layers"].items():
        state[f"{name}.weight"] = rebuild_weight(name, entry, tensors, file).to(dtype)
    for alias, key in manifest["tied"].items():
        state[alias] = state[key]
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as error:
        first_line = str(error).strip().splitlines()[-1].strip()
        raise UserError(f"{file}: tensors do not fit {type(model).__name__}: {first_line}") from error
    if missing:
        raise UserError(f"{file}: missing tensor {missing[0]!r} that {type(model).__name__} needs")
    if unexpected:
        raise UserError(f"{file}: tensor {unexpected[0]!r} that {type(model).__name__} does not have")
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    model.to(device).eval()

    tokenizer = None
    if (path / "tokenizer_config.json").is_file() or (path / "tokenizer.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def artifact_bytes(path: Path | str) -> int:
    """Bytes of the weights file of an artifact: what size accounting predicts."""
    return (Path(path) / WEIGHTS_FILE).stat().st_size


def size_gap(path: Path | str, accounted_bytes: int) -> float:
    """Relative difference of the weights file's size to the accounted size."""
    return abs(artifact_bytes(path) - accounted_bytes) / max(accounted_bytes, 1)


__all__ = [
    "FORMAT_VERSION",
    "artifact_bytes",
    "export_compressed",
    "load",
    "read_manifest",
    "rebuild_weight",
    "size_gap",
    "write_hf_folder",
]


class ArtifactTarget(LinearTarget):
    """Our own artifact: every level, any sparsity, bytes as each level's codec writes them (`size.linear_bytes`);
    16-bit elsewhere."""

    name = "artifact"
    export_format = "compressed"

    def linear_bytes(
        self,
        setting: LayerCompression,
        plan: CompressionPlan,
        out_features: int,
        in_features: int,
        bias: bool,
        dtype: torch.dtype,
    ) -> int:
        return linear_bytes(out_features, in_features, setting, plan, bias)

    def tensor_bytes(self, numel: int, dtype: torch.dtype) -> int:
        return numel * HALF_BYTES

    def export(self, given: ExportInput, out_dir: Path) -> Written:
        path = export_compressed(
            given.model, given.tokenizer, given.plan, given.compressed, out_dir, given.provenance, overwrite=True
        )
        return Written(path, artifact_bytes(path))


TARGET = ArtifactTarget()
