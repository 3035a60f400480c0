"""Text sources (the embedded default, a Hugging Face dataset, local files) into three disjoint token pools."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedTokenizerBase

from autocompress.errors import UserError

if TYPE_CHECKING:
    import datasets

    from autocompress.config import DataConfig

DATASET_BATCH = 256  # records tokenized at once from a dataset split


@dataclass(frozen=True)
class TokenPools:
    """Fixed-length token windows [n, seq_len]: calibration feeds the methods, fitness scores trials,
    held-out judges the final frontier. No window appears in two pools."""

    calibration: torch.Tensor
    fitness: torch.Tensor
    heldout: torch.Tensor

    def digest(self) -> str:
        """A hash of every token of the three pools: what the text sources (files, a dataset at whatever
        revision, the embedded docs), the tokenizer and the split gave, so that an edited corpus file or a
        changed dataset changes it."""
        digest = hashlib.sha256()
        for pool in (self.calibration, self.fitness, self.heldout):
            digest.update(str(tuple(pool.shape)).encode())
            digest.update(pool.to(torch.int64).contiguous().numpy().tobytes())
        return digest.hexdigest()


def embedded_texts() -> list[str]:
    """CPython's own English documentation, shipped in the stdlib: no download needed."""
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def load_dataset_split(name: str, config: str | None, split: str, text_column: str) -> datasets.Dataset:
    import datasets

    try:
        dataset = datasets.load_dataset(name, config, split=split)
    except Exception as error:  # datasets raises many unrelated types for a missing or unreachable set
        raise UserError(f"data: dataset {name!r} cannot be loaded: {str(error).splitlines()[0]}") from error
    if text_column not in dataset.column_names:
        raise UserError(f"data: dataset {name!r} has no column {text_column!r}; it has {dataset.column_names}")
    return dataset


def sampled_dataset_windows(
    dataset: datasets.Dataset,
    text_column: str,
    tokenizer: PreTrainedTokenizerBase,
    seq_len: int,
    needed: int,
    seed: int,
) -> torch.Tensor:
    """Windows from the records of a dataset split in a seeded order, tokenized only until `needed` windows are
    filled: a split of millions of records is sampled, not tokenized whole, to cut a few dozen windows."""
    ids: list[int] = []
    for batch in dataset.shuffle(seed=seed).iter(batch_size=DATASET_BATCH):
        ids.extend(joined_ids([text for text in batch[text_column] if text], tokenizer))
        if len(ids) >= needed * seq_len:
            break
    return windows_of(ids, seq_len)


def file_texts(paths: list[str], text_column: str) -> list[str]:
    """Whole .txt files, or one record per line of .jsonl files (its `text_column` field)."""
    texts = []
    for raw in paths:
        path = Path(raw)
        try:
            content = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise UserError(f"data: cannot read {path}: {error}") from error
        if path.suffix == ".jsonl":
            for number, line in enumerate(content.splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    texts.append(str(json.loads(line)[text_column]))
                except (json.JSONDecodeError, KeyError, TypeError) as error:
                    raise UserError(f"data: {path}:{number} is not a JSON object with {text_column!r}") from error
        elif path.suffix == ".txt":
            texts.append(content)
        else:
            raise UserError(f"data: {path} is neither .txt nor .jsonl")
    return texts


def load_texts(config: DataConfig) -> list[str]:
    """The texts of the pydoc or files source, whole: both are small enough to tokenize entirely."""
    texts = embedded_texts() if config.source == "pydoc" else file_texts(config.files, config.text_column)
    if not any(text.strip() for text in texts):
        raise UserError(f"data: the {config.source} source holds no text")
    return texts


def joined_ids(texts: list[str], tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The texts' tokens, each text followed by the end-of-sequence token."""
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    for encoded in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]:
        ids.extend(encoded)
        ids.extend(separator)
    return ids


def windows_of(ids: list[int], seq_len: int) -> torch.Tensor:
    count = len(ids) // seq_len
    return torch.tensor(ids[: count * seq_len], dtype=torch.long).reshape(count, seq_len)


def token_windows(texts: list[str], tokenizer: PreTrainedTokenizerBase, seq_len: int) -> torch.Tensor:
    """All texts tokenized, joined with the end-of-sequence token, cut into windows of seq_len tokens."""
    return windows_of(joined_ids(texts, tokenizer), seq_len)


def split_pools(windows: torch.Tensor, calibration: int, fitness: int, heldout: int, seed: int) -> TokenPools:
    """A seeded shuffle of the windows, cut into three disjoint pools."""
    needed = calibration + fitness + heldout
    if needed > len(windows):
        raise UserError(
            f"data: the text gives {len(windows)} windows of {windows.shape[1]} tokens, "
            f"but the pools ask for {needed} (calibration {calibration} + fitness {fitness} + heldout {heldout})"
        )
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(seed))
    return TokenPools(
        calibration=windows[order[:calibration]],
        fitness=windows[order[calibration : calibration + fitness]],
        heldout=windows[order[calibration + fitness : needed]],
    )


def token_pools(config: DataConfig, tokenizer: PreTrainedTokenizerBase) -> TokenPools:
    needed = config.calibration + config.fitness + config.heldout
    if config.source == "dataset":
        dataset = load_dataset_split(config.dataset, config.dataset_config, config.split, config.text_column)
        windows = sampled_dataset_windows(dataset, config.text_column, tokenizer, config.seq_len, needed, config.seed)
    else:
        windows = token_windows(load_texts(config), tokenizer, config.seq_len)
    return split_pools(windows, config.calibration, config.fitness, config.heldout, config.seed)
