"""vLLM's compressed-tensors checkpoints: a mixed per-Linear quantized model written with compressed-tensors' own
compressors, loadable by vLLM and by transformers.

One quantized Linear of ours (`QuantizedWeight`: unsigned codes c, zero-point z, float16 scale s per group,
w = (c − z)·s) maps onto compressed-tensors' conventions as follows (`scheme_for`):

- int4/int8, symmetric, in groups of g or one per row: INT, symmetric, GROUP(g) or CHANNEL, `pack-quantized`:
  weight_packed int32 (the codes packed densely, 32/b a word), weight_scale [out, groups], weight_shape;
- int4, asymmetric: the same, asymmetric, plus weight_zero_point int32 (zero-points packed along the output dim);
- fp8-e4m3 per row: FLOAT 8, CHANNEL, `naive-quantized`: weight float8_e4m3fn (the codes' bit patterns),
  weight_scale [out, 1];
- nvfp4: FLOAT 4, TENSOR_GROUP(16) with e4m3 scales (the NVFP4A16 preset), `nvfp4-pack-quantized`: weight_packed
  uint8 (two codes a byte, the even column low), weight_scale float8_e4m3fn [out, in/16], weight_global_scale [1];
- fp16: no scheme; the Linear is listed in `ignore` and its weight stored in the serving dtype (bfloat16 unless
  `compression.serve_dtype` says float16), as every other unquantized tensor.

- Signed ranges: compressed-tensors quantizes to signed q in [−2^(b−1), 2^(b−1)) and packs q + 2^(b−1), so the packed
  words hold exactly our unsigned codes c; its zero-point is signed too, z − 2^(b−1) (int8), packed the same way
  (so the packed zero-points are our z). A symmetric grid stores no zero-point (ours is fixed at 2^(b−1)).
- NVFP4: compressed-tensors divides by its global scale, so it stores 1 / (our tensor scale), in float32.
- Scales are stored in the dtype the model computes them in (bfloat16 for a bfloat16 model), except that a float32
  or float16 model stores our float16 scales themselves, without loss; NVFP4 block scales are e4m3.

How the checkpoint is written (`write_compressed_tensors`): the compressors get the dequantized weights the model
computes with, plus our scales (and zero-points, global scales) attached as module parameters the way
compressed-tensors' lifecycle leaves a calibrated module (`quantization_scheme`, status FROZEN, `weight_scale`...);
re-quantizing with our own scales gives back our codes, which is checked on the compressed tensors before saving.
`ModelCompressor` compresses and saves; `config.json` gets one config group per distinct level (targets: the Linear
names) and an `ignore` list of every untouched Linear and embedding (lm_head included).

Reading it back (`load_compressed_tensors`): transformers' compressed-tensors integration loads the compressed
layout, then every module is decompressed with its own scheme. transformers' `CompressedTensorsConfig(dequantize=
True)` (`run_compressed=False` is its deprecated alias) is not used: it decompresses every module with the scheme of
the first config group (`get_dense_scheme`), which garbles the other levels of a mixed checkpoint (int8 weights read
as int4: off by up to the largest weight), and computes in the checkpoint's scale dtype (float16) instead of the
model's. Decompressed this way, integer and FP8 weights are bit-identical to ours. NVFP4 ones are only in a
bfloat16 model: compressed-tensors decompresses NVFP4 to bfloat16 (multiplying by scale / global scale), so in a
float32 or float16 model they differ from ours by a bfloat16 rounding (at most 2^-8 relative; about 3e-7 nats of KL
per NVFP4 Linear of SmolLM2); the codes and scales stored are exactly ours. compressed-tensors 0.20 also expects
asymmetric zero-points unpacked when transformers lays out the empty model, so those are read from the file as stored.

What vLLM runs (`refusal`, `fusion_refusals`): weight-only int4/int8 through its WNA16 Marlin kernels (groups of
32, 64, 128 or per channel, dividing the row; zero-points only for 4 bits), FP8 weight-only through W8A16-FP8
(per channel), NVFP4A16 through its FP4 Marlin kernel. Before vLLM 0.24, Marlin also needed the
output dim a multiple of 64 and the input dim a multiple of 128; from 0.24 on it pads other shapes. vLLM fuses
q/k/v_proj and gate/up_proj into one layer that takes one scheme (that of the first shard), and for NVFP4 one global
scale (the largest), so those siblings must share a level, and NVFP4 siblings their tensor scale.
FP8 with one scale per tensor is refused: transformers' compressed-tensors lifecycle holds that float32 scale in the
model's dtype, so in a 16-bit model it would not compute our weights (FP8 per channel has float16 scales, which a
16-bit model rounds the same way we do).
Pruned weights are stored densely (as codes of zero): vLLM runs no unstructured sparsity.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.compressors.base import decompress_module
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
from compressed_tensors.config import CompressionFormat
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationScheme,
    QuantizationStatus,
    QuantizationStrategy,
    QuantizationType,
)
from compressed_tensors.quantization.utils import is_module_quantized
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from autocompress.errors import UserError
from autocompress.files import staged_write
from autocompress.methods import QuantizedWeight
from autocompress.methods.formats import FORMATS, PER_ROW, PER_TENSOR, scale_codes
from autocompress.models import compressible_linears, meta_model
from autocompress.plan import UNQUANTIZED, CompressionPlan, LayerCompression, Level
from autocompress.provenance import json_default, with_versions
from autocompress.targets.artifact import PROVENANCE_FILE
from autocompress.targets.base import ExportInput, Written
from autocompress.targets.linear import LinearTarget

if TYPE_CHECKING:
    from autocompress.config import Config

INTEGER = "int"
FP8 = "fp8-e4m3"
NVFP4 = "nvfp4"
NVFP4_BLOCK = 16
MARLIN_GROUP_SIZES = (PER_ROW, 32, 64, 128)
MARLIN_BITS = (4, 8)
MARLIN_TILE_OUT, MARLIN_TILE_IN = 64, 128  # the strict thread tile of Marlin before vLLM 0.24
# vLLM's packed_modules_mapping of the Llama family (Llama, Mistral, Qwen2/3): shards it fuses into one layer.
FUSED_SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
_WORD_BITS = 32
_SHAPE_BYTES = 16  # weight_shape: two int64


@dataclass(frozen=True)
class VllmLevel:
    """A Linear's stored form as this target sees it.

    `kind` is "int", "fp16" or a number format's name (`methods.formats.FORMATS`); `group_size` counts inputs
    per scale, -1 for one scale per output channel, 0 for one per tensor (FP8). `symmetric` matters for "int" only.
    """

    kind: str
    bits: int
    group_size: int
    symmetric: bool = True

    @property
    def name(self) -> str:
        """The config group name: `int4-g128`, `int4-asym-channel`, `fp8-e4m3-channel`, `nvfp4`, `fp16`..."""
        if self.kind in (UNQUANTIZED, NVFP4):
            return self.kind
        grid = "channel" if self.group_size == PER_ROW else "tensor" if self.group_size == PER_TENSOR else None
        kind = self.kind
        if self.kind == INTEGER:
            kind = f"int{self.bits}" if self.symmetric else f"int{self.bits}-asym"
        return f"{kind}-{grid or f'g{self.group_size}'}"

    def on(self, in_features: int) -> VllmLevel:
        """The same level on rows of `in_features` inputs: a group holding the whole row is one per channel."""
        if self.kind in (INTEGER, FP8) and self.group_size > 0 and self.group_size >= in_features:
            return VllmLevel(self.kind, self.bits, PER_ROW, self.symmetric)
        return self


FP16_LEVEL = VllmLevel(UNQUANTIZED, 16, PER_ROW)


def level_of(quantized: QuantizedWeight) -> VllmLevel:
    """The level of one stored quantized weight."""
    in_features = quantized.codes.shape[1]
    if quantized.format is None:
        return VllmLevel(INTEGER, quantized.bits, quantized.group_size, quantized.symmetric).on(in_features)
    group_size = PER_TENSOR if quantized.scale_format == "none" else quantized.group_size
    return VllmLevel(quantized.format, quantized.bits, group_size).on(in_features)


def level_for(level: Level, plan_group_size: int, plan_symmetric: bool) -> VllmLevel:
    """The level a plan's precision level stands for (integer levels take the plan's groups and symmetry unless
    they name their groups), before any shape is known."""
    if level.name == UNQUANTIZED:
        return FP16_LEVEL
    if not level.is_format:
        group_size = plan_group_size if level.group_size is None else level.group_size
        return VllmLevel(INTEGER, level.bits, group_size, plan_symmetric)
    spec = FORMATS[level.method]
    group_size = spec.block_size or (spec.default_group_size if level.group_size is None else level.group_size)
    return VllmLevel(spec.name, level.bits, group_size)


def refusal(level: VllmLevel, out_features: int, in_features: int, *, tile_padding: bool = True) -> str | None:
    """Why vLLM cannot run a Linear of out × in at `level` (one line), or None when it can.

    `tile_padding` False applies Marlin's strict thread tile of vLLM before 0.24 (out % 64, in % 128).
    Tensor parallelism is not considered: each shard must satisfy the same rules on its slice.
    """
    level = level.on(in_features)
    if level.kind == UNQUANTIZED:
        return None
    if level.kind == INTEGER:
        if level.bits not in MARLIN_BITS:
            return f"{level.name}: vLLM's WNA16 Marlin kernels run 4- and 8-bit integer weights only"
        if not level.symmetric and level.bits != 4:
            return f"{level.name}: vLLM's Marlin kernel takes zero-points for 4-bit weights only"
        if level.group_size not in MARLIN_GROUP_SIZES:
            return f"{level.name}: vLLM's Marlin kernel takes groups of 32, 64 or 128 inputs, or one per channel"
        if level.group_size != PER_ROW and in_features % level.group_size:
            return f"{level.name}: groups of {level.group_size} do not divide the {in_features} inputs of a row"
    elif level.kind == FP8:
        if level.group_size == PER_TENSOR:
            return f"{level.name}: its float32 tensor scale would be held in the model's dtype on load; use per channel"
        if level.group_size != PER_ROW:
            return f"{level.name}: vLLM's W8A16-FP8 takes one scale per channel (or tensor), not groups"
    elif level.kind == NVFP4:
        if in_features % NVFP4_BLOCK:
            return f"{level.name}: blocks of {NVFP4_BLOCK} do not divide the {in_features} inputs of a row"
    else:
        return f"{level.name}: not a level of the vLLM target (int4, int8, fp8-e4m3, nvfp4, fp16)"
    if not tile_padding and (out_features % MARLIN_TILE_OUT or in_features % MARLIN_TILE_IN):
        return (
            f"{level.name}: Marlin before vLLM 0.24 needs the output dim a multiple of {MARLIN_TILE_OUT} and the "
            f"input dim a multiple of {MARLIN_TILE_IN}, not {out_features} × {in_features}"
        )
    return None


def fusion_refusals(levels: Mapping[str, VllmLevel], tensor_scales: Mapping[str, float] | None = None) -> list[str]:
    """One line per group of sibling Linears that vLLM fuses (`FUSED_SIBLINGS`) but that do not share a level (or,
    for NVFP4, a tensor scale), given every Linear's level by name (untouched ones at `FP16_LEVEL`)."""
    refused = []
    for name, level in levels.items():
        prefix, _, leaf = name.rpartition(".")
        for siblings in FUSED_SIBLINGS:
            if leaf != siblings[0]:
                continue
            names = [f"{prefix}.{sibling}" for sibling in siblings]
            found = [levels[sibling] for sibling in names if sibling in levels]
            if len(set(found)) > 1:
                refused.append(
                    f"{prefix}.{{{','.join(siblings)}}}: vLLM fuses them into one layer of one scheme, "
                    f"but they take {', '.join(found_level.name for found_level in found)}"
                )
            elif level.kind == NVFP4 and tensor_scales is not None:
                scales = {tensor_scales[sibling] for sibling in names if sibling in tensor_scales}
                if len(scales) > 1:
                    refused.append(
                        f"{prefix}.{{{','.join(siblings)}}}: vLLM's fused NVFP4 layer takes one global scale, "
                        "but their tensor scales differ"
                    )
    return refused


def scale_dtype(model_dtype: torch.dtype) -> torch.dtype:
    """How group and channel scales are stored: as the model computes them, but float16 (ours, lossless) for a
    float32 or float16 model."""
    return torch.bfloat16 if model_dtype == torch.bfloat16 else torch.float16


def scheme_for(level: VllmLevel | QuantizedWeight, targets: Iterable[str] = ()) -> QuantizationScheme | None:
    """The compressed-tensors scheme of a level (None for fp16, which stays dense and is ignored)."""
    if isinstance(level, QuantizedWeight):
        level = level_of(level)
    if level.kind == UNQUANTIZED:
        return None
    if level.kind == INTEGER:
        per_channel = level.group_size == PER_ROW
        weights = QuantizationArgs(
            num_bits=level.bits,
            type=QuantizationType.INT,
            symmetric=level.symmetric,
            strategy=QuantizationStrategy.CHANNEL if per_channel else QuantizationStrategy.GROUP,
            group_size=None if per_channel else level.group_size,
        )
        return QuantizationScheme(targets=list(targets), weights=weights, format=CompressionFormat.pack_quantized)
    if level.kind == FP8:
        weights = QuantizationArgs(
            num_bits=8,
            type=QuantizationType.FLOAT,
            symmetric=True,
            strategy=QuantizationStrategy.CHANNEL,
        )
        # Weight-only FP8 is what compressed-tensors calls naive-quantized (float-quantized implies activations).
        return QuantizationScheme(targets=list(targets), weights=weights, format=CompressionFormat.naive_quantized)
    if level.kind == NVFP4:
        weights = QuantizationArgs(  # compressed-tensors' NVFP4A16 preset
            num_bits=4,
            type=QuantizationType.FLOAT,
            symmetric=True,
            strategy=QuantizationStrategy.TENSOR_GROUP,
            group_size=NVFP4_BLOCK,
            scale_dtype=torch.float8_e4m3fn,
            zp_dtype=torch.float8_e4m3fn,
        )
        return QuantizationScheme(targets=list(targets), weights=weights, format=CompressionFormat.nvfp4_pack_quantized)
    raise ValueError(refusal(level, 1, 1) or f"{level.name}: no compressed-tensors scheme")


def compressed_tensors_bytes(
    level: VllmLevel,
    out_features: int,
    in_features: int,
    bias: bool,
    dtype: torch.dtype = torch.float16,
    stored: torch.dtype | None = None,
) -> int:
    """Bytes of one Linear as the checkpoint stores it (every tensor it writes for it), for a model of `dtype`
    whose unquantized tensors (weights, biases) are stored in `stored` (`dtype` itself by default)."""
    level = level.on(in_features)
    stored = stored or dtype
    bias_bytes = out_features * stored.itemsize if bias else 0
    if level.kind == UNQUANTIZED:
        return out_features * in_features * stored.itemsize + bias_bytes
    scale_bytes = scale_dtype(dtype).itemsize
    if level.kind == INTEGER:
        groups = 1 if level.group_size == PER_ROW else math.ceil(in_features / level.group_size)
        words = out_features * math.ceil(in_features * level.bits / _WORD_BITS)
        zeros = 0 if level.symmetric else math.ceil(out_features * level.bits / _WORD_BITS) * groups
        return (words + zeros) * 4 + out_features * groups * scale_bytes + _SHAPE_BYTES + bias_bytes
    if level.kind == FP8:
        return out_features * in_features + out_features * scale_bytes + bias_bytes
    if level.kind == NVFP4:
        return out_features * math.ceil(in_features / 2) + out_features * in_features // NVFP4_BLOCK + 4 + bias_bytes
    raise ValueError(refusal(level, out_features, in_features) or f"{level.name}: no compressed-tensors form")


def write_compressed_tensors(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    quantized: Mapping[str, QuantizedWeight],
    out_dir: Path,
    *,
    tile_padding: bool = True,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write `model`, whose Linears named in `quantized` compute with those weights dequantized (as
    `compress.apply_plan` leaves them), as a compressed-tensors checkpoint folder; the model is left unchanged.
    Every tensor but the quantized weights (and their scales) is stored in `dtype`, the dtype vLLM then serves the
    model in (config.json's torch_dtype): the model's own by default.

    Raises ValueError, before writing anything, when a Linear's weight is not what its codes dequantize to, or a
    level is one vLLM cannot run (`refusal`, `fusion_refusals`; `tile_padding` as there).
    """
    linears = {name: module for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    _check(model, linears, quantized, tile_padding)
    # A copy of the module tree that shares every parameter: compression replaces the copy's parameters only.
    memo = {id(tensor): tensor for tensor in [*model.parameters(), *model.buffers()]}
    quantized_weights = {id(linears[name].weight) for name in quantized}
    if dtype is not None and dtype != model.dtype:  # the others as vLLM serves them: new tensors, the model's kept
        for parameter in model.parameters():
            if id(parameter) not in quantized_weights and parameter.is_floating_point():
                memo[id(parameter)] = nn.Parameter(parameter.detach().to(dtype), requires_grad=False)
    shell = copy.deepcopy(model, memo)
    if dtype is not None:
        shell.config.torch_dtype = dtype
    shell_modules = dict(shell.named_modules())
    schemes: dict[VllmLevel, QuantizationScheme] = {}
    for name, stored in quantized.items():
        level = level_of(stored)
        scheme = schemes.get(level)
        if scheme is None:
            scheme = schemes[level] = scheme_for(level)
        scheme.targets.append(name)
        _attach(shell_modules[name], scheme, stored, model.dtype)
    compressor = ModelCompressor.from_pretrained_model(shell)
    config = compressor.quantization_config
    config.config_groups = {level.name: scheme for level, scheme in schemes.items()}
    config.ignore = [
        name
        for name, module in shell.named_modules(remove_duplicate=False)
        if isinstance(module, nn.Linear | nn.Embedding) and name not in quantized
    ]
    compressor.compress_model(shell)
    for name, stored in quantized.items():
        _check_stored_codes(name, shell_modules[name], stored)
    out_dir = Path(out_dir)
    shell.save_pretrained(out_dir)
    compressor.update_config(str(out_dir))
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir


def load_compressed_tensors(
    out_dir: Path, dtype: torch.dtype | str = "auto", device: str | torch.device = "cpu"
) -> PreTrainedModel:
    """A compressed-tensors checkpoint loaded by transformers and dequantized into a plain model of `dtype` (the
    checkpoint's own for "auto"): every Linear holds its dequantized weight, without quantization parameters."""
    # compressed-tensors 0.20 lays out an empty (meta) asymmetric pack-quantized module with its zero-points
    # unpacked, int8 [out, groups], while checkpoints hold them packed, int32 [out·bits/32, groups]: transformers
    # then reports those (and only those) as mismatched, and they are read from the checkpoint as stored.
    model, info = AutoModelForCausalLM.from_pretrained(
        out_dir, dtype=dtype, device_map=device, ignore_mismatched_sizes=True, output_loading_info=True
    )
    mismatched = {key for key, *_ in info["mismatched_keys"]}
    if any(not key.endswith(".weight_zero_point") for key in mismatched):
        raise ValueError(f"{out_dir}: checkpoint tensors of unexpected shapes: {', '.join(sorted(mismatched))}")
    for key, tensor in _checkpoint_tensors(Path(out_dir), mismatched).items():
        module_name, _, name = key.rpartition(".")
        _register(model.get_submodule(module_name), name, tensor.to(device))
    for module in model.modules():
        if is_module_quantized(module):
            # Each module with its own scheme (see the module docstring for why not `dequantize=True`).
            decompress_module(module, leave_decompressed=False)
            # NVFP4 decompresses to bfloat16 whatever the model's dtype; a Linear must run in the model's.
            module.weight.data = module.weight.data.to(model.dtype)
    model.hf_quantizer.compressor.remove_decompression_hook(model)
    return model.eval()


def _checkpoint_tensors(folder: Path, keys: Collection[str]) -> dict[str, torch.Tensor]:
    """The named tensors as the checkpoint's safetensors files store them."""
    found = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, "pt") as file:
            found |= {key: file.get_tensor(key) for key in file.keys() if key in keys}  # noqa: SIM118 (not a dict)
    return found


def _check(
    model: PreTrainedModel,
    linears: Mapping[str, nn.Linear],
    quantized: Mapping[str, QuantizedWeight],
    tile_padding: bool,
) -> None:
    """Refuse, in one ValueError listing every reason, what the checkpoint could not hold exactly or vLLM run."""
    refused = []
    levels = {name: FP16_LEVEL for name in linears}
    for name, stored in quantized.items():
        module = linears.get(name)
        if module is None:
            refused.append(f"{name}: not a Linear of the model")
            continue
        levels[name] = level = level_of(stored)
        reason = refusal(level, *module.weight.shape, tile_padding=tile_padding)
        if reason is not None:
            refused.append(f"{name}: {reason}")
        elif not torch.equal(module.weight.data, stored.dequantize(model.dtype).to(module.weight.device)):
            refused.append(f"{name}: its weight is not what its codes dequantize to; write the compressed model")
    tensor_scales = {name: stored.tensor_scale for name, stored in quantized.items() if stored.format == NVFP4}
    refused += fusion_refusals(levels, tensor_scales)
    if refused:
        raise ValueError("cannot write this model for vLLM: " + "; ".join(refused))


def _attach(module: nn.Linear, scheme: QuantizationScheme, stored: QuantizedWeight, dtype: torch.dtype) -> None:
    """Our scales (and zero-points, global scale) on a Linear, as compressed-tensors' calibration leaves them."""
    # The compressors divide the weight by its scale in the weight's dtype: in float32 the quotient is our code's
    # value to far within half a step; in bfloat16 (8 significant bits) an 8-bit code can land half a step off.
    _register(module, "weight", module.weight.data.float())
    device = module.weight.device
    if stored.format == NVFP4:
        # The compressor rounds these to e4m3 itself; they are e4m3 values already, held in float32.
        scale = stored.scale.to(torch.float32)
        reciprocal = torch.reciprocal(torch.tensor([stored.tensor_scale], dtype=torch.float32))
        _register(module, "weight_global_scale", reciprocal)
    else:
        # The scale the model computes with (float16 ones rounded to bfloat16 in a bfloat16 model): its weights
        # are multiples of that one.
        scale = stored.scale.to(dtype).to(scale_dtype(dtype))
    _register(module, "weight_scale", scale.to(device))
    if stored.format is None and not stored.symmetric:
        signed_zero = stored.zero.to(torch.int32) - 2 ** (stored.bits - 1)
        _register(module, "weight_zero_point", signed_zero.to(device, torch.int8))
    module.quantization_scheme = scheme
    module.quantization_status = QuantizationStatus.FROZEN


def _register(module: nn.Module, name: str, value: torch.Tensor) -> None:
    module.register_parameter(name, nn.Parameter(value, requires_grad=False))


def _check_stored_codes(name: str, module: nn.Module, stored: QuantizedWeight) -> None:
    """The compressed tensors must hold exactly our codes (and zero-points, e4m3 scales): compression re-quantized
    our dequantized weights, and a rounding slip there would otherwise ship unnoticed."""
    codes = stored.codes.to(torch.int32)
    if stored.format is None:
        offset = 2 ** (stored.bits - 1)
        found = unpack_from_int32(module.weight_packed, stored.bits, codes.shape).to(torch.int32) + offset
        exact = torch.equal(found.cpu(), codes.cpu())
        if not stored.symmetric:
            zeros = unpack_from_int32(module.weight_zero_point, stored.bits, stored.zero.shape, packed_dim=0)
            exact = exact and torch.equal((zeros.to(torch.int32) + offset).cpu(), stored.zero.to(torch.int32).cpu())
    elif stored.format == FP8:
        exact = torch.equal(module.weight.view(torch.uint8).to(torch.int32).cpu(), codes.cpu())
    else:
        packed = module.weight_packed.to(torch.int32).cpu()
        exact = torch.equal(packed & 0xF, codes[:, 0::2].cpu()) and torch.equal(packed >> 4, codes[:, 1::2].cpu())
        scales = module.weight_scale.view(torch.uint8).cpu()
        exact = exact and torch.equal(scales, scale_codes(stored.scale, "e4m3").cpu())
    if not exact:
        raise ValueError(f"{name}: compressed-tensors did not store our codes exactly; nothing was written")


_HEADER_ENTRY_BYTES = 50  # a safetensors header entry beyond its name and offsets: "":{"dtype":..,"shape":[..],..},
_HEADER_START_BYTES = 8 + len('{"__metadata__":{"format":"pt"}}')  # the header's length, then its metadata


def stored_names(level: VllmLevel, bias: bool) -> tuple[str, ...]:
    """The tensors the checkpoint stores for one Linear at `level`, by their names under the Linear's."""
    names = {
        INTEGER: ("weight_packed", "weight_scale", "weight_shape"),
        FP8: ("weight", "weight_scale"),
        NVFP4: ("weight_packed", "weight_scale", "weight_global_scale"),
        UNQUANTIZED: ("weight",),
    }[level.kind]
    if level.kind == INTEGER and not level.symmetric:
        names += ("weight_zero_point",)
    return names + (("bias",) if bias else ())


class VllmTarget(LinearTarget):
    """compressed-tensors for vLLM: weight-only int4/int8 (groups of 32, 64, 128 or per channel), FP8 E4M3 per
    channel, NVFP4 and fp16, no sparsity; each Linear as `compressed_tensors_bytes` counts it, every other tensor in
    the dtype vLLM serves the model in (`serve_dtype`, bfloat16 unless `compression.serve_dtype` says float16, not
    the dtype the model loads in for the search), and the safetensors header."""

    name = "vllm"
    export_format = "compressed-tensors"
    serves_in_dtype = True  # vLLM serves the model in bfloat16 or float16, whatever the search loads it in

    def __init__(self, serve_dtype: torch.dtype = torch.bfloat16) -> None:
        self.serve_dtype = serve_dtype

    def for_config(self, config: Config) -> VllmTarget:
        serve_dtype = getattr(torch, config.compression.serve_dtype)
        return self if serve_dtype == self.serve_dtype else VllmTarget(serve_dtype)

    def level(self, setting: LayerCompression, plan: CompressionPlan) -> VllmLevel:
        return level_for(setting.level, plan.group_size, plan.symmetric)

    def check_config(self, config: Config) -> None:
        super().check_config(config)
        search, compression = config.search, config.compression
        sparse = [level for level in search.sparsity_levels() if level > 0]
        if sparse:
            raise ValueError(
                f"compression.target vllm: vLLM runs no sparse weights, so search.sparsity must be 0, got {sparse}"
            )
        if compression.quantization in FORMATS:
            raise ValueError(
                "compression.target vllm: compression.quantization is the method of the integer levels (rtn, gptq, "
                "gptq-actorder); name number formats in search.formats"
            )
        if compression.granularity == "linear" and len(search.precision_levels()) > 1:
            raise ValueError(
                "compression.target vllm: vLLM runs q/k/v_proj and gate/up_proj each as one layer of one scheme, "
                "which per-Linear levels would split; use granularity: block"
            )
        plan = CompressionPlan(**compression.plan_options())
        for precision in search.precision_levels():
            # A level refused on rows of 1024 inputs (which every allowed group divides) is refused on any shape.
            reason = refusal(self.level(setting_of(precision), plan), MARLIN_TILE_OUT, 8 * MARLIN_TILE_IN)
            if reason is not None:
                raise ValueError(f"compression.target vllm: {reason}")

    def check_model(self, config: Config) -> None:
        plan = CompressionPlan(**config.compression.plan_options())
        levels = [self.level(setting_of(precision), plan) for precision in config.search.precision_levels()]
        for linear in compressible_linears(meta_model(config.model)):
            for level in levels:
                reason = refusal(level, *linear.module.weight.shape)
                if reason is not None:
                    raise UserError(f"compression.target vllm: {linear.name}: {reason}")

    def linear_bytes(
        self,
        setting: LayerCompression,
        plan: CompressionPlan,
        out_features: int,
        in_features: int,
        bias: bool,
        dtype: torch.dtype,
    ) -> int:
        level = self.level(setting, plan)
        reason = "vLLM runs no sparse weights" if setting.sparsity > 0 else refusal(level, out_features, in_features)
        if reason is not None:  # a plan given by hand (apply --plan) that the config's levels did not vet
            raise UserError(f"compression.target vllm: {reason}")
        return compressed_tensors_bytes(level, out_features, in_features, bias, dtype, self.serve_dtype)

    def tensor_bytes(self, numel: int, dtype: torch.dtype) -> int:
        return numel * self.serve_dtype.itemsize

    def overhead_bytes(self, model: nn.Module, plan: CompressionPlan) -> int:
        """The safetensors header: the length, the metadata, then one entry per tensor (its name, dtype, shape and
        offsets, whose digits are estimated from the dense model's bytes)."""
        linears = compressible_linears(model)
        names = []
        for linear in linears:
            level = self.level(plan.setting(linear.name, linear.block), plan)
            names += [f"{linear.name}.{leaf}" for leaf in stored_names(level, linear.module.bias is not None)]
        inside = {f"{linear.name}.{leaf}" for linear in linears for leaf in ("weight", "bias")}
        names += [name for name, _ in model.named_parameters() if name not in inside]  # tied ones once
        offset_digits = len(str(sum(parameter.numel() for parameter in model.parameters()) * 2))
        entries = sum(len(name) + _HEADER_ENTRY_BYTES + 2 * offset_digits for name in names)
        return _HEADER_START_BYTES + entries

    def export(self, given: ExportInput, out_dir: Path) -> Written:
        """A compressed-tensors checkpoint of the compressed model: the codes and scales it computes with, written
        by compressed-tensors' own compressors, and our provenance beside it."""
        compressed = given.compressed
        pruned = sorted(name for name, kept in compressed.items() if kept.mask is not None)
        if pruned:
            raise UserError(f"export: compressed-tensors for vLLM stores no sparse weights, but {pruned[0]} is pruned")
        quantized = {name: kept.quantized for name, kept in compressed.items() if kept.quantized is not None}

        def write(folder: Path) -> None:
            try:
                write_compressed_tensors(given.model, given.tokenizer, quantized, folder, dtype=self.serve_dtype)
            except ValueError as error:
                raise UserError(f"export: {error}") from error
            provenance = with_versions({"format": self.export_format, **given.provenance})
            (folder / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2, default=json_default) + "\n")

        path = staged_write(out_dir, write)
        return Written(path, sum(file.stat().st_size for file in path.glob("*.safetensors")))


def setting_of(precision: int | str) -> LayerCompression:
    """An unpruned setting at a precision level (a bit-width, or a level name)."""
    return LayerCompression(bits=precision) if isinstance(precision, int) else LayerCompression(format=precision)


TARGET = VllmTarget()
