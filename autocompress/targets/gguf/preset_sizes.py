"""Size limits named by llama.cpp preset: `search.budget: {size: q4_k_m}`, `search.max_size: q4_k_m`,
`frontier --max-size q4_k_m`, `export --max-size q4_k_m`.

A preset's name stands for the file `llama-quantize --imatrix` writes of the study's model with that preset. Its
bytes are computed, not measured: llama.cpp's type for every tensor (`presets.preset_types`, its per-tensor
rules and fallbacks) sized by the GGUF writer's layout (`file.gguf_layout`, exact from shapes). The
llama.cpp file holds a few more metadata keys than ours (those naming its importance matrix: 256 bytes more on
SmolLM2-135M, `results/benchmarks/gguf.csv`), so the figure never exceeds the preset's file.

The limit a study searches under is that size less what an export adds to the bytes a trial counts: the plan
(`autocompress.plan`, as long as its longest level names make it) and the provenance (the study's config, package
versions, and at most `PROVENANCE_FIGURES_BYTES` of figures, names and dates), so the exported file, metadata
included, is no larger than the preset's.
"""

from __future__ import annotations

import functools
import json
from typing import TYPE_CHECKING

from autocompress.errors import UserError

if TYPE_CHECKING:
    from autocompress.config import Config, ModelConfig

# What an export's provenance holds beyond the config and the package versions: the study and trial, how it was
# chosen, the storage URL, the trial's and the held-out figures (a few dozen numbers), the dense bytes, the date.
# A long storage path or --pick reason fits: these take about 1 kB on the embedded model's exports.
PROVENANCE_FIGURES_BYTES = 4096


def preset_names() -> tuple[str, ...]:
    """The llama.cpp presets a size limit may name."""
    from autocompress.targets.gguf.presets import PRESETS

    return tuple(PRESETS)


def preset_file_bytes(config: Config, preset: str) -> int:
    """Bytes of the GGUF file of the config's model with every tensor in the type llama.cpp's `preset` gives it
    (with an importance matrix), as the project's writer lays it out with no provenance: the size of the file
    `llama-quantize --imatrix` writes, less the keys that name its importance matrix."""
    return _sizes(config.model_dump_json(), preset)[0]


def preset_ceiling(config: Config, preset: str) -> int:
    """The bytes a trial may count under a limit named `preset`: the preset's file less what an export adds."""
    file_bytes, metadata_bytes = _sizes(config.model_dump_json(), preset)
    return file_bytes - metadata_bytes


def check_size_budget(config: Config) -> None:
    """A UserError (one line) for a size budget below the smallest plan of a gguf study without block shapes (every
    unit at its first level), from the model's config alone: what a study refuses once its model loads
    (`search.study.check_budget`), refused before. The smallest plan with block shapes is a deci file whose layout
    needs the model's blocks, so that refusal waits for the model."""
    from autocompress.allocation import below_the_smallest_plan
    from autocompress.targets.gguf.weights import space_levels

    budget = config.search.budget
    if budget is None or budget.dimension != "size" or config.search.structure is not None:
        return
    _, tensors, layout = _layout(config.model.model_dump_json(), config.compression.granularity)
    levels = space_levels(config)
    smallest = layout.file_bytes({f"{tensor.module}.weight": levels[tensor.unit][0] for tensor in tensors})
    ceiling = budget.max_bytes(layout.file_bytes(), config)
    if smallest > ceiling:
        raise UserError(f"search.budget: {below_the_smallest_plan(ceiling, smallest)}")


@functools.lru_cache(maxsize=16)
def _sizes(config_json: str, preset: str) -> tuple[int, int]:
    """(the preset's file bytes, the bytes an export's metadata adds to a trial's) for the study of `config_json`."""
    from autocompress.config import Config
    from autocompress.plan import CompressionPlan, LayerCompression
    from autocompress.targets.gguf.file import PLAN_KEY
    from autocompress.targets.gguf.presets import PRESETS, is_quantized, preset_types
    from autocompress.targets.gguf.weights import space_levels

    if preset not in PRESETS:
        raise UserError(f"size {preset!r}: not a llama.cpp preset; known: {', '.join(PRESETS)}")
    config = Config.model_validate_json(config_json)
    if config.compression.target != "gguf":
        raise UserError(f"size {preset!r}: a llama.cpp preset's size is a budget of compression.target: gguf only")
    model_config, tensors, layout = _layout(config.model.model_dump_json(), config.compression.granularity)
    heads = model_config.num_attention_heads
    types = preset_types(
        preset,
        [(tensor.gguf_name, tensor.shape) for tensor in tensors],
        model_config.num_hidden_layers,
        n_head=heads,
        n_head_kv=getattr(model_config, "num_key_value_heads", None) or heads,
        imatrix=True,
    )
    chosen = {f"{t.module}.weight": types[t.gguf_name] for t in tensors if is_quantized(types[t.gguf_name])}
    file_bytes = layout.file_bytes(chosen)

    # The longest plan: every unit at its level of the longest JSON (a unit's entry depends on its level alone).
    longest = {
        unit: max((LayerCompression(format=level) for level in levels), key=lambda each: len(each.model_dump_json()))
        for unit, levels in space_levels(config).items()
    }
    plan_json = CompressionPlan(**config.compression.plan_options(), layers=longest).model_dump_json()
    provenance_json = json.dumps({"config": json.loads(config_json), "versions": _versions()}, default=str)
    # GGUF string key-values: the key (u64 length, bytes), the value type (u32), the value (u64 length, bytes); the
    # search's layout already holds an empty provenance, "{}".
    plan_kv = 8 + len(PLAN_KEY.encode()) + 4 + 8 + len(plan_json.encode())
    provenance_growth = len(provenance_json.encode()) - len(b"{}")
    return file_bytes, plan_kv + provenance_growth + PROVENANCE_FIGURES_BYTES + layout.alignment


@functools.lru_cache(maxsize=4)
def _layout(model_json: str, granularity: str):
    """The model's config, the tensors a gguf plan types, and the GGUF layout of its file with no provenance."""
    from autocompress.config import ModelConfig
    from autocompress.models import meta_model
    from autocompress.targets.gguf.file import gguf_layout, tokenizer_gguf
    from autocompress.targets.gguf.weights import gguf_tensors

    model_config = ModelConfig.model_validate_json(model_json)
    model = meta_model(model_config)
    tokenizer_source = tokenizer_gguf(model_config)
    tokenizer = None if tokenizer_source is not None else _tokenizer(model_config)
    return model.config, gguf_tensors(model, granularity), gguf_layout(model, tokenizer, tokenizer_source)


def _tokenizer(model: ModelConfig):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model.name, trust_remote_code=model.trust_remote_code)
    except Exception as error:  # a hub model not cached, a folder without a tokenizer: one line
        raise UserError(f"size: cannot load {model.name}'s tokenizer to size a preset's file ({error})") from error


def _versions() -> dict[str, str]:
    from autocompress.targets.artifact import package_versions

    return package_versions()
