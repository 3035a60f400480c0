"""Fitness: KL divergence to the dense model, cross-entropy, perplexity and throughput on a token pool."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Metrics:
    ce: float  # mean next-token cross-entropy (nats)
    kl: float | None  # mean per-token KL(dense ‖ model) (nats); None without a reference
    tokens_per_s: float
    n_tokens: int

    @property
    def ppl(self) -> float:
        return math.exp(self.ce)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def log_probs_of_logits(logits: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities in float32 from a model's logits."""
    return F.log_softmax(logits.float(), dim=-1)


@torch.no_grad()
def log_probs(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities [batch, seq_len, vocab] in float32."""
    return log_probs_of_logits(model(tokens.to(_device(model)), use_cache=False).logits)


# A reference holds tokens × vocabulary log-probabilities (4 GB in float32 for 8K tokens of Llama 3's 128K
# vocabulary); float16 halves that. Log-probabilities lie in [-100, 0], where float16 keeps 10 mantissa bits:
# the KL moves by about 5e-6 nats per token, nearly the same for every trial, so trials rank as with float32.
REFERENCE_DTYPE = torch.float16


@torch.no_grad()
def dense_reference(model: nn.Module, tokens: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The dense model's log-probabilities on a pool, computed once and reused by every trial (on CPU)."""
    return torch.cat(
        [
            log_probs(model, tokens[i : i + batch_size]).to(REFERENCE_DTYPE).cpu()
            for i in range(0, len(tokens), batch_size)
        ]
    )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    tokens: torch.Tensor,
    reference: torch.Tensor | nn.Module | None = None,
    batch_size: int = 4,
    log_probs_of: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
) -> Metrics:
    """Score `model` on `tokens`. `reference` is the dense model itself, or its cached log-probabilities.

    `log_probs_of(start, batch)`, if given, computes the model's log-probabilities of the batch that starts at
    window `start` of `tokens` in place of a plain forward (`block_reuse.BlockInputCache` runs only the blocks a
    change reaches)."""
    ce_sum = kl_sum = 0.0
    seconds = 0.0
    for start in range(0, len(tokens), batch_size):
        batch = tokens[start : start + batch_size]
        began = time.perf_counter()
        predicted = log_probs(model, batch) if log_probs_of is None else log_probs_of(start, batch)
        seconds += time.perf_counter() - began
        targets = batch[:, 1:].to(predicted.device)
        ce_sum += -predicted[:, :-1].gather(-1, targets.unsqueeze(-1)).sum().item()
        if reference is None:
            continue
        if isinstance(reference, nn.Module):
            dense = log_probs(reference, batch).to(predicted.device)
        else:
            dense = reference[start : start + batch_size].to(predicted.device, torch.float32)
        kl_sum += F.kl_div(predicted, dense, log_target=True, reduction="sum").item()
    n_predicted = tokens.shape[0] * (tokens.shape[1] - 1)
    return Metrics(
        ce=ce_sum / n_predicted,
        kl=None if reference is None else kl_sum / tokens.numel(),
        tokens_per_s=tokens.numel() / seconds if seconds else float("inf"),
        n_tokens=tokens.numel(),
    )
