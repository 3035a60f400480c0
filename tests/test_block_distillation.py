"""Block-local distillation: a structural alternative trained to reproduce its parent sub-block's output from the
sub-block's recorded inputs, judged on calibration windows it was not trained on."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from autocompress.block_distillation import (
    AlternativeStore,
    BlockDistillationOptions,
    alternative_levels,
    capture,
    distill,
    distill_alternatives,
    options_of,
)
from autocompress.config import BlockDistillationConfig
from autocompress.distillation import measure_importance
from autocompress.plan import BlockStructure, CompressionPlan
from autocompress.structure import StructureStitcher, variant_modules
from tests.test_structure import calibration_tokens, four_block_config, four_block_model


@pytest.fixture(scope="module")
def teacher_and_records():
    teacher = four_block_model()
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    tokens = calibration_tokens(256, windows=48)  # 36 to train on, 12 held out
    importance = measure_importance(teacher, tokens)
    return teacher, importance, capture(teacher, tokens, blocks=[1, 2])


def test_the_records_are_what_each_sub_block_adds_to_the_residual_stream(teacher_and_records) -> None:
    teacher, _, records = teacher_and_records
    assert set(records) == {(1, "ffn"), (1, "attention"), (2, "ffn"), (2, "attention")}
    train, heldout = records[1, "ffn"].split(0.25)
    assert (train, heldout) == (range(36), range(36, 48))  # disjoint windows: judged on what it never trained on
    for kind, module in (("ffn", teacher.model.layers[1].mlp), ("attention", teacher.model.layers[1].self_attn)):
        assert records[1, kind].mse(module, heldout, batch_size=4) < 1e-12  # the parent reproduces itself


@pytest.mark.parametrize(
    ("kind", "structure"), [("ffn", BlockStructure(ffn=0.5)), ("attention", BlockStructure(kv_groups=1))]
)
def test_a_trained_alternative_reproduces_its_parent_better_than_its_untrained_cut_on_held_out_windows(
    teacher_and_records, kind: str, structure: BlockStructure
) -> None:
    teacher, importance, records = teacher_and_records
    block = teacher.model.layers[2]
    swaps = variant_modules(block, 2, structure, importance, teacher.config)
    alternative = swaps["mlp" if kind == "ffn" else "self_attn"]
    before = {key: value.clone() for key, value in block.state_dict().items()}
    result = distill(alternative, records[2, kind], BlockDistillationOptions())
    print(f"{kind}: held-out MSE {result.heldout_mse_cut:.3e} cut, {result.heldout_mse:.3e} trained")
    assert result.steps == 100
    assert result.heldout_mse < 0.95 * result.heldout_mse_cut  # measured: 0.88 (FFN), 0.51 (attention)
    assert all(torch.equal(before[key], value) for key, value in block.state_dict().items())  # the parent untouched


def test_the_configs_section_sets_the_options_and_defaults_to_100_steps() -> None:
    assert options_of(BlockDistillationConfig()) == BlockDistillationOptions(steps=100)
    assert options_of(BlockDistillationConfig(steps=7, learning_rate=1e-3)).steps == 7


def test_no_attention_has_nothing_to_train_and_is_judged_all_the_same(teacher_and_records) -> None:
    teacher, importance, records = teacher_and_records
    swaps = variant_modules(teacher.model.layers[2], 2, BlockStructure(kv_groups=0), importance, teacher.config)
    result = distill(swaps["self_attn"], records[2, "attention"], BlockDistillationOptions())
    assert result.steps == 0 and result.heldout_mse == result.heldout_mse_cut > 0


def test_each_block_gets_the_alternatives_llama_cpp_runs_there() -> None:
    levels = alternative_levels(four_block_config(), [1, 0.5], [2, 1, 0], drop_blocks=True)
    assert levels[0] == {"attention": [1], "ffn": [64]}  # the first block keeps attention and is never removed
    assert levels[1] == levels[2] == {"attention": [1, 0], "ffn": [64, 0]}  # 0 and 0: the block removed
    assert levels[3] == {"attention": [1, 0], "ffn": [64]}


def test_trained_alternatives_are_kept_on_disk_read_back_on_resume_and_stitched(
    teacher_and_records, tmp_path: Path
) -> None:
    teacher, importance, _ = teacher_and_records
    tokens = calibration_tokens(256, windows=8)
    levels = {2: {"attention": [1, 0], "ffn": [64]}}
    options = BlockDistillationOptions(steps=5)
    first = distill_alternatives(teacher, tokens, importance, levels, options, AlternativeStore(tmp_path))
    assert set(first) == {(2, "attention", 1), (2, "attention", 0), (2, "ffn", 64)}
    assert not any(alternative.from_store for alternative in first.values())
    assert first[2, "ffn", 64].result.steps == 5 and first[2, "attention", 0].result.steps == 0

    again = distill_alternatives(teacher, tokens, importance, levels, options, AlternativeStore(tmp_path))
    assert all(alternative.from_store for alternative in again.values())
    for key, alternative in again.items():
        assert alternative.result == first[key].result
        for attribute, module in alternative.modules.items():
            stored, trained = module.state_dict(), first[key].modules[attribute].state_dict()
            assert all(torch.equal(stored[name], trained[name]) for name in trained)

    stitcher = StructureStitcher(teacher, importance, {key: alternative.modules for key, alternative in again.items()})
    stitcher.stitch(CompressionPlan(structure={"model.layers.2": BlockStructure(ffn=0.5, kv_groups=1)}))
    try:
        assert teacher.model.layers[2].mlp is again[2, "ffn", 64].modules["mlp"]
        assert teacher.model.layers[2].self_attn is again[2, "attention", 1].modules["self_attn"]
    finally:
        stitcher.restore()


def test_records_are_the_same_whichever_blocks_are_taken_together() -> None:
    teacher = four_block_model()
    tokens = calibration_tokens(256, windows=4)
    alone = capture(teacher, tokens, [1], batch_size=2)  # the pass stops after block 1
    together = capture(teacher, tokens, [3, 1], batch_size=2)
    assert set(together) == {(1, "ffn"), (1, "attention"), (3, "ffn"), (3, "attention")}
    for kind in ("ffn", "attention"):
        assert torch.equal(alone[1, kind].inputs, together[1, kind].inputs)
        assert torch.equal(alone[1, kind].outputs, together[1, kind].outputs)
