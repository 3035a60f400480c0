"""llama.cpp as the GGUF target's runtime: it computes what transformers computes on the same model, our port of its
presets assigns the types it writes, and it reads the importance matrix we write.

Skipped when llama-cpp-python (or the embedded model's tokenizer) is missing, except under CI=true where that is a
failure; the imatrix-file test needs the llama-quantize tool (benchmarks/build_llama_cpp.sh) and is skipped without.
"""

from __future__ import annotations

import math
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from autocompress.calibration import collect_statistics
from autocompress.errors import UserError
from autocompress.metrics import dense_reference, evaluate, log_probs
from autocompress.models import compressible_linears, embedded_gguf
from autocompress.plan import CompressionPlan
from autocompress.targets.gguf.file import write_gguf
from autocompress.targets.gguf.llama_cpp import (
    LlamaCppModel,
    gguf_statistics,
    llama_cpp_available,
    llama_cpp_tool,
    quantize,
    write_imatrix,
)
from autocompress.targets.gguf.presets import PRESETS, preset_types
from tests.conftest import require

SEQ_LEN = 64
THREADS = 2


def embedded_tokenizer_gguf() -> Path:
    try:
        return embedded_gguf()
    except UserError as error:
        require(str(error))
        raise


def fp16_exact(model: LlamaForCausalLM) -> LlamaForCausalLM:
    """The model with every weight rounded to float16, so that its F16 GGUF file holds exactly the same model."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(parameter.half().float())
    return model.eval()


def write_f16(model: LlamaForCausalLM, path: Path, tokenizer_source: Path | None = None) -> Path:
    write_gguf(model, None, CompressionPlan(), {}, path, tokenizer_source=tokenizer_source)
    return path


def file_types(path: Path) -> dict[str, str]:
    return {tensor.name: tensor.tensor_type.name.lower() for tensor in gguf.GGUFReader(path).tensors}


def file_data(path: Path) -> dict[str, bytes]:
    return {tensor.name: tensor.data.tobytes() for tensor in gguf.GGUFReader(path).tensors}


@pytest.fixture(scope="module")
def scored(tmp_path_factory: pytest.TempPathFactory) -> tuple[LlamaForCausalLM, Path]:
    """A tiny random Llama with SmolLM2's vocabulary and tied embeddings, weights large enough (std 0.25) that its
    next-token distributions are far from uniform, and its F16 GGUF file with SmolLM2's real tokenizer keys."""
    require(llama_cpp_available())
    tokenizer = embedded_tokenizer_gguf()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.25,
        tie_word_embeddings=True,
    )
    model = fp16_exact(LlamaForCausalLM(config))
    return model, write_f16(model, tmp_path_factory.mktemp("llama-cpp") / "tiny-f16.gguf", tokenizer)


def windows(vocab: int, n: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (n, SEQ_LEN), generator=torch.Generator().manual_seed(seed))


def test_llama_cpp_log_probs_match_transformers(scored: tuple[LlamaForCausalLM, Path]) -> None:
    model, path = scored
    tokens = windows(model.config.vocab_size)
    dense = log_probs(model, tokens)
    with LlamaCppModel(path, n_ctx=SEQ_LEN, n_threads=THREADS) as runtime:
        assert runtime.n_vocab == model.config.vocab_size
        ours = runtime.log_probs(tokens)
        again = next(runtime.iter_log_probs(tokens[:1]))  # after three other windows: the cache was emptied
        metrics = runtime.evaluate(tokens, reference=dense_reference(model, tokens, batch_size=2))
    assert ours.shape == dense.shape and ours.dtype == torch.float32
    kl = F.kl_div(ours, dense, log_target=True, reduction="none").sum(-1)
    top1 = (ours.argmax(-1) == dense.argmax(-1)).float().mean().item()
    entropy = -(dense.exp() * dense).sum(-1).mean().item()
    print(f"llama.cpp vs transformers (F16): mean KL {kl.mean():.2e}, max {kl.max():.2e}, top-1 {top1:.4f}")
    assert entropy < math.log(model.config.vocab_size) - 3  # peaked enough for the comparison to mean something
    assert kl.mean().item() <= 1e-3
    assert top1 >= 0.98  # the rest are near-ties that float16 rounding may flip
    assert torch.equal(again, ours[0])
    transformers_metrics = evaluate(model, tokens, reference=model, batch_size=2)
    assert metrics.kl <= 1e-3
    assert metrics.ce == pytest.approx(transformers_metrics.ce, rel=1e-3)


def test_llama_cpp_greedy_generation(scored: tuple[LlamaForCausalLM, Path]) -> None:
    model, path = scored
    prompt = windows(model.config.vocab_size, n=1)[0, :16]
    with LlamaCppModel(path, n_ctx=SEQ_LEN, n_threads=THREADS) as runtime:
        generated = runtime.generate(prompt.tolist(), 8)
        speed = runtime.generation_speed(prompt.tolist(), 16)
    sequence = torch.cat([prompt, torch.tensor(generated)])[None]
    with torch.no_grad():
        logits = model(sequence).logits[0, len(prompt) - 1 : -1]
    chosen = logits.gather(-1, torch.tensor(generated)[:, None])[:, 0]
    assert torch.all(chosen >= logits.max(-1).values - 1e-2)  # each token is transformers' argmax (up to F16 ties)
    print(f"llama.cpp greedy generation: {speed:.0f} tokens/s")
    assert speed > 0


MODELS = {
    # rows of 256 and 512, which every k-quant fits; a separate output tensor; 4 query heads per key/value head
    # (GQA rules); 12 layers, so that llama.cpp's layer order (blk.2 before blk.10) matters
    "tiny": dict(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=12,
        num_attention_heads=8,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    ),
    # SmolLM2-135M's widths: rows of 576 take the k-quant fallbacks (ffn_down's 1536 fits); tied embeddings
    "smollm2-like": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=8,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
    ),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def quantizable(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """(HF model, its F16 GGUF file) for each shape in MODELS; a small vocabulary and no tokenizer, which
    quantizing does not read."""
    require(llama_cpp_available())
    model = preset_model(request.param)
    return model, write_f16(model, tmp_path_factory.mktemp("presets") / f"{request.param}-f16.gguf")


def preset_model(shape: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, max_position_embeddings=256, **MODELS[shape])
    return fp16_exact(LlamaForCausalLM(config))


def predicted_types(model: LlamaForCausalLM, path: Path, preset: str, imatrix: bool = False) -> dict[str, str]:
    tensors = [(tensor.name, tuple(int(n) for n in reversed(tensor.shape))) for tensor in gguf.GGUFReader(path).tensors]
    config = model.config
    return preset_types(
        preset,
        tensors,
        config.num_hidden_layers,
        n_head=config.num_attention_heads,
        n_head_kv=config.num_key_value_heads,
        imatrix=imatrix,
    )


def test_preset_types_are_the_types_llama_cpp_writes(quantizable, tmp_path: Path) -> None:
    model, source = quantizable
    mismatches = {}
    for preset in PRESETS:
        written = file_types(quantize(source, tmp_path / f"{preset}.gguf", preset, n_threads=THREADS))
        predicted = predicted_types(model, source, preset)
        assert predicted.keys() == written.keys()
        mismatches |= {
            (preset, name): (predicted[name], kind) for name, kind in written.items() if predicted[name] != kind
        }
    assert not mismatches  # (preset, tensor): (ours, llama.cpp's)


def calibration(model: LlamaForCausalLM, n: int = 2) -> tuple[dict, int]:
    """Our calibration statistics of `model` on random windows, keyed by GGUF tensor name, and the token count."""
    tokens = windows(model.config.vocab_size, n=n, seed=2)
    statistics = collect_statistics(model, compressible_linears(model), tokens, {"input_sq_norms"})
    return gguf_statistics(statistics, model.config.num_hidden_layers), tokens.numel()


def test_importance_data_reaches_llama_cpp(quantizable, tmp_path: Path) -> None:
    """With our statistics as its importance matrix, llama.cpp quantizes differently, and its imatrix-only rule
    (q4_0/q5_0's first eighth of ffn_down in q4_1/q5_1) is the one our port predicts."""
    model, source = quantizable
    statistics, _ = calibration(model)
    assert set(statistics) <= set(file_types(source))
    for preset in ("q4_0", "q5_0", "q4_k_m"):
        weighted = quantize(source, tmp_path / f"{preset}-imatrix.gguf", preset, statistics, n_threads=THREADS)
        assert file_types(weighted) == predicted_types(model, source, preset, imatrix=True)
    weighted_data = file_data(tmp_path / "q4_k_m-imatrix.gguf")
    plain = file_data(quantize(source, tmp_path / "plain.gguf", "q4_k_m", n_threads=THREADS))
    assert any(plain[name] != data for name, data in weighted_data.items())


def test_imatrix_file_holds_sums_and_counts(tmp_path: Path) -> None:
    """The file llama-imatrix would write for these statistics (needs no llama.cpp)."""
    model = preset_model("smollm2-like")
    statistics, n_tokens = calibration(model)
    reader = gguf.GGUFReader(write_imatrix(tmp_path / "imatrix.gguf", statistics, chunk_size=SEQ_LEN))
    fields = reader.fields
    assert fields["general.type"].contents() == "imatrix"
    assert "general.architecture" not in fields
    assert fields["imatrix.datasets"].contents() == ["autocompress calibration"]
    assert fields["imatrix.chunk_count"].contents() == n_tokens // SEQ_LEN
    assert fields["imatrix.chunk_size"].contents() == SEQ_LEN
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    assert set(tensors) == {f"{name}.{part}" for name in statistics for part in ("in_sum2", "counts")}
    for name, stats in statistics.items():
        sums, counts = tensors[f"{name}.in_sum2"], tensors[f"{name}.counts"]
        assert list(sums.shape) == [stats.input_sq_norms.numel(), 1] and list(counts.shape) == [1, 1]
        np.testing.assert_array_equal(sums.data.reshape(-1), stats.input_sq_norms.numpy())
        assert counts.data.reshape(-1).tolist() == [n_tokens]


def test_llama_quantize_reads_our_imatrix_file(quantizable, tmp_path: Path) -> None:
    """`llama-quantize --imatrix` takes the file and quantizes exactly as with the statistics handed over directly."""
    tool = llama_cpp_tool("llama-quantize")
    if tool is None:
        pytest.skip("no llama-quantize: run benchmarks/build_llama_cpp.sh or set AUTOCOMPRESS_LLAMA_CPP_BIN")
    model, source = quantizable
    statistics, _ = calibration(model)
    imatrix = write_imatrix(tmp_path / "imatrix.gguf", statistics, chunk_size=SEQ_LEN)
    target = tmp_path / "cli.gguf"
    command = [str(tool), "--imatrix", str(imatrix), str(source), str(target), "Q4_K_M", str(THREADS)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert f"loaded {len(statistics)} importance matrix entries" in run.stdout + run.stderr
    direct = file_data(quantize(source, tmp_path / "direct.gguf", "q4_k_m", statistics, n_threads=THREADS))
    assert file_data(target) == direct
