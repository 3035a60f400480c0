"""How fast llama.cpp runs a GGUF file on this machine, predicted from its tensors' types and shapes: a table of
timings that llama.cpp itself produced, measured once per machine and cached.

llama.cpp's Python bindings time no single operation, so the table is measured through llama.cpp's own loader and
graph, on synthetic GGUF files (written by `file.write_gguf_tensors`) of the model's architecture (its widths,
heads and vocabulary), and timed with llama.cpp's performance counters (`LlamaCppModel.timings`):
- a layer: all-F16 files (the reference type) with a quarter of the model's layers and with all of them
  (`probe_layers`); the difference in time over the difference in layer count is one layer's time (its matrices in
  F16, attention over the context, norms);
- the output matrix: the long file against one with a tiny vocabulary; what is left of the short file's time is the
  fixed part (embedding lookup, final norm, graph);
- a tensor type at a shape: long files whose tensors of that shape (attn_q and attn_output, attn_k and attn_v,
  ffn_gate and ffn_up, ffn_down, as the widths group them; or the output matrix, or the tied embedding) are in that
  type and the rest F16; the paired difference from the all-F16 file over the count of such tensors is that type's
  time at that shape, relative to F16;
- a block alternative (`search.structure`: an FFN of w channels, attention of g key/value groups, none): a `deci`
  file (written as exports write them: `structure.build_structured`, then the same writer) whose layers all take it
  (for no attention, all but the first, as llama.cpp needs), F16, paired with the long llama file, over the count
  of such layers, is that layer's difference from the teacher's F16 layer: its matrices at their real shapes and,
  for attention, the attention over the context of its heads, measured, not assumed; files of it whose alternative
  matrices of one shape (gate/up [w, hidden], down [hidden, w]; q [g·per group·head_dim, hidden], k/v
  [g·head_dim, hidden], o [hidden, g·per group·head_dim]) are in a type, paired with it, are that type's times at
  those shapes, each in the type a level stores there (`structured.storable_level`).
Every probe but one has the model's own vocabulary and layer count (up to `PROBE_BYTES` of F16 layers), so that
each token streams as many weights as the model does: on this machine one F16 layer of SmolLM2 took 0.33 ms in a
2-to-8-layer file, 0.35 ms from 8 to 16 layers and 0.38 ms from 16 to 30, and a probe small enough to stay in the
CPU's caches between tokens would time a matrix faster than the model runs it.
llama.cpp repacks some types at load for the CPU (q4_0, q4_K, iq4_nl and mxfp4 into interleaved layouts on AVX2,
when the rows come in eights: `ggml-cpu/repack.cpp`); the probes load through the same loader, so the table
holds the time of what llama.cpp runs, not of what the file stores.

A file's predicted time is then the fixed part + the F16 output matrix + each block's time (the F16 layer plus the
differences of the alternatives it is made of; nothing for a removed block, which llama.cpp skips) + each matrix's
difference from F16 at its shape, for one decoded token (after a prompt of `prompt_tokens`, so attention covers
that context) and for the prompt as one batch. Timings are paired (probe and reference alternately, the median of
differences), since the machine may be busy; the table is keyed by the llama.cpp build (llama-cpp-python's version
and a digest of its libraries), the CPU (model and flags) and the thread count, and by the architecture.
"""

from __future__ import annotations

import hashlib
import json
import platform
import statistics
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gguf
import numpy as np
import torch
from filelock import FileLock

from autocompress.files import write_text_atomically
from autocompress.models import cache_dir
from autocompress.plan import BlockStructure, CompressionPlan
from autocompress.structure import BlockShape, block_index, block_shape, build_structured
from autocompress.targets.base import Speed, SpeedModel
from autocompress.targets.gguf.blocks import GgufBlocks, fits, quantize_rows
from autocompress.targets.gguf.llama_cpp import LlamaCppModel, Timing, _threads

if TYPE_CHECKING:
    from autocompress.targets.gguf.weights import GgufWeights, UnitTensor

REFERENCE = "f16"  # every shape takes it; the types' times are differences from it
PROBE_BYTES = 2 << 30  # the F16 layers of the longest probe, at most: the model's own layers where they fit
PROBE_VOCAB = 32
PROMPT_TOKENS = 64  # the prompt batch, and the context each decoded token attends over
DECODE_TOKENS = 32
REPEATS = 5
METHOD = 1  # bumped when the way of measuring changes, so older tables are measured again (block alternatives
# were added to the table without changing how its other entries are measured: an older table gains them)
_SAMPLE_ROWS = 8  # rows quantized per probe tensor, repeated to its height (timing does not read the values)

# A llama layer's matrices by role: the state-dict module under model.layers.N, and its [out, in] shape.
_ROLES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_ATTENTION_ROLES = ("q_proj", "k_proj", "v_proj", "o_proj")
_FFN_ROLES = ("gate_proj", "up_proj", "down_proj")
SubBlock = tuple[str, int]  # a block's alternative: ("attention", key/value groups kept) or ("ffn", channels kept)
_MODULES = {
    "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj",
    "o_proj": "self_attn.o_proj",
    "gate_proj": "mlp.gate_proj",
    "up_proj": "mlp.up_proj",
    "down_proj": "mlp.down_proj",
}


@dataclass(frozen=True)
class Architecture:
    """What llama.cpp's time per token depends on besides the tensor types: a llama model's widths and vocabulary."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    layers: int

    @classmethod
    def of_config(cls, config) -> Architecture:
        """From a transformers config of the llama family."""
        heads = config.num_attention_heads
        return cls(
            hidden=config.hidden_size,
            intermediate=config.intermediate_size,
            heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            vocab=config.vocab_size,
            tied=bool(getattr(config, "tie_word_embeddings", False)),
            layers=config.num_hidden_layers,
        )

    @property
    def block(self) -> BlockShape:
        """The teacher's decoder block: every block of a llama file."""
        return BlockShape(self.intermediate, self.heads, self.kv_heads)

    @property
    def per_group(self) -> int:
        return self.heads // self.kv_heads

    def role_shapes(self, block: BlockShape | None = None) -> dict[str, tuple[int, int]]:
        """Each matrix's [out, in] in a block of `block`'s dimensions (the teacher's by default), as transformers
        stores it; a block without attention has no q/k/v/o, a removed block no matrix."""
        block = block or self.block
        if block.removed:
            return {}
        attention = block.num_attention_heads * self.head_dim
        kv = block.num_key_value_heads * self.head_dim
        width = block.intermediate_size
        shapes = {}
        if attention:
            shapes |= {"q_proj": (attention, self.hidden), "k_proj": (kv, self.hidden)}
            shapes |= {"v_proj": (kv, self.hidden), "o_proj": (self.hidden, attention)}
        return shapes | {
            "gate_proj": (width, self.hidden),
            "up_proj": (width, self.hidden),
            "down_proj": (self.hidden, width),
        }

    def sub_blocks(self, block: BlockShape) -> list[SubBlock]:
        """The alternatives a block of `block`'s dimensions is made of where it differs from the teacher's (none
        for a removed block, which computes nothing); ValueError (one line) for attention whose query heads per
        key/value group are not the teacher's, which no alternative has."""
        if block.removed:
            return []
        found: list[SubBlock] = []
        groups = block.num_key_value_heads
        if block.num_attention_heads != groups * self.per_group:
            raise ValueError(
                f"a block of {block.num_attention_heads} query heads in {groups} key/value groups: the speed model "
                f"times attention alternatives of the teacher's {self.per_group} query heads per group"
            )
        if groups != self.kv_heads:
            found.append(("attention", groups))
        if block.intermediate_size != self.intermediate:
            found.append(("ffn", block.intermediate_size))
        return found

    def alternative_block(self, sub_block: SubBlock) -> BlockShape:
        """The teacher's block with one sub-block replaced by `sub_block`."""
        kind, level = sub_block
        if kind == "attention":
            return BlockShape(self.intermediate, level * self.per_group, level)
        return BlockShape(level, self.heads, self.kv_heads)

    def alternative_groups(self, sub_block: SubBlock) -> dict[tuple[int, int], list[str]]:
        """The matrices of an alternative (its own sub-block's only) grouped by shape: each group is probed
        together."""
        roles = _ATTENTION_ROLES if sub_block[0] == "attention" else _FFN_ROLES
        groups: dict[tuple[int, int], list[str]] = {}
        for role, shape in self.role_shapes(self.alternative_block(sub_block)).items():
            if role in roles:
                groups.setdefault(shape, []).append(role)
        return groups

    def probe_structure(self, sub_block: SubBlock, layers: int) -> dict[str, BlockStructure]:
        """The block structures of a probe of `layers` layers that all take `sub_block` (but the first, which
        llama.cpp needs with attention, for no attention)."""
        kind, level = sub_block
        if kind == "attention":
            structure = BlockStructure(kv_groups=level)
        else:
            structure = BlockStructure(ffn=level / self.intermediate)
        first = 1 if sub_block == ("attention", 0) else 0
        return {f"model.layers.{layer}": structure for layer in range(first, layers)}

    def shape_groups(self) -> dict[tuple[int, int], list[str]]:
        """The layer matrices grouped by shape: each group is probed together."""
        groups: dict[tuple[int, int], list[str]] = {}
        for role, shape in self.role_shapes().items():
            groups.setdefault(shape, []).append(role)
        return groups

    def probe_layers(self) -> tuple[int, int]:
        """The layer counts of the short and long reference probes: the model's own count, fewer where its F16
        layers would exceed `PROBE_BYTES`, and a quarter of that."""
        layer_bytes = 2 * sum(out * columns for out, columns in self.role_shapes().values())
        long = max(2, min(self.layers, PROBE_BYTES // layer_bytes))
        return max(1, long // 4), long

    @property
    def head_shape(self) -> tuple[int, int]:
        return (self.vocab, self.hidden)

    def probe_config(self, layers: int, vocab: int):
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=vocab,
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            head_dim=self.head_dim,
            max_position_embeddings=4096,
            tie_word_embeddings=self.tied,
        )


def _key(type_name: str, shape: Sequence[int]) -> str:
    return f"{type_name}:{shape[0]}x{shape[1]}"


def _sub_block_key(sub_block: SubBlock) -> str:
    return f"{sub_block[0]}:{sub_block[1]}"


def _describe(sub_block: SubBlock) -> str:
    kind, level = sub_block
    return f"attention of {level} key/value groups" if kind == "attention" else f"an FFN of {level} channels"


@dataclass
class SpeedTable:
    """llama.cpp's timings on one machine for one architecture, in seconds: `prompt_s` for the whole prompt batch of
    `prompt_tokens`, `decode_s` for one token decoded after it.

    `fixed`: the time outside the layers and the output matrix; `layer`: one layer with F16 matrices; `head`: the
    output matrix in F16; `deltas`: per `type:OUTxIN`, one matrix of that type and shape minus the same in F16;
    `sub_blocks`: per alternative (`attention:GROUPS`, `ffn:CHANNELS`), one F16 layer with it minus the teacher's
    F16 layer (its matrices at their shapes and, for attention, the attention over the context of its heads)."""

    machine: dict[str, Any]
    architecture: Architecture
    prompt_tokens: int
    decode_tokens: int
    fixed: Timing
    layer: Timing
    head: Timing
    deltas: dict[str, Timing] = field(default_factory=dict)
    reference: str = REFERENCE
    sub_blocks: dict[str, Timing] = field(default_factory=dict)

    def delta(self, type_name: str, shape: Sequence[int]) -> Timing:
        if type_name == self.reference:
            return Timing(0.0, 0.0)
        key = _key(type_name, shape)
        if key not in self.deltas:
            raise ValueError(f"the speed table has no timing of {type_name} at [{shape[0]}, {shape[1]}]")
        return self.deltas[key]

    def block_seconds(self, block: BlockShape) -> Timing:
        """One decoder block of `block`'s dimensions with F16 matrices: the teacher's F16 layer plus the difference
        of each alternative it is made of; a removed block computes nothing."""
        if block.removed:
            return Timing(0.0, 0.0)
        prompt, decode = self.layer.prompt_s, self.layer.decode_s
        for sub_block in self.architecture.sub_blocks(block):
            key = _sub_block_key(sub_block)
            if key not in self.sub_blocks:
                raise ValueError(f"the speed table has no timing of a block with {_describe(sub_block)}")
            prompt += self.sub_blocks[key].prompt_s
            decode += self.sub_blocks[key].decode_s
        return Timing(prompt_s=prompt, decode_s=decode)

    def seconds(self, tensors: Iterable[tuple[str, Sequence[int]]], blocks: Sequence[BlockShape]) -> Timing:
        """Predicted seconds (prompt batch, one decoded token) of a model of these decoder blocks whose matrices
        (the blocks' and the output's, each once) have these (type, [out, in])."""
        prompt = self.fixed.prompt_s + self.head.prompt_s
        decode = self.fixed.decode_s + self.head.decode_s
        for block in blocks:
            seconds = self.block_seconds(block)
            prompt += seconds.prompt_s
            decode += seconds.decode_s
        for type_name, shape in tensors:
            delta = self.delta(type_name, shape)
            prompt += delta.prompt_s
            decode += delta.decode_s
        return Timing(prompt_s=prompt, decode_s=decode)

    def predict(self, tensors: Iterable[tuple[str, Sequence[int]]], blocks: Sequence[BlockShape]) -> Speed:
        seconds = self.seconds(tensors, blocks)
        return Speed(decode_tps=1.0 / seconds.decode_s, prompt_tps=self.prompt_tokens / seconds.prompt_s)

    def to_json(self) -> dict[str, Any]:
        return {
            "machine": self.machine,
            "architecture": asdict(self.architecture),
            "prompt_tokens": self.prompt_tokens,
            "decode_tokens": self.decode_tokens,
            "reference": self.reference,
            "fixed": asdict(self.fixed),
            "layer": asdict(self.layer),
            "head": asdict(self.head),
            "deltas": {key: asdict(value) for key, value in sorted(self.deltas.items())},
            "sub_blocks": {key: asdict(value) for key, value in sorted(self.sub_blocks.items())},
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SpeedTable:
        return cls(
            machine=dict(data["machine"]),
            architecture=Architecture(**data["architecture"]),
            prompt_tokens=int(data["prompt_tokens"]),
            decode_tokens=int(data["decode_tokens"]),
            reference=data["reference"],
            fixed=Timing(**data["fixed"]),
            layer=Timing(**data["layer"]),
            head=Timing(**data["head"]),
            deltas={key: Timing(**value) for key, value in data["deltas"].items()},
            sub_blocks={key: Timing(**value) for key, value in data.get("sub_blocks", {}).items()},
        )


# ---------------------------------------------------------------- what a model computes


def _computed(name: str, names: Iterable[str]) -> bool:
    """Whether a 2-D tensor is a matrix product of every token: all but an untied token embedding (a row lookup)."""
    return name != "token_embd.weight" or "output.weight" not in set(names)


def plan_tensors(
    weights: GgufWeights, plan: CompressionPlan, config
) -> tuple[list[tuple[str, tuple[int, int]]], list[BlockShape]]:
    """The (type, [out, in]) of every matrix a plan's GGUF file computes with (at the shapes its block structure
    gives them), and its decoder blocks' dimensions, from the GGUF backend's units (a plan sets the type of every
    decoder-block Linear and of the output matrix) and the model's `config`: shapes only, nothing is built."""
    stored = weights.stored_shapes(plan)
    names = [name for name, _, _ in stored]
    tensors = [(level, shape) for name, level, shape in stored if _computed(name, names)]
    architecture = Architecture.of_config(config)
    blocks = [architecture.block] * architecture.layers
    blocks_name = getattr(weights, "blocks_name", "model.layers")
    for name, structure in plan.structure.items():
        blocks[block_index(name, blocks_name)] = block_shape(structure, config)
    return tensors, blocks


def _plan_of(reader: gguf.GGUFReader) -> CompressionPlan | None:
    from autocompress.targets.gguf.file import PLAN_KEY

    field = reader.fields.get(PLAN_KEY)
    try:
        return None if field is None else CompressionPlan.from_json(field.contents())
    except ValueError:
        return None


def _deci_teacher(blocks: Sequence[BlockShape], plan: CompressionPlan | None) -> BlockShape:
    """The teacher's block of a deci file: read off the blocks its plan (`autocompress.plan`, where the exporter
    wrote one) leaves at the teacher's FFN width or attention, else the widest of its blocks."""
    widths, attention = [], []
    for index, block in enumerate(blocks):
        if plan is None or block.removed:
            continue
        structure = plan.structure.get(f"model.layers.{index}")
        widths.append(round(block.intermediate_size / (1.0 if structure is None else structure.ffn)))
        if structure is None or structure.kv_groups is None:
            attention.append((block.num_attention_heads, block.num_key_value_heads))
    width = widths[0] if widths else max(block.intermediate_size for block in blocks)
    heads, kv_heads = attention[0] if attention else max((b.num_attention_heads, b.num_key_value_heads) for b in blocks)
    return BlockShape(width, heads, kv_heads)


def file_architecture(path: Path | str) -> tuple[Architecture, list[tuple[str, tuple[int, int]]], list[BlockShape]]:
    """A GGUF file's architecture (for a `deci` file, its teacher's: `_deci_teacher`), the (type, [out, in]) of
    every matrix it computes with, and its decoder blocks' dimensions; ValueError (one line) for a file that is of
    neither of llama.cpp's `llama` and `deci` architectures (what the probes are)."""
    reader = gguf.GGUFReader(path)
    arch = reader.fields["general.architecture"].contents() if "general.architecture" in reader.fields else None

    def value(key: str, default: Any = None) -> Any:
        found = reader.fields.get(f"{arch}.{key}")
        return default if found is None else found.contents()

    if arch not in ("llama", "deci"):
        raise ValueError(f"{path}: the speed model probes llama.cpp's llama and deci architectures, not {arch!r}")
    shapes = {tensor.name: tuple(int(size) for size in reversed(tensor.shape.tolist())) for tensor in reader.tensors}
    hidden, layers = int(value("embedding_length")), int(value("block_count"))
    heads, widths = value("attention.head_count"), value("feed_forward_length")
    kv_heads = value("attention.head_count_kv", heads)
    if arch == "llama":
        block = BlockShape(int(widths), int(heads), int(kv_heads))
        blocks = [block] * layers
    else:
        blocks = [BlockShape(*map(int, dims)) for dims in zip(widths, heads, kv_heads, strict=True)]
        block = _deci_teacher(blocks, _plan_of(reader))
    architecture = Architecture(
        hidden=hidden,
        intermediate=block.intermediate_size,
        heads=block.num_attention_heads,
        kv_heads=block.num_key_value_heads,
        head_dim=int(value("attention.key_length", hidden // max(1, block.num_attention_heads))),
        vocab=shapes["token_embd.weight"][0],
        tied="output.weight" not in shapes,
        layers=layers,
    )
    tensors = [
        (tensor.tensor_type.name.lower(), shapes[tensor.name])
        for tensor in reader.tensors
        if len(shapes[tensor.name]) == 2 and _computed(tensor.name, shapes)
    ]
    return architecture, tensors, blocks


# ---------------------------------------------------------------- the machine


def _library_digest() -> str:
    """A digest of llama-cpp-python's shared libraries: the llama.cpp build that runs."""
    import llama_cpp

    folder = Path(llama_cpp.__file__).parent / "lib"
    digest = hashlib.sha256()
    for path in sorted({file.resolve() for file in folder.glob("*") if file.is_file()}):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _cpu() -> tuple[str, list[str]]:
    """The CPU's model name and feature flags (Linux /proc/cpuinfo; elsewhere what `platform` says)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine(), []
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    fields = {key.strip(): text.strip() for key, text in fields.items()}
    name = fields.get("model name") or fields.get("Model") or platform.machine()
    return name, sorted(set((fields.get("flags") or fields.get("Features") or "").split()))


def machine(threads: int) -> dict[str, Any]:
    """What a speed table is valid for: the llama.cpp build, what it was built to use, the CPU, the threads."""
    import llama_cpp

    name, flags = _cpu()
    return {
        "llama_cpp_python": llama_cpp.__version__,
        "libraries_sha256": _library_digest(),
        "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
        "cpu": name,
        "cpu_flags": flags,
        "threads": threads,
    }


# ---------------------------------------------------------------- measuring


def timing_model(path: Path | str, threads: int, prompt_tokens: int, decode_tokens: int) -> LlamaCppModel:
    """A GGUF file loaded for `measure_timing`: as llama.cpp serves (the last token's logits only), with a context
    of exactly the prompt and the decoded tokens, as the table's probes are run. The file is read into memory
    rather than mapped, so that no timing counts the page faults of a mapping the kernel reclaimed meanwhile."""
    return LlamaCppModel(path, n_ctx=prompt_tokens + decode_tokens, n_threads=threads, logits_all=False, use_mmap=False)


def _prompt(model: LlamaCppModel, prompt_tokens: int) -> list[int]:
    return [1 + index % (model.n_vocab - 1) for index in range(prompt_tokens)]


def measure_timing(model: LlamaCppModel, prompt_tokens: int, decode_tokens: int, repeats: int) -> list[Timing]:
    """`repeats` timings of one loaded model (after a warm-up run)."""
    prompt = _prompt(model, prompt_tokens)
    model.timings(prompt, 2)
    return [model.timings(prompt, decode_tokens) for _ in range(repeats)]


def median_timing(timings: Sequence[Timing]) -> Timing:
    return Timing(
        prompt_s=statistics.median(timing.prompt_s for timing in timings),
        decode_s=statistics.median(timing.decode_s for timing in timings),
    )


def paired_difference(
    reference: LlamaCppModel, probe: LlamaCppModel, prompt_tokens: int, decode_tokens: int, repeats: int
) -> tuple[Timing, Timing]:
    """The median over `repeats` pairs of (probe − reference) timings, each pair run back to back (in alternating
    order), so that a load on the machine that changes slowly cancels; and the reference's median timing."""
    differences, references = [], []
    for model in (reference, probe):
        model.timings(_prompt(model, prompt_tokens), 2)
    for repeat in range(repeats):
        pair = [reference, probe] if repeat % 2 == 0 else [probe, reference]
        timed = {id(model): model.timings(_prompt(model, prompt_tokens), decode_tokens) for model in pair}
        first, second = timed[id(reference)], timed[id(probe)]
        differences.append(Timing(second.prompt_s - first.prompt_s, second.decode_s - first.decode_s))
        references.append(first)
    return median_timing(differences), median_timing(references)


def _none_tokenizer(folder: Path) -> Path:
    """A GGUF file holding only `tokenizer.ggml.model = none`: the probes' tokenizer keys (llama.cpp then makes
    vocab_size dummy tokens, and ids are fed as they are)."""
    path = folder / "tokenizer.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tokenizer_model("none")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


class _ProbeWriter:
    """Writes the probe files of one architecture into a folder, through the project's GGUF writer."""

    def __init__(self, architecture: Architecture, folder: Path) -> None:
        self.architecture = architecture
        self.folder = folder
        self.tokenizer = _none_tokenizer(folder)
        self._models: dict[tuple[int, int], Any] = {}
        self._structured: tuple[str, Any] | None = None  # the last structured model: an alternative's probes share it
        self._rows: dict[tuple[str, int], np.ndarray] = {}

    def _model(self, layers: int, vocab: int):
        from transformers import LlamaForCausalLM

        if (layers, vocab) not in self._models:
            torch.manual_seed(0)
            self._models[layers, vocab] = LlamaForCausalLM(self.architecture.probe_config(layers, vocab)).eval()
        return self._models[layers, vocab]

    def _blocks(self, type_name: str, shape: tuple[int, int]) -> GgufBlocks:
        """A matrix of `shape` in `type_name`: a few random rows quantized, repeated to the height."""
        out, columns = shape
        if (type_name, columns) not in self._rows:
            generator = torch.Generator().manual_seed(columns)
            sample = torch.randn(_SAMPLE_ROWS, columns, generator=generator) * 0.02
            self._rows[type_name, columns] = quantize_rows(sample, type_name)
        rows = self._rows[type_name, columns]
        return GgufBlocks(type_name, np.ascontiguousarray(np.resize(rows, (out, rows.shape[1]))))

    def write(
        self,
        name: str,
        layers: int,
        vocab: int,
        types: Mapping[str, str],
        structure: Mapping[str, BlockStructure] | None = None,
    ) -> Path:
        """A probe of `layers` layers and `vocab` tokens whose tensors (by state-dict key) have `types`; the rest
        F16 (matrices) and F32 (norms), as the converter writes them. With `structure`, the blocks it names take
        those shapes (`structure.build_structured`) and the file is llama.cpp's `deci`, as an export writes it."""
        from autocompress.targets.gguf.file import write_gguf_tensors
        from autocompress.targets.gguf.structured import zero_importance

        model = self._model(layers, vocab)
        if structure:
            plan = CompressionPlan(structure=structure)
            key = f"{layers}/{vocab}/{plan.to_json()}"
            if self._structured is None or self._structured[0] != key:
                self._structured = (key, build_structured(model, plan, zero_importance(model.config)))
            model = self._structured[1]
        state = model.state_dict()
        tensors = {key: self._blocks(type_name, tuple(state[key].shape)) for key, type_name in types.items()}
        path = self.folder / f"{name}.gguf"
        write_gguf_tensors(model, None, tensors, path, tokenizer_source=self.tokenizer)
        return path


def _layer_types(layers: int, roles: Iterable[str], type_name: str) -> dict[str, str]:
    return {f"model.layers.{layer}.{_MODULES[role]}.weight": type_name for layer in range(layers) for role in roles}


def _head_key(architecture: Architecture) -> str:
    return "model.embed_tokens.weight" if architecture.tied else "lm_head.weight"


def probe_types(architecture: Architecture, types: Iterable[str]) -> dict[tuple[int, int], list[str]]:
    """The types probed at each shape (layer matrices' and the output's): those of `types` whose blocks split its
    rows, the reference left out."""
    shapes = [*architecture.shape_groups(), architecture.head_shape]
    return {
        shape: [name for name in dict.fromkeys(types) if name != REFERENCE and fits(name, shape[1])] for shape in shapes
    }


def alternative_probe_types(
    architecture: Architecture, types: Iterable[str], sub_block: SubBlock
) -> dict[tuple[int, int], list[str]]:
    """The types probed at each shape of an alternative's matrices: what each of `types` stores at its rows
    (itself, or llama.cpp's fallback for a row it does not split: `structured.storable_level`), the reference
    left out."""
    from autocompress.targets.gguf.structured import storable_level

    return {
        shape: [name for name in dict.fromkeys(storable_level(kind, shape[1]) for kind in types) if name != REFERENCE]
        for shape in architecture.alternative_groups(sub_block)
    }


def table_entries(
    architecture: Architecture, types: Iterable[str], sub_blocks: Iterable[SubBlock] = ()
) -> tuple[set[str], set[str]]:
    """The `deltas` and `sub_blocks` keys a table of `types` and these alternatives holds."""
    types = list(types)
    deltas = {_key(name, shape) for shape, names in probe_types(architecture, types).items() for name in names}
    for sub_block in sub_blocks:
        found = alternative_probe_types(architecture, types, sub_block)
        deltas |= {_key(name, shape) for shape, names in found.items() for name in names}
    return deltas, {_sub_block_key(sub_block) for sub_block in sub_blocks}


def measure_table(
    architecture: Architecture,
    types: Iterable[str],
    threads: int | None = None,
    prompt_tokens: int = PROMPT_TOKENS,
    decode_tokens: int = DECODE_TOKENS,
    repeats: int = REPEATS,
    layers: tuple[int, int] | None = None,
    progress: Callable[[str], None] | None = None,
    known: SpeedTable | None = None,
    sub_blocks: Iterable[SubBlock] = (),
) -> SpeedTable:
    """Measure the speed table of `architecture` for `types` and the alternatives `sub_blocks` in llama.cpp on this
    machine (see the module's description): every probe file written into a temporary folder, loaded and timed
    against its reference. With `known` (a table of the same settings), only what it lacks is measured and added."""
    threads = threads or _threads()
    types = list(dict.fromkeys(types))
    short, long = layers or architecture.probe_layers()
    if not 0 < short < long:
        raise ValueError(f"probe layer counts must be increasing and positive, got {layers}")
    say = progress or (lambda _text: None)
    groups = architecture.shape_groups()
    done = set(known.deltas) if known is not None else set()
    wanted = {
        shape: [name for name in names if _key(name, shape) not in done]
        for shape, names in probe_types(architecture, types).items()
    }
    head_shape = architecture.head_shape

    def load(path: Path) -> LlamaCppModel:
        return timing_model(path, threads, prompt_tokens, decode_tokens)

    def per_matrix(reference: LlamaCppModel, model: LlamaCppModel, count: int) -> Timing:
        difference, _ = paired_difference(reference, model, prompt_tokens, decode_tokens, repeats)
        return Timing(difference.prompt_s / count, difference.decode_s / count)

    def probe(reference: LlamaCppModel, path: Path, count: int) -> Timing:
        with load(path) as model:
            timing = per_matrix(reference, model, count)
        path.unlink()
        return timing

    deltas: dict[str, Timing] = dict(known.deltas) if known is not None else {}
    alternatives: dict[str, Timing] = dict(known.sub_blocks) if known is not None else {}
    vocab = architecture.vocab

    def measure_alternative(writer: _ProbeWriter, long_model: LlamaCppModel, sub_block: SubBlock) -> None:
        """A deci probe whose layers all take the alternative, F16, against the long llama probe, over the count
        of such layers: its difference from the teacher's F16 layer; probes of it with the matrices of one shape
        in a type, against that deci probe: the type's difference from F16 at that shape."""
        key = _sub_block_key(sub_block)
        pending = {
            shape: [name for name in names if _key(name, shape) not in deltas]
            for shape, names in alternative_probe_types(architecture, types, sub_block).items()
        }
        if key in alternatives and not any(pending.values()):
            return
        structure = architecture.probe_structure(sub_block, long)
        path = writer.write(key.replace(":", "-"), long, vocab, {}, structure)
        with load(path) as reference:
            if key not in alternatives:
                say(f"speed: an F16 layer with {_describe(sub_block)}")
                alternatives[key] = per_matrix(long_model, reference, len(structure))
            for shape, roles in architecture.alternative_groups(sub_block).items():
                for type_name in pending[shape]:
                    say(f"speed: {type_name} at [{shape[0]}, {shape[1]}] ({', '.join(roles)}), {_describe(sub_block)}")
                    types_of = _layer_types(long, roles, type_name)
                    probed = writer.write(f"{type_name}-{key.replace(':', '-')}", long, vocab, types_of, structure)
                    deltas[_key(type_name, shape)] = probe(reference, probed, len(structure) * len(roles))
        path.unlink()

    with tempfile.TemporaryDirectory(prefix="autocompress-speed-") as folder:
        writer = _ProbeWriter(architecture, Path(folder))
        with load(writer.write("long", long, vocab, {})) as long_model:
            if known is None:
                with load(writer.write("short", short, vocab, {})) as short_model:
                    say(f"speed: one layer from {short} and {long} F16 layers")
                    difference, at_short = paired_difference(
                        short_model, long_model, prompt_tokens, decode_tokens, repeats
                    )
                layer = Timing(difference.prompt_s / (long - short), difference.decode_s / (long - short))
                say(f"speed: the F16 output matrix [{head_shape[0]}, {head_shape[1]}]")
                tiny_head = writer.write("tiny-vocabulary", long, PROBE_VOCAB, {})
                head = probe(long_model, tiny_head, -1)  # the full output matrix minus a tiny one
                fixed = Timing(
                    at_short.prompt_s - short * layer.prompt_s - head.prompt_s,
                    at_short.decode_s - short * layer.decode_s - head.decode_s,
                )
            else:
                fixed, layer, head = known.fixed, known.layer, known.head
            for shape, roles in groups.items():
                for type_name in wanted[shape]:
                    say(f"speed: {type_name} at [{shape[0]}, {shape[1]}] ({', '.join(roles)})")
                    path = writer.write(f"{type_name}-layers", long, vocab, _layer_types(long, roles, type_name))
                    deltas[_key(type_name, shape)] = probe(long_model, path, long * len(roles))
            for type_name in wanted[head_shape]:
                say(f"speed: {type_name} output matrix [{head_shape[0]}, {head_shape[1]}]")
                path = writer.write(f"{type_name}-head", long, vocab, {_head_key(architecture): type_name})
                deltas[_key(type_name, head_shape)] = probe(long_model, path, 1)
            for sub_block in dict.fromkeys(sub_blocks):
                measure_alternative(writer, long_model, sub_block)
    return SpeedTable(
        machine=machine(threads),
        architecture=architecture,
        prompt_tokens=prompt_tokens,
        decode_tokens=decode_tokens,
        fixed=fixed,
        layer=layer,
        head=head,
        deltas=deltas,
        sub_blocks=alternatives,
    )


def table_path(architecture: Architecture, threads: int, prompt_tokens: int, decode_tokens: int) -> Path:
    """Where the table for these settings is cached: one file per llama.cpp build, CPU, thread count, architecture
    and token counts."""
    key = {
        "method": METHOD,
        "machine": machine(threads),
        "architecture": asdict(architecture),
        "prompt_tokens": prompt_tokens,
        "decode_tokens": decode_tokens,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return cache_dir() / "speed" / f"{digest}.json"


def speed_table(
    architecture: Architecture,
    types: Iterable[str],
    threads: int | None = None,
    prompt_tokens: int = PROMPT_TOKENS,
    decode_tokens: int = DECODE_TOKENS,
    repeats: int = REPEATS,
    progress: Callable[[str], None] | None = None,
    remeasure: bool = False,
    sub_blocks: Iterable[SubBlock] = (),
) -> SpeedTable:
    """The cached speed table for these settings, holding at least `types` at every shape they fit and the
    alternatives `sub_blocks` with the types their matrices store: what the cache lacks (all of it, without a
    readable cache file, or with `remeasure`) is measured (`measure_table`) and stored."""
    threads = threads or _threads()
    types = list(dict.fromkeys(types))
    path = table_path(architecture, threads, prompt_tokens, decode_tokens)
    known = None
    if path.is_file() and not remeasure:
        try:
            known = SpeedTable.from_json(json.loads(path.read_text()))
        except (ValueError, KeyError, TypeError):
            known = None
    sub_blocks = list(dict.fromkeys(sub_blocks))
    deltas, alternatives = table_entries(architecture, types, sub_blocks)
    if known is not None and deltas <= set(known.deltas) and alternatives <= set(known.sub_blocks):
        return known
    table = measure_table(
        architecture,
        types,
        threads,
        prompt_tokens,
        decode_tokens,
        repeats,
        progress=progress,
        known=known,
        sub_blocks=sub_blocks,
    )
    write_text_atomically(path, json.dumps(table.to_json(), indent=1))
    return table


def locked_speed_table(
    architecture: Architecture,
    types: Iterable[str],
    threads: int,
    progress: Callable[[str], None] | None = None,
    sub_blocks: Iterable[SubBlock] = (),
) -> SpeedTable:
    """`speed_table` under a lock beside the cached table, so that the processes of one study that start together
    measure it once (two measuring at once would also time each other)."""
    path = table_path(architecture, threads, PROMPT_TOKENS, DECODE_TOKENS)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(path.with_suffix(".lock")):
        return speed_table(architecture, types, threads, progress=progress, sub_blocks=sub_blocks)


def preset_tensors(tensors: Sequence[UnitTensor], config, preset: str) -> list[tuple[str, tuple[int, int]]]:
    """The (type, [out, in]) of every matrix the model's file computes with under llama.cpp's `preset`
    (`presets.preset_types`, with llama.cpp's fallbacks, as llama-quantize --imatrix assigns them)."""
    from autocompress.targets.gguf.weights import model_preset_types

    types = model_preset_types(preset, tensors, config)
    names = [tensor.gguf_name for tensor in tensors]
    return [(types[tensor.gguf_name], tensor.shape) for tensor in tensors if _computed(tensor.gguf_name, names)]


class PlanSpeed(SpeedModel):
    """The gguf target's speed model of a session's plans: llama.cpp's speed table for the model's architecture
    on `threads` threads, holding every level a unit may take, F16 (the dense file), the types of `presets`, and
    the block alternatives `sub_blocks` a study's `search.structure` offers, with the types their matrices store."""

    def __init__(
        self,
        weights: GgufWeights,
        config,
        levels: Iterable[str],
        threads: int | None = None,
        presets: Sequence[str] = (),
        progress: Callable[[str], None] | None = None,
        sub_blocks: Iterable[SubBlock] = (),
    ) -> None:
        self.weights = weights
        self.config = config
        self.threads = threads or _threads()
        self.architecture = Architecture.of_config(config)
        self.blocks = [self.architecture.block] * self.architecture.layers
        self.presets = {name: preset_tensors(weights.tensors, config, name) for name in presets}
        names = [tensor.gguf_name for tensor in weights.tensors]
        dense = [(REFERENCE, tensor.shape) for tensor in weights.tensors if _computed(tensor.gguf_name, names)]
        types = {REFERENCE, *levels, *(kind for tensors in self.presets.values() for kind, _ in tensors)}
        self.table = locked_speed_table(self.architecture, sorted(types), self.threads, progress, sub_blocks)
        self.dense = self.table.predict(dense, self.blocks)

    def predict(self, plan: CompressionPlan) -> Speed:
        return self.table.predict(*plan_tensors(self.weights, plan, self.config))

    def preset(self, name: str) -> Speed:
        if name not in self.presets:
            raise ValueError(f"the speed model holds the presets {sorted(self.presets)}, not {name!r}")
        return self.table.predict(self.presets[name], self.blocks)


def file_speed(
    path: Path | str,
    threads: int | None = None,
    repeats: int = REPEATS,
    prompt_tokens: int = PROMPT_TOKENS,
    decode_tokens: int = DECODE_TOKENS,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """A GGUF file's prompt and decode tokens/s as llama.cpp runs it here (the median of `repeats` runs), beside
    the speed model's prediction (measuring what the cached table lacks first) and its relative error; where the
    file cannot be predicted (another architecture, a type the probes cannot write), `speed_note` says why."""
    threads = threads or _threads()
    with timing_model(path, threads, prompt_tokens, decode_tokens) as model:
        measured = median_timing(measure_timing(model, prompt_tokens, decode_tokens, repeats))
    result: dict[str, Any] = {
        "threads": threads,
        "speed_runs": repeats,
        "speed_prompt_tokens": prompt_tokens,
        "speed_decode_tokens": decode_tokens,
        "measured_prompt_tps": prompt_tokens / measured.prompt_s,
        "measured_decode_tps": 1.0 / measured.decode_s,
    }
    try:
        architecture, tensors, blocks = file_architecture(path)
        types = {type_name for type_name, _ in tensors}
        sub_blocks = [sub_block for block in blocks for sub_block in architecture.sub_blocks(block)]
        table = speed_table(
            architecture, types, threads, prompt_tokens, decode_tokens, repeats, progress, sub_blocks=sub_blocks
        )
        predicted = table.predict(tensors, blocks)
    except ValueError as error:
        return result | {"speed_note": f"no speed prediction: {error}"}
    return result | {
        "predicted_prompt_tps": predicted.prompt_tps,
        "predicted_decode_tps": predicted.decode_tps,
        "prompt_tps_error": predicted.prompt_tps / result["measured_prompt_tps"] - 1,
        "decode_tps_error": predicted.decode_tps / result["measured_decode_tps"] - 1,
    }
