"""Fitness against the dense model: a cached reference scores a trial as the dense model itself would."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from autocompress.compress import apply_plan
from autocompress.metrics import (
    REFERENCE_DTYPE,
    TokenValues,
    dense_reference,
    evaluate,
    gap_closed,
    paired_difference,
)
from autocompress.plan import CompressionPlan


def test_the_cached_reference_is_half_the_bytes_of_float32_log_probabilities(tiny_model) -> None:
    tokens = torch.randint(0, tiny_model.config.vocab_size, (3, 16))
    reference = dense_reference(tiny_model, tokens, batch_size=2)
    assert reference.dtype == REFERENCE_DTYPE
    assert reference.element_size() == 2
    assert reference.shape == (3, 16, tiny_model.config.vocab_size)


@pytest.fixture
def confident_model(tiny_model):
    """The tiny Llama with sharp next-token distributions, as a trained model has."""
    with torch.no_grad():
        tiny_model.model.norm.weight.mul_(8)
    return tiny_model


def test_kl_to_the_cached_reference_ranks_trials_as_the_dense_model_does(confident_model) -> None:
    tokens = torch.randint(0, confident_model.config.vocab_size, (4, 32))
    reference = dense_reference(confident_model, tokens, batch_size=2)
    exact, cached = {}, {}
    for bits in (2, 3, 4):
        compressed = copy.deepcopy(confident_model)
        apply_plan(compressed, CompressionPlan.uniform(bits=bits, quantization="rtn", group_size=32), {})
        exact[bits] = evaluate(compressed, tokens, reference=confident_model, batch_size=2)
        cached[bits] = evaluate(compressed, tokens, reference=reference, batch_size=2)

    for bits in exact:
        assert cached[bits].ce == exact[bits].ce
        assert cached[bits].kl == pytest.approx(exact[bits].kl, abs=2e-5)
    assert cached[2].kl - cached[3].kl == pytest.approx(exact[2].kl - exact[3].kl, rel=1e-3)
    assert cached[3].kl - cached[4].kl == pytest.approx(exact[3].kl - exact[4].kl, rel=1e-3)


def llama_cpp_kl_divergence(logits: np.ndarray, base_log_probs: np.ndarray, targets: np.ndarray) -> dict:
    """llama.cpp's `log_softmax` of tools/perplexity/perplexity.cpp, token by token in plain Python (without its
    uint16 storage of the base's log-probabilities), and its summary of the values."""
    kld, p_diff, same = [], [], 0
    for row, base, token in zip(logits, base_log_probs, targets, strict=True):
        max_logit, imax = row.max(), int(row.argmax())
        log_sum_exp = np.log(np.exp(row - max_logit).sum())
        nll = max_logit + log_sum_exp - row[token]
        nll_base = -base[token]
        kld.append(sum(np.exp(b) * (b - row[i] + max_logit + log_sum_exp) for i, b in enumerate(base)))
        same += imax == int(base.argmax())
        p_diff.append(np.exp(-nll) - np.exp(-nll_base))
    values = np.sort(np.array(kld))
    fraction = 0.999 * (len(values) - 1)
    low = int(fraction)
    percentile = (1 - (fraction - low)) * values[low] + (fraction - low) * values[min(low + 1, len(values) - 1)]
    return {
        "mean_kld": values.mean(),
        "kld_99_9": percentile,
        "median_kld": np.median(values),
        "same_top_p": same / len(values),
        "rms_dp": np.sqrt(np.mean(np.square(p_diff))),
    }


def test_kld_statistics_follow_llama_perplexity_definitions(confident_model) -> None:
    tokens = torch.randint(0, confident_model.config.vocab_size, (3, 24))
    compressed = copy.deepcopy(confident_model)
    apply_plan(compressed, CompressionPlan.uniform(bits=3, quantization="rtn", group_size=32), {})
    values = TokenValues()
    metrics = evaluate(compressed, tokens, reference=confident_model, batch_size=2, values=values)
    statistics = values.statistics()

    with torch.no_grad():
        logits = compressed(tokens).logits[:, :-1].double().reshape(-1, confident_model.config.vocab_size)
        base = torch.log_softmax(confident_model(tokens).logits[:, :-1].double(), -1)
    expected = llama_cpp_kl_divergence(
        logits.numpy(), base.reshape(logits.shape).numpy(), tokens[:, 1:].reshape(-1).numpy()
    )
    assert statistics["tokens_scored"] == 3 * 23
    assert 0 < expected["same_top_p"] < 1 and expected["median_kld"] < expected["kld_99_9"]
    for key, value in expected.items():
        assert statistics[key] == pytest.approx(value, rel=1e-4, abs=1e-7), key
    assert statistics["ppl"] == pytest.approx(metrics.ppl, rel=1e-6)
    assert len(values.window_kld()) == 3 and len(values.window_nll()) == 3


def test_without_a_reference_only_perplexity_is_reported(tiny_model) -> None:
    values = TokenValues()
    evaluate(tiny_model, torch.randint(0, tiny_model.config.vocab_size, (2, 8)), batch_size=2, values=values)
    assert not values.against_dense and set(values.statistics()) == {"ppl", "tokens_scored"}


def test_a_paired_comparison_finds_the_better_model_and_the_gap_it_closes() -> None:
    rng = np.random.default_rng(0)
    base = rng.uniform(2.0, 3.0, 40)
    other = base + 0.20 + rng.normal(0, 0.02, 40)  # every window worse than the base by about 0.2 nats
    better = base + 0.05 + rng.normal(0, 0.02, 40)  # a quarter of that gap left
    delta = paired_difference(better, other)
    assert delta["delta"] == pytest.approx(-0.15, abs=0.01)
    assert delta["ci_low"] < delta["delta"] < delta["ci_high"] < 0
    assert delta["windows_lower"] == delta["windows"] == 40
    closed = gap_closed(better, other, base)
    assert closed["gap_closed_ci_low"] < closed["gap_closed"] < closed["gap_closed_ci_high"]
    assert closed["gap_closed"] == pytest.approx(0.75, abs=0.05)
    assert paired_difference(other, better)["windows_lower"] == 0
