"""The embedded default end to end: SmolLM2-135M on CPython's documentation, compressed one-shot.

Slow (about two minutes on 2 CPU cores): `pytest -m "not slow"` leaves it out.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
from transformers import PreTrainedModel

from autocompress.calibration import collect_statistics
from autocompress.compress import apply_plan, statistics_needed
from autocompress.config import DataConfig
from autocompress.data import TokenPools, token_pools
from autocompress.metrics import evaluate
from autocompress.models import EMBEDDED_MODEL, compressible_linears, load_model, unit_names
from autocompress.plan import CompressionPlan

pytestmark = pytest.mark.slow

DATA = DataConfig(source="pydoc", seq_len=128, calibration=8, fitness=2, heldout=6, batch_size=4, seed=0)


@dataclass
class Embedded:
    model: PreTrainedModel
    pools: TokenPools
    dense_ppl: float
    norms: dict  # Wanda's calibration statistics, collected once


@pytest.fixture(scope="module")
def embedded() -> Embedded:
    torch.manual_seed(0)
    model, tokenizer = load_model(EMBEDDED_MODEL, device="cpu")
    pools = token_pools(DATA, tokenizer)
    needs = statistics_needed(CompressionPlan.uniform(sparsity=0.5, pruning="wanda"))
    norms = collect_statistics(model, compressible_linears(model), pools.calibration, needs, DATA.batch_size)
    dense_ppl = evaluate(model, pools.heldout, batch_size=DATA.batch_size).ppl
    return Embedded(model, pools, dense_ppl, norms)


def heldout_ppl_after(embedded: Embedded, plan: CompressionPlan) -> float:
    """Held-out perplexity of a compressed copy of the dense model (the dense model itself is left alone)."""
    model = copy.deepcopy(embedded.model)
    apply_plan(model, plan, embedded.norms)
    return evaluate(model, embedded.pools.heldout, batch_size=DATA.batch_size).ppl


def test_the_embedded_model_has_30_blocks_of_7_compressible_linears(embedded):
    linears = compressible_linears(embedded.model)
    assert len(linears) == 30 * 7
    assert len(unit_names(embedded.model, "block")) == 30
    assert {linear.name.split(".", 3)[3] for linear in linears} == {
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    }


def test_the_pools_have_the_configured_sizes(embedded):
    assert embedded.pools.calibration.shape == (8, 128)
    assert embedded.pools.fitness.shape == (2, 128)
    assert embedded.pools.heldout.shape == (6, 128)


def test_the_dense_held_out_perplexity_is_sane(embedded):
    assert 3 < embedded.dense_ppl < 60


def test_wanda_beats_magnitude_on_held_out_perplexity_at_50_percent(embedded):
    wanda = heldout_ppl_after(embedded, CompressionPlan.uniform(sparsity=0.5, pruning="wanda"))
    magnitude = heldout_ppl_after(embedded, CompressionPlan.uniform(sparsity=0.5, pruning="magnitude"))
    assert embedded.dense_ppl < wanda < magnitude
