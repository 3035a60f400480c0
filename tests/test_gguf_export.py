"""GGUF export for every family llama.cpp runs: each tensor in the type the plan chose, the converter's metadata and
transforms, exact bytes, and llama.cpp's own next-token distributions against transformers on the same weights.

Each family is a random tiny model (2 layers, rows of 256 or 512 so that every K-type fits), exported in F16 and in
a mixed K-quant plan with the embedding quantized too. The llama.cpp comparisons skip when llama-cpp-python is
missing, except under CI=true, where that is a failure.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from autocompress.errors import UserError
from autocompress.metrics import log_probs
from autocompress.models import embedded_gguf, load_model
from autocompress.targets.gguf.blocks import GgufBlocks, dequantize_rows, quantize_rows
from autocompress.targets.gguf.file import gguf_layout, write_gguf_tensors
from autocompress.targets.gguf.llama_cpp import LlamaCppModel, llama_cpp_available
from tests.conftest import require

SEQ_LEN = 32
THREADS = 2
VOCAB = 512  # the small byte-level BPE vocabulary every family but Llama uses
WINDOW = 8  # Gemma's sliding window, shorter than the windows scored, so that which layers slide matters
# Mixed K-quant plan: 2-D weights cycle through these types; the embedding takes q4_k (llama.cpp dequantizes its
# rows exactly), an untied output matrix q6_k (its matmul quantizes activations to 8 bits, like every layer's).
MIXED = ("q4_k", "q5_k", "q6_k", "q3_k", "q2_k", "iq4_xs", "q8_0")


COMMON = dict(
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    initializer_range=1 / 16,  # 1/√hidden: each layer keeps the scale of its input, so rounding does not blow up
)
FAMILIES = {
    # SmolLM2's own vocabulary and tokenizer keys (copied from the embedded GGUF), untied output
    "llama": (LlamaForCausalLM, LlamaConfig, dict(vocab_size=49152, tie_word_embeddings=False)),
    "mistral": (MistralForCausalLM, MistralConfig, dict(tie_word_embeddings=False)),
    "qwen2": (Qwen2ForCausalLM, Qwen2Config, dict(tie_word_embeddings=True)),  # q/k/v biases
    "qwen3": (Qwen3ForCausalLM, Qwen3Config, dict(head_dim=128, tie_word_embeddings=True)),  # 4·128 ≠ 256
    "gemma2": (
        Gemma2ForCausalLM,
        Gemma2Config,
        dict(head_dim=64, query_pre_attn_scalar=64, sliding_window=WINDOW, attn_implementation="eager"),
    ),
    "gemma3": (
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        dict(
            head_dim=64,
            query_pre_attn_scalar=64,
            sliding_window=WINDOW,
            layer_types=["sliding_attention", "full_attention"],
            final_logit_softcapping=30.0,
        ),
    ),
    "phi3": (Phi3ForCausalLM, Phi3Config, dict(original_max_position_embeddings=256, pad_token_id=0)),
}


def bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer of VOCAB tokens trained on this file's text (what llama.cpp's gpt2 vocab reads)."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|endoftext|>"]
    )
    backend.train_from_iterator([Path(__file__).read_text()] * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")


def norm_centre(family: str, key: str) -> float:
    """Norm weights around 1 (x·w), Gemma's around 0 (x·(1 + w)); Gemma's post-norms around 1 (x·2), so that its
    layers weigh against an embedding it scales by √hidden, and its tied output does not just predict the input."""
    if "gemma" not in family:
        return 1.0
    return 1.0 if ".post_" in key else 0.0


def tiny_model(family: str, seed: int = 0) -> PreTrainedModel:
    """A random tiny model of `family` whose weights float16 holds exactly (what its F16 file stores), with random
    norms (around 1; around 0 for Gemma, whose norms scale by 1 + w) and biases, so the transforms show."""
    model_class, config_class, extra = FAMILIES[family]
    torch.manual_seed(seed)
    config = config_class(**{"vocab_size": VOCAB, **COMMON, **extra})
    model = model_class(config).eval()
    with torch.no_grad():
        for key, parameter in model.named_parameters():
            if key.endswith("norm.weight"):
                parameter.copy_(torch.randn_like(parameter) * 0.2 + norm_centre(family, key))
            elif key.endswith(".bias"):
                parameter.copy_(torch.randn_like(parameter) * 0.5)
            elif key.endswith(("lm_head.weight", "embed_tokens.weight")):  # peaked next-token distributions
                parameter.copy_((parameter * (1.5 if "gemma" in family else 4.0)).half().float())
            else:
                parameter.copy_(parameter.half().float())
    return model


def mixed_plan(model: PreTrainedModel) -> dict[str, GgufBlocks]:
    """Every 2-D weight in a K-type (or iq4_xs/q8_0) as llama.cpp writes it, with a random importance matrix."""
    generator = torch.Generator().manual_seed(1)
    tensors = {}
    weights = [(key, value) for key, value in model.state_dict().items() if value.dim() == 2]
    tied = model.config.tie_word_embeddings
    for index, (key, weight) in enumerate(weights):
        if tied and key == "lm_head.weight":
            continue
        kind = (
            "q4_k"
            if key.endswith("embed_tokens.weight")
            else "q6_k"
            if key == "lm_head.weight"
            else MIXED[index % len(MIXED)]
        )
        importance = torch.rand(weight.shape[1], generator=generator) + 0.1
        tensors[key] = GgufBlocks(kind, quantize_rows(weight, kind, importance))
    return tensors


def dequantized(model: PreTrainedModel, tensors: dict[str, GgufBlocks]) -> PreTrainedModel:
    """The model transformers runs on the weights the file holds: each quantized weight decoded by gguf."""
    with torch.no_grad():
        state = model.state_dict()
        for key, tensor in tensors.items():
            state[key].copy_(dequantize_rows(tensor.data, tensor.type, state[key].shape[1]))
    return model


def export(family: str, model: PreTrainedModel, tensors: dict[str, GgufBlocks], path: Path) -> Path:
    if family == "llama":
        source = embedded_gguf()
        report = write_gguf_tensors(model, None, tensors, path, {"family": family}, tokenizer_source=source)
        layout = gguf_layout(model, None, source, {"family": family})
    else:
        tokenizer = bpe_tokenizer()
        report = write_gguf_tensors(model, tokenizer, tensors, path, {"family": family})
        layout = gguf_layout(model, tokenizer, None, {"family": family})
    size = path.stat().st_size
    assert report.accounted_bytes == size
    assert layout.file_bytes({key: tensor.type for key, tensor in tensors.items()}) == size
    return path


# llama.cpp's CPU kernels quantize a matmul's activations to its weight type's "vec_dot" type: Q8_K (blocks of
# 256, scale max/-127) for the K-types and IQ4_XS, Q8_0/Q8_1 (blocks of 32, float16 scale amax/127) for the
# 32-blocks, float16 for F16 weights. `activation_rounding` does that to a transformers model's Linear inputs, which
# measures the floor this sets on the KL between llama.cpp and transformers on the same weights.
SUPER_BLOCK_TYPES = {"q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "iq4_xs"}


def _q8_k(x: torch.Tensor) -> torch.Tensor:
    blocks = x.reshape(-1, 256)
    peak = blocks.gather(-1, blocks.abs().argmax(-1, keepdim=True))
    iscale = -127.0 / torch.where(peak == 0, torch.ones_like(peak), peak)
    rounded = torch.clamp(torch.round(iscale * blocks), max=127) / iscale
    return torch.where(peak == 0, torch.zeros_like(blocks), rounded).reshape(x.shape)


def _q8_0(x: torch.Tensor) -> torch.Tensor:
    blocks = x.reshape(-1, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    inverse = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    return (torch.round(blocks * inverse) * (amax / 127).half().float()).reshape(x.shape)


def activation_rounding(model: PreTrainedModel, types: dict[str, str]) -> list:
    """Forward pre-hooks rounding each Linear's input as llama.cpp does for its weight's type (F16 by default)."""
    hooks = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        key = f"{name}.weight"
        if model.config.tie_word_embeddings and key == "lm_head.weight":
            key = next(k for k in model.state_dict() if k.endswith("embed_tokens.weight"))
        kind = types.get(key, "f16")
        rounding = _q8_k if kind in SUPER_BLOCK_TYPES else (lambda x: x.half().float()) if kind == "f16" else _q8_0
        hooks.append(module.register_forward_pre_hook(lambda _module, args, rounding=rounding: (rounding(args[0]),)))
    return hooks


def kl(predicted: torch.Tensor, reference: torch.Tensor) -> float:
    return F.kl_div(predicted, reference, log_target=True, reduction="none").sum(-1).mean().item()


def windows(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (4, SEQ_LEN), generator=torch.Generator().manual_seed(2))


def llama_cpp_log_probs(path: Path, tokens: torch.Tensor) -> torch.Tensor:
    with LlamaCppModel(path, n_ctx=tokens.shape[1], n_threads=THREADS) as runtime:
        return runtime.log_probs(tokens)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_llama_cpp_computes_what_transformers_computes(family: str, tmp_path: Path) -> None:
    """F16: llama.cpp's next-token distributions equal transformers' to float16 rounding. Mixed K-quants with the
    embedding quantized: llama.cpp on the file against transformers on the same decoded weights differ by what
    8-bit activation rounding alone makes transformers differ from itself (measured here, `floor`)."""
    require(llama_cpp_available())
    model = tiny_model(family)
    tokens = windows(model.config.vocab_size)
    ours = log_probs(model, tokens)
    entropy = -(ours.exp() * ours).sum(-1).mean().item()
    assert 0.5 < entropy < math.log(model.config.vocab_size) - 3  # peaked, not one-hot: the comparison means something
    f16 = llama_cpp_log_probs(export(family, model, {}, tmp_path / "f16.gguf"), tokens)
    kl_f16 = kl(f16, ours)

    tensors = mixed_plan(model)
    dequantized(model, tensors)
    path = export(family, model, tensors, tmp_path / "mixed.gguf")
    stored = {tensor.name: tensor for tensor in gguf.GGUFReader(path).tensors}
    reference = log_probs(model, tokens)
    mixed = llama_cpp_log_probs(path, tokens)
    hooks = activation_rounding(model, {key: tensor.type for key, tensor in tensors.items()})
    floor = kl(log_probs(model, tokens), reference)
    for hook in hooks:
        hook.remove()
    kl_mixed = kl(mixed, reference)
    top1 = (mixed.argmax(-1) == reference.argmax(-1)).float().mean().item()
    print(
        f"{family}: F16 KL {kl_f16:.1e}; mixed K-quant KL {kl_mixed:.1e} (top-1 {top1:.3f}), 8-bit activation "
        f"floor {floor:.1e}; entropy {entropy:.2f} nats"
    )
    assert kl_f16 <= 2e-5
    assert kl_mixed <= max(1e-3, 1.25 * floor)  # measured: at most 1.09 × floor
    assert top1 >= 0.9
    assert stored["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.Q4_K
    assert ("output.weight" in stored) == (not model.config.tie_word_embeddings)


def test_llama3_rope_scaling_becomes_llama_cpp_rope_freqs(tmp_path: Path) -> None:
    """Llama 3's scaled rotary frequencies, as transformers computes them, reach llama.cpp as its `rope_freqs`
    tensor: over 256 positions, four times the unscaled context, both compute the same."""
    require(llama_cpp_available())
    scaling = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    scaling |= {"original_max_position_embeddings": 64, "rope_theta": 500000.0}
    torch.manual_seed(0)
    config = LlamaConfig(**{**COMMON, "vocab_size": VOCAB, "max_position_embeddings": 1024, "rope_scaling": scaling})
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(parameter.half().float())
        model.lm_head.weight.mul_(4)
    path = write_gguf_tensors(model, bpe_tokenizer(), {}, tmp_path / "llama3.gguf").path
    assert "rope_freqs.weight" in {tensor.name for tensor in gguf.GGUFReader(path).tensors}
    tokens = torch.randint(0, VOCAB, (2, 256), generator=torch.Generator().manual_seed(2))
    assert kl(llama_cpp_log_probs(path, tokens), log_probs(model, tokens)) <= 2e-5


def test_the_file_holds_the_given_blocks_in_llama_cpp_row_order(tmp_path: Path) -> None:
    """Block bytes are written as the search evaluated them: only Llama's query/key rows move (whole rows, so
    quantized ones too), norms and embeddings are the converter's F32/F16, and the plan travels in the file."""
    model = tiny_model("mistral")
    tensors = mixed_plan(model)
    report = write_gguf_tensors(model, bpe_tokenizer(), tensors, tmp_path / "m.gguf", {"trial": 3})
    reader = gguf.GGUFReader(report.path)
    stored = {tensor.name: tensor for tensor in reader.tensors}
    config = model.config
    for key, name in [
        ("model.layers.1.mlp.down_proj.weight", "blk.1.ffn_down.weight"),
        ("model.layers.0.self_attn.v_proj.weight", "blk.0.attn_v.weight"),
    ]:
        assert stored[name].tensor_type.name.lower() == tensors[key].type
        np.testing.assert_array_equal(np.asarray(stored[name].data).reshape(tensors[key].data.shape), tensors[key].data)
    q = tensors["model.layers.0.self_attn.q_proj.weight"].data
    heads, rows = config.num_attention_heads, q.shape[0]
    order = np.arange(rows).reshape(heads, 2, rows // heads // 2).swapaxes(1, 2).reshape(rows)
    np.testing.assert_array_equal(np.asarray(stored["blk.0.attn_q.weight"].data).reshape(q.shape), q[order])
    assert stored["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert json.loads(reader.fields["autocompress.provenance"].contents()) == {"trial": 3}
    assert reader.fields["general.architecture"].contents() == "llama"
    assert report.accounted_bytes == report.path.stat().st_size


def test_gemma_norms_shift_by_one_and_layers_slide_as_configured(tmp_path: Path) -> None:
    model = tiny_model("gemma3")
    path = write_gguf_tensors(model, bpe_tokenizer(), {}, tmp_path / "g.gguf").path
    reader = gguf.GGUFReader(path)
    stored = {tensor.name: np.asarray(tensor.data) for tensor in reader.tensors}
    norm = model.model.layers[0].input_layernorm.weight.detach().numpy()
    np.testing.assert_array_equal(stored["blk.0.attn_norm.weight"], norm + np.float32(1))
    assert "output.weight" not in stored  # tied: the one embedding matrix
    assert list(reader.fields["gemma3.attention.sliding_window_pattern"].contents()) == [True, False]
    assert reader.fields["gemma3.attention.sliding_window"].contents() == WINDOW
    assert reader.fields["gemma3.rope.freq_base_swa"].contents() == 10000.0


def test_the_size_counts_every_byte_for_any_types(tmp_path: Path) -> None:
    """The layout's size from shapes alone (a model on the meta device) equals the written file's."""
    model = tiny_model("qwen2")
    tokenizer = bpe_tokenizer()
    with torch.device("meta"):
        shapes_only = Qwen2ForCausalLM(model.config)
    layout = gguf_layout(shapes_only, tokenizer, metadata={"study": "s"})
    for kind in ("q2_k", "iq4_xs", "q5_1", "bf16"):
        tensors = {
            key: GgufBlocks(kind, quantize_rows(weight, kind))
            for key, weight in model.state_dict().items()
            if weight.dim() == 2 and "embed" not in key
        }
        path = write_gguf_tensors(model, tokenizer, tensors, tmp_path / f"{kind}.gguf", {"study": "s"}).path
        assert layout.file_bytes({key: tensor.type for key, tensor in tensors.items()}) == path.stat().st_size


def test_what_llama_cpp_would_compute_differently_is_refused(tmp_path: Path) -> None:
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=1, n_head=2, vocab_size=VOCAB))
    with pytest.raises(UserError, match=r"GGUF is written for .* not GPT2LMHeadModel"):
        gguf_layout(gpt2)
    scaled = Gemma2ForCausalLM(Gemma2Config(**{**COMMON, "vocab_size": VOCAB, "head_dim": 64}))  # 256 ≠ 64
    with pytest.raises(UserError, match="query_pre_attn_scalar=256"):
        gguf_layout(scaled)
    yarn = LlamaConfig(**{**COMMON, "vocab_size": VOCAB}, rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(UserError, match="rope scaling 'yarn'"):
        gguf_layout(LlamaForCausalLM(yarn))
    model = tiny_model("qwen3")
    layout = gguf_layout(model)
    narrow = LlamaForCausalLM(LlamaConfig(**{**COMMON, "vocab_size": VOCAB, "hidden_size": 192, "head_dim": 48}))
    with pytest.raises(UserError, match="rows of 192 weights, which q4_k's 256-blocks do not divide"):
        gguf_layout(narrow).file_bytes({"model.layers.0.mlp.up_proj.weight": "q4_k"})
    with pytest.raises(UserError, match=r"no tensor 'model\.layers\.9\.mlp\.up_proj\.weight'"):
        layout.file_bytes({"model.layers.9.mlp.up_proj.weight": "q8_0"})
    embedding = GgufBlocks("q8_0", quantize_rows(model.model.embed_tokens.weight, "q8_0"))
    both = {"model.embed_tokens.weight": embedding, "lm_head.weight": embedding}
    with pytest.raises(UserError, match="tied model stores one embedding matrix"):
        write_gguf_tensors(model, None, both, tmp_path / "tied.gguf")


def evaluated_pair(folder: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerFast, Path, dict, PreTrainedModel, dict]:
    """What `evaluate` tests judge: a dense tiny Mistral saved with its tokenizer as `folder/base`, a data config of
    6 held-out windows of this file's text, and a copy of the model at a mixed plan's decoded weights with the plan's
    tensors: (dense, tokenizer, base folder, data, compressed, tensors)."""
    dense = tiny_model("mistral")
    tokenizer = bpe_tokenizer()
    base = folder / "base"
    dense.save_pretrained(base)
    tokenizer.save_pretrained(base)
    corpus = folder / "corpus.txt"
    corpus.write_text(Path(__file__).read_text())
    data = {"source": "files", "files": [str(corpus)], "seq_len": SEQ_LEN, "calibration": 2, "fitness": 2}
    data |= {"heldout": 6, "batch_size": 2}
    compressed = tiny_model("mistral")
    tensors = mixed_plan(compressed)
    dequantized(compressed, tensors)
    return dense, tokenizer, base, data, compressed, tensors


def test_evaluate_runs_the_file_in_llama_cpp_beside_the_prediction(tmp_path: Path, capsys) -> None:
    """`autocompress evaluate model.gguf`: llama.cpp's held-out perplexity and KL to the dense base on the study's
    own held-out windows (the base model's tokenizer, the data config the file records) match transformers on the
    decoded weights, and the search's figures stand beside them."""
    require(llama_cpp_available())
    from autocompress.cli import main
    from autocompress.config import DataConfig
    from autocompress.data import token_pools
    from autocompress.evaluate import evaluate_artifact, evaluation_lines
    from autocompress.metrics import evaluate

    dense, tokenizer, base, data, compressed, tensors = evaluated_pair(tmp_path)
    tokens = token_pools(DataConfig.model_validate(data), tokenizer).heldout
    ours = evaluate(compressed, tokens, reference=dense, batch_size=2)
    layout = gguf_layout(compressed, tokenizer)
    provenance = {
        "base_model": {"name": str(base), "device": "cpu"},
        "data": data,
        "trial": 7,
        "heldout": {"ppl": ours.ppl, "kl": ours.kl},
        "metrics": {"kl": 0.5},
    }
    types = {key: tensor.type for key, tensor in tensors.items()}
    provenance["accounted_bytes"] = 0
    for _ in range(3):  # the provenance holds the size it is part of: a fixed point once the digits settle
        provenance["accounted_bytes"] = gguf_layout(compressed, tokenizer, metadata=provenance).file_bytes(types)
    assert layout.overhead_bytes < provenance["accounted_bytes"]
    path = write_gguf_tensors(compressed, tokenizer, tensors, tmp_path / "out" / "model.gguf", provenance).path

    result = evaluate_artifact(path.parent, new_tokens=8)
    with capsys.disabled():
        print("\n".join(evaluation_lines(result)))
        print(f"transformers on the decoded weights: ppl {ours.ppl:.4f}, KL {ours.kl:.5f}")
    assert result["runtime"] == "llama.cpp" and result["trial"] == 7
    assert result["heldout_tokens"] == tokens.numel()
    assert result["size_on_disk_bytes"] == result["accounted_bytes"]
    assert result["predicted_heldout_ppl"] == ours.ppl and result["predicted_fitness_kl"] == 0.5
    assert result["heldout_ppl"] == pytest.approx(ours.ppl, rel=0.02)
    assert result["heldout_kl"] == pytest.approx(ours.kl, rel=0.2, abs=5e-3)
    assert result["dense_heldout_ppl"] == pytest.approx(evaluate(dense, tokens, batch_size=2).ppl, rel=1e-6)
    assert result["tokens_per_s"] > 0 and result["dense_tokens_per_s"] > 0

    capsys.readouterr()
    main(["evaluate", str(path), "--no-dense", "--new-tokens", "4"])
    printed = capsys.readouterr().out
    assert "llama.cpp" in printed and "held-out perplexity" in printed


def test_evaluate_against_another_gguf_gives_kld_statistics_and_paired_differences(tmp_path: Path, capsys) -> None:
    """`autocompress evaluate A.gguf --against B.gguf`: both files run in llama.cpp on the same held-out windows
    (B, a file without our provenance as llama-quantize writes, takes A's windows), each with the KLD statistics
    llama-perplexity --kl-divergence reports against the dense base, and the paired per-window differences."""
    require(llama_cpp_available())
    from autocompress.cli import main
    from autocompress.config import DataConfig
    from autocompress.data import token_pools
    from autocompress.metrics import TokenValues, evaluate

    dense, tokenizer, base, data, compressed, tensors = evaluated_pair(tmp_path)
    provenance = {"base_model": {"name": str(base), "device": "cpu"}, "data": data}
    quantized = write_gguf_tensors(compressed, tokenizer, tensors, tmp_path / "quantized.gguf", provenance).path
    plain = write_gguf_tensors(dense, tokenizer, {}, tmp_path / "f16.gguf").path  # no provenance

    capsys.readouterr()
    main(["evaluate", str(quantized), "--against", str(plain), "--json", "--new-tokens", "4"])
    result = json.loads(capsys.readouterr().out)
    tokens = token_pools(DataConfig.model_validate(data), tokenizer).heldout
    values = TokenValues()
    evaluate(compressed, tokens, reference=dense, batch_size=2, values=values)
    ours = values.statistics()
    assert result["against"]["path"] == str(plain)
    assert result["heldout_mean_kld"] == pytest.approx(ours["mean_kld"], rel=0.2, abs=5e-3)
    assert result["heldout_same_top_p"] == pytest.approx(ours["same_top_p"], abs=0.05)
    assert result["against"]["heldout_mean_kld"] < result["heldout_mean_kld"]  # F16 of the base: nearly the base
    compared = result["comparison"]
    assert compared["windows"] == 6 and compared["nll_per_token"]["ci_low"] <= compared["nll_per_token"]["delta"]
    assert compared["kld_per_token"]["delta"] > 0 and compared["kld_per_token"]["windows_lower"] < 6

    main(["evaluate", str(quantized), "--against", str(plain), "--new-tokens", "4", "--no-dense"])
    table = capsys.readouterr().out
    assert "--against" in table and "99.9% KLD" in table and "quantized.gguf minus --against" in table


def test_a_gguf_model_is_converted_once_into_the_cache_keyed_by_its_content(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    """A `.gguf` model's tokenizer and dequantized tensors are converted into the model cache on the first load;
    the second load reads that folder (no conversion) and computes the same logits; a file of other content gets a
    folder of its own."""
    from autocompress import models

    monkeypatch.setenv("AUTOCOMPRESS_CACHE", str(tmp_path / "cache"))
    model = tiny_model("mistral")
    tokenizer = bpe_tokenizer()
    path = write_gguf_tensors(model, tokenizer, mixed_plan(model), tmp_path / "tiny.gguf").path
    tokens = windows(model.config.vocab_size)

    first, first_tokenizer = load_model(str(path), device="cpu")
    assert "Converting" in capsys.readouterr().err
    folders = list((tmp_path / "cache" / "models" / "gguf").iterdir())
    assert len(folders) == 1 and (folders[0] / "config.json").is_file()
    monkeypatch.setattr(models, "converted_gguf", lambda *_: pytest.fail("converted a second time"))
    second, second_tokenizer = load_model(str(path), device="cpu")
    with torch.no_grad():
        assert torch.equal(first(tokens).logits, second(tokens).logits)
    assert second_tokenizer("def main") == first_tokenizer("def main")

    monkeypatch.undo()
    monkeypatch.setenv("AUTOCOMPRESS_CACHE", str(tmp_path / "cache"))
    other = write_gguf_tensors(tiny_model("mistral", seed=1), tokenizer, {}, tmp_path / "other.gguf").path
    load_model(str(other), device="cpu")
    assert len(list((tmp_path / "cache" / "models" / "gguf").iterdir())) == 2
