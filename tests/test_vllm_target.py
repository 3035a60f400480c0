"""The vLLM target: a mixed per-Linear quantized model written as a compressed-tensors checkpoint and read back by
transformers' own compressed-tensors integration, exactly."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel

from autocompress.methods import QUANTIZERS, LayerStatistics, QuantizedWeight, QuantSpec
from autocompress.models import compressible_linears
from autocompress.plan import CompressionPlan, parse_level
from autocompress.search.space import SearchSpace
from autocompress.size import model_size
from autocompress.targets.vllm import (
    FP16_LEVEL,
    VllmLevel,
    compressed_tensors_bytes,
    fusion_refusals,
    level_for,
    level_of,
    load_compressed_tensors,
    refusal,
    scheme_for,
    write_compressed_tensors,
)

SAFETENSORS_HEADER_PER_TENSOR = 96  # the JSON entry of one tensor: name, dtype, shape, offsets (an estimate)
NVFP4_TOLERANCE = 2.0**-8  # relative: compressed-tensors decompresses NVFP4 through bfloat16

# Per Linear of the tiny Llama: (quantizer, spec); what is not listed stays in fp16 (here float32, the model dtype).
# Fused siblings (q/k/v, gate/up) share a level, as vLLM needs; RTN and GPTQ codes mix within one level.
PLAN: dict[str, tuple[str, QuantSpec]] = {
    "model.layers.0.self_attn.q_proj": ("rtn", QuantSpec(4, 128, True)),
    "model.layers.0.self_attn.k_proj": ("gptq", QuantSpec(4, 128, True)),
    "model.layers.0.self_attn.v_proj": ("rtn", QuantSpec(4, 128, True)),
    "model.layers.0.self_attn.o_proj": ("nvfp4", QuantSpec(4, 16, False)),
    "model.layers.0.mlp.gate_proj": ("rtn", QuantSpec(8, -1, True)),
    "model.layers.0.mlp.up_proj": ("gptq", QuantSpec(8, -1, True)),
    "model.layers.0.mlp.down_proj": ("fp8-e4m3", QuantSpec(8, -1, False)),
    "model.layers.1.self_attn.q_proj": ("rtn", QuantSpec(4, 64, False)),
    "model.layers.1.self_attn.k_proj": ("gptq", QuantSpec(4, 64, False)),
    "model.layers.1.self_attn.v_proj": ("rtn", QuantSpec(4, 64, False)),
    "model.layers.1.self_attn.o_proj": ("fp8-e4m3", QuantSpec(8, -1, False)),
    "model.layers.1.mlp.down_proj": ("gptq", QuantSpec(4, -1, True)),
}


def quantize_model(model: PreTrainedModel, plan: Mapping[str, tuple[str, QuantSpec]]) -> dict[str, QuantizedWeight]:
    """Quantize the planned Linears with the project's quantizers; each then computes with its dequantized weight.
    GPTQ gets the Hessian of random inputs."""
    modules = dict(model.named_modules())
    generator = torch.Generator().manual_seed(1)
    quantized = {}
    for name, (method, spec) in plan.items():
        weight = modules[name].weight.data
        inputs = torch.randn(256, weight.shape[1], generator=generator)
        stats = LayerStatistics(n_tokens=inputs.shape[0], hessian=inputs.T @ inputs)
        quantized[name] = QUANTIZERS[method].function(weight.float(), None, spec, stats)
        modules[name].weight.data = quantized[name].dequantize(model.dtype)
    return quantized


def linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, nn.Linear)}


def stored_tensors(folder: Path) -> dict[str, int]:
    """Bytes of every tensor of the checkpoint's safetensors files, by name."""
    sizes = {}
    for path in folder.glob("*.safetensors"):
        with safe_open(path, "pt") as file:
            for key in file.keys():  # noqa: SIM118 (safe_open is not a mapping)
                tensor = file.get_tensor(key)
                sizes[key] = tensor.numel() * tensor.element_size()
    return sizes


def mean_kl(reference_logits: torch.Tensor, logits: torch.Tensor) -> float:
    reference = F.log_softmax(reference_logits.double(), -1)
    return float(F.kl_div(F.log_softmax(logits.double(), -1), reference, log_target=True, reduction="batchmean"))


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[PreTrainedModel, dict, PreTrainedModel, Path]:
    """The tiny compressed Llama, its quantized weights, the checkpoint folder and the model reloaded from it."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=1000,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = LlamaForCausalLM(config).eval()
    quantized = quantize_model(model, PLAN)
    folder = write_compressed_tensors(model, None, quantized, tmp_path_factory.mktemp("ct"))
    return model, quantized, load_compressed_tensors(folder), folder


def test_reloaded_weights_are_ours_bit_for_bit(written: tuple) -> None:
    model, quantized, reloaded, _ = written
    ours, theirs = linears(model), linears(reloaded)
    for name in ours:
        assert theirs[name].weight.dtype == model.dtype
        if name in quantized and quantized[name].format == "nvfp4":
            # Codes and scales are stored exactly (checked by the writer); only the decompression rounds.
            error = (theirs[name].weight - ours[name].weight).abs()
            assert bool((error <= NVFP4_TOLERANCE * ours[name].weight.abs()).all()), name
        else:
            assert torch.equal(theirs[name].weight, ours[name].weight), name
    assert not any(name.endswith(("_scale", "_zero_point", "_packed", "_shape")) for name in reloaded.state_dict())
    assert not any(hasattr(module, "quantization_scheme") for module in model.modules())  # left as it was


def test_reloaded_logits_match_the_compressed_model(written: tuple) -> None:
    model, _, reloaded, _ = written
    tokens = torch.randint(0, model.config.vocab_size, (4, 64), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        kl = mean_kl(model(tokens).logits.flatten(0, 1), reloaded(tokens).logits.flatten(0, 1))
    assert kl <= 1e-5


def test_bytes_on_disk_are_the_accounted_bytes(written: tuple) -> None:
    model, quantized, _, folder = written
    stored = stored_tensors(folder)
    accounted = 0
    for name, module in linears(model).items():
        if name == "lm_head":
            continue
        level = level_of(quantized[name]) if name in quantized else FP16_LEVEL
        expected = compressed_tensors_bytes(level, *module.weight.shape, module.bias is not None, model.dtype)
        assert sum(size for key, size in stored.items() if key.startswith(f"{name}.")) == expected, name
        accounted += expected
    in_blocks = {f"{name}.{leaf}" for name in linears(model) for leaf in ("weight", "bias")}
    untouched = [p for key, p in model.named_parameters() if key not in in_blocks or key.startswith("lm_head")]
    accounted += sum(parameter.numel() * parameter.element_size() for parameter in untouched)
    accounted += 8 + SAFETENSORS_HEADER_PER_TENSOR * len(stored)  # the header's length, then its JSON
    on_disk = sum(path.stat().st_size for path in folder.glob("*.safetensors"))
    assert abs(on_disk - accounted) <= 0.01 * accounted


def test_config_has_one_group_per_level_and_ignores_the_rest(written: tuple) -> None:
    model, quantized, _, folder = written
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors"
    assert config["format"] == "mixed-precision"
    by_level: dict[str, set[str]] = {}
    for name, stored in quantized.items():
        by_level.setdefault(level_of(stored).name, set()).add(name)
    groups = config["config_groups"]
    assert {name: set(group["targets"]) for name, group in groups.items()} == by_level
    assert set(by_level) == {
        "int4-g128",
        "nvfp4",
        "int8-channel",
        "fp8-e4m3-channel",
        "int4-asym-g64",
        "int4-channel",
    }
    asymmetric = groups["int4-asym-g64"]["weights"]
    assert (asymmetric["symmetric"], asymmetric["strategy"], asymmetric["group_size"]) == (False, "group", 64)
    assert groups["nvfp4"]["format"] == "nvfp4-pack-quantized"
    assert groups["fp8-e4m3-channel"]["format"] == "naive-quantized"
    assert all(group["input_activations"] is None for group in groups.values())  # weight-only: A16
    untouched = {name for name in linears(model) if name not in quantized}
    assert set(config["ignore"]) == untouched | {"model.embed_tokens"}
    assert "lm_head" in config["ignore"]


def test_checkpoint_holds_our_codes_zero_points_and_global_scale(written: tuple) -> None:
    """Our unsigned codes and zero-points are what the packed int32 words hold; the NVFP4 global scale is the
    reciprocal of our tensor scale."""
    _, quantized, _, folder = written
    (path,) = folder.glob("*.safetensors")
    name = "model.layers.1.self_attn.q_proj"
    stored = quantized[name]
    with safe_open(path, "pt") as file:
        words = file.get_tensor(f"{name}.weight_packed")
        zeros = file.get_tensor(f"{name}.weight_zero_point")
        global_scale = file.get_tensor("model.layers.0.self_attn.o_proj.weight_global_scale")
    nibbles = torch.stack([(words >> (4 * i)) & 0xF for i in range(8)], -1).flatten(1)
    assert torch.equal(nibbles, stored.codes.long())
    zero_nibbles = torch.stack([(zeros >> (4 * i)) & 0xF for i in range(8)], 1).flatten(0, 1)
    assert torch.equal(zero_nibbles[: stored.zero.shape[0]], stored.zero.long())
    tensor_scale = quantized["model.layers.0.self_attn.o_proj"].tensor_scale
    assert global_scale.item() == pytest.approx(1 / tensor_scale, rel=2**-23)


def test_levels_map_onto_compressed_tensors_schemes() -> None:
    assert scheme_for(FP16_LEVEL) is None
    int4 = scheme_for(VllmLevel("int", 4, 128, symmetric=True), ["a"])
    assert (int4.weights.strategy, int4.weights.group_size, int4.weights.type) == ("group", 128, "int")
    assert int4.format == "pack-quantized" and int4.targets == ["a"]
    int8 = scheme_for(VllmLevel("int", 8, -1, symmetric=True)).weights
    assert (int8.strategy, int8.group_size, int8.num_bits) == ("channel", None, 8)
    assert not scheme_for(VllmLevel("int", 4, 64, symmetric=False)).weights.symmetric
    fp8 = scheme_for(VllmLevel("fp8-e4m3", 8, -1))
    assert (fp8.weights.type, fp8.weights.strategy, fp8.input_activations) == ("float", "channel", None)
    nvfp4 = scheme_for(VllmLevel("nvfp4", 4, 16)).weights
    assert (nvfp4.strategy, nvfp4.group_size, nvfp4.scale_dtype) == ("tensor_group", 16, torch.float8_e4m3fn)
    assert level_for(parse_level("int4"), 64, False) == VllmLevel("int", 4, 64, symmetric=False)
    assert level_for(parse_level("int8-row"), 128, True) == VllmLevel("int", 8, -1)
    assert level_for(parse_level("fp8-e4m3"), 128, True) == VllmLevel("fp8-e4m3", 8, -1)
    assert level_for(parse_level("nvfp4"), 128, True) == VllmLevel("nvfp4", 4, 16)
    assert level_for(parse_level("fp16"), 128, True) == FP16_LEVEL


@pytest.mark.parametrize(
    ("level", "shape", "refused"),
    [
        (VllmLevel("int", 4, 128), (576, 576), "groups of 128 do not divide"),
        (VllmLevel("int", 4, 64), (576, 576), None),
        (VllmLevel("int", 4, 32), (192, 576), None),
        (VllmLevel("int", 4, 128), (576, 128), None),  # one group per row: per channel
        (VllmLevel("int", 4, 16), (256, 256), "groups of 32, 64 or 128"),
        (VllmLevel("int", 8, -1, symmetric=False), (256, 256), "zero-points for 4-bit"),
        (VllmLevel("int", 4, 64, symmetric=False), (256, 256), None),
        (VllmLevel("int", 3, 64), (256, 256), "4- and 8-bit"),
        (VllmLevel("fp8-e4m3", 8, 128), (256, 256), "one scale per channel"),
        (VllmLevel("fp8-e4m3", 8, 0), (256, 256), "tensor scale would be held in the model's dtype"),
        (VllmLevel("fp8-e4m3", 8, -1), (256, 256), None),
        (VllmLevel("nvfp4", 4, 16), (256, 200), "blocks of 16"),
        (VllmLevel("nf4", 4, 64), (256, 256), "not a level of the vLLM target"),
        (FP16_LEVEL, (3, 5), None),
    ],
)
def test_refusal_follows_vllm_kernels(level: VllmLevel, shape: tuple[int, int], refused: str | None) -> None:
    reason = refusal(level, *shape)
    assert reason is None if refused is None else refused in reason


def test_refusal_without_tile_padding_needs_marlin_tiles() -> None:
    assert "vLLM 0.24" in refusal(VllmLevel("int", 4, 64), 576, 576, tile_padding=False)
    assert refusal(VllmLevel("int", 4, 64), 576, 1536, tile_padding=False) is None
    assert "vLLM 0.24" in refusal(VllmLevel("nvfp4", 4, 16), 192, 576, tile_padding=False)


def test_fused_siblings_must_share_a_level_and_an_nvfp4_tensor_scale() -> None:
    prefix = "model.layers.0.self_attn"
    int4, nvfp4 = VllmLevel("int", 4, 128), VllmLevel("nvfp4", 4, 16)
    same = {f"{prefix}.{leaf}": int4 for leaf in ("q_proj", "k_proj", "v_proj")}
    assert fusion_refusals(same) == []
    mixed = same | {f"{prefix}.k_proj": FP16_LEVEL}
    assert "int4-g128, fp16, int4-g128" in fusion_refusals(mixed)[0]
    fp4 = {f"{prefix}.{leaf}": nvfp4 for leaf in ("q_proj", "k_proj", "v_proj")}
    scales = {name: 1.0 for name in fp4} | {f"{prefix}.v_proj": 2.0}
    assert "one global scale" in fusion_refusals(fp4, scales)[0]


def test_write_refuses_what_vllm_cannot_run_and_writes_nothing(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=2
    )
    model = LlamaForCausalLM(config).eval()
    plan = {
        "model.layers.0.mlp.down_proj": ("rtn", QuantSpec(4, 64, True)),  # 96 inputs: groups of 64 do not divide
        "model.layers.0.mlp.gate_proj": ("rtn", QuantSpec(8, -1, False)),  # and up_proj stays fp16
    }
    quantized = quantize_model(model, plan)
    with pytest.raises(ValueError) as refused:
        write_compressed_tensors(model, None, quantized, tmp_path / "out")
    message = str(refused.value)
    assert "groups of 64 do not divide the 96 inputs" in message
    assert "zero-points for 4-bit" in message
    assert "vLLM fuses them" in message
    assert not (tmp_path / "out").exists()
    int8 = {f"model.layers.0.mlp.{leaf}": ("rtn", QuantSpec(8, -1, True)) for leaf in ("gate_proj", "up_proj")}
    quantized = quantize_model(model, int8)
    model.get_submodule("model.layers.0.mlp.up_proj").weight.data[0, 0] += 1
    with pytest.raises(ValueError, match="up_proj: its weight is not what its codes dequantize to"):
        write_compressed_tensors(model, None, quantized, tmp_path / "out")


@pytest.mark.slow
def test_embedded_model_round_trips(tmp_path: Path) -> None:
    """SmolLM2-135M (hidden 576, not a multiple of 128): int4 in groups of 64 and 32, int8, FP8 and NVFP4.
    NVFP4 goes on a third of the o_proj only: each adds ~3e-7 nats of KL through compressed-tensors' bfloat16."""
    from autocompress.models import load_model

    model, tokenizer = load_model("smollm2-135m", dtype="float32", device="cpu")
    model.eval()
    plan: dict[str, tuple[str, QuantSpec]] = {}
    for index in range(model.config.num_hidden_layers):
        block = f"model.layers.{index}"
        group = 64 if index % 2 else 32
        plan |= {f"{block}.self_attn.{leaf}": ("rtn", QuantSpec(4, group, True)) for leaf in ("q_proj", "k_proj")}
        plan[f"{block}.self_attn.v_proj"] = ("rtn", QuantSpec(4, group, True))
        if index % 3 == 0:
            plan[f"{block}.self_attn.o_proj"] = ("nvfp4", QuantSpec(4, 16, False))
        plan |= {f"{block}.mlp.{leaf}": ("rtn", QuantSpec(8, -1, True)) for leaf in ("gate_proj", "up_proj")}
        if index % 3:
            plan[f"{block}.mlp.down_proj"] = ("fp8-e4m3", QuantSpec(8, -1, False))
    quantized = quantize_model(model, plan)
    q_proj = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert "groups of 128 do not divide the 576" in refusal(VllmLevel("int", 4, 128), *q_proj.weight.shape)
    folder = write_compressed_tensors(model, tokenizer, quantized, tmp_path / "smollm2")
    reloaded = load_compressed_tensors(folder)
    theirs = linears(reloaded)
    for name, module in linears(model).items():
        if name in quantized and quantized[name].format == "nvfp4":
            error = (theirs[name].weight - module.weight).abs()
            assert bool((error <= NVFP4_TOLERANCE * module.weight.abs()).all()), name
        else:
            assert torch.equal(theirs[name].weight, module.weight), name
    tokens = tokenizer("The capital of France is Paris. " * 8, return_tensors="pt").input_ids
    with torch.no_grad():
        kl = mean_kl(model(tokens).logits[0], reloaded(tokens).logits[0])
    assert kl <= 1e-5


# --- compression.target: vllm, from the config to a search, its export and the reload ------------------------------

VLLM_LEVELS = ["int4", "int8-row", "fp8-e4m3", "fp16"]  # int4: the plan's symmetric groups of 32
MIXED = {"model.layers.0.format": "int4", "model.layers.1.format": "int8-row", "model.layers.2.format": "fp8-e4m3"}


def model_folder(folder: Path, **shape: int) -> Path:
    """A seeded tiny Llama (the tests' vocabulary and tokenizer) with `shape` overriding its config, saved."""
    from tests.conftest import tiny_llama_config, tiny_tokenizer

    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config().__class__(**(tiny_llama_config().to_dict() | shape))).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def vllm_config(folder: Path, model_dir: Path, **search: object) -> dict:
    from tests.conftest import tiny_study_config

    return tiny_study_config(
        folder,
        model_dir,
        compression={"symmetric": True, "target": "vllm"},
        search={"sparsity": [0.0], "bits": [16], "formats": VLLM_LEVELS, "n_trials": 5} | search,
    )


@pytest.fixture(scope="module")
def vllm_study(tmp_path_factory: pytest.TempPathFactory):
    """A `target: vllm` search on a 3-block tiny Llama, with a plan of int4 groups, int8 and FP8 enqueued."""
    from autocompress.config import Config
    from autocompress.search import StudyLocation, run_search

    folder = tmp_path_factory.mktemp("vllm-study")
    config = Config.model_validate(vllm_config(folder, model_folder(folder / "model", num_hidden_layers=3)))
    location = StudyLocation.resolve("vllm", folder / "results")
    study = run_search(config, location, n_trials=5, progress=False)
    study.enqueue_trial(MIXED)
    study = run_search(config, location, n_trials=6, progress=False)
    return config, location, folder


def test_a_vllm_search_counts_compressed_tensors_bytes(vllm_study) -> None:
    from autocompress.record import scored_records
    from autocompress.search.study import load_existing
    from autocompress.session import CompressionSession
    from autocompress.targets import target_named

    config, location, _ = vllm_study
    study, record = load_existing(location)
    records = scored_records(study)
    assert len(records) >= 6
    session = CompressionSession(config, cache_dir=location.cache_dir)
    space_plan = SearchSpace(config, record.units).plan_from_params
    vllm = target_named("vllm")
    for trial in records:
        plan = space_plan(trial.params)
        assert trial.size_bytes == model_size(session.model, plan, vllm).total_bytes
        assert trial.size_bytes != model_size(session.model, plan).total_bytes  # not our artifact's bytes


@pytest.mark.parametrize("pick", ["mixed", "best"])
def test_a_vllm_plan_exports_as_compressed_tensors_and_reloads_with_matching_logits_and_size(vllm_study, pick) -> None:
    from autocompress.export import choose_trial, export_trial
    from autocompress.metrics import evaluate
    from autocompress.search.study import load_existing
    from autocompress.session import CompressionSession

    config, location, folder = vllm_study
    study, record = load_existing(location)
    if pick == "mixed":
        number = next(trial.number for trial in study.trials if trial.params == MIXED)
        chosen, how = choose_trial(study, record, trial=number)
    else:
        chosen, how = choose_trial(study, record)
    result = export_trial(record, location, chosen, folder / f"export-{pick}", chosen_by=how)
    assert result.format == "compressed-tensors"  # the target's own
    on_disk = sum(path.stat().st_size for path in result.path.glob("*.safetensors"))
    assert result.weights_bytes == on_disk
    assert result.accounted_bytes == chosen.size_bytes  # what the search scored is what was written
    assert abs(on_disk - result.accounted_bytes) <= 0.01 * result.accounted_bytes
    assert result.fitness_loss == pytest.approx(chosen.loss, rel=1e-5, abs=1e-9)
    quantization = json.loads((result.path / "config.json").read_text())["quantization_config"]
    if pick == "mixed":
        assert set(quantization["config_groups"]) == {"int4-g32", "int8-channel", "fp8-e4m3-channel"}
    config_json = json.loads((result.path / "config.json").read_text())
    assert config_json.get("torch_dtype", config_json.get("dtype")) == "bfloat16"  # what vLLM serves it in
    with safe_open(next(result.path.glob("*.safetensors")), "pt") as file:
        assert file.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16  # stored as served
    session = CompressionSession(config, cache_dir=location.cache_dir)
    reloaded = load_compressed_tensors(result.path, dtype=session.model.dtype)  # the search's float32
    session.stitch(SearchSpace(config, record.units).plan_from_params(chosen.params))
    assert evaluate(reloaded, session.pools.heldout, reference=session.model).kl <= 1e-5


def test_tensors_left_unquantized_count_in_the_serving_dtype_not_the_load_dtype(tmp_path: Path) -> None:
    """The demo model loads in float32 for the search, but vLLM serves it in bfloat16: a dense 16-bit plan counts
    the ~269 MB of the model in 16 bits, not the 538 MB of float32, with either serving dtype."""
    from autocompress.config import Config, ModelConfig
    from autocompress.models import EMBEDDED_MODEL, meta_model
    from autocompress.targets import target_named

    model = meta_model(ModelConfig(name=EMBEDDED_MODEL, dtype="float32"))
    parameters = sum(parameter.numel() for parameter in model.parameters())
    vllm = target_named("vllm")
    dense = model_size(model, CompressionPlan.uniform(bits=16), vllm)
    header = vllm.overhead_bytes(model, CompressionPlan.uniform(bits=16))
    assert dense.total_bytes == 2 * parameters + header
    assert 268e6 < dense.total_bytes < 271e6
    config = vllm_config(tmp_path, tmp_path)
    float16 = Config.model_validate(config | {"compression": config["compression"] | {"serve_dtype": "float16"}})
    assert vllm.for_config(float16).serve_dtype == torch.float16
    assert (
        model_size(model, CompressionPlan.uniform(bits=16), vllm.for_config(float16)).total_bytes == dense.total_bytes
    )
    int4_plan = CompressionPlan.uniform(bits=4, group_size=64, symmetric=True)
    int4 = model_size(model, int4_plan, vllm)
    in_linears = sum(linear.module.weight.numel() for linear in compressible_linears(model))
    untouched = int4.total_bytes - sum(int4.per_layer.values()) - vllm.overhead_bytes(model, int4_plan)
    assert untouched == 2 * (parameters - in_linears)  # the embedding and the norms, in bfloat16
    print(f"dense 16-bit: {dense.total_bytes:,} bytes; uniform int4-g64: {int4.total_bytes:,} bytes")


def test_serve_dtype_belongs_to_the_vllm_target(tmp_path: Path) -> None:
    from pydantic import ValidationError

    from autocompress.config import Config
    from tests.conftest import tiny_study_config

    config = tiny_study_config(tmp_path, tmp_path, compression={"serve_dtype": "float16"})
    with pytest.raises(ValidationError, match="serve_dtype: only target vllm"):
        Config.model_validate(config)


@pytest.mark.parametrize(
    ("search", "refused"),
    [
        ({"sparsity": [0.0, 0.5]}, "vLLM runs no sparse weights"),
        ({"formats": ["int4", "nf4"]}, "nf4-g64: not a level of the vLLM target"),
        ({"formats": ["int4-g16"]}, "groups of 32, 64 or 128"),
        ({"formats": None, "bits": [3, 16]}, "4- and 8-bit"),
    ],
)
def test_vllm_refuses_sparsity_and_levels_it_cannot_run_before_any_model_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture, search: dict, refused: str
) -> None:
    from autocompress.cli import main
    from tests.conftest import write_yaml

    config = vllm_config(tmp_path, tmp_path / "no-such-model", **search)  # never read: the config fails first
    with pytest.raises(SystemExit) as exit_code:
        main(["search", str(write_yaml(tmp_path / "space.yaml", config)), "--results", str(tmp_path / "results")])
    assert exit_code.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("autocompress: error: ") and refused in error and "\n" not in error


def test_vllm_refuses_a_level_the_model_shapes_rule_out_from_its_config_alone(tmp_path: Path, monkeypatch) -> None:
    from autocompress import session
    from autocompress.config import Config
    from autocompress.errors import UserError

    model_dir = model_folder(tmp_path / "model", hidden_size=96)
    config = Config.model_validate(vllm_config(tmp_path, model_dir, formats=["int4-g64", "fp16"]))

    def no_weights(**kwargs):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(session, "load_model", no_weights)
    with pytest.raises(UserError, match="groups of 64 do not divide the 96 inputs of a row"):
        session.CompressionSession(config)
