"""Fitness: KL divergence to the dense model, cross-entropy, perplexity and throughput on a token pool."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

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


# Log-probabilities take tokens × vocabulary × 4 bytes: a batch of 4 windows of 256 tokens over Gemma 3's 262,144
# entries is 1.1 GB, and every intermediate (softmax, the reference in float32, the KL terms) as much again. The
# head is applied to the final hidden states of at most this many (token, vocabulary entry) pairs at a time (128 MB
# in float32), so memory stays flat whatever the vocabulary: 128 tokens of Gemma 3, a whole window of SmolLM2.
# Smaller pieces cost CPU: the head and KL of 512 tokens of Gemma 3's shape took 4.3 CPU s whole, 4.6 s in pieces of
# 128 tokens and 5.6-6.0 s in pieces of 64 (one thread).
HEAD_CHUNK_ELEMENTS = 2**25

# Families whose causal-LM forward is the output head on the base model's last hidden state, then (Gemma 2, 3)
# `final_logit_softcapping`: their head can run a few tokens at a time after the blocks. Others (Granite scales its
# logits, Cohere too) give their full logits, which are then read a few tokens at a time.
PLAIN_HEAD_FAMILIES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3_text"})


class _HeadReached(Exception):
    """Raised at the output head's input: the blocks have run, the head runs later, a few tokens at a time."""


class Predictions:
    """A batch's next-token predictions [windows, seq_len, vocab], computed a piece at a time: from the final hidden
    states, the output head runs on the few tokens asked for (`log_probs`); from full logits, those tokens are read."""

    def __init__(self, model: nn.Module, hidden: torch.Tensor | None = None, logits: torch.Tensor | None = None):
        if (hidden is None) == (logits is None):
            raise ValueError("predictions come from hidden states or from logits, one of them")
        self.model = model
        self.hidden = hidden
        self.logits = logits
        self.shape = (*(hidden if logits is None else logits).shape[:2], model.config.vocab_size)

    def log_probs(self, window: int, start: int, end: int) -> torch.Tensor:
        """Float32 log-probabilities [end - start, vocab] of positions start..end-1 of one window of the batch."""
        if self.logits is not None:
            return log_probs_of_logits(self.logits[window, start:end])
        logits = self.model.get_output_embeddings()(self.hidden[window, start:end])
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return log_probs_of_logits(logits)

    def all(self) -> torch.Tensor:
        """Every log-probability of the batch at once [windows, seq_len, vocab] (small vocabularies, tests)."""
        windows, seq_len, _ = self.shape
        return torch.stack([self.log_probs(window, 0, seq_len) for window in range(windows)])

    def pieces(self) -> Iterator[tuple[int, int, int]]:
        """(window, start, end): the batch cut into pieces of at most HEAD_CHUNK_ELEMENTS log-probabilities."""
        windows, seq_len, vocab = self.shape
        length = max(1, min(seq_len, HEAD_CHUNK_ELEMENTS // vocab))
        for window in range(windows):
            for start in range(0, seq_len, length):
                yield window, start, min(start + length, seq_len)


@torch.no_grad()
def predictions(model: nn.Module, tokens: torch.Tensor | None = None, **inputs: torch.Tensor) -> Predictions:
    """The model's predictions on `tokens` (or on other forward inputs: `inputs_embeds=...`), the output head held
    back for the families where that is exact (PLAIN_HEAD_FAMILIES)."""
    if tokens is not None:
        inputs["input_ids"] = tokens.to(_device(model))
    if getattr(model.config, "model_type", None) not in PLAIN_HEAD_FAMILIES:
        return Predictions(model, logits=model(**inputs, use_cache=False).logits)
    captured: list[torch.Tensor] = []

    def stop(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        captured.append(args[0])
        raise _HeadReached

    hook = model.get_output_embeddings().register_forward_pre_hook(stop)
    try:
        model(**inputs, use_cache=False)
    except _HeadReached:
        pass
    finally:
        hook.remove()
    return Predictions(model, hidden=captured[0])


@torch.no_grad()
def log_probs(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities [batch, seq_len, vocab] in float32."""
    return predictions(model, tokens).all()


# A reference holds tokens × vocabulary log-probabilities (4 GB in float32 for 8K tokens of Llama 3's 128K
# vocabulary); float16 halves that. Log-probabilities lie in [-100, 0], where float16 keeps 10 mantissa bits:
# the KL moves by about 5e-6 nats per token, nearly the same for every trial, so trials rank as with float32.
REFERENCE_DTYPE = torch.float16


class WindowLogProbs(Protocol):
    """Reference log-probabilities [windows, seq_len, vocab] kept elsewhere than in one tensor (on disk: the
    session's references), read a piece at a time."""

    shape: tuple[int, int, int]

    def rows(self, window: int, start: int, end: int) -> torch.Tensor:
        """Positions start..end-1 of one window [end - start, vocab], in the stored dtype."""
        ...


Reference = torch.Tensor | nn.Module | WindowLogProbs


@torch.no_grad()
def reference_pieces(model: nn.Module, tokens: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    """The dense model's log-probabilities on `tokens` [windows, seq_len], in REFERENCE_DTYPE on CPU, a piece of
    one window at a time ([tokens, vocab], `Predictions.pieces`), in the order of the flattened tensor."""
    for first in range(0, len(tokens), batch_size):
        predicted = predictions(model, tokens[first : first + batch_size])
        for window, start, end in predicted.pieces():
            yield predicted.log_probs(window, start, end).to(REFERENCE_DTYPE).cpu()


def dense_reference(model: nn.Module, tokens: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The dense model's log-probabilities on a pool, computed once and reused by every trial (on CPU)."""
    return torch.cat(list(reference_pieces(model, tokens, batch_size))).view(*tokens.shape, -1)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    tokens: torch.Tensor,
    reference: Reference | None = None,
    batch_size: int = 4,
    predictions_of: Callable[[int, torch.Tensor], Predictions] | None = None,
    values: TokenValues | None = None,
) -> Metrics:
    """Score `model` on `tokens`. `reference` is the dense model itself, or its cached log-probabilities (a tensor
    or `WindowLogProbs`), window i of it for window i of `tokens`.

    `predictions_of(start, batch)`, if given, computes the model's predictions of the batch that starts at window
    `start` of `tokens` in place of a plain forward (`block_reuse.BlockInputCache` runs only the blocks a change
    reaches). `values`, if given, gathers the per-token values (`TokenValues`) on the way. Each window is scored a
    piece at a time (`Predictions.pieces`), so no batch's distributions over a large vocabulary are held at once."""
    ce_sum = kl_sum = 0.0
    seconds = 0.0
    for first in range(0, len(tokens), batch_size):
        batch = tokens[first : first + batch_size]
        began = time.perf_counter()
        predicted = predictions(model, batch) if predictions_of is None else predictions_of(first, batch)
        seconds += time.perf_counter() - began
        dense = predictions(reference, batch) if isinstance(reference, nn.Module) else None
        window_values: dict[int, list[dict[str, np.ndarray]]] = {}
        for window, start, end in predicted.pieces():
            began = time.perf_counter()
            log_p = predicted.log_probs(window, start, end)
            seconds += time.perf_counter() - began
            log_q = kld = None
            if dense is not None:
                log_q = dense.log_probs(window, start, end).to(log_p.device)
            elif isinstance(reference, torch.Tensor):
                log_q = reference[first + window, start:end].to(log_p.device, torch.float32)
            elif reference is not None:
                log_q = reference.rows(first + window, start, end).to(log_p.device, torch.float32)
            if log_q is not None:
                kld = F.kl_div(log_p, log_q, log_target=True, reduction="none").sum(-1)
                kl_sum += kld.sum().item()
            predicting = min(end, batch.shape[1] - 1) - start  # the window's last position has no next token
            if predicting <= 0:
                continue
            targets = batch[window, start + 1 : start + 1 + predicting].to(log_p.device)
            nll = -log_p[:predicting].gather(-1, targets[:, None])[:, 0]
            ce_sum += nll.sum().item()
            if values is not None:
                window_values.setdefault(window, []).append(
                    token_values(
                        log_p[:predicting],
                        targets,
                        nll,
                        None if log_q is None else log_q[:predicting],
                        None if kld is None else kld[:predicting],
                    )
                )
        for parts in window_values.values():
            values.add_window({key: np.concatenate([part[key] for part in parts]) for key in parts[0]})
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


def token_values(
    log_p: torch.Tensor,
    targets: torch.Tensor,
    nll: torch.Tensor,
    log_q: torch.Tensor | None = None,
    kld: torch.Tensor | None = None,
) -> dict[str, np.ndarray]:
    """`TokenValues`' figures of some predicted tokens of one window, from the model's log-probabilities
    [tokens, vocab] of them, the actual next tokens, their negative log-likelihoods and, against the dense base,
    its log-probabilities and the KL of each token."""
    values = {"nll": nll.double().cpu().numpy()}
    if log_q is None or kld is None:
        return values
    dense_nll = -log_q.gather(-1, targets[:, None])[:, 0]
    return values | {
        "dense_nll": dense_nll.double().cpu().numpy(),
        "kld": kld.double().cpu().numpy(),
        "same_top": (log_p.argmax(-1) == log_q.argmax(-1)).cpu().numpy(),
        "p_diff": (torch.exp(-nll.double()) - torch.exp(-dense_nll.double())).cpu().numpy(),
    }


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
        if dense is not None:
            dense = dense.reshape(predicted.shape).to(predicted.device, torch.float32)
        for window, log_p in enumerate(predicted[:, :-1]):
            targets = tokens[window, 1:].to(predicted.device)
            nll = -log_p.gather(-1, targets[:, None])[:, 0]
            log_q = kld = None
            if dense is not None:
                log_q = dense[window, :-1]
                kld = F.kl_div(log_p, log_q, log_target=True, reduction="none").sum(-1)
            self.add_window(token_values(log_p, targets, nll, log_q, kld))

    def add_window(self, values: dict[str, np.ndarray]) -> None:
        """Record one window's per-token values (`token_values`, its pieces concatenated)."""
        for key, array in values.items():
            getattr(self, key).append(array)

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
