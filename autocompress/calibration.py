"""Calibration statistics at the input of every compressible Linear, from one pass of the dense model."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from autocompress.methods import LayerStatistics, Statistic
from autocompress.models import CompressibleLinear, decoder_blocks


class _Collected(Exception):
    """Raised after the last block whose Linears are calibrated: the rest of the forward would change nothing."""


def last_block_needed(model: nn.Module, linears: list[CompressibleLinear]) -> nn.Module | None:
    """The last decoder block holding one of `linears`; None when one lies outside the blocks (lm_head)."""
    blocks_name, blocks = decoder_blocks(model)
    index = {f"{blocks_name}.{position}": position for position in range(len(blocks))}
    if not linears or any(linear.block not in index for linear in linears):
        return None
    return blocks[max(index[linear.block] for linear in linears)]


@torch.no_grad()
def collect_statistics(
    model: nn.Module,
    linears: Iterable[CompressibleLinear],
    tokens: torch.Tensor,
    needs: set[Statistic],
    batch_size: int = 4,
    progress: bool = False,
) -> dict[str, LayerStatistics]:
    """Run the dense model over `tokens` and accumulate what the methods need, per Linear name.

    Sums are kept in float32 on the model's device; nothing is collected when nothing is needed. Linears fed the
    very same input tensor (q/k/v, gate/up) share one LayerStatistics: their sums are equal, and a Hessian is
    the largest thing a study keeps in memory. Each forward stops after the last block holding one of `linears`,
    so the statistics of a few blocks (`CompressionSession.linear_statistics`) cost only the blocks up to them; with
    the output head among them (GGUF's importance matrix of the output), each forward stops at the head's input,
    before its matmul, which over a large vocabulary costs more than every block together.
    """
    linears = list(linears)
    statistics = {linear.name: LayerStatistics() for linear in linears}
    if not needs:
        return statistics
    shares_input_of: dict[str, str] = {}  # decided on each Linear's first call
    first_called: set[str] = set()
    previous: dict[str, object] = {"input": None, "owner": ""}  # the last input summed, and whose sums hold it

    def accumulate(name: str):
        def hook(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            same_input = inputs[0] is previous["input"]
            if name not in first_called:
                first_called.add(name)
                if same_input:
                    shares_input_of[name] = str(previous["owner"])
            if name in shares_input_of:
                if not same_input or shares_input_of[name] != previous["owner"]:
                    raise RuntimeError(f"calibration: {name} shared the input of {shares_input_of[name]} only at times")
                return
            previous.update(input=inputs[0], owner=name)
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
            stats = statistics[name]
            stats.n_tokens += x.shape[0]
            if "input_sq_norms" in needs:
                squares = x.square().sum(0)
                stats.input_sq_norms = squares if stats.input_sq_norms is None else stats.input_sq_norms + squares
            if "hessian" in needs:
                outer = x.T @ x
                stats.hessian = outer if stats.hessian is None else stats.hessian + outer

        return hook

    def stop(_module: nn.Module, *_: object) -> None:
        raise _Collected

    # Pre-hooks, so that a stop registered after them on the same module (the head) runs once they have summed.
    handles = [linear.module.register_forward_pre_hook(accumulate(linear.name)) for linear in linears]
    last_block = last_block_needed(model, linears)
    head = model.get_output_embeddings()
    if last_block is not None:
        handles.append(last_block.register_forward_hook(stop))
    elif head is not None and any(linear.module is head for linear in linears):
        handles.append(head.register_forward_pre_hook(stop))  # the last module of the forward: nothing after it
    device = next(model.parameters()).device
    try:
        for start in tqdm(range(0, len(tokens), batch_size), desc="calibration", disable=not progress, leave=False):
            with contextlib.suppress(_Collected):
                model(tokens[start : start + batch_size].to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        previous.clear()
    for name, owner in shares_input_of.items():
        statistics[name] = statistics[owner]
    return statistics
