"""The speed model of the gguf target: a table of llama.cpp's timings per tensor type and shape, measured on
synthetic GGUF files and cached per machine, and the tokens/s it predicts from a plan's or a file's tensors.
Nothing here checks a wall-clock figure: only the arithmetic, what the probes hold, and the plumbing."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import gguf
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from autocompress.plan import BlockStructure, CompressionPlan, LayerCompression
from autocompress.structure import BlockShape, build_structured
from autocompress.targets.gguf import speed
from autocompress.targets.gguf.blocks import GgufBlocks, quantize_rows
from autocompress.targets.gguf.file import gguf_layout, write_gguf_tensors
from autocompress.targets.gguf.llama_cpp import Timing, llama_cpp_available
from autocompress.targets.gguf.speed import Architecture, SpeedTable, file_architecture, plan_tensors
from autocompress.targets.gguf.structured import zero_importance
from autocompress.targets.gguf.weights import GgufWeights
from tests.conftest import require

TINY = Architecture(hidden=64, intermediate=256, heads=4, kv_heads=2, head_dim=16, vocab=128, tied=True, layers=2)


def tiny_llama(tied: bool = True) -> LlamaForCausalLM:
    """A 2-layer Llama whose MLP rows (256) take K-types and whose hidden rows (64) take only 32-block types."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(config).eval()


def table() -> SpeedTable:
    return SpeedTable(
        machine={"threads": 1},
        architecture=TINY,
        prompt_tokens=8,
        decode_tokens=4,
        fixed=Timing(prompt_s=0.5, decode_s=0.25),
        layer=Timing(prompt_s=2.0, decode_s=1.0),
        head=Timing(prompt_s=0.25, decode_s=0.5),
        deltas={
            "q4_0:64x64": Timing(prompt_s=-0.125, decode_s=-0.0625),
            "q4_k:64x256": Timing(prompt_s=0.25, decode_s=-0.125),
            "q8_0:128x64": Timing(prompt_s=-0.0625, decode_s=-0.25),
        },
    )


def test_a_prediction_is_the_reference_model_plus_each_matrixs_difference_from_f16() -> None:
    tensors = [("q4_0", (64, 64)), ("q4_0", (64, 64)), ("q4_k", (64, 256)), ("f16", (32, 64)), ("q8_0", (128, 64))]
    seconds = table().seconds(tensors, [TINY.block] * 3)
    # fixed + 3 layers + the F16 head, then -2·0.0625 (q4_0) - 0.125 (q4_k) + 0 (f16) - 0.25 (q8_0 head)
    assert seconds.decode_s == 0.25 + 3 * 1.0 + 0.5 - 0.125 - 0.125 - 0.25
    assert seconds.prompt_s == 0.5 + 3 * 2.0 + 0.25 - 0.25 + 0.25 - 0.0625
    predicted = table().predict(tensors, [TINY.block] * 3)
    assert predicted.decode_tps == 1 / seconds.decode_s
    assert predicted.prompt_tps == 8 / seconds.prompt_s  # a prompt batch of prompt_tokens


def structured_table() -> SpeedTable:
    """`table()` with alternatives: an FFN of 128 channels, attention of one key/value group, no attention."""
    sub_blocks = {
        "ffn:128": Timing(prompt_s=-0.75, decode_s=-0.375),
        "attention:1": Timing(prompt_s=-0.5, decode_s=-0.125),
        "attention:0": Timing(prompt_s=-1.0, decode_s=-0.25),
    }
    deltas = {"q8_0:64x32": Timing(prompt_s=-0.03125, decode_s=-0.015625)}
    base = table()
    return replace(base, deltas=base.deltas | deltas, sub_blocks=sub_blocks)


def test_a_structured_plans_time_sums_its_blocks_alternatives_and_its_matrices_at_their_shapes() -> None:
    """A block costs the teacher's F16 layer plus each alternative's difference from it (a narrower FFN, fewer
    heads, no attention); a removed block costs nothing; the matrices' types are timed at their own shapes."""
    narrow = BlockShape(128, 2, 1)  # half the FFN, one key/value group of two query heads
    headless = BlockShape(256, 0, 0)
    blocks = [TINY.block, narrow, BlockShape(0, 0, 0), headless]
    tensors = [("q8_0", (64, 32)), ("q4_0", (64, 64))]
    seconds = structured_table().seconds(tensors, blocks)
    # fixed + head + layer + (layer - 0.375 - 0.125) + 0 + (layer - 0.25), then -0.015625 (q8_0) - 0.0625 (q4_0)
    assert seconds.decode_s == 0.25 + 0.5 + 1.0 + (1.0 - 0.375 - 0.125) + 0 + (1.0 - 0.25) - 0.015625 - 0.0625
    assert seconds.prompt_s == 0.5 + 0.25 + 2.0 + (2.0 - 0.75 - 0.5) + 0 + (2.0 - 1.0) - 0.03125 - 0.125
    teacher_shaped = structured_table().seconds(tensors, [TINY.block] * 4)
    assert seconds.decode_s < teacher_shaped.decode_s and seconds.prompt_s < teacher_shaped.prompt_s
    with pytest.raises(ValueError, match=r"no timing of a block with an FFN of 64 channels"):
        structured_table().seconds([], [BlockShape(64, 4, 2)])
    with pytest.raises(ValueError, match=r"3 query heads in 1 key/value groups: .* the teacher's 2 query heads"):
        structured_table().seconds([], [BlockShape(256, 3, 1)])


def test_an_alternatives_matrices_are_probed_by_shape_in_the_types_they_store() -> None:
    assert TINY.alternative_groups(("ffn", 128)) == {(128, 64): ["gate_proj", "up_proj"], (64, 128): ["down_proj"]}
    assert TINY.alternative_groups(("attention", 1)) == {
        (32, 64): ["q_proj"],
        (16, 64): ["k_proj", "v_proj"],
        (64, 32): ["o_proj"],
    }
    assert TINY.alternative_groups(("attention", 0)) == {}
    # 128-wide rows do not take q4_k: llama.cpp stores its fallback, q5_0, which is what is timed there
    probed = speed.alternative_probe_types(TINY, ["f16", "q4_k", "q8_0"], ("ffn", 128))
    assert probed == {(128, 64): ["q5_0", "q8_0"], (64, 128): ["q5_0", "q8_0"]}
    deltas, sub_blocks = speed.table_entries(TINY, ["q8_0"], [("ffn", 128), ("attention", 0)])
    assert sub_blocks == {"ffn:128", "attention:0"}
    assert {"q8_0:128x64", "q8_0:64x128", "q8_0:64x64", "q8_0:64x256"} <= deltas
    structure = TINY.probe_structure(("attention", 0), 3)
    assert structure == {f"model.layers.{index}": BlockStructure(kv_groups=0) for index in (1, 2)}  # 0 keeps it


def test_a_type_the_table_has_not_timed_at_a_shape_is_refused_in_one_line() -> None:
    with pytest.raises(ValueError, match=r"no timing of q4_k at \[64, 64\]"):
        table().seconds([("q4_k", (64, 64))], [TINY.block])


def test_a_table_round_trips_through_json() -> None:
    assert SpeedTable.from_json(table().to_json()) == table()
    assert SpeedTable.from_json(structured_table().to_json()) == structured_table()
    older = table().to_json()
    del older["sub_blocks"]  # a table measured before alternatives were: its entries are measured alike
    assert SpeedTable.from_json(older) == table()


def test_the_layer_matrices_are_probed_in_groups_of_one_shape() -> None:
    assert TINY.shape_groups() == {
        (64, 64): ["q_proj", "o_proj"],
        (32, 64): ["k_proj", "v_proj"],
        (256, 64): ["gate_proj", "up_proj"],
        (64, 256): ["down_proj"],
    }
    probed = speed.probe_types(TINY, ["f16", "q4_k", "q8_0"])
    assert probed[(64, 256)] == ["q4_k", "q8_0"]  # 256-wide rows take K-types; f16 is the reference
    assert probed[(64, 64)] == probed[TINY.head_shape] == ["q8_0"]


def test_probes_have_the_models_own_layer_count_unless_its_f16_layers_are_too_large() -> None:
    smollm2 = Architecture(576, 1536, 9, 3, 64, 49152, tied=True, layers=30)
    assert smollm2.probe_layers() == (7, 30)
    seven_b = Architecture(4096, 11008, 32, 32, 128, 32000, tied=False, layers=32)  # 405 MB per F16 layer
    assert seven_b.probe_layers() == (1, 5)
    assert TINY.probe_layers() == (1, 2)


def test_a_plans_matrices_are_its_units_types_and_shapes() -> None:
    model = tiny_llama(tied=True)
    weights = GgufWeights(model, "linear", lambda: {}, None, gguf_layout(model))
    down = "model.layers.1.mlp.down_proj"
    plan = CompressionPlan(
        default=LayerCompression(format="q8_0"),
        layers={down: LayerCompression(format="q4_k"), "model.embed_tokens": LayerCompression(format="q4_0")},
        granularity="linear",
    )
    tensors, blocks = plan_tensors(weights, plan, model.config)
    assert blocks == [TINY.block] * 2 and len(tensors) == 2 * 7 + 1  # the tied embedding is the output matrix
    assert ("q4_k", (64, 256)) in tensors and ("q4_0", (128, 64)) in tensors
    assert sum(type_name == "q8_0" for type_name, _ in tensors) == 2 * 7 - 1


def test_an_untied_embedding_is_a_lookup_and_not_timed() -> None:
    model = tiny_llama(tied=False)
    weights = GgufWeights(model, "linear", lambda: {}, None, gguf_layout(model))
    tensors, _ = plan_tensors(weights, CompressionPlan.uniform(format="q8_0", granularity="linear"), model.config)
    assert len(tensors) == 2 * 7 + 1 and ("q8_0", (128, 64)) in tensors  # the output matrix, once


@pytest.mark.parametrize("tied", [True, False])
def test_a_files_architecture_and_matrices_are_read_from_its_gguf(tmp_path: Path, tied: bool) -> None:
    model = tiny_llama(tied)
    down = model.model.layers[0].mlp.down_proj.weight
    blocks = {"model.layers.0.mlp.down_proj.weight": GgufBlocks("q4_k", quantize_rows(down, "q4_k"))}
    path = write_gguf_tensors(model, None, blocks, tmp_path / "tiny.gguf").path
    architecture, tensors, blocks = file_architecture(path)
    assert architecture == Architecture.of_config(model.config) == replace(TINY, tied=tied)
    assert blocks == [TINY.block] * 2 and len(tensors) == 2 * 7 + 1
    assert ("q4_k", (64, 256)) in tensors and tensors.count(("f16", (128, 64))) == 1


def test_a_table_is_cached_per_thread_count_and_architecture(monkeypatch, tmp_path: Path) -> None:
    require(llama_cpp_available())
    monkeypatch.setenv("AUTOCOMPRESS_CACHE", str(tmp_path))
    one = speed.table_path(TINY, 1, 8, 4)
    assert one.parent == tmp_path / "speed"
    assert one == speed.table_path(TINY, 1, 8, 4)
    assert one != speed.table_path(TINY, 2, 8, 4)
    assert one != speed.table_path(replace(TINY, vocab=256), 1, 8, 4)
    assert one != speed.table_path(TINY, 1, 16, 4)
    key = speed.machine(1)
    assert key["threads"] == 1 and key["system_info"] and len(key["libraries_sha256"]) == 16


def test_a_probe_holds_its_type_in_every_layer_and_f16_elsewhere(tmp_path: Path) -> None:
    writer = speed._ProbeWriter(TINY, tmp_path)
    path = writer.write("probe", 3, speed.PROBE_VOCAB, speed._layer_types(3, ["gate_proj", "up_proj"], "q4_0"))
    types = {tensor.name: tensor.tensor_type.name for tensor in gguf.GGUFReader(path).tensors}
    assert [types[f"blk.{layer}.ffn_up.weight"] for layer in range(3)] == ["Q4_0"] * 3
    assert types["blk.2.ffn_gate.weight"] == "Q4_0" and types["blk.2.ffn_down.weight"] == "F16"
    assert types["token_embd.weight"] == "F16" and types["blk.0.attn_norm.weight"] == "F32"
    architecture, _, blocks = file_architecture(path)
    assert len(blocks) == 3 and architecture == replace(TINY, vocab=speed.PROBE_VOCAB, layers=3)


def test_measuring_times_every_fitting_type_at_every_shape_and_caches_what_it_measured(
    monkeypatch, tmp_path: Path
) -> None:
    require(llama_cpp_available())
    monkeypatch.setenv("AUTOCOMPRESS_CACHE", str(tmp_path))
    measured = []

    def measure(architecture, types, *args, known=None, **kwargs):
        measured.append((sorted(types), known is not None))
        return real_measure(architecture, types, *args, known=known, **kwargs)

    real_measure = speed.measure_table
    monkeypatch.setattr(speed, "measure_table", measure)
    options = {"threads": 1, "prompt_tokens": 4, "decode_tokens": 2, "repeats": 1}
    first = speed.speed_table(TINY, ["q8_0"], **options)
    shapes = [*TINY.shape_groups(), TINY.head_shape]
    assert set(first.deltas) == {f"q8_0:{out}x{inp}" for out, inp in shapes}
    values = [first.fixed, first.layer, first.head, *first.deltas.values()]
    assert all(math.isfinite(value.prompt_s) and math.isfinite(value.decode_s) for value in values)
    assert first.machine["threads"] == 1
    # a type the cache lacks is measured alone and added; the reference parts are kept
    both = speed.speed_table(TINY, ["q4_k", "q8_0"], **options)
    assert set(both.deltas) == set(first.deltas) | {"q4_k:64x256"} and both.layer == first.layer
    assert {key: both.deltas[key] for key in first.deltas} == first.deltas
    assert speed.speed_table(TINY, ["q8_0", "q4_k"], **options) == both
    assert measured == [(["q8_0"], False), (["q4_k", "q8_0"], True)]
    speed.table_path(TINY, 1, 4, 2).write_text("{not json")
    speed.speed_table(TINY, ["q8_0"], **options)  # an unreadable cache is measured again
    assert measured[-1] == (["q8_0"], False)


def test_a_file_is_timed_by_llama_cpp_and_predicted_from_its_tensors(tmp_path: Path) -> None:
    require(llama_cpp_available())
    model = tiny_llama()
    down = model.model.layers[1].mlp.down_proj.weight
    blocks = {"model.layers.1.mlp.down_proj.weight": GgufBlocks("q4_k", quantize_rows(down, "q4_k"))}
    tokenizer = speed._none_tokenizer(tmp_path)
    path = write_gguf_tensors(model, None, blocks, tmp_path / "tiny.gguf", tokenizer_source=tokenizer).path
    with speed.timing_model(path, 1, 4, 3) as runtime:
        timings = speed.measure_timing(runtime, 4, 3, repeats=2)
    assert len(timings) == 2 and all(timing.prompt_s > 0 and timing.decode_s > 0 for timing in timings)
    architecture, tensors, blocks = file_architecture(path)
    measured_table = speed.measure_table(architecture, ["q4_k"], threads=1, prompt_tokens=4, decode_tokens=3, repeats=1)
    predicted = measured_table.predict(tensors, blocks)
    assert predicted.decode_tps != 0 and predicted.prompt_tps != 0


def test_an_alternatives_probe_is_a_deci_file_of_its_shapes(tmp_path: Path) -> None:
    writer = speed._ProbeWriter(TINY, tmp_path)
    structure = TINY.probe_structure(("attention", 1), 3)
    path = writer.write("probe", 3, speed.PROBE_VOCAB, speed._layer_types(3, ["k_proj", "v_proj"], "q8_0"), structure)
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.architecture"].contents() == "deci"
    assert reader.fields["deci.attention.head_count"].contents() == [2, 2, 2]
    assert reader.fields["deci.attention.head_count_kv"].contents() == [1, 1, 1]
    types = {tensor.name: tensor.tensor_type.name for tensor in reader.tensors}
    assert types["blk.2.attn_k.weight"] == "Q8_0" and types["blk.2.attn_q.weight"] == "F16"
    architecture, _, blocks = file_architecture(path)
    assert blocks == [BlockShape(256, 2, 1)] * 3
    assert architecture == replace(TINY, heads=2, kv_heads=1, vocab=speed.PROBE_VOCAB, layers=3)  # no plan: widest


def deci_file(folder: Path) -> tuple[Path, CompressionPlan]:
    """A four-block deci file of a tiny Llama, every block with half the FFN: block 1 also with one key/value group,
    block 2 removed, block 3 without attention; block 1's FFN in q8_0, the rest F16; its plan recorded as an export
    records it."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(replace_config(tiny_llama().config, num_hidden_layers=4)).eval()
    structure = {
        "model.layers.0": BlockStructure(ffn=0.5),
        "model.layers.1": BlockStructure(ffn=0.5, kv_groups=1),
        "model.layers.2": BlockStructure(removed=True),
        "model.layers.3": BlockStructure(ffn=0.5, kv_groups=0),
    }
    plan = CompressionPlan(structure=structure)
    structured = build_structured(model, plan, zero_importance(model.config))
    blocks = {}
    for role in ("gate_proj", "up_proj", "down_proj"):
        key = f"model.layers.1.mlp.{role}.weight"
        blocks[key] = GgufBlocks("q8_0", quantize_rows(structured.state_dict()[key], "q8_0"))
    tokenizer = speed._none_tokenizer(folder)
    path = write_gguf_tensors(structured, None, blocks, folder / "deci.gguf", tokenizer_source=tokenizer, plan=plan)
    return path.path, plan


def replace_config(config: LlamaConfig, **changes: object) -> LlamaConfig:
    return LlamaConfig(**(config.to_dict() | changes))


def test_a_deci_file_is_predicted_from_the_teachers_table_and_its_blocks_alternatives(
    tmp_path: Path, monkeypatch
) -> None:
    """The file's teacher is read off its plan; the table is measured on llama.cpp's own deci probes for the
    alternatives the file's blocks have; the prediction is exactly the sum of the table's entries for its blocks
    and matrices (how close it comes to the measured speed is the benchmark's question, not a test's)."""
    require(llama_cpp_available())
    monkeypatch.setenv("AUTOCOMPRESS_CACHE", str(tmp_path / "cache"))
    path, _plan = deci_file(tmp_path)
    architecture, tensors, blocks = file_architecture(path)
    assert architecture == replace(TINY, tied=True, layers=4)  # the teacher's, though no block keeps its FFN
    assert blocks == [BlockShape(128, 4, 2), BlockShape(128, 2, 1), BlockShape(0, 0, 0), BlockShape(128, 0, 0)]
    assert ("q8_0", (128, 64)) in tensors and ("q8_0", (64, 128)) in tensors and ("f16", (32, 64)) in tensors
    assert len(tensors) == 7 + 7 + 3 + 1  # blocks 0 and 1, block 3's FFN, the tied output

    result = speed.file_speed(path, threads=1, repeats=1, prompt_tokens=4, decode_tokens=2)
    (table_path,) = (tmp_path / "cache" / "speed").glob("*.json")
    table = SpeedTable.from_json(json.loads(table_path.read_text()))
    assert set(table.sub_blocks) == {"ffn:128", "attention:1", "attention:0"}
    assert {"q8_0:128x64", "q8_0:64x128"} <= set(table.deltas)  # q8_0 at the narrow FFN's shapes
    assert all(math.isfinite(value.decode_s) for value in table.sub_blocks.values())
    narrow = table.layer.decode_s + table.sub_blocks["ffn:128"].decode_s
    by_block = [
        narrow,
        narrow + table.sub_blocks["attention:1"].decode_s,
        0.0,
        narrow + table.sub_blocks["attention:0"].decode_s,
    ]
    matrices = [table.delta(type_name, shape).decode_s for type_name, shape in tensors]
    seconds = table.fixed.decode_s + table.head.decode_s + sum(by_block) + sum(matrices)
    assert result["predicted_decode_tps"] == pytest.approx(1 / seconds, rel=1e-12)
    assert result["measured_decode_tps"] > 0 and "speed_note" not in result


def test_evaluate_measures_prompt_and_decode_speed_beside_the_prediction(
    tmp_path: Path, monkeypatch, capsys, tiny_model_dir: Path, write_corpus
) -> None:
    require(llama_cpp_available())
    from autocompress.cli import main
    from autocompress.evaluate import evaluation_lines

    monkeypatch.setenv("AUTOCOMPRESS_CACHE", str(tmp_path / "cache"))  # the speed table is measured there
    model = LlamaForCausalLM.from_pretrained(tiny_model_dir)
    up = model.model.layers[0].mlp.up_proj.weight
    blocks = {"model.layers.0.mlp.up_proj.weight": GgufBlocks("q8_0", quantize_rows(up, "q8_0"))}
    data = {"source": "files", "files": [str(write_corpus(4000))], "seq_len": 32, "calibration": 1, "fitness": 1}
    provenance = {"base_model": {"name": str(tiny_model_dir), "device": "cpu"}, "data": data | {"heldout": 2}}
    tokenizer = speed._none_tokenizer(tmp_path)  # llama.cpp takes the ids the base model's tokenizer gives
    path = write_gguf_tensors(model, None, blocks, tmp_path / "model.gguf", provenance, tokenizer_source=tokenizer).path

    main(["evaluate", str(path), "--no-dense", "--threads", "1", "--new-tokens", "4", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["threads"] == 1 and result["speed_runs"] == speed.REPEATS
    assert result["measured_decode_tps"] > 0 and result["measured_prompt_tps"] > 0
    assert math.isfinite(result["predicted_decode_tps"]) and math.isfinite(result["predicted_prompt_tps"])
    assert result["decode_tps_error"] == result["predicted_decode_tps"] / result["measured_decode_tps"] - 1
    assert result["prompt_tps_error"] == result["predicted_prompt_tps"] / result["measured_prompt_tps"] - 1
    assert len(list((tmp_path / "cache" / "speed").glob("*.json"))) == 1
    printed = "\n".join(evaluation_lines(result))
    assert "decode (tokens/s)" in printed and "median of 5 runs on 1 thread(s)" in printed
