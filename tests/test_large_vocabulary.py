"""A large vocabulary is scored a few tokens at a time, against references read from disk a few tokens at a time,
with the figures of scoring everything at once."""

from __future__ import annotations

import copy
from pathlib import Path

import gguf
import pytest
import torch
import torch.nn.functional as F
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GemmaConfig,
    GemmaForCausalLM,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
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

from autocompress import metrics
from autocompress.compress import apply_plan
from autocompress.measurement import StoredLogProbs, store_reference
from autocompress.metrics import REFERENCE_DTYPE, TokenValues, dense_reference, evaluate, predictions
from autocompress.plan import CompressionPlan
from autocompress.targets.gguf.file import _copy_tokenizer_fields, tokenizer_fields

VOCAB = 4096  # 16 times the tiny Llama's: pieces of a window are what this file is about


def small(config_class, vocab_size: int = 256, **extra):
    return config_class(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        **extra,
    )


@pytest.fixture
def large_vocabulary_model() -> LlamaForCausalLM:
    """A tiny Llama with a 4,096-entry vocabulary and sharp distributions, as a trained model has."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(small(LlamaConfig, vocab_size=VOCAB, tie_word_embeddings=True)).eval()
    with torch.no_grad():
        model.model.norm.weight.mul_(8)
    return model


@pytest.fixture
def small_pieces(monkeypatch: pytest.MonkeyPatch) -> int:
    """Pieces of 5 tokens of a 4,096-entry vocabulary: a window of 24 tokens is cut into 5 pieces, the last short."""
    monkeypatch.setattr(metrics, "HEAD_CHUNK_ELEMENTS", 5 * VOCAB)
    return 5


def unchunked(model, tokens: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """Cross-entropy and KL per token from whole-batch log-probabilities, as evaluate computed them before pieces."""
    predicted = F.log_softmax(model(tokens, use_cache=False).logits.float(), dim=-1)
    ce = -predicted[:, :-1].gather(-1, tokens[:, 1:, None]).sum().item() / (tokens.shape[0] * (tokens.shape[1] - 1))
    kl = F.kl_div(predicted, reference.float(), log_target=True, reduction="sum").item() / tokens.numel()
    return ce, kl


def test_kl_and_cross_entropy_in_pieces_equal_them_on_whole_batches(large_vocabulary_model, small_pieces) -> None:
    tokens = torch.randint(0, VOCAB, (3, 24))
    reference = dense_reference(large_vocabulary_model, tokens, batch_size=2)
    compressed = copy.deepcopy(large_vocabulary_model)
    apply_plan(compressed, CompressionPlan.uniform(bits=3, quantization="rtn", group_size=32), {})
    with torch.no_grad():
        ce, kl = unchunked(compressed, tokens, reference)
    scored = evaluate(compressed, tokens, reference=reference, batch_size=2)
    assert scored.kl > 0.01  # a real distance, so that the tolerance below means something
    assert scored.kl == pytest.approx(kl, rel=1e-5)
    assert scored.ce == pytest.approx(ce, rel=1e-6)


def test_the_reference_computed_in_pieces_is_the_whole_batch_log_softmax(large_vocabulary_model, small_pieces) -> None:
    tokens = torch.randint(0, VOCAB, (3, 24))
    with torch.no_grad():
        whole = F.log_softmax(large_vocabulary_model(tokens).logits.float(), dim=-1)
    reference = dense_reference(large_vocabulary_model, tokens, batch_size=2)
    assert reference.dtype == REFERENCE_DTYPE
    assert torch.allclose(reference.float(), whole, rtol=0, atol=2**-6)  # float16's steps below 16 are 2**-7


def test_token_values_gathered_in_pieces_equal_those_of_whole_windows(large_vocabulary_model, small_pieces) -> None:
    tokens = torch.randint(0, VOCAB, (3, 24))
    reference = dense_reference(large_vocabulary_model, tokens, batch_size=2)
    compressed = copy.deepcopy(large_vocabulary_model)
    apply_plan(compressed, CompressionPlan.uniform(bits=3, quantization="rtn", group_size=32), {})
    in_pieces, whole = TokenValues(), TokenValues()
    evaluate(compressed, tokens, reference=reference, batch_size=2, values=in_pieces)
    with torch.no_grad():
        whole.add(F.log_softmax(compressed(tokens).logits.float(), dim=-1), tokens, reference)
    assert [len(values) for values in in_pieces.kld] == [23, 23, 23]
    for name, figure in whole.statistics().items():
        assert in_pieces.statistics()[name] == pytest.approx(figure, rel=1e-5, abs=1e-7), name


def test_the_reference_stored_on_disk_reads_back_piece_by_piece_and_scores_as_in_memory(
    large_vocabulary_model, small_pieces, tmp_path: Path
) -> None:
    tokens = torch.randint(0, VOCAB, (5, 24))
    in_memory = dense_reference(large_vocabulary_model, tokens, batch_size=2)
    stored = store_reference(large_vocabulary_model, tokens, batch_size=2, path=tmp_path / "reference.safetensors")
    assert stored.shape == (5, 24, VOCAB)
    assert torch.equal(stored.read(), in_memory)
    assert torch.equal(stored[2:4].rows(1, 5, 10), in_memory[3, 5:10])
    compressed = copy.deepcopy(large_vocabulary_model)
    apply_plan(compressed, CompressionPlan.uniform(bits=3, quantization="rtn", group_size=32), {})
    from_disk = evaluate(compressed, tokens[1:4], reference=stored[1:4], batch_size=2)
    from_memory = evaluate(compressed, tokens[1:4], reference=in_memory[1:4], batch_size=2)
    assert (from_disk.kl, from_disk.ce) == (from_memory.kl, from_memory.ce)


def test_a_stored_reference_of_another_shape_cut_short_or_garbage_is_not_read(
    large_vocabulary_model, tmp_path: Path
) -> None:
    path = tmp_path / "reference.safetensors"
    tokens = torch.randint(0, VOCAB, (2, 16))
    store_reference(large_vocabulary_model, tokens, batch_size=2, path=path)
    assert StoredLogProbs.open(path, (2, 16, VOCAB)) is not None
    assert StoredLogProbs.open(path, (3, 16, VOCAB)) is None
    assert StoredLogProbs.open(tmp_path / "missing.safetensors", (2, 16, VOCAB)) is None
    path.write_bytes(path.read_bytes()[:-1000])
    assert StoredLogProbs.open(path, (2, 16, VOCAB)) is None
    path.write_bytes(b"garbage" * 10)  # its first 8 bytes read as a header of ~7e18 bytes
    assert StoredLogProbs.open(path, (2, 16, VOCAB)) is None


FAMILIES = [
    (LlamaForCausalLM, small(LlamaConfig)),
    (MistralForCausalLM, small(MistralConfig)),
    (Qwen2ForCausalLM, small(Qwen2Config)),
    (Qwen3ForCausalLM, small(Qwen3Config, head_dim=16)),
    (Phi3ForCausalLM, small(Phi3Config, pad_token_id=0)),
    (GemmaForCausalLM, small(GemmaConfig, head_dim=16)),
    (Gemma2ForCausalLM, small(Gemma2Config, head_dim=16, final_logit_softcapping=2.0)),
    (Gemma3ForCausalLM, small(Gemma3TextConfig, head_dim=16, final_logit_softcapping=2.0)),
    (GraniteForCausalLM, small(GraniteConfig, logits_scaling=4.0)),  # scales its logits: not held back
]


@pytest.mark.parametrize(
    ("model_class", "config"),
    FAMILIES,
    ids=["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3", "granite"],
)
def test_the_head_run_after_the_blocks_gives_the_full_forwards_log_probabilities(model_class, config) -> None:
    torch.manual_seed(0)
    model = model_class(config).eval()
    tokens = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        full = F.log_softmax(model(tokens, use_cache=False).logits.float(), dim=-1)
        held_back = predictions(model, tokens)
    assert (held_back.hidden is not None) == (config.model_type in metrics.PLAIN_HEAD_FAMILIES)
    assert torch.allclose(held_back.all(), full, rtol=0, atol=1e-5)


def tokenizer_gguf(path: Path) -> Path:
    """A GGUF file holding a tokenizer's keys only, of each kind GGUF stores them in."""
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list([f"token{index}" for index in range(50)] + ["▁ü", "<0x0A>"])
    writer.add_token_scores([-0.1 * index for index in range(52)])
    writer.add_token_types([1] * 52)
    writer.add_bos_token_id(2)
    writer.add_add_bos_token(True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_gguf_files_tokenizer_is_read_once_and_then_from_the_model_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AUTOCOMPRESS_CACHE", str(tmp_path / "cache"))
    source = tokenizer_gguf(tmp_path / "tokenizer.gguf")
    first = tokenizer_fields(source)
    monkeypatch.setattr(gguf, "GGUFReader", None)  # a second read would fail
    assert tokenizer_fields(source) == first
    writer = gguf.GGUFWriter(tmp_path / "copy.gguf", "llama")
    assert _copy_tokenizer_fields(writer, source) == 52
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    monkeypatch.undo()
    copied = gguf.GGUFReader(tmp_path / "copy.gguf").fields
    original = gguf.GGUFReader(source).fields
    for key in [key for key in original if key.startswith("tokenizer.")]:
        assert copied[key].types == original[key].types, key
        assert copied[key].contents() == pytest.approx(original[key].contents()), key
