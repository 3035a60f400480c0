"""Students: cut from the teacher to exactly the requested shape, loadable by plain transformers, and
trained by knowledge distillation to move closer to the teacher."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from autocompress.distillation import (
    DistillationOptions,
    _training_loss,
    build_student,
    distill,
    evaluate_kd,
    kd_loss,
    measure_importance,
    next_token_ce,
)
from autocompress.plan import StudentArchitecture


@pytest.fixture(scope="module")
def teacher() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=8,
        tie_word_embeddings=True,
        initializer_range=0.1,  # sharper next-token distributions than the default, so KL has room to fall
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, 128, (16, 32), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def importance(teacher, tokens):
    return measure_importance(teacher, tokens)


@pytest.mark.parametrize(
    "architecture",
    [
        StudentArchitecture(num_layers=2),
        StudentArchitecture(intermediate_size=64),
        StudentArchitecture(num_attention_heads=4, num_key_value_heads=2),
        StudentArchitecture(num_attention_heads=4, num_key_value_heads=4),
        StudentArchitecture(hidden_size=48),
        StudentArchitecture(
            num_layers=3, intermediate_size=96, num_attention_heads=4, num_key_value_heads=4, hidden_size=32
        ),
    ],
)
def test_a_student_has_exactly_the_requested_shape_and_loads_in_plain_transformers(
    teacher, importance, architecture: StudentArchitecture, tmp_path: Path
) -> None:
    student = build_student(teacher, architecture, importance)
    shape = architecture.resolved(teacher.config)
    config = student.config
    assert (
        config.num_hidden_layers,
        config.intermediate_size,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.hidden_size,
    ) == (
        shape["num_layers"],
        shape["intermediate_size"],
        shape["num_attention_heads"],
        shape["num_key_value_heads"],
        shape["hidden_size"],
    )
    block = student.model.layers[0]
    assert block.mlp.gate_proj.weight.shape == (shape["intermediate_size"], shape["hidden_size"])
    assert block.self_attn.q_proj.weight.shape == (shape["num_attention_heads"] * 8, shape["hidden_size"])
    assert block.self_attn.k_proj.weight.shape == (shape["num_key_value_heads"] * 8, shape["hidden_size"])

    student.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    batch = torch.randint(0, 128, (2, 16))
    torch.testing.assert_close(reloaded(batch).logits, student(batch).logits)
    assert reloaded.generate(batch[:1, :4], max_new_tokens=3, do_sample=False).shape == (1, 7)


def test_the_teacher_is_left_untouched(teacher, importance) -> None:
    before = {name: value.clone() for name, value in teacher.state_dict().items()}
    build_student(teacher, StudentArchitecture(num_layers=2, intermediate_size=64, hidden_size=48), importance)
    after = teacher.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_a_full_size_student_is_the_teacher(teacher, importance, tokens) -> None:
    student = build_student(teacher, StudentArchitecture(), importance)
    torch.testing.assert_close(student(tokens[:2]).logits, teacher(tokens[:2]).logits)


def test_depth_cut_drops_the_blocks_that_change_their_input_least(teacher, importance) -> None:
    student = build_student(teacher, StudentArchitecture(num_layers=2), importance)
    kept = importance.blocks.topk(2).indices.sort().values.tolist()
    for student_block, teacher_index in zip(student.model.layers, kept, strict=True):
        assert torch.equal(student_block.mlp.down_proj.weight, teacher.model.layers[teacher_index].mlp.down_proj.weight)


@pytest.mark.parametrize(
    ("architecture", "message"),
    [
        (StudentArchitecture(num_layers=5), "exceeds the teacher"),
        (StudentArchitecture(num_attention_heads=6, num_key_value_heads=4), "multiple of its key/value heads"),
        (StudentArchitecture(num_attention_heads=8, num_key_value_heads=2), "at most 2 query heads"),
        (StudentArchitecture(num_attention_heads=6, num_key_value_heads=3), "not a multiple of the number"),
    ],
)
def test_impossible_shapes_are_refused(teacher, architecture, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        architecture.resolved(teacher.config)


def test_distillation_lowers_the_kl_to_the_teacher(teacher, importance, tokens) -> None:
    student = build_student(teacher, StudentArchitecture(num_layers=2, intermediate_size=64), importance)
    before = evaluate_kd(student, teacher, tokens[12:], batch_size=4)
    history = distill(
        student,
        teacher,
        tokens[:12],
        DistillationOptions(steps=40, learning_rate=1e-3, eval_every=10),
        eval_tokens=tokens[12:],
    )
    assert [step for step, _ in history] == [10, 20, 30, 40]
    assert history[-1][1] < 0.9 * before


def test_the_hard_label_term_adds_the_weighted_cross_entropy_to_the_kl(teacher, importance, tokens) -> None:
    student = build_student(teacher, StudentArchitecture(num_layers=2, intermediate_size=64), importance)
    batch = tokens[:4]
    with torch.no_grad():
        teacher_logits, student_logits = teacher(batch).logits, student(batch).logits
        kl = kd_loss(student_logits, teacher_logits, temperature=2.0)
        ce = next_token_ce(student_logits, batch)
        mixed = _training_loss(
            student, teacher, batch, DistillationOptions(temperature=2.0, ce_weight=0.5), nullcontext()
        )
    assert mixed.item() == pytest.approx((kl + 0.5 * ce).item(), rel=1e-5)


def test_an_early_stop_verdict_ends_training(teacher, importance, tokens) -> None:
    student = build_student(teacher, StudentArchitecture(num_layers=2), importance)
    history = distill(
        student,
        teacher,
        tokens[:12],
        DistillationOptions(steps=100, eval_every=5),
        eval_tokens=tokens[12:],
        on_eval=lambda step, kl: step >= 10,
    )
    assert [step for step, _ in history] == [5, 10]


def test_frozen_masks_keep_pruned_weights_at_zero_while_training(teacher, importance, tokens) -> None:
    student = build_student(teacher, StudentArchitecture(num_layers=2), importance)
    name = "model.layers.0.mlp.down_proj.weight"
    mask = torch.rand_like(student.get_parameter(name)) > 0.5
    student.get_parameter(name).data.mul_(mask)
    distill(student, teacher, tokens[:12], DistillationOptions(steps=5, learning_rate=1e-2), frozen_masks={name: mask})
    assert torch.all(student.get_parameter(name)[~mask] == 0)
