"""Evaluations from kept decoder-block inputs score exactly as full ones, and reuse only what is current."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from transformers import (
    GemmaConfig,
    GemmaForCausalLM,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from autocompress.block_reuse import BlockInputCache, bytes_per_kept_block, reusable, spread
from autocompress.config import Config
from autocompress.metrics import Metrics, log_probs
from autocompress.plan import CompressionPlan, LayerCompression
from autocompress.session import CompressionSession
from tests.conftest import tiny_llama_config, tiny_study_config, tiny_tokenizer

N_BLOCKS = 4
WINDOWS, SEQ_LEN, HIDDEN = 4, 32, 64
BLOCK_BYTES = WINDOWS * SEQ_LEN * HIDDEN * 4  # float32


@pytest.fixture(scope="module")
def four_block_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama of conftest with four decoder blocks, so that there is a middle to start from."""
    folder = tmp_path_factory.mktemp("tiny-llama-4")
    config = tiny_llama_config()
    config.num_hidden_layers = N_BLOCKS
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def session_config(tmp_path: Path, model_dir: Path, reuse_memory_mb: float = 1.0) -> Config:
    raw = tiny_study_config(tmp_path, model_dir, fitness=WINDOWS, search={"reuse_memory_mb": reuse_memory_mb})
    raw["data"]["batch_size"] = 2  # two batches per pool, so batches start from kept inputs at an offset
    return Config.model_validate(raw)


def plan_with(changed: dict[int, LayerCompression]) -> CompressionPlan:
    """Every block pruned to 30% at 8 bits, except the blocks in `changed`."""
    layers = {f"model.layers.{block}": setting for block, setting in changed.items()}
    return CompressionPlan(
        default=LayerCompression(sparsity=0.3, bits=8), layers=layers, pruning="wanda", group_size=32
    )


BASE = plan_with({})
FROM_BLOCK_2 = plan_with({2: LayerCompression(sparsity=0.6, bits=4), 3: LayerCompression(bits=4)})
FROM_BLOCK_3 = plan_with({3: LayerCompression(sparsity=0.6, bits=4)})
FROM_BLOCK_0 = plan_with({0: LayerCompression(sparsity=0.6, bits=4)})
FROM_BLOCK_1 = plan_with({1: LayerCompression(sparsity=0.6, bits=4)})


@contextmanager
def counting_block_runs(session: CompressionSession) -> Iterator[list[int]]:
    """How many times each decoder block runs (one per batch), counted by hooks of the test's own."""
    runs = [0] * len(session.block_inputs.blocks)
    hooks = [
        block.register_forward_hook(lambda *_, index=index: runs.__setitem__(index, runs[index] + 1))
        for index, block in enumerate(session.block_inputs.blocks)
    ]
    try:
        yield runs
    finally:
        for hook in hooks:
            hook.remove()


def assert_same_metrics(reused: Metrics, fresh: Metrics) -> None:
    assert reused.kl == pytest.approx(fresh.kl, rel=1e-6)
    assert reused.ce == pytest.approx(fresh.ce, rel=1e-6)
    assert reused.n_tokens == fresh.n_tokens


def fresh_metrics(config: Config, plan: CompressionPlan, stages: list[int] | None = None) -> Metrics:
    return CompressionSession(config).measure(plan, stages=stages).metrics


def test_a_plan_differing_from_block_k_on_runs_blocks_k_and_later_and_scores_as_a_fresh_session(
    tmp_path: Path, four_block_model_dir: Path
) -> None:
    config = session_config(tmp_path, four_block_model_dir)
    session = CompressionSession(config)
    assert session.block_inputs.kept_blocks == (1, 2, 3)
    session.measure(BASE)

    with counting_block_runs(session) as runs:
        reused = session.measure(FROM_BLOCK_2).metrics
    assert runs == [0, 0, 2, 2]  # two batches, each from block 2's kept input
    assert_same_metrics(reused, fresh_metrics(config, FROM_BLOCK_2))

    with counting_block_runs(session) as runs:  # back to BASE: blocks 2 and 3 change again
        back = session.measure(BASE).metrics
    assert runs == [0, 0, 2, 2]
    assert_same_metrics(back, fresh_metrics(config, BASE))

    with counting_block_runs(session) as runs:
        session.measure(FROM_BLOCK_3)
    assert runs == [0, 0, 0, 2]
    assert session.block_inputs.memory_bytes == 3 * BLOCK_BYTES


def test_reuse_is_exact_on_cpu_float32(tmp_path: Path, four_block_model_dir: Path) -> None:
    config = session_config(tmp_path, four_block_model_dir)
    session = CompressionSession(config)
    session.measure(BASE)
    reused = session.measure(FROM_BLOCK_3).metrics
    fresh = fresh_metrics(config, FROM_BLOCK_3)
    assert (reused.kl, reused.ce) == (fresh.kl, fresh.ce)


def test_a_plan_differing_in_block_0_runs_every_block(tmp_path: Path, four_block_model_dir: Path) -> None:
    config = session_config(tmp_path, four_block_model_dir)
    session = CompressionSession(config)
    session.measure(BASE)
    skipped = session.block_inputs.blocks_skipped
    with counting_block_runs(session) as runs:
        metrics = session.measure(FROM_BLOCK_0).metrics
    assert runs == [2, 2, 2, 2]
    assert session.block_inputs.blocks_skipped == skipped
    assert_same_metrics(metrics, fresh_metrics(config, FROM_BLOCK_0))


def test_staged_evaluation_stopped_early_keeps_only_the_windows_it_scored(
    tmp_path: Path, four_block_model_dir: Path
) -> None:
    config = session_config(tmp_path, four_block_model_dir)
    session = CompressionSession(config)

    def stop(*_: object) -> None:
        raise StopIteration  # as optuna.TrialPruned would, after the first stage

    with pytest.raises(StopIteration):
        session.measure(BASE, stages=[2, 4], on_stage=stop)
    with counting_block_runs(session) as runs:
        metrics = session.measure(FROM_BLOCK_2, stages=[2, 4]).metrics
    # Windows 0-1 start from block 2's kept input; windows 2-3 were never scored, so they run every block.
    assert runs == [1, 1, 2, 2]
    assert_same_metrics(metrics, fresh_metrics(config, FROM_BLOCK_2, stages=[2, 4]))
    only_block_3_changed = plan_with({2: LayerCompression(sparsity=0.6, bits=4), 3: LayerCompression(sparsity=0.6)})
    with counting_block_runs(session) as runs:
        session.measure(only_block_3_changed, stages=[2, 4])
    assert runs == [0, 0, 0, 2]  # now every window's input of block 3 is kept


def test_a_failed_stitch_drops_every_kept_input(
    tmp_path: Path, four_block_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = session_config(tmp_path, four_block_model_dir)
    session = CompressionSession(config)
    session.measure(BASE)
    with monkeypatch.context() as patch:

        def failing(*args: object, **kwargs: object) -> None:
            raise RuntimeError("simulated failure")

        patch.setattr("autocompress.targets.linear.apply_plan", failing)
        with pytest.raises(RuntimeError):
            session.measure(FROM_BLOCK_3)
    assert session.block_inputs.start_block(WINDOWS) == 0
    with counting_block_runs(session) as runs:
        metrics = session.measure(FROM_BLOCK_3).metrics
    assert runs == [2, 2, 2, 2]
    assert_same_metrics(metrics, fresh_metrics(config, FROM_BLOCK_3))


def test_restoring_dense_weights_drops_every_kept_input(tmp_path: Path, four_block_model_dir: Path) -> None:
    session = CompressionSession(session_config(tmp_path, four_block_model_dir))
    session.measure(BASE)
    assert session.block_inputs.start_block(WINDOWS) == 3
    session.restore_dense()
    assert session.block_inputs.start_block(WINDOWS) == 0


def test_held_out_measurements_neither_use_nor_spoil_the_fitness_inputs(
    tmp_path: Path, four_block_model_dir: Path
) -> None:
    config = session_config(tmp_path, four_block_model_dir)
    session = CompressionSession(config)
    session.reference("heldout")  # first: computing the dense reference restores the dense weights
    session.measure(BASE)
    with counting_block_runs(session) as runs:
        heldout = session.measure(FROM_BLOCK_3, pool="heldout").metrics
    assert runs == [2, 2, 2, 2]
    assert heldout.kl == CompressionSession(config).measure(FROM_BLOCK_3, pool="heldout").metrics.kl
    with counting_block_runs(session) as runs:
        metrics = session.measure(FROM_BLOCK_3).metrics
    assert runs == [0, 0, 0, 2]
    assert_same_metrics(metrics, fresh_metrics(config, FROM_BLOCK_3))


def test_the_memory_budget_keeps_evenly_spread_blocks_and_the_rest_runs_from_the_nearest_before(
    tmp_path: Path, four_block_model_dir: Path
) -> None:
    one_block_mb = 1.5 * BLOCK_BYTES / 10**6
    config = session_config(tmp_path, four_block_model_dir, reuse_memory_mb=one_block_mb)
    session = CompressionSession(config)
    assert session.block_inputs.bytes_per_block == BLOCK_BYTES
    assert session.block_inputs.kept_blocks == (2,)
    session.measure(BASE)
    assert session.block_inputs.memory_bytes == BLOCK_BYTES <= one_block_mb * 10**6

    with counting_block_runs(session) as runs:
        metrics = session.measure(FROM_BLOCK_3).metrics  # block 3's input is not kept: from block 2's
    assert runs == [0, 0, 2, 2]
    assert_same_metrics(metrics, fresh_metrics(config, FROM_BLOCK_3))
    with counting_block_runs(session) as runs:
        metrics = session.measure(FROM_BLOCK_1).metrics  # nothing kept before block 1 changes: a full evaluation
    assert runs == [2, 2, 2, 2]
    assert_same_metrics(metrics, fresh_metrics(config, FROM_BLOCK_1))


def test_without_a_budget_nothing_is_kept_and_every_block_runs(tmp_path: Path, four_block_model_dir: Path) -> None:
    session = CompressionSession(session_config(tmp_path, four_block_model_dir, reuse_memory_mb=0))
    assert session.block_inputs.kept_blocks == ()
    session.measure(BASE)
    with counting_block_runs(session) as runs:
        session.measure(FROM_BLOCK_3)
    assert runs == [2, 2, 2, 2]
    assert session.block_inputs.memory_bytes == 0


def test_kept_blocks_are_spread_evenly() -> None:
    assert spread(29, 30) == tuple(range(1, 30))
    assert spread(99, 30) == tuple(range(1, 30))
    assert spread(1, 30) == (15,)
    assert spread(2, 30) == (10, 20)
    assert spread(0, 30) == ()
    assert len(spread(7, 30)) == 7


def small(config_class, **extra):
    return config_class(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=N_BLOCKS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        **extra,
    )


@pytest.mark.parametrize(
    ("model_class", "config"),
    [
        (LlamaForCausalLM, tiny_llama_config()),
        (MistralForCausalLM, small(MistralConfig, sliding_window=16)),
        (Qwen2ForCausalLM, small(Qwen2Config)),
        (Qwen3ForCausalLM, small(Qwen3Config, head_dim=16)),
        (Phi3ForCausalLM, small(Phi3Config, pad_token_id=0)),
    ],
    ids=["llama", "mistral", "qwen2", "qwen3", "phi3"],
)
def test_running_from_a_kept_input_is_the_full_forward_of_every_supported_family(model_class, config) -> None:
    config.num_hidden_layers = N_BLOCKS
    torch.manual_seed(0)
    model = model_class(config).eval()
    tokens = torch.randint(0, 256, (WINDOWS, SEQ_LEN))
    cache = BlockInputCache(model, WINDOWS, SEQ_LEN, memory_bytes=10**9)
    assert cache.kept_blocks == (1, 2, 3)
    cache.predictions(tokens, 0)  # records
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight.mul_(0.5)
    cache.block_changed("model.layers.2")
    assert cache.start_block(WINDOWS) == 2
    assert torch.allclose(cache.predictions(tokens[:2], 0).all(), log_probs(model, tokens[:2]), rtol=0, atol=1e-6)
    assert torch.allclose(cache.predictions(tokens[2:], 2).all(), log_probs(model, tokens[2:]), rtol=0, atol=1e-6)
    assert cache.blocks_skipped == 4


def test_families_that_transform_the_embeddings_or_mix_block_types_are_not_reused() -> None:
    gemma = GemmaForCausalLM(small(GemmaConfig, head_dim=16))  # scales inputs_embeds inside forward
    assert not reusable(gemma)
    assert BlockInputCache(gemma, WINDOWS, SEQ_LEN, memory_bytes=10**9).kept_blocks == ()
    layer_types = ["sliding_attention", "full_attention"] * (N_BLOCKS // 2)
    mixed = Qwen2ForCausalLM(small(Qwen2Config, use_sliding_window=True, sliding_window=8, layer_types=layer_types))
    assert not reusable(mixed)
    llama = LlamaForCausalLM(tiny_llama_config())
    assert reusable(llama)
    assert bytes_per_kept_block(llama, WINDOWS, SEQ_LEN) == WINDOWS * SEQ_LEN * HIDDEN * 4
