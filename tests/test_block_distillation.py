"""Block-local distillation: a structural alternative trained to reproduce its parent sub-block's output from the
sub-block's recorded inputs, judged on calibration windows it was not trained on."""

from __future__ import annotations

import pytest
import torch

from autocompress.block_distillation import BlockDistillationOptions, capture, distill, options_of
from autocompress.config import BlockDistillationConfig
from autocompress.distillation import measure_importance
from autocompress.plan import BlockStructure
from autocompress.structure import variant_modules
from tests.test_structure import calibration_tokens, four_block_model


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
