"""Fitness: KL divergence to the dense model, cross-entropy, perplexity and throughput on a token pool."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
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
    values: TokenValues | None = None,
) -> Metrics:
    """Score `model` on `tokens`. `reference` is the dense model itself, or its cached log-probabilities.

    `log_probs_of(start, batch)`, if given, computes the model's log-probabilities of the batch that starts at
    window `start` of `tokens` in place of a plain forward (`block_reuse.BlockInputCache` runs only the blocks a
    change reaches). `values`, if given, gathers the per-token values (`TokenValues`) on the way."""
    ce_sum = kl_sum = 0.0
    seconds = 0.0
    for start in range(0, len(tokens), batch_size):
        batch = tokens[start : start + batch_size]
        began = time.perf_counter()
        predicted = log_probs(model, batch) if log_probs_of is None else log_probs_of(start, batch)
        seconds += time.perf_counter() - began
        targets = batch[:, 1:].to(predicted.device)
        ce_sum += -predicted[:, :-1].gather(-1, targets.unsqueeze(-1)).sum().item()
        dense = None
        if isinstance(reference, nn.Module):
            dense = log_probs(reference, batch).to(predicted.device)
        elif reference is not None:
            dense = reference[start : start + batch_size].to(predicted.device, torch.float32)
        if dense is not None:
            kl_sum += F.kl_div(predicted, dense, log_target=True, reduction="sum").item()
        if values is not None:
            values.add(predicted, batch, dense)
    n_predicted = tokens.shape[0] * (tokens.shape[1] - 1)
    return Metrics(
        ce=ce_sum / n_predicted,
        kl=None if reference is None else kl_sum / tokens.numel(),
        tokens_per_s=tokens.numel() / seconds if seconds else float("inf"),
        n_tokens=tokens.numel(),
    )


# ---------------------------------------------------------------- the field's statistics, from per-token values

# Windows resampled by the paired bootstrap of two models' per-window figures.
BOOTSTRAP_DRAWS = 10_000


@dataclass
class TokenValues:
    """Per predicted token (position t of a window predicting token t + 1), window by window: what llama.cpp's
    `llama-perplexity --kl-divergence` accumulates, from which every statistic it reports follows.

    Each list holds one float64 array of seq_len - 1 values per window: `nll` the model's negative log-likelihood
    of the actual next token; against the dense base, `dense_nll` the base's, `kld` KL(base ‖ model) over the
    vocabulary, `same_top` whether the model's most likely token is the base's (first one on ties, as llama.cpp
    takes it) and `p_diff` the model's probability of the actual next token minus the base's."""

    nll: list[np.ndarray] = field(default_factory=list)
    dense_nll: list[np.ndarray] = field(default_factory=list)
    kld: list[np.ndarray] = field(default_factory=list)
    same_top: list[np.ndarray] = field(default_factory=list)
    p_diff: list[np.ndarray] = field(default_factory=list)

    def add(self, predicted: torch.Tensor, tokens: torch.Tensor, dense: torch.Tensor | None = None) -> None:
        """Record windows [batch, seq_len] (or one [seq_len]) from their next-token log-probabilities
        [..., seq_len, vocab] and, when given, the dense base's on the same windows."""
        predicted, tokens = predicted.float().reshape(-1, *predicted.shape[-2:]), tokens.reshape(-1, tokens.shape[-1])
        targets = tokens[:, 1:, None].to(predicted.device)
        log_p = predicted[:, :-1]
        nll = -log_p.gather(-1, targets)[..., 0]
        self.nll += list(nll.double().cpu().numpy())
        if dense is None:
            return
        log_q = dense.reshape(predicted.shape).to(predicted.device, torch.float32)[:, :-1]
        dense_nll = -log_q.gather(-1, targets)[..., 0]
        kld = F.kl_div(log_p, log_q, log_target=True, reduction="none").sum(-1)
        self.dense_nll += list(dense_nll.double().cpu().numpy())
        self.kld += list(kld.double().cpu().numpy())
        self.same_top += list((log_p.argmax(-1) == log_q.argmax(-1)).cpu().numpy())
        self.p_diff += list((torch.exp(-nll.double()) - torch.exp(-dense_nll.double())).cpu().numpy())

    @property
    def against_dense(self) -> bool:
        return bool(self.kld)

    def window_nll(self) -> np.ndarray:
        """Mean negative log-likelihood per predicted token of each window."""
        return np.array([values.mean() for values in self.nll])

    def window_dense_nll(self) -> np.ndarray:
        return np.array([values.mean() for values in self.dense_nll])

    def window_kld(self) -> np.ndarray:
        """Mean KL to the dense base per predicted token of each window."""
        return np.array([values.mean() for values in self.kld])

    def statistics(self) -> dict[str, float]:
        """Perplexity and, against the dense base, llama.cpp's headline figures with its definitions: mean,
        99.9th percentile (linear interpolation between order statistics) and median of the per-token KLD;
        same-top-p, the share of tokens whose most likely next token is the base's; RMS Δp, the root mean square of
        the change in the probability of the actual next token. Fractions, not llama.cpp's percentages."""
        nll = np.concatenate(self.nll)
        figures = {"ppl": float(np.exp(nll.mean())), "tokens_scored": int(nll.size)}
        if not self.against_dense:
            return figures
        kld, p_diff = np.concatenate(self.kld), np.concatenate(self.p_diff)
        return figures | {
            "dense_ppl": float(np.exp(np.concatenate(self.dense_nll).mean())),
            "mean_kld": float(kld.mean()),
            "kld_99_9": float(np.percentile(kld, 99.9)),
            "median_kld": float(np.median(kld)),
            "max_kld": float(kld.max()),
            "same_top_p": float(np.concatenate(self.same_top).mean()),
            "rms_dp": float(np.sqrt(np.mean(p_diff**2))),
        }


def _bootstrap_means(delta: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The windows of each bootstrap draw (the same for every series of one comparison) and the mean of `delta`
    over each draw."""
    draws = np.random.default_rng(seed).integers(0, len(delta), size=(BOOTSTRAP_DRAWS, len(delta)))
    return draws, delta[draws].mean(axis=1)


def paired_difference(values: np.ndarray, other: np.ndarray, seed: int = 0) -> dict[str, float]:
    """The mean of a per-window figure (NLL or KLD per token, say) of one model minus another's on the same
    windows, with a paired bootstrap 95% interval (windows resampled), and the windows where the first is lower."""
    delta = np.asarray(values, dtype=np.float64) - np.asarray(other, dtype=np.float64)
    _, means = _bootstrap_means(delta, seed)
    return {
        "delta": float(delta.mean()),
        "ci_low": float(np.percentile(means, 2.5)),
        "ci_high": float(np.percentile(means, 97.5)),
        "windows_lower": int((delta < 0).sum()),
        "windows": len(delta),
    }


def gap_closed(values: np.ndarray, other: np.ndarray, base: np.ndarray, seed: int = 0) -> dict[str, float]:
    """From three models' mean NLL per token on the same windows (windows of equal token counts): the share of
    `other`'s perplexity gap to `base` that the first model closes, with a paired bootstrap 95% interval (one draw
    of windows for the three)."""
    draws, _ = _bootstrap_means(np.asarray(values, dtype=np.float64), seed)
    series = [np.asarray(each, dtype=np.float64) for each in (values, other, base)]
    ppl_values, ppl_other, ppl_base = (np.exp(each[draws].mean(axis=1)) for each in series)
    closures = (ppl_other - ppl_values) / (ppl_other - ppl_base)
    point = [math.exp(each.mean()) for each in series]
    return {
        "gap_closed": (point[1] - point[0]) / (point[1] - point[2]),
        "gap_closed_ci_low": float(np.percentile(closures, 2.5)),
        "gap_closed_ci_high": float(np.percentile(closures, 97.5)),
    }
