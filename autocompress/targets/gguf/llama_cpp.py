"""llama.cpp as a runtime: score a GGUF file with llama.cpp itself, quantize with its presets, and hand it our
calibration statistics as its importance matrix.

The GGUF target promises that what is scored is what ships, so its files are judged by the runtime that ships them
(llama-cpp-python's bindings of llama.cpp, CPU or GPU build), not by our reimplementation of its kernels:
- `LlamaCppModel` evaluates windows of token ids the project tokenized, each from an empty KV cache at positions
  0..n-1 and without an added BOS token, exactly as `autocompress.metrics.log_probs` feeds transformers, and returns
  the same [windows, seq_len, vocab] float32 log-probabilities, so the same KL and perplexity code applies;
- `quantize` runs `llama_model_quantize` with a preset (see `autocompress.targets.gguf.presets`) and, optionally,
  importance data from our own calibration statistics;
- `write_imatrix` writes those statistics as the GGUF imatrix file that this llama.cpp's `llama-imatrix` writes and
  `llama-quantize --imatrix` reads, for the command-line tools (`benchmarks/build_llama_cpp.sh` builds them).

llama-cpp-python is optional: nothing here imports it before it is used, and `llama_cpp_available()` says why it
cannot be.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gguf
import numpy as np
import torch
import torch.nn.functional as F

from autocompress.methods import LayerStatistics
from autocompress.metrics import Metrics, TokenValues
from autocompress.models import cache_dir
from autocompress.targets.gguf.presets import PRESETS

if TYPE_CHECKING:
    from llama_cpp import Llama

TOOLS_ENV = "AUTOCOMPRESS_LLAMA_CPP_BIN"  # a folder holding llama-quantize & co, before the cache and PATH
NEW_TOKENS = 32  # generated per throughput measurement, as autocompress.evaluate does with transformers
IMATRIX_DATASET = "autocompress calibration"
TYPICAL_QUANTILE = 0.2
GGML_LOG_LEVEL_ERROR = 4  # ggml.h: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5


def llama_cpp_available() -> str | None:
    """None when llama-cpp-python can be imported, else the reason in one line (tests skip with it)."""
    try:
        import llama_cpp  # noqa: F401
    except Exception as error:  # ImportError, or OSError when its shared library does not load
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return f"llama-cpp-python is not usable: {first_line} (pip install llama-cpp-python)"
    return None


def _threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class LlamaCppModel:
    """A GGUF file loaded in llama.cpp, scored on token windows the project tokenized.

    `n_ctx` bounds the longest window (and prompt plus generated tokens); llama-cpp-python keeps
    n_ctx × vocab float32 logits, so it is best set to the window length rather than the model's context.
    `logits_all=False` computes the logits of a batch's last token only, as llama.cpp serves a prompt: for
    `timings`, not for scoring. `options` go to `llama_cpp.Llama` as they are (`n_gpu_layers=-1` on a GPU build,
    `flash_attn`...).
    """

    def __init__(
        self, path: Path | str, n_ctx: int, n_threads: int | None = None, logits_all: bool = True, **options: Any
    ) -> None:
        from llama_cpp import Llama

        threads = n_threads or _threads()
        self.path = Path(path)
        self.n_ctx = n_ctx
        self.n_threads = threads
        self._llama: Llama = Llama(
            model_path=str(self.path),
            n_ctx=n_ctx,
            n_batch=n_ctx,
            n_ubatch=n_ctx,
            logits_all=logits_all,
            n_threads=threads,
            n_threads_batch=threads,
            verbose=False,
            **options,
        )

    @property
    def n_vocab(self) -> int:
        return self._llama.n_vocab()

    def close(self) -> None:
        self._llama.close()

    def __enter__(self) -> LlamaCppModel:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _logits(self, ids: Sequence[int]) -> np.ndarray:
        """llama.cpp's logits [len(ids), vocab] for `ids` fed as they are, from an empty KV cache at position 0
        (`eval` drops every cached position from `n_tokens` on, and `reset` sets that to 0)."""
        if len(ids) > self.n_ctx:
            raise ValueError(f"a window of {len(ids)} tokens does not fit n_ctx={self.n_ctx}")
        self._llama.reset()
        self._llama.eval(list(ids))
        return self._llama.scores[: len(ids)]

    def iter_log_probs(self, windows: torch.Tensor) -> Iterator[torch.Tensor]:
        """Next-token log-probabilities [seq_len, vocab] (float32) of each window in turn: one window's worth of
        memory at a time, for vocabularies where all of them would not fit."""
        for window in windows.tolist():
            yield F.log_softmax(torch.from_numpy(self._logits(window)), dim=-1)

    def log_probs(self, windows: torch.Tensor) -> torch.Tensor:
        """Next-token log-probabilities [n_windows, seq_len, vocab] in float32, like
        `autocompress.metrics.log_probs` (position t predicts token t + 1; the last one predicts past the window)."""
        return torch.stack(list(self.iter_log_probs(windows)))

    def evaluate(
        self, tokens: torch.Tensor, reference: torch.Tensor | None = None, values: TokenValues | None = None
    ) -> Metrics:
        """Cross-entropy over every predicted token and the mean per-token KL(reference ‖ llama.cpp) against
        cached dense log-probabilities [n_windows, seq_len, vocab], with `autocompress.metrics.evaluate`'s
        conventions, so that figures from transformers and from llama.cpp compare; `values`, if given, gathers
        each window's per-token values (`TokenValues`) on the way."""
        ce_sum = kl_sum = seconds = 0.0
        for index, window in enumerate(tokens):
            began = time.perf_counter()
            predicted = next(self.iter_log_probs(window[None]))
            seconds += time.perf_counter() - began
            ce_sum += -predicted[:-1].gather(-1, window[1:, None]).sum().item()
            dense = None if reference is None else reference[index].to(torch.float32)
            if dense is not None:
                kl_sum += F.kl_div(predicted, dense, log_target=True, reduction="sum").item()
            if values is not None:
                values.add(predicted, window, dense)
        return Metrics(
            ce=ce_sum / (tokens.shape[0] * (tokens.shape[1] - 1)),
            kl=None if reference is None else kl_sum / tokens.numel(),
            tokens_per_s=tokens.numel() / seconds if seconds else float("inf"),
            n_tokens=tokens.numel(),
        )

    def generate(self, prompt: Sequence[int], new_tokens: int) -> list[int]:
        """The `new_tokens` ids greedy decoding appends to `prompt` (no BOS added, no stop at EOS): the prompt in
        one batch, then one token at a time."""
        if len(prompt) + new_tokens > self.n_ctx:
            raise ValueError(f"{len(prompt)} prompt + {new_tokens} new tokens do not fit n_ctx={self.n_ctx}")
        self._llama.reset()
        self._llama.eval(list(prompt))
        generated = [int(np.argmax(self._llama.scores[self._llama.n_tokens - 1]))]
        while len(generated) < new_tokens:
            self._llama.eval(generated[-1:])
            generated.append(int(np.argmax(self._llama.scores[self._llama.n_tokens - 1])))
        return generated

    def generation_speed(self, prompt: Sequence[int], new_tokens: int = NEW_TOKENS) -> float:
        """Tokens per second of greedy generation of `new_tokens` after `prompt`, prompt processing included and
        after a warm-up, as `autocompress.evaluate.generation_speed` measures transformers."""
        self.generate(prompt, 2)
        began = time.perf_counter()
        self.generate(prompt, new_tokens)
        return new_tokens / (time.perf_counter() - began)

    def timings(self, prompt: Sequence[int], new_tokens: int) -> Timing:
        """The compute time of `prompt` fed as one batch from an empty KV cache, then of each of `new_tokens` tokens
        fed one at a time after it (the prompt's ids again, in turn: which ids does not change the work).

        On one thread, llama.cpp computes in the calling thread, so its CPU time is the time the computation took,
        whatever else the machine runs (wall-clock time on a shared machine also counts the other processes' turns);
        on several, llama.cpp's own performance counters (wall-clock, no Python in between). Each token is
        synchronized, so that llama.cpp counts it as a decode step and not as part of a batch; the decode time is
        a typical token's (`_typical`), the prompt's the batch's."""
        import llama_cpp

        if len(prompt) < 2 or len(prompt) + new_tokens > self.n_ctx:
            raise ValueError(
                f"a prompt of {len(prompt)} (at least 2) + {new_tokens} tokens must fit n_ctx={self.n_ctx}"
            )
        context = self._llama.ctx
        self._llama.reset()
        llama_cpp.llama_perf_context_reset(context)
        began = time.thread_time()
        self._llama.eval(list(prompt))
        llama_cpp.llama_synchronize(context)
        prompt_cpu = time.thread_time() - began
        cpu, wall = [], []
        for step in range(new_tokens):
            began, counted = time.thread_time(), llama_cpp.llama_perf_context(context).t_eval_ms
            self._llama.eval([prompt[step % len(prompt)]])
            llama_cpp.llama_synchronize(context)
            cpu.append(time.thread_time() - began)
            wall.append((llama_cpp.llama_perf_context(context).t_eval_ms - counted) / 1e3)
        counters = llama_cpp.llama_perf_context(context)
        if counters.n_eval != new_tokens:
            raise RuntimeError(f"llama.cpp counted {counters.n_eval} decode steps, not {new_tokens}")
        if self.n_threads == 1:
            return Timing(prompt_s=prompt_cpu, decode_s=_typical(cpu))
        return Timing(prompt_s=counters.t_p_eval_ms / 1e3, decode_s=_typical(wall))


def _typical(seconds: Sequence[float]) -> float:
    """A decoded token's time: the 20th percentile of the tokens' times, since a busy machine's interference (its
    caches and memory bandwidth taken by other processes) only ever adds time, and in bursts."""
    return float(np.quantile(np.asarray(seconds), TYPICAL_QUANTILE))


@dataclass(frozen=True)
class Timing:
    """Seconds llama.cpp computed (see `LlamaCppModel.timings`): one prompt batch, and one decoded token after it."""

    prompt_s: float
    decode_s: float


def _float32_sums(stats: LayerStatistics) -> np.ndarray:
    return stats.input_sq_norms.detach().float().cpu().numpy().reshape(-1)


def _column_means(statistics: Mapping[str, LayerStatistics]) -> dict[str, np.ndarray]:
    """What llama.cpp quantizes with: the mean of x_j² over calibration tokens per input column (the GGUF imatrix
    holds sums and counts, and llama-quantize divides them)."""
    means = {}
    for name, stats in statistics.items():
        if stats.input_sq_norms is None or stats.n_tokens <= 0:
            raise ValueError(f"imatrix: no input statistics for {name!r} (calibrate with 'input_sq_norms')")
        sums = _float32_sums(stats).astype(np.float64)  # the F32 sums the file holds, divided as llama-quantize does
        means[name] = (sums / np.float32(stats.n_tokens)).astype(np.float32)
    return means


def quantize(
    source: Path | str,
    target: Path | str,
    preset: str,
    statistics: Mapping[str, LayerStatistics] | None = None,
    n_threads: int | None = None,
) -> Path:
    """Quantize a GGUF file with llama.cpp's `preset` (a key of `presets.PRESETS`), as `llama-quantize` does.

    `statistics` (per GGUF tensor name, see `gguf_statistics`) become llama.cpp's importance matrix, passed as
    the per-column means that `llama-quantize --imatrix` would read from `write_imatrix`'s file."""
    import llama_cpp

    if preset not in PRESETS:
        raise ValueError(f"unknown llama.cpp preset {preset!r}; known: {', '.join(PRESETS)}")
    target = Path(target)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = PRESETS[preset].ftype
    params.nthread = n_threads or _threads()
    means = _column_means(statistics or {})
    if means:
        entries = (llama_cpp.llama_model_imatrix_data * (len(means) + 1))()  # ends with a NULL name
        keep = []  # the names and arrays must outlive the call
        for entry, (name, values) in zip(entries, means.items(), strict=False):
            data = np.ascontiguousarray(values, dtype=np.float32)
            keep.append((name.encode(), data))
            entry.name = keep[-1][0]
            entry.data = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entry.size = data.size
        params.imatrix = entries
    errors: list[str] = []
    with _llama_cpp_errors(errors):
        failed = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    if failed:
        reason = " ".join(line.strip() for line in errors if line.strip()) or "no reason logged"
        raise RuntimeError(f"llama.cpp could not quantize {source} to {preset}: {reason}")
    return target


@contextmanager
def _llama_cpp_errors(errors: list[str]) -> Iterator[None]:
    """Collect llama.cpp's error messages in `errors` and drop the rest of its log while the block runs.

    llama-cpp-python's own log filter maps an older ggml level numbering (this ggml's WARN reaches it as ERROR and
    its ERROR as DEBUG), so it would print quantization's one warning per fallback tensor and hide the errors."""
    import llama_cpp

    previous, user_data = llama_cpp.llama_log_callback(), ctypes.c_void_p()
    llama_cpp.llama_log_get(ctypes.byref(previous), ctypes.byref(user_data))

    @llama_cpp.llama_log_callback
    def collect(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
        if level == GGML_LOG_LEVEL_ERROR:
            errors.append(text.decode(errors="replace"))

    llama_cpp.llama_log_set(collect, ctypes.c_void_p())
    try:
        yield
    finally:
        llama_cpp.llama_log_set(previous, user_data)


def gguf_statistics(statistics: Mapping[str, LayerStatistics], n_layers: int) -> dict[str, LayerStatistics]:
    """Calibration statistics keyed by Linear (`model.layers.0.self_attn.q_proj`) re-keyed by the GGUF tensor that
    Linear becomes (`blk.0.attn_q.weight`), the names llama.cpp's imatrix uses. Input columns keep their order (the
    writer permutes only query/key rows), so the sums carry over as they are."""
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    renamed = {}
    for linear, stats in statistics.items():
        name = names.get_name(f"{linear}.weight", try_suffixes=(".weight",))
        if name is None:
            raise ValueError(f"imatrix: GGUF has no name for the Linear {linear!r}")
        renamed[name] = stats
    return renamed


class _ImatrixWriter(gguf.GGUFWriter):
    """An imatrix file names no architecture (llama.cpp's own writer stores none)."""

    def add_architecture(self) -> None:
        pass


def write_imatrix(
    path: Path | str,
    statistics: Mapping[str, LayerStatistics],
    chunk_size: int,
    datasets: Sequence[str] = (IMATRIX_DATASET,),
) -> Path:
    """Write calibration statistics (per GGUF tensor name: the sum over tokens of x_j² per input column, and the
    token count) as the importance-matrix file `llama-quantize --imatrix` reads.

    The format is the GGUF one that this llama.cpp's `llama-imatrix` writes and prefers (the legacy .dat is still
    read, but stores means times call counts and no token counts): per tensor `<name>.in_sum2` (F32 [1, in]
    sums) and `<name>.counts` (F32 [1, 1] tokens), plus `imatrix.datasets`, `imatrix.chunk_count` and
    `imatrix.chunk_size`, without which llama-quantize refuses the file. `chunk_size` is the calibration window
    length, which llama.cpp's chunks are."""
    path = Path(path)
    if not statistics or not datasets:
        raise ValueError("imatrix: llama-quantize needs statistics and at least one dataset name")
    _column_means(statistics)  # refuses missing statistics before anything is written
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = _ImatrixWriter(path, "")
    writer.add_type(gguf.GGUFType.IMATRIX)
    writer.add_array(gguf.Keys.IMatrix.DATASETS, list(datasets))
    most_tokens = max(stats.n_tokens for stats in statistics.values())
    writer.add_uint32(gguf.Keys.IMatrix.CHUNK_COUNT, most_tokens // chunk_size)
    writer.add_uint32(gguf.Keys.IMatrix.CHUNK_SIZE, chunk_size)
    for name in sorted(statistics):  # llama-imatrix's order
        stats = statistics[name]
        writer.add_tensor(f"{name}.in_sum2", np.ascontiguousarray(_float32_sums(stats).reshape(1, -1)))
        writer.add_tensor(f"{name}.counts", np.array([[stats.n_tokens]], dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def llama_cpp_tool(name: str) -> Path | None:
    """A llama.cpp command-line tool (`llama-quantize`, `llama-imatrix`, `llama-perplexity`): from the folder in
    $AUTOCOMPRESS_LLAMA_CPP_BIN, else the one benchmarks/build_llama_cpp.sh builds in the cache, else PATH."""
    folders = [os.environ.get(TOOLS_ENV), cache_dir() / "llama.cpp" / "bin"]
    for folder in folders:
        if folder and (Path(folder) / name).is_file() and os.access(Path(folder) / name, os.X_OK):
            return Path(folder) / name
    found = shutil.which(name)
    return Path(found) if found else None
