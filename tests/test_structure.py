"""Structural levels: per-block FFN widths, key/value groups and removed blocks, as plan data, as config refusals
before any model loads, and as a model built from the teacher by an importance-based cut."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config

from autocompress.config import load_config
from autocompress.distillation import measure_importance
from autocompress.errors import UserError
from autocompress.plan import BlockStructure, CompressionPlan
from autocompress.structure import (
    BlockShape,
    NoAttention,
    NoFeedForward,
    StructureStitcher,
    block_shapes,
    build_structured,
    check_structure,
    is_structured,
    structure_choices,
)
from tests.conftest import write_yaml
from tests.test_config_and_cli import error_line, run_main

STRUCTURE = {
    "model.layers.0": BlockStructure(ffn=0.5),
    "model.layers.1": BlockStructure(removed=True),
    "model.layers.2": BlockStructure(kv_groups=0, ffn=0.75),
    "model.layers.3": BlockStructure(kv_groups=1, ffn=0.25),
}


def four_block_config(**overrides: object) -> LlamaConfig:
    """A tiny Llama of four blocks, four query heads in two key/value groups, 128 FFN channels."""
    values = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    return LlamaConfig(**(values | overrides))


def four_block_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(four_block_config()).eval()


# --- plan data --------------------------------------------------------------------------------------------------


def test_a_structural_plan_round_trips_through_json_and_trial_parameters() -> None:
    plan = CompressionPlan.uniform(bits=4, structure=STRUCTURE)
    assert CompressionPlan.from_json(plan.to_json()) == plan
    params = plan.to_params()
    assert params["model.layers.1.removed"] is True
    assert params["model.layers.2.kv_groups"] == 0 and params["model.layers.2.ffn"] == 0.75
    assert "model.layers.1.ffn" not in params  # a removed block says nothing more
    rebuilt = CompressionPlan.from_params(params, default=plan.default)
    assert rebuilt == plan


def test_a_removed_blocks_sampled_width_and_groups_mean_nothing() -> None:
    params = {"model.layers.1.removed": True, "model.layers.1.ffn": 0.5, "model.layers.1.kv_groups": 1}
    plan = CompressionPlan.from_params(params)
    assert plan.structure == {"model.layers.1": BlockStructure(removed=True)}
    with pytest.raises(ValueError, match="removed block has no FFN width"):
        BlockStructure(removed=True, ffn=0.5)


def test_a_plan_without_shapes_serializes_as_before_structural_levels() -> None:
    plan = CompressionPlan.uniform(bits=4, structure={"model.layers.0": BlockStructure()})
    assert plan.structure == {}  # the teacher's shape is not named
    assert "structure" not in json.loads(plan.to_json())
    assert plan == CompressionPlan.uniform(bits=4)


def test_shapes_llama_cpp_cannot_run_are_refused_in_one_line() -> None:
    config = four_block_config()
    check_structure(STRUCTURE, config)
    refusals = {
        "model.layers.0": (BlockStructure(removed=True), "removes blocks 1 to 2 only"),
        "model.layers.3": (BlockStructure(removed=True), "removes blocks 1 to 2 only"),
        "model.layers.1": (BlockStructure(kv_groups=3), "the teacher has 2"),
        "model.layers.2": (BlockStructure(ffn=0.3), "not a whole number of channels"),
    }
    for block, (shape, message) in refusals.items():
        with pytest.raises(ValueError, match=message):
            check_structure({block: shape}, config)
    with pytest.raises(ValueError, match="first block keeps its attention"):
        check_structure({"model.layers.0": BlockStructure(kv_groups=0)}, config)
    with pytest.raises(ValueError, match="has 4 blocks"):
        check_structure({"model.layers.4": BlockStructure(ffn=0.5)}, config)


def test_each_block_is_offered_only_the_shapes_llama_cpp_runs_there() -> None:
    choices = structure_choices([1, 0.5], [2, 1, 0], True, n_layers=4)
    assert choices["model.layers.0.kv_groups"] == [1, 2]  # the first block keeps its attention
    assert choices["model.layers.3.kv_groups"] == [0, 1, 2]
    assert [key for key in choices if key.endswith(".removed")] == ["model.layers.1.removed", "model.layers.2.removed"]
    assert choices["model.layers.0.ffn"] == [0.5, 1]
    every_extreme = {key: values[0] if not key.endswith(".removed") else values[-1] for key, values in choices.items()}
    plan = CompressionPlan.from_params(every_extreme)
    check_structure(plan.structure, four_block_config())
    assert plan.structure["model.layers.1"] == BlockStructure(removed=True)
    assert structure_choices([1.0], None, False, n_layers=4) == {}


# --- config: refused before any model loads ---------------------------------------------------------------------


def config_only_folder(folder: Path, config) -> Path:
    """A model folder holding only its config.json: no weights, so anything that loads the model fails."""
    folder.mkdir()
    config.save_pretrained(folder)
    return folder


def gguf_study(model_dir: Path, corpus: Path, **structure: object) -> dict:
    return {
        "model": {"name": str(model_dir), "device": "cpu"},
        "data": {"source": "files", "files": [str(corpus)], "seq_len": 16, "calibration": 4, "fitness": 2},
        "compression": {"target": "gguf"},
        "search": {"formats": ["q8_0", "f16"], "structure": structure},
    }


@pytest.mark.parametrize(
    ("structure", "message"),
    [
        (
            {"ffn": [1, 0.3]},
            "an FFN width of 0.3 of the teacher's 128 channels is 38.4, not a whole number of channels",
        ),
        ({"kv_groups": [2, 3]}, "3 key/value groups: the teacher has 2, and a group keeps its 2 query heads"),
    ],
)
def test_a_level_the_models_shapes_break_exits_2_in_one_line_before_the_model_loads(
    tmp_path: Path, capsys, structure: dict, message: str
) -> None:
    folder = config_only_folder(tmp_path / "model", four_block_config())
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("w " * 100)
    path = write_yaml(tmp_path / "space.yaml", gguf_study(folder, corpus, **structure))
    code, _, err = run_main(["search", str(path), "--storage", f"sqlite:///{tmp_path / 'study.db'}"], capsys)
    assert error_line(code, err).endswith(f"search.structure: {message}")


def test_removing_blocks_of_a_two_block_model_is_refused(tmp_path: Path, capsys) -> None:
    folder = config_only_folder(tmp_path / "model", four_block_config(num_hidden_layers=2))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("w " * 100)
    path = write_yaml(tmp_path / "space.yaml", gguf_study(folder, corpus, drop_blocks=True))
    code, _, err = run_main(["search", str(path), "--storage", f"sqlite:///{tmp_path / 'study.db'}"], capsys)
    assert "drop_blocks: llama.cpp removes neither the first nor the last block" in error_line(code, err)


def test_a_family_deci_does_not_run_is_refused_naming_those_it_does(tmp_path: Path, capsys) -> None:
    qwen = Qwen2Config(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4
    )
    qwen.architectures = ["Qwen2ForCausalLM"]
    folder = config_only_folder(tmp_path / "model", qwen)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("w " * 100)
    path = write_yaml(tmp_path / "space.yaml", gguf_study(folder, corpus, ffn=[1, 0.5]))
    code, _, err = run_main(["search", str(path), "--storage", f"sqlite:///{tmp_path / 'study.db'}"], capsys)
    assert "which runs LlamaForCausalLM, MistralForCausalLM blocks, not Qwen2ForCausalLM's" in error_line(code, err)


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"compression": {"target": "artifact"}}, "so far under compression.target gguf only, not artifact"),
        ({"search": {"structure": {"ffn": [1.0]}}}, "offers at least one of ffn widths below 1"),
        ({"search": {"structure": {"ffn": [1.5]}}}, "fractions of the teacher's in (0, 1]"),
        ({"search": {"structure": {"kv_groups": [-1]}}}, "0 or more"),
        ({"search": {"structure": {"kv_groups": [0]}}}, "offer a count above 0 too"),
    ],
)
def test_a_structure_section_that_cannot_ship_is_one_line(tmp_path: Path, section: dict, message: str) -> None:
    config = gguf_study(tmp_path, tmp_path / "corpus.txt", ffn=[1, 0.5])
    for key, value in section.items():
        config[key] = config[key] | value
    with pytest.raises(UserError, match=r"search\.structure") as refusal:
        load_config(write_yaml(tmp_path / "space.yaml", config))
    assert message in str(refusal.value) and "\n" not in str(refusal.value)


# --- the model built from the teacher ---------------------------------------------------------------------------


def calibration_tokens(vocab: int, windows: int = 8, length: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (windows, length), generator=torch.Generator().manual_seed(seed))


def test_the_structured_model_has_each_blocks_shape_and_leaves_the_teacher_whole() -> None:
    teacher = four_block_model()
    before = {key: value.clone() for key, value in teacher.state_dict().items()}
    importance = measure_importance(teacher, calibration_tokens(256))
    model = build_structured(teacher, CompressionPlan(structure=STRUCTURE), importance)
    assert block_shapes(model) == [
        BlockShape(64, 4, 2),
        BlockShape(0, 0, 0),
        BlockShape(96, 0, 0),
        BlockShape(32, 2, 1),
    ]
    assert is_structured(model) and not is_structured(teacher)
    assert all(torch.equal(before[key], value) for key, value in teacher.state_dict().items())
    blocks = model.model.layers
    assert isinstance(blocks[1].mlp, NoFeedForward) and isinstance(blocks[2].self_attn, NoAttention)
    assert not any(
        key.startswith(("model.layers.1.", "model.layers.2.self_attn", "model.layers.2.input_"))
        for key in model.state_dict()
    )
    logits = model(calibration_tokens(256, windows=2)).logits
    assert torch.isfinite(logits).all()


def test_a_removed_block_passes_its_input_on_and_a_cut_keeps_the_most_important_channels() -> None:
    teacher = four_block_model()
    tokens = calibration_tokens(256)
    importance = measure_importance(teacher, tokens)
    model = build_structured(
        teacher, CompressionPlan(structure={"model.layers.1": BlockStructure(removed=True)}), importance
    )
    hidden = torch.randn(2, 8, 64)
    positions = model.model.rotary_emb(hidden, torch.arange(8)[None])
    assert torch.equal(model.model.layers[1](hidden, position_embeddings=positions), hidden)

    half = build_structured(teacher, CompressionPlan(structure={"model.layers.0": BlockStructure(ffn=0.5)}), importance)
    kept = importance.mlp_channels[0].topk(64).indices.sort().values
    assert torch.equal(half.model.layers[0].mlp.up_proj.weight, teacher.model.layers[0].mlp.up_proj.weight[kept])
    assert torch.equal(half.model.layers[0].mlp.down_proj.weight, teacher.model.layers[0].mlp.down_proj.weight[:, kept])


def test_a_cut_attention_computes_what_the_teacher_computes_without_the_dropped_heads() -> None:
    teacher = four_block_model()
    importance = measure_importance(teacher, calibration_tokens(256))
    plan = CompressionPlan(structure={"model.layers.2": BlockStructure(kv_groups=1)})
    cut = build_structured(teacher, plan, importance)
    kept_group = int(importance.heads[2].reshape(2, 2).sum(-1).argmax())
    silenced = copy.deepcopy(teacher)
    dropped = [head for head in range(4) if head // 2 != kept_group]
    with torch.no_grad():
        for head in dropped:  # a dropped head's output reaches the residual stream through o_proj only
            silenced.model.layers[2].self_attn.o_proj.weight[:, head * 16 : (head + 1) * 16] = 0
    tokens = calibration_tokens(256, windows=2, seed=3)
    torch.testing.assert_close(cut(tokens).logits, silenced(tokens).logits)


# --- stitching --------------------------------------------------------------------------------------------------


def test_a_stitched_structural_plan_equals_the_directly_built_model_and_rolls_back_to_the_teacher() -> None:
    teacher = four_block_model()
    tokens = calibration_tokens(256, windows=2, seed=3)
    dense = teacher(tokens).logits
    importance = measure_importance(teacher, calibration_tokens(256))
    plan = CompressionPlan(structure=STRUCTURE)
    built = build_structured(teacher, plan, importance)
    stitcher = StructureStitcher(teacher, importance)
    other = {"model.layers.2": BlockStructure(removed=True), "model.layers.3": BlockStructure(ffn=0.5)}
    stitcher.stitch(CompressionPlan(structure=other))  # another plan first: stitching replaces it whole
    stitcher.stitch(plan)
    assert block_shapes(teacher) == block_shapes(built)
    assert torch.equal(teacher(tokens).logits, built(tokens).logits)
    stitcher.restore()
    assert not is_structured(teacher)
    assert torch.equal(teacher(tokens).logits, dense)


def test_a_structure_the_model_cannot_take_changes_nothing() -> None:
    teacher = four_block_model()
    stitcher = StructureStitcher(teacher, measure_importance(teacher, calibration_tokens(256)))
    stitcher.stitch(CompressionPlan(structure={"model.layers.1": BlockStructure(ffn=0.5)}))
    with pytest.raises(ValueError, match="removes blocks 1 to 2 only"):
        stitcher.stitch(CompressionPlan(structure={"model.layers.3": BlockStructure(removed=True)}))
    assert block_shapes(teacher)[1].intermediate_size == 64


def test_a_plan_file_with_shapes_is_refused_where_they_would_be_ignored(tmp_path: Path, capsys) -> None:
    plan = tmp_path / "plan.json"
    plan.write_text(CompressionPlan(structure=STRUCTURE).to_json(), encoding="utf-8")
    config = write_yaml(tmp_path / "space.yaml", {})  # target artifact, whose runtime runs no shapes
    code, _, err = run_main(["apply", str(config), "--plan", str(plan)], capsys)
    assert "under compression.target gguf only, not artifact" in error_line(code, err)
