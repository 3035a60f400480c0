"""Evaluations that reuse what did not change: decoder blocks before the first changed one are not run again.

A search scores plan after plan on one resident model, and consecutive plans often differ in a few units only.
The input of decoder block k on the fitness windows is the same as long as the embeddings and blocks 0..k-1 hold
the same weights, so `BlockInputCache` keeps the inputs of some blocks from earlier evaluations (a forward
pre-hook records them) and runs each batch from the last kept block whose input is still current: that block,
the ones after it and the final norm. The metrics are computed by `metrics.evaluate` as always, which runs the output
head itself, a few tokens at a time (a large vocabulary's head is most of a forward's memory).

The bookkeeping follows writes, not plans: the session reports every block whose weights it is about to change
(`block_changed`) and drops everything on a change it cannot attribute to a block (dense weights restored, a
failed stitch: `invalidate`). A kept input is therefore exactly what the full model would compute now; the only
difference a reused evaluation can show is float rounding of batches composed differently from when it was kept.

Memory, on the model's device: windows × seq_len × hidden_size × bytes per element of the model's dtype for each
kept block (SmolLM2-135M, 8 fitness windows of 256 tokens in float32: 8·256·576·4 B = 4.7 MB a block, 137 MB for
the 29 blocks after the first). Block 0's input is the embedding lookup, never worth keeping. When the budget holds
fewer blocks, the kept ones are spread evenly, so a change in block k reruns from the nearest kept block ≤ k.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from autocompress.metrics import Predictions, predictions
from autocompress.models import decoder_blocks

# Families whose base model feeds `inputs_embeds` to the first block as it is and passes nothing but the hidden
# state from block to block, so running a slice of the blocks from a kept input is the full forward's tail.
# Not Gemma (it scales the embeddings inside forward) nor Granite (a multiplier), nor hybrids with other state.
# Qwen2/Qwen3 pick each block's mask as `config.layer_types[i]` by its position in the list it runs, so a slice
# is only safe when every block has the same type (`reusable` checks).
REUSABLE_FAMILIES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3"})

PredictionsOf = Callable[[int, torch.Tensor], Predictions]  # (first window of the batch, its tokens) -> predictions


def reusable(model: nn.Module) -> bool:
    """Whether the model's blocks can be run from a kept input (see REUSABLE_FAMILIES)."""
    config = getattr(model, "config", None)
    layer_types = getattr(config, "layer_types", None) or []
    return getattr(config, "model_type", None) in REUSABLE_FAMILIES and len(set(layer_types)) <= 1


def bytes_per_kept_block(model: nn.Module, windows: int, seq_len: int) -> int:
    """windows × seq_len × hidden_size × bytes per element of the model's dtype."""
    element_bytes = next(model.parameters()).element_size()
    return windows * seq_len * model.config.hidden_size * element_bytes


def spread(count: int, n_blocks: int) -> tuple[int, ...]:
    """`count` block indices in 1..n_blocks-1, evenly spaced (all of them when count is n_blocks - 1)."""
    count = max(0, min(count, n_blocks - 1))
    return tuple(sorted({round(index * n_blocks / (count + 1)) for index in range(1, count + 1)}))


class BlockInputCache:
    """The inputs of some decoder blocks on the first windows of one token pool, current for the weights the model
    holds now. `predictions_from` plugs it into `metrics.evaluate`."""

    def __init__(self, model: nn.Module, windows: int, seq_len: int, memory_bytes: int) -> None:
        self.model = model
        blocks_name, self.blocks = decoder_blocks(model)
        parent_name, _, self._blocks_attribute = blocks_name.rpartition(".")
        self._blocks_parent = model.get_submodule(parent_name)
        self._block_index = {f"{blocks_name}.{index}": index for index in range(len(self.blocks))}
        self.windows = windows
        self.bytes_per_block = bytes_per_kept_block(model, windows, seq_len)
        affordable = memory_bytes // self.bytes_per_block if reusable(model) and self.bytes_per_block else 0
        self.kept_blocks = spread(affordable, len(self.blocks))
        self._inputs: dict[int, torch.Tensor] = {}
        # Rows [0, n) of a kept block's inputs are what the model computes now; rows after them are stale.
        self._current = dict.fromkeys(self.kept_blocks, 0)
        self.blocks_run = 0  # block forwards, one per batch and block run
        self.blocks_skipped = 0  # block forwards a kept input saved

    @property
    def memory_bytes(self) -> int:
        """Bytes the kept inputs hold now (allocated at their first recording)."""
        return sum(inputs.numel() * inputs.element_size() for inputs in self._inputs.values())

    def block_changed(self, block_name: str) -> None:
        """The weights of `block_name` are about to change: the kept inputs of later blocks are no longer current."""
        changed = self._block_index[block_name]
        for block in self.kept_blocks:
            if block > changed:
                self._current[block] = 0

    def invalidate(self) -> None:
        """Weights changed in ways not reported per block: no kept input is current any more."""
        self._current = dict.fromkeys(self.kept_blocks, 0)

    def start_block(self, end_window: int) -> int:
        """The block a batch of windows up to `end_window` starts from: the last kept one current for all of them."""
        return max((block for block in self.kept_blocks if self._current[block] >= end_window), default=0)

    def predictions_from(self, offset: int) -> PredictionsOf:
        """`metrics.evaluate`'s `predictions_of` for the pool's windows from `offset` on."""
        return lambda start, tokens: self.predictions(tokens, offset + start)

    @torch.no_grad()
    def predictions(self, tokens: torch.Tensor, first_window: int) -> Predictions:
        """The model's next-token predictions on windows [first_window, first_window + len(tokens)) of the pool,
        run from the last kept block current for them, recording the inputs of the kept blocks after it."""
        end_window = first_window + len(tokens)
        if end_window > self.windows:
            raise ValueError(f"windows up to {end_window} asked of a cache of {self.windows}")
        start = self.start_block(end_window)
        # A block current only up to before this batch is extended; one current for less would leave a gap.
        recorded = [block for block in self.kept_blocks if block > start and self._current[block] >= first_window]
        hooks = [
            self.blocks[block].register_forward_pre_hook(
                functools.partial(self._record, block, first_window), with_kwargs=True
            )
            for block in recorded
        ]
        try:
            if start == 0:
                result = predictions(self.model, tokens)
            else:
                # A copy, so that a block changing its input in place could not change the kept one.
                result = self._run_from(start, self._inputs[start][first_window:end_window].clone())
        finally:
            for hook in hooks:
                hook.remove()
        for block in recorded:
            self._current[block] = end_window
        self.blocks_run += len(self.blocks) - start
        self.blocks_skipped += start
        return result

    def _record(self, block: int, first_window: int, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        if block not in self._inputs:
            self._inputs[block] = hidden.new_empty((self.windows, *hidden.shape[1:]))
        self._inputs[block][first_window : first_window + len(hidden)].copy_(hidden)

    def _run_from(self, start: int, hidden: torch.Tensor) -> Predictions:
        """The full forward's tail: the base model with its blocks from `start` on, fed the kept input of `start`
        as its embeddings (positions and the causal mask depend only on the sequence length)."""
        every_block = getattr(self._blocks_parent, self._blocks_attribute)
        setattr(self._blocks_parent, self._blocks_attribute, every_block[start:])
        try:
            return predictions(self.model, inputs_embeds=hidden)
        finally:
            setattr(self._blocks_parent, self._blocks_attribute, every_block)
