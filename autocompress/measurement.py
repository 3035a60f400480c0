"""Measuring a plan: its size and its distance to the dense model on a token pool, against the dense model's
log-probabilities computed once per pool and kept on disk in float16, read a piece at a time.

A pool's reference holds windows × seq_len × vocabulary log-probabilities: 1 GB in float16 for 8 windows of 256
tokens of Gemma 3 (262,144 entries). It is written a piece at a time as the dense model computes it and read back a few
tokens at a time while a plan is scored (`metrics.evaluate` scores each window a piece at a time), so no process
ever holds a pool's distributions whole. `CompressionSession` owns one `Measurer`; this module holds what measuring
does, the session what it measures with (the model, the pools, the stitching).
"""

from __future__ import annotations

import json
import logging
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from autocompress.files import write_atomically
from autocompress.metrics import REFERENCE_DTYPE, Metrics, dense_reference, evaluate, reference_pieces
from autocompress.size import SizeReport, model_size

if TYPE_CHECKING:
    from autocompress.plan import CompressionPlan
    from autocompress.session import CompressionSession
    from autocompress.students import ReportCallback

__all__ = ["Measurement", "Measurer", "StageCallback", "StoredLogProbs", "combine_metrics", "store_reference"]

log = logging.getLogger(__name__)

# (stage index, windows scored so far, metrics on them, size of the plan)
StageCallback = Callable[[int, int, Metrics, SizeReport], None]


@dataclass(frozen=True)
class Measurement:
    size: SizeReport
    metrics: Metrics  # on every window scored (the whole pool unless `stages` stopped short of it)
    stitch_s: float
    eval_s: float
    stages: tuple[tuple[int, Metrics], ...] = ()  # (windows scored so far, metrics on them) after each stage
    curve: tuple[tuple[int, float], ...] = ()  # a student's (training step, KL on the fitness pool)
    shape: dict[str, int] | None = None  # the architecture of the model measured (student or teacher)


def combine_metrics(parts: Sequence[Metrics], seq_len: int) -> Metrics:
    """The metrics of consecutive slices of one pool as if the pool had been scored at once."""
    tokens = sum(part.n_tokens for part in parts)
    predicted = [part.n_tokens // seq_len * (seq_len - 1) for part in parts]
    kl = None
    if all(part.kl is not None for part in parts):
        kl = sum(part.kl * part.n_tokens for part in parts) / tokens
    seconds = sum(part.n_tokens / part.tokens_per_s for part in parts if part.tokens_per_s not in (0, float("inf")))
    return Metrics(
        ce=sum(part.ce * count for part, count in zip(parts, predicted, strict=True)) / sum(predicted),
        kl=kl,
        tokens_per_s=tokens / seconds if seconds else float("inf"),
        n_tokens=tokens,
    )


# ---------------------------------------------------------------- references on disk

REFERENCE_KEY = "log_probs"  # the tensor's name in the file, as earlier caches named it
_SAFETENSORS_DTYPE = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}


class StoredLogProbs:
    """Log-probabilities [windows, seq_len, vocab] in a safetensors file of one tensor, read a piece at a time
    (`metrics.WindowLogProbs`); `[start:end]` is the same file seen from window `start` to `end`."""

    def __init__(self, path: Path, shape: tuple[int, int, int], data_start: int, first: int = 0) -> None:
        self.path = path
        self.shape = shape
        self._data_start = data_start
        self._first = first
        self._element = torch.empty((), dtype=REFERENCE_DTYPE).element_size()

    @classmethod
    def open(cls, path: Path, shape: Sequence[int]) -> StoredLogProbs | None:
        """The file's log-probabilities if it holds exactly `shape` of them in REFERENCE_DTYPE, whole; None when it
        is missing, of another shape, or unreadable (then it is computed again and rewritten whole)."""
        try:
            with path.open("rb") as file:
                (length,) = struct.unpack("<Q", file.read(8))
                if length > path.stat().st_size - 8:  # garbage read as a length: reading it could exhaust memory
                    raise ValueError(f"a header of {length} bytes in a file of {path.stat().st_size}")
                header = json.loads(file.read(length))
            entry = header[REFERENCE_KEY]
            begin, end = entry["data_offsets"]
            element = torch.empty((), dtype=REFERENCE_DTYPE).element_size()
            expected = (tuple(entry["shape"]) == tuple(shape)) and entry["dtype"] == _SAFETENSORS_DTYPE[REFERENCE_DTYPE]
            complete = path.stat().st_size >= 8 + length + end and end - begin == element * _count(shape)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, struct.error) as error:
            log.warning("reference file %s is unreadable (%s); computing it again", path, error)
            return None
        if not (expected and complete):
            return None
        windows, seq_len, vocab = shape
        return cls(path, (windows, seq_len, vocab), 8 + length + begin)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, windows: slice) -> StoredLogProbs:
        start, stop, step = windows.indices(self.shape[0])
        if step != 1:
            raise ValueError("stored log-probabilities are sliced by consecutive windows only")
        stop = max(start, stop)
        return StoredLogProbs(self.path, (stop - start, *self.shape[1:]), self._data_start, self._first + start)

    def rows(self, window: int, start: int, end: int) -> torch.Tensor:
        """Positions start..end-1 of window `window` (of this slice) [end - start, vocab], read from the file."""
        if not 0 <= window < self.shape[0]:
            raise IndexError(f"window {window} of {self.shape[0]}")
        _, seq_len, vocab = self.shape
        offset = self._data_start + (((self._first + window) * seq_len + start) * vocab) * self._element
        count = (end - start) * vocab
        with self.path.open("rb") as file:
            file.seek(offset)
            data = bytearray(file.read(count * self._element))
        return torch.frombuffer(data, dtype=REFERENCE_DTYPE).view(end - start, vocab)

    def read(self) -> torch.Tensor:
        """Every window at once (small vocabularies only: a large one's is gigabytes)."""
        _, seq_len, _ = self.shape
        return torch.stack([self.rows(window, 0, seq_len) for window in range(self.shape[0])])


def _count(shape: Sequence[int]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def store_reference(model: torch.nn.Module, tokens: torch.Tensor, batch_size: int, path: Path) -> StoredLogProbs:
    """The dense model's log-probabilities on `tokens` written to a safetensors file piece by piece as they are
    computed (atomically: a reader sees the whole file or none), and opened for reading."""
    shape = (*tokens.shape, model.config.vocab_size)
    element = torch.empty((), dtype=REFERENCE_DTYPE).element_size()
    entry = {"dtype": _SAFETENSORS_DTYPE[REFERENCE_DTYPE], "shape": list(shape), "data_offsets": [0, 0]}
    entry["data_offsets"][1] = element * _count(shape)
    header = json.dumps({REFERENCE_KEY: entry}).encode()
    header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned, as safetensors writes it

    def write(temporary: str) -> None:
        with open(temporary, "wb") as file:
            file.write(struct.pack("<Q", len(header)))
            file.write(header)
            for piece in reference_pieces(model, tokens, batch_size):
                file.write(piece.numpy().data)  # no copy: a piece of Gemma 3 is 64 MB in float16

    write_atomically(path, write)
    stored = StoredLogProbs.open(path, shape)
    if stored is None:
        raise OSError(f"{path}: the reference just written does not read back")
    return stored


# ---------------------------------------------------------------- measuring plans


Reference = torch.Tensor | StoredLogProbs


class Measurer:
    """Scores plans on a session's pools: each pool's dense reference computed once (kept on disk beside the
    study when the session has a cache folder, in memory otherwise), then a plan stitched (or a student trained)
    and evaluated against it."""

    def __init__(self, session: CompressionSession) -> None:
        self.session = session
        self._references: dict[str, Reference] = {}
        self.last_stitch_s = 0.0  # of the latest measure(), for a trial that staged fitness stops

    def reference(self, pool: str) -> Reference:
        """The dense model's log-probabilities on a pool ('fitness', 'heldout'), computed once."""
        if pool in self._references:
            return self._references[pool]
        session = self.session
        tokens = getattr(session.pools, pool)
        shape = (*tokens.shape, session.model.config.vocab_size)
        cache = session.cache_dir
        path = None if cache is None else cache / f"reference-{pool}.safetensors"
        reference: Reference | None = None if path is None else StoredLogProbs.open(path, shape)
        if reference is None:
            session.restore_dense()
            if path is None:
                reference = dense_reference(session.model, tokens, session.batch_size)
            else:
                reference = store_reference(session.model, tokens, session.batch_size, path)
        self._references[pool] = reference
        return reference

    def measure(
        self,
        plan: CompressionPlan,
        pool: str = "fitness",
        stages: Sequence[int] | None = None,
        on_stage: StageCallback | None = None,
        on_report: ReportCallback | None = None,
        start: int = 0,
    ) -> Measurement:
        """`CompressionSession.measure`."""
        session = self.session
        reference = self.reference(pool)  # first: computing it restores the dense weights
        if session.trains(plan):
            return self._measure_trained(plan, pool, reference, on_report)
        if plan.student is not None:  # a "student" of the teacher's own shape is the teacher
            plan = plan.model_copy(update={"student": None})
        tokens = getattr(session.pools, pool)
        stages = [len(tokens)] if stages is None else [min(count, len(tokens)) for count in stages]
        reuse = session.block_inputs if pool == "fitness" else None
        began = time.perf_counter()
        size = session.stitch(plan)
        stitched = time.perf_counter()
        self.last_stitch_s = stitched - began
        parts: list[Metrics] = []
        done: list[tuple[int, Metrics]] = []
        for index, end in enumerate(stages):
            if end > start:
                predictions_of = None if reuse is None else reuse.predictions_from(start)
                parts.append(
                    evaluate(
                        session.model,
                        tokens[start:end],
                        reference=reference[start:end],
                        batch_size=session.batch_size,
                        predictions_of=predictions_of,
                    )
                )
                start = end
            done.append((start, combine_metrics(parts, tokens.shape[1])))
            if on_stage is not None and index < len(stages) - 1:
                on_stage(index, start, done[-1][1], size)
        return Measurement(
            size, done[-1][1], stitch_s=stitched - began, eval_s=time.perf_counter() - stitched, stages=tuple(done)
        )

    def _measure_trained(
        self, plan: CompressionPlan, pool: str, reference: Reference, on_report: ReportCallback | None
    ) -> Measurement:
        from autocompress.students import without_training

        session = self.session
        began = time.perf_counter()
        trained = session.realize(plan, on_report)
        built = time.perf_counter()
        self.last_stitch_s = built - began
        own = model_size(trained.model, without_training(plan), session.target)
        size = SizeReport(own.total_bytes, session.dense_bytes, own.per_layer)  # a fraction of the teacher
        tokens = getattr(session.pools, pool)
        metrics = evaluate(trained.model, tokens, reference=reference, batch_size=session.batch_size)
        return Measurement(
            size,
            metrics,
            stitch_s=built - began,
            eval_s=time.perf_counter() - built,
            curve=tuple(trained.curve),
            shape=trained.shape,
        )
