"""The compressed artifact: bit packing, export, size on disk, load, integrity checks."""

from __future__ import annotations

import copy
import json
import shutil
import string

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from autocompress.calibration import collect_statistics
from autocompress.codecs.packing import pack, pack_mask, packed_length, unpack, unpack_mask
from autocompress.compress import apply_plan, statistics_needed
from autocompress.errors import UserError
from autocompress.methods import PRUNERS, QUANTIZERS
from autocompress.methods.formats import FORMATS, format_storage
from autocompress.models import compressible_linears
from autocompress.plan import CompressionPlan, LayerCompression
from autocompress.size import model_size
from autocompress.targets import artifact as artifact_format
from autocompress.targets.artifact import export_compressed, load, read_manifest, sha256_file, write_hf_folder

PRUNED_4BIT = [
    "model.layers.0.self_attn.q_proj",
    "model.layers.0.mlp.gate_proj",
    "model.layers.1.self_attn.k_proj",
    "model.layers.1.mlp.down_proj",
]
QUANTIZED_3BIT = ["model.layers.0.self_attn.v_proj", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.up_proj"]
PRUNED_ONLY = ["model.layers.1.self_attn.o_proj"]
PROVENANCE = {"base_model": "tiny-random-llama", "study": "unit-test", "trial": 7, "metrics": {"kl": 0.125}}


# --- packing -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("count", [0, 1, 7, 8, 9, 13, 1001])
def test_pack_round_trips_at_exact_length(bits: int, count: int) -> None:
    generator = torch.Generator().manual_seed(bits * 1000 + count)
    codes = torch.randint(0, 2**bits, (count,), generator=generator, dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert len(packed) == packed_length(count, bits) == -(-count * bits // 8)
    assert torch.equal(unpack(packed, count, bits), codes)


def test_pack_is_little_endian_and_checks_its_input() -> None:
    assert pack(torch.tensor([1, 2, 3]), 3).tolist() == [1 | 2 << 3 | (3 & 3) << 6, 3 >> 2]
    assert pack(torch.tensor([1, 15, 7]), 4).tolist() == [0xF1, 0x07]
    with pytest.raises(ValueError, match="lie in"):
        pack(torch.tensor([4]), 2)
    with pytest.raises(ValueError, match="take 2 bytes"):
        unpack(torch.zeros(3, dtype=torch.uint8), 5, 3)


def test_mask_packs_to_one_bit_per_position() -> None:
    mask = torch.rand(13, 7, generator=torch.Generator().manual_seed(0)) > 0.5
    packed = pack_mask(mask)
    assert len(packed) == packed_length(13 * 7, 1)
    assert torch.equal(unpack_mask(packed, mask.shape), mask)


# --- a tiny model, compressed with a mixed plan and exported ----------------------------------------------


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for char in string.printable:
        vocab.setdefault(char, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )


def tiny_model(hidden_size: int = 128, intermediate_size: int = 256) -> LlamaForCausalLM:
    """At the default sizes the safetensors header (about 4 kB here) stays well under 2% of the file."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


def mixed_plan(**options: object) -> CompressionPlan:
    layers = {name: LayerCompression(sparsity=0.5, bits=4) for name in PRUNED_4BIT}
    layers |= {name: LayerCompression(bits=3) for name in QUANTIZED_3BIT}
    layers |= {name: LayerCompression(sparsity=0.5) for name in PRUNED_ONLY}
    return CompressionPlan(layers=layers, granularity="linear", **{"group_size": 32, **options})


def compress(model: LlamaForCausalLM, plan: CompressionPlan) -> dict:
    tokens = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    statistics = collect_statistics(model, compressible_linears(model), tokens, statistics_needed(plan))
    return apply_plan(model, plan, statistics, keep=True)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    model, tokenizer, plan = tiny_model(), tiny_tokenizer(), mixed_plan()
    compressed = compress(model, plan)
    path = export_compressed(model, tokenizer, plan, compressed, tmp_path_factory.mktemp("export") / "tiny", PROVENANCE)
    loaded, loaded_tokenizer = load(path)
    return {"model": model, "plan": plan, "path": path, "loaded": loaded, "tokenizer": loaded_tokenizer}


def half_stored(model: LlamaForCausalLM) -> LlamaForCausalLM:
    """The compressed model with every tensor the artifact keeps in 16 bits rounded to float16."""
    reference = copy.deepcopy(model)
    quantized = {f"{name}.weight" for name in PRUNED_4BIT + QUANTIZED_3BIT}
    with torch.no_grad():
        for name, tensor in reference.state_dict().items():
            if name not in quantized:
                tensor.copy_(tensor.half().float())
    return reference


def test_layout_stores_codes_masks_and_scales_not_dense_weights(artifact) -> None:
    tensors = load_file(artifact["path"] / "model.safetensors")
    for name in PRUNED_4BIT:
        assert {f"{name}.{part}" for part in ("codes", "mask", "scale", "zero")} <= tensors.keys()
        shape = artifact["model"].get_submodule(name).weight.shape
        kept = unpack_mask(tensors[f"{name}.mask"], shape).sum().item()
        assert kept == shape.numel() // 2
        assert len(tensors[f"{name}.codes"]) == packed_length(kept, 4)  # kept positions only
    for name in QUANTIZED_3BIT:
        assert f"{name}.codes" in tensors and f"{name}.mask" not in tensors
    for name in PRUNED_ONLY:
        assert tensors[f"{name}.values"].dtype == torch.float16 and f"{name}.codes" not in tensors
    for name in PRUNED_4BIT + QUANTIZED_3BIT + PRUNED_ONLY:
        assert f"{name}.weight" not in tensors
    assert tensors["model.layers.0.self_attn.k_proj.weight"].dtype == torch.float16  # untouched
    assert "model.embed_tokens.weight" in tensors and "lm_head.weight" not in tensors  # tied, stored once
    assert {"config.json", "manifest.json", "tokenizer.json"} <= {p.name for p in artifact["path"].iterdir()}


def test_size_on_disk_matches_the_accounting(artifact) -> None:
    accounted = model_size(artifact["model"], artifact["plan"]).total_bytes
    on_disk = (artifact["path"] / "model.safetensors").stat().st_size
    assert on_disk >= accounted
    assert abs(on_disk - accounted) / accounted < 0.02


def test_manifest_holds_plan_layers_and_provenance(artifact) -> None:
    manifest = read_manifest(artifact["path"])
    assert CompressionPlan.model_validate(manifest["plan"]) == artifact["plan"]
    assert manifest["provenance"] == PROVENANCE
    assert manifest["format_version"] == artifact_format.FORMAT_VERSION
    assert {"torch", "transformers", "autocompress"} <= manifest["versions"].keys()
    assert manifest["files"]["model.safetensors"]["sha256"] == sha256_file(artifact["path"] / "model.safetensors")
    assert manifest["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    assert manifest["config"]["hidden_size"] == 128
    entry = manifest["layers"][PRUNED_4BIT[0]]
    assert entry == {
        "shape": [128, 128],
        "pruned": True,
        "kept": 128 * 64,
        "bits": 4,
        "group_size": 32,
        "symmetric": False,
        "groups": 4,
        "levels": False,
    }
    assert manifest["layers"][QUANTIZED_3BIT[0]]["pruned"] is False


def test_loaded_weights_equal_the_compressed_weights(artifact) -> None:
    model, loaded = artifact["model"], artifact["loaded"]
    for name in PRUNED_4BIT + QUANTIZED_3BIT:  # exactly what the compressed model computes with
        assert torch.equal(loaded.get_submodule(name).weight, model.get_submodule(name).weight), name
    for name in PRUNED_ONLY:  # kept values stored in 16 bits
        original = model.get_submodule(name).weight
        assert torch.equal(loaded.get_submodule(name).weight, original.half().float())
        assert (loaded.get_submodule(name).weight == 0).sum() >= original.numel() // 2
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert loaded.dtype == torch.float32


def test_loaded_model_reproduces_the_logits(artifact) -> None:
    tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = artifact["loaded"](tokens).logits
        expected = half_stored(artifact["model"])(tokens).logits
        compressed = artifact["model"](tokens).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, compressed, rtol=0, atol=2e-3)  # only 16-bit storage of the rest differs


def test_loaded_model_generates(artifact) -> None:
    tokenizer = artifact["tokenizer"]
    inputs = tokenizer("hello", return_tensors="pt")
    output = artifact["loaded"].generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=2)
    assert output.shape == (1, inputs["input_ids"].shape[1] + 4)
    assert isinstance(tokenizer.decode(output[0]), str)


# --- integrity -----------------------------------------------------------------------------------------------


@pytest.fixture
def artifact_copy(artifact, tmp_path):
    return shutil.copytree(artifact["path"], tmp_path / "copy")


def test_truncated_file_is_refused(artifact_copy) -> None:
    weights = artifact_copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(UserError, match=r"model\.safetensors.*checksum"):
        load(artifact_copy)


def test_flipped_byte_is_refused(artifact_copy) -> None:
    weights = artifact_copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"model\.safetensors.*checksum"):
        load(artifact_copy)


def test_missing_manifest_and_unknown_version_are_refused(artifact_copy) -> None:
    manifest_file = artifact_copy / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    manifest_file.write_text(json.dumps(manifest | {"format_version": 99}))
    with pytest.raises(UserError, match="unknown format version 99"):
        load(artifact_copy)
    manifest_file.unlink()
    with pytest.raises(UserError, match=r"manifest\.json is missing"):
        load(artifact_copy)


def test_missing_tensor_is_named(artifact_copy) -> None:
    weights = artifact_copy / "model.safetensors"
    tensors = load_file(weights)
    del tensors[f"{QUANTIZED_3BIT[0]}.scale"]
    save_file(tensors, weights)
    manifest_file = artifact_copy / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    manifest["files"]["model.safetensors"]["sha256"] = sha256_file(weights)
    manifest_file.write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=rf"missing tensor '{QUANTIZED_3BIT[0]}\.scale'"):
        load(artifact_copy)


# --- writing -------------------------------------------------------------------------------------------------


def test_refuses_to_overwrite_unless_asked(tmp_path) -> None:
    model, plan = tiny_model(), CompressionPlan.uniform(bits=8, group_size=-1, symmetric=True)
    compressed = compress(model, plan)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        export_compressed(model, None, plan, compressed, out, {})
    with pytest.raises(UserError, match="not an earlier export"):  # --overwrite replaces only our own exports
        export_compressed(model, None, plan, compressed, out, {}, overwrite=True)
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    export_compressed(model, None, plan, compressed, out, {})
    export_compressed(model, None, plan, compressed, out, {}, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging folders left behind
    loaded, tokenizer = load(out)
    assert tokenizer is None
    for linear in compressible_linears(model):  # symmetric, per-row grids: no zero-points stored
        assert torch.equal(loaded.get_submodule(linear.name).weight, linear.module.weight)
    assert "model.layers.0.mlp.up_proj.zero" not in load_file(out / "model.safetensors")


def test_a_crash_leaves_no_artifact(tmp_path, monkeypatch) -> None:
    model, plan = tiny_model(), CompressionPlan.uniform(sparsity=0.5, pruning="magnitude", pattern="2:4")
    compressed = compress(model, plan)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(artifact_format, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        export_compressed(model, None, plan, compressed, tmp_path / "out", {})
    assert list(tmp_path.iterdir()) == []


def test_bfloat16_model_round_trips_exactly(tmp_path) -> None:
    model = tiny_model().to(torch.bfloat16)
    plan = CompressionPlan(
        default=LayerCompression(sparsity=0.5),
        layers={QUANTIZED_3BIT[0]: LayerCompression(sparsity=0.5, bits=4)},
        granularity="linear",
        pruning="magnitude",
        pattern="2:4",
    )
    compressed = compress(model, plan)
    loaded, _ = load(export_compressed(model, None, plan, compressed, tmp_path / "out", {}))
    assert loaded.dtype == torch.bfloat16
    expected = model.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    stored = load_file(tmp_path / "out" / "model.safetensors")
    assert stored["model.norm.weight"].dtype == stored[f"{PRUNED_ONLY[0]}.values"].dtype == torch.bfloat16


METHOD_PAIRS = [(pruning, "rtn") for pruning in sorted(PRUNERS)]
METHOD_PAIRS += [("magnitude", quantization) for quantization in sorted(QUANTIZERS) if quantization != "rtn"]


@pytest.mark.parametrize(("pruning", "quantization"), METHOD_PAIRS)
def test_every_registered_method_exports_what_it_computes(pruning: str, quantization: str, tmp_path) -> None:
    model = tiny_model(hidden_size=64, intermediate_size=128)
    bits = FORMATS[quantization].bits if quantization in FORMATS else 4  # a number format has its own bits
    plan = CompressionPlan.uniform(
        sparsity=0.5, bits=bits, pruning=pruning, quantization=quantization, group_size=32, granularity="linear"
    )
    compressed = compress(model, plan)
    loaded, _ = load(export_compressed(model, None, plan, compressed, tmp_path / "out", {}))
    for linear in compressible_linears(model):
        assert torch.equal(loaded.get_submodule(linear.name).weight, linear.module.weight), linear.name


@pytest.mark.parametrize("quantization", sorted(FORMATS))
def test_number_formats_store_codes_and_scales_as_their_accounting_says(quantization: str, tmp_path) -> None:
    model = tiny_model(hidden_size=64, intermediate_size=128)
    plan = CompressionPlan.uniform(
        bits=FORMATS[quantization].bits, quantization=quantization, group_size=32, granularity="linear"
    )
    path = export_compressed(model, None, plan, compress(model, plan), tmp_path / "out", {})
    tensors = load_file(path / "model.safetensors")
    manifest = read_manifest(path)
    for linear in compressible_linears(model):
        name = linear.name
        assert manifest["layers"][name]["format"] == quantization
        assert f"{name}.zero" not in tensors and f"{name}.levels" not in tensors  # zero is 0; levels are named
        stored = sum(tensor.nbytes for key, tensor in tensors.items() if key.startswith(f"{name}."))
        assert stored == format_storage(quantization, *linear.module.weight.shape, group_size=32).total, name
    loaded, _ = load(path)
    for linear in compressible_linears(model):
        assert torch.equal(loaded.get_submodule(linear.name).weight, linear.module.weight), linear.name


def test_missing_stored_form_is_refused(tmp_path) -> None:
    model, plan = tiny_model(), mixed_plan()
    compressed = compress(model, plan)
    del compressed[PRUNED_4BIT[0]]
    with pytest.raises(UserError, match=PRUNED_4BIT[0]):
        export_compressed(model, None, plan, compressed, tmp_path / "out", {})


def test_write_hf_folder_is_a_plain_dense_folder(artifact, tmp_path) -> None:
    path = write_hf_folder(artifact["loaded"], artifact["tokenizer"], tmp_path / "hf", torch.float16)
    assert (path / "model.safetensors").is_file() and not list(path.glob("*.bin"))
    dense = AutoModelForCausalLM.from_pretrained(path)
    assert dense.dtype == torch.float16
    name = f"{PRUNED_4BIT[0]}.weight"
    assert torch.equal(dense.state_dict()[name], artifact["loaded"].state_dict()[name].half())
    assert artifact["loaded"].dtype == torch.float32  # the model given is left as it was


FORMAT_LEVELS = ["nf4", "mxfp4", "nvfp4", "fp8-e4m3", "fp8-e5m2-tensor", "int4-g32", "nf4-g128"]


def test_a_plan_of_per_layer_formats_stores_what_size_accounts_and_loads_back(tmp_path) -> None:
    model = tiny_model()
    layers = {
        linear.name: LayerCompression(sparsity=0.5 * (index % 3 == 0), format=FORMAT_LEVELS[index % 7])
        for index, linear in enumerate(compressible_linears(model))
    }
    plan = CompressionPlan(layers=layers, granularity="linear", pruning="magnitude", group_size=64)
    path = export_compressed(model, None, plan, compress(model, plan), tmp_path / "out", {})
    tensors = load_file(path / "model.safetensors")
    size = model_size(model, plan)
    for name, setting in layers.items():
        stored = sum(tensor.nbytes for key, tensor in tensors.items() if key.startswith(f"{name}."))
        assert stored == size.per_layer[name], (name, setting)
    on_disk = (path / "model.safetensors").stat().st_size
    assert size.total_bytes <= on_disk < size.total_bytes * 1.02  # the rest: the safetensors header
    assert CompressionPlan.model_validate(read_manifest(path)["plan"]) == plan
    loaded, _ = load(path)
    for linear in compressible_linears(model):
        assert torch.equal(loaded.get_submodule(linear.name).weight, linear.module.weight), linear.name
