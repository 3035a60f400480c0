"""Block-local distillation (Puzzle's "BLD"): each structural alternative of a sub-block, cut from the teacher's by
importance (`structure.variant_modules`), is trained to reproduce that sub-block's output from its cached inputs.

A decoder block adds two things to the residual stream: its attention's output (from the input norm's output) and its
FFN's output (from the post-attention norm's output). An alternative replaces one of them and leaves the residual
itself alone, so the MSE between what the alternative adds and what the teacher's sub-block adds is the MSE on the
residual stream. `capture` records, for the chosen blocks, each sub-block's input and output on calibration windows in
one pass of the teacher; `distill` trains an alternative on the first windows and judges it, before and after, on the
last ones (`heldout_fraction`), which it never trains on: the calibration pool is small, so an alternative judged on
its training windows would look better than it is. FFN alternatives train the FFN alone, attention alternatives the
attention alone; no attention and a removed block have nothing to train.

Blocks are independent: every block's alternatives can be trained in its own process from its own captured inputs.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from autocompress.config import BlockDistillationConfig
from autocompress.distillation import Importance
from autocompress.files import write_atomically
from autocompress.models import decoder_blocks
from autocompress.structure import (
    SubBlockLevel,
    attention_alternative,
    ffn_alternative,
    ffn_width,
    structure_choices,
    teacher_shape,
)

SubBlock = Literal["ffn", "attention"]


@dataclass(frozen=True)
class BlockDistillationOptions:
    steps: int = 100
    learning_rate: float = 1e-4
    batch_size: int = 4  # calibration windows per step
    heldout_fraction: float = 0.25  # the last windows, on which alternatives are judged and never trained
    seed: int = 0  # of the order training windows are drawn in


def options_of(settings: BlockDistillationConfig) -> BlockDistillationOptions:
    """The training options of a config's `search.structure.distillation` section."""
    return BlockDistillationOptions(
        steps=settings.steps,
        learning_rate=settings.learning_rate,
        batch_size=settings.batch_size,
        heldout_fraction=settings.heldout_fraction,
    )


@dataclass
class SubBlockRecord:
    """What one sub-block of the teacher took and added to the residual stream, per calibration window (on the CPU,
    so that many blocks' records do not crowd the model's device)."""

    kind: SubBlock
    inputs: torch.Tensor  # [windows, tokens, hidden]: the sub-block's input, after its norm
    outputs: torch.Tensor  # [windows, tokens, hidden]: what it adds to the residual stream
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None  # attention: rope cos, sin of one window
    attention_mask: torch.Tensor | None = None  # attention: one window's mask (None: causal, as sdpa takes it)

    def split(self, heldout_fraction: float) -> tuple[range, range]:
        """(training windows, held-out windows): the last `heldout_fraction` of them held out, at least one of each."""
        count = len(self.inputs)
        if count < 2:
            raise ValueError(f"block-local distillation needs two calibration windows or more, got {count}")
        heldout = min(count - 1, max(1, round(count * heldout_fraction)))
        return range(count - heldout), range(count - heldout, count)

    def run(self, module: nn.Module, windows: torch.Tensor | slice | range) -> torch.Tensor:
        """What `module` (this sub-block or an alternative of it) adds on the given windows."""
        device = self.device_of(module)
        windows = slice(windows.start, windows.stop) if isinstance(windows, range) else windows
        inputs = self.inputs[windows].to(device)
        if self.kind == "ffn":
            return module(inputs)
        count = len(inputs)
        cos, sin = (part.to(device).expand(count, *part.shape[1:]) for part in self.position_embeddings)
        mask = None if self.attention_mask is None else self.attention_mask.to(device).expand(count, -1, -1, -1)
        return module(hidden_states=inputs, position_embeddings=(cos, sin), attention_mask=mask)[0]

    @torch.no_grad()
    def mse(self, module: nn.Module, windows: range, batch_size: int) -> float:
        """Mean squared error of what `module` adds against what the teacher's sub-block adds, on `windows`."""
        total = 0.0
        for start in range(windows.start, windows.stop, batch_size):
            batch = slice(start, min(start + batch_size, windows.stop))
            error = self.run(module, batch).float() - self.outputs[batch].to(self.device_of(module)).float()
            total += error.square().sum().item()
        return total / (len(windows) * self.outputs[0].numel())

    @staticmethod
    def device_of(module: nn.Module) -> torch.device:
        """Where a module computes (the CPU for one without parameters)."""
        return next(module.parameters(), torch.empty(0)).device


class _Recorded(Exception):
    """Raised after the last recorded block, to skip the rest of the forward pass."""


@torch.no_grad()
def capture(
    model: nn.Module, tokens: torch.Tensor, blocks: Iterable[int], batch_size: int = 4
) -> dict[tuple[int, SubBlock], SubBlockRecord]:
    """Each sub-block's inputs and outputs in the chosen decoder blocks of `model`, on `tokens` [windows, length],
    in one pass per batch of windows that stops after the last chosen block; keyed by (block index, "ffn" |
    "attention")."""
    all_blocks = decoder_blocks(model)[1]
    blocks = sorted(set(blocks))
    captured: dict[tuple[int, SubBlock], dict] = {}
    hooks = []

    def on_ffn(index: int):
        def hook(_module, args, output):
            parts = captured.setdefault((index, "ffn"), {"inputs": [], "outputs": []})
            parts["inputs"].append(args[0].detach().cpu())
            parts["outputs"].append(output.detach().cpu())

        return hook

    def on_attention(index: int):
        def hook(_module, args, kwargs, output):
            parts = captured.setdefault((index, "attention"), {"inputs": [], "outputs": []})
            hidden = args[0] if args else kwargs["hidden_states"]
            parts["inputs"].append(hidden.detach().cpu())
            parts["outputs"].append(output[0].detach().cpu())
            cos, sin = kwargs["position_embeddings"]
            parts["position_embeddings"] = (cos[:1].detach().cpu(), sin[:1].detach().cpu())
            mask = kwargs.get("attention_mask")
            parts["attention_mask"] = None if mask is None else mask[:1].detach().cpu()

        return hook

    def stop(_module, _args, _output):
        raise _Recorded

    for index in blocks:
        block = all_blocks[index]
        hooks.append(block.mlp.register_forward_hook(on_ffn(index)))
        hooks.append(block.self_attn.register_forward_hook(on_attention(index), with_kwargs=True))
    hooks.append(all_blocks[blocks[-1]].register_forward_hook(stop))  # the later blocks and the head: not needed
    device = next(model.parameters()).device
    try:
        for start in range(0, len(tokens), batch_size):
            with contextlib.suppress(_Recorded):
                model(tokens[start : start + batch_size].to(device), use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return {
        (index, kind): SubBlockRecord(
            kind,
            torch.cat(parts["inputs"]),
            torch.cat(parts["outputs"]),
            parts.get("position_embeddings"),
            parts.get("attention_mask"),
        )
        for (index, kind), parts in captured.items()
    }


@dataclass(frozen=True)
class DistillationResult:
    """One alternative trained: its held-out MSE as cut and as trained, and what the training cost."""

    steps: int
    seconds: float
    heldout_mse_cut: float
    heldout_mse: float
    train_mse: float  # on the training windows, after training


def distill(alternative: nn.Module, record: SubBlockRecord, options: BlockDistillationOptions) -> DistillationResult:
    """Train `alternative` (in place) to add what the teacher's sub-block adds, from the sub-block's recorded inputs,
    on the training windows; judge it on the held-out ones. An alternative without parameters is judged only."""
    train, heldout = record.split(options.heldout_fraction)
    before = record.mse(alternative, heldout, options.batch_size)
    parameters = list(alternative.parameters())
    steps = options.steps if parameters else 0
    started = time.perf_counter()
    if steps:
        for parameter in parameters:
            parameter.requires_grad_(True)
        optimizer = torch.optim.AdamW(parameters, lr=options.learning_rate, weight_decay=0.0)
        generator = torch.Generator().manual_seed(options.seed)
        alternative.train()
        device = SubBlockRecord.device_of(alternative)
        try:
            for step in range(steps):
                rows = train.start + torch.randint(len(train), (options.batch_size,), generator=generator)
                loss = F.mse_loss(record.run(alternative, rows).float(), record.outputs[rows].to(device).float())
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"block-local distillation loss is not finite at step {step + 1}")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        finally:
            alternative.eval()
            for parameter in parameters:
                parameter.requires_grad_(False)
    seconds = time.perf_counter() - started
    after = record.mse(alternative, heldout, options.batch_size)
    return DistillationResult(steps, seconds, before, after, record.mse(alternative, train, options.batch_size))


# ---------------------------------------------------------------- every alternative of a model, kept on disk


def alternative_levels(config, ffn: Iterable[float], kv_groups: Iterable[int] | None, drop_blocks: bool) -> dict:
    """Per block index, the sub-block levels its alternatives take, {"attention": [key/value groups], "ffn":
    [channels]}, the teacher's own left out; a removed block is both at 0 (in blocks 1 to L-2 only)."""
    choices = structure_choices(ffn, kv_groups, drop_blocks, config.num_hidden_layers)
    teacher = teacher_shape(config)
    levels: dict[int, dict[str, list[int]]] = {}
    for index in range(config.num_hidden_layers):
        block = f"model.layers.{index}"
        widths = {ffn_width(fraction, config) for fraction in choices.get(f"{block}.ffn", [])}
        groups = set(choices.get(f"{block}.kv_groups", []))
        if True in choices.get(f"{block}.removed", []):
            widths.add(0)
            groups.add(0)
        levels[index] = {
            "attention": sorted((groups - {teacher.num_key_value_heads}), reverse=True),
            "ffn": sorted((widths - {teacher.intermediate_size}), reverse=True),
        }
    return levels


@dataclass(frozen=True)
class Alternative:
    modules: dict[str, nn.Module]  # by attribute of the decoder block, as `StructureStitcher` swaps them in
    result: DistillationResult
    from_store: bool  # read back from disk rather than trained now


class AlternativeStore:
    """Trained alternatives on disk: one safetensors file per (block, sub-block, level), its training result in the
    file's metadata, each written atomically, so an interrupted distillation resumes with what it finished. The
    folder must be keyed by what the alternatives depend on (the teacher, the calibration windows, the options)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def path(self, key: SubBlockLevel) -> Path:
        index, kind, level = key
        return self.folder / f"block{index}-{kind}-{level}.safetensors"

    def load(self, key: SubBlockLevel, modules: dict[str, nn.Module]) -> DistillationResult | None:
        """The stored result, with the stored weights loaded into `modules`; None if it is not stored."""
        path = self.path(key)
        if not path.is_file():
            return None
        with safe_open(path, framework="pt") as stored:
            result = json.loads(stored.metadata()["result"])
        tensors = load_file(path)
        for attribute, module in modules.items():
            prefix = f"{attribute}."
            state = {name.removeprefix(prefix): value for name, value in tensors.items() if name.startswith(prefix)}
            module.load_state_dict(state, strict=True)
        return DistillationResult(**result)

    def save(self, key: SubBlockLevel, modules: dict[str, nn.Module], result: DistillationResult) -> None:
        tensors = {
            f"{attribute}.{name}": value.detach().cpu().contiguous()
            for attribute, module in modules.items()
            for name, value in module.state_dict().items()
        }
        metadata = {"result": json.dumps(asdict(result))}
        write_atomically(self.path(key), lambda temporary: save_file(tensors, temporary, metadata=metadata))


def distill_alternatives(
    teacher: nn.Module,
    tokens: torch.Tensor,
    importance: Importance,
    levels: dict[int, dict[str, list[int]]],
    options: BlockDistillationOptions,
    store: AlternativeStore | None = None,
    progress: bool = False,
    memory_bytes: int = 10**9,
) -> dict[SubBlockLevel, Alternative]:
    """Every alternative of `levels` (see `alternative_levels`), cut from the teacher by importance and trained by
    `distill` on `tokens` (calibration windows); those the store holds are read back instead. The teacher is left
    untouched. Its sub-blocks' records (inputs and outputs of both sub-blocks: four [windows, length, hidden]
    tensors per block) are taken for as many consecutive blocks at once as `memory_bytes` holds, at least one."""
    blocks = decoder_blocks(teacher)[1]
    config = teacher.config
    element = next(teacher.parameters()).element_size()
    per_block = 4 * tokens.numel() * config.hidden_size * element
    chunk = max(1, memory_bytes // per_block)
    pending = [
        index
        for index, per_kind in levels.items()
        if any(
            store is None or not store.path((index, kind, level)).is_file()
            for kind in per_kind
            for level in per_kind[kind]
        )
    ]
    alternatives: dict[SubBlockLevel, Alternative] = {}
    total = sum(len(block_levels) for per_kind in levels.values() for block_levels in per_kind.values())
    bar = tqdm(total=total, desc="block-local distillation", disable=not progress, leave=False)
    records: dict[tuple[int, SubBlock], SubBlockRecord] = {}
    try:
        for index, per_kind in levels.items():
            if index in pending and (index, "ffn") not in records:
                later = pending[pending.index(index) :][:chunk]
                records = capture(teacher, tokens, later, options.batch_size)
            for kind, kind_levels in per_kind.items():
                for level in kind_levels:
                    key = (index, kind, level)
                    if kind == "attention":
                        modules = attention_alternative(blocks[index], index, level, importance, config)
                    else:
                        modules = ffn_alternative(blocks[index], index, level, importance)
                    trained = modules["self_attn" if kind == "attention" else "mlp"]
                    result = None if store is None else store.load(key, modules)
                    if result is None:
                        result = distill(trained, records[index, kind], options)
                        if store is not None:
                            store.save(key, modules, result)
                        alternatives[key] = Alternative(modules, result, from_store=False)
                    else:
                        alternatives[key] = Alternative(modules, result, from_store=True)
                    bar.update()
    finally:
        bar.close()
    return alternatives
