"""Fitness against the dense model: a cached reference scores a trial as the dense model itself would."""

from __future__ import annotations

import copy

import pytest
import torch

from autocompress.compress import apply_plan
from autocompress.metrics import REFERENCE_DTYPE, dense_reference, evaluate
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
