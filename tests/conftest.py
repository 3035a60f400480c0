"""Shared fixtures: a tiny randomly initialized Llama with a word-level tokenizer, saved as a model folder."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from optuna.trial import TrialState
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from autocompress.config import Config

CLI = [sys.executable, "-c", "from autocompress.cli import main; main()"]
POSTGRES_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
TINY_WORDS = [f"w{index}" for index in range(200)]
SPECIAL_TOKENS = ["<unk>", "</s>"]


def tiny_llama_config(tie_word_embeddings: bool = True) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tie_word_embeddings,
        eos_token_id=1,
        bos_token_id=1,
        pad_token_id=None,
    )


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """One token per whitespace-separated word: `w0`..`w199`, plus `<unk>` (0) and `</s>` (1)."""
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + TINY_WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>")


def random_text(words: int, seed: int = 0) -> str:
    """`words` tokens of the tiny vocabulary, chosen at random (so token windows are all different)."""
    generator = random.Random(seed)
    return " ".join(generator.choice(TINY_WORDS) for _ in range(words))


def tiny_study_config(
    folder: Path,
    model_dir: Path,
    *,
    fitness: int = 4,
    calibration: int = 4,
    corpus_words: int = 8000,
    compression: dict | None = None,
    search: dict | None = None,
) -> dict:
    """A search config for a model folder on a random corpus written into `folder`: 32-token windows,
    Wanda + RTN in groups of 32, sparsity 0/0.3/0.6 and bits 4/8/16 per block, 10 trials, seed 0.
    `compression` and `search` override fields of their sections."""
    corpus = folder / "corpus.txt"
    corpus.write_text(random_text(corpus_words, seed=1))
    return {
        "model": {"name": str(model_dir), "device": "cpu"},
        "data": {
            "source": "files",
            "files": [str(corpus)],
            "seq_len": 32,
            "calibration": calibration,
            "fitness": fitness,
            "heldout": 4,
        },
        "compression": {"pruning": "wanda", "quantization": "rtn", "group_size": 32} | (compression or {}),
        "search": {"sparsity": [0.0, 0.3, 0.6], "bits": [4, 8, 16], "n_trials": 10, "seed": 0} | (search or {}),
    }


def write_yaml(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder `autocompress.models.load_model` loads: a seeded 2-block Llama (float32) and its tokenizer."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture
def tiny_model() -> LlamaForCausalLM:
    """A fresh, seeded tiny Llama in memory (no tokenizer), for tests that change its weights."""
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config()).eval()


@pytest.fixture
def untied_tiny_model() -> LlamaForCausalLM:
    """The tiny Llama with a separate lm_head instead of one tied to the embeddings."""
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=False)).eval()


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    """The tiny model's word-level tokenizer."""
    return tiny_tokenizer()


@pytest.fixture
def write_corpus(tmp_path: Path) -> Callable[..., Path]:
    """`write_corpus(words, name="corpus.txt", seed=0)`: a .txt file in tmp_path of `words` random tiny-vocabulary
    words (one token each), so its token windows are all different."""

    def write(words: int, name: str = "corpus.txt", seed: int = 0) -> Path:
        path = tmp_path / name
        path.write_text(random_text(words, seed), encoding="utf-8")
        return path

    return write


@pytest.fixture
def space_file(tmp_path: Path, tiny_model_dir: Path):
    """Write a search-space YAML for the tiny model, heartbeats every second and stale after 2; `fitness` sets
    how many fitness windows (so how long) a trial takes, keyword arguments override `search` fields."""

    def write(fitness: int = 4, **search: object) -> Path:
        search = {"heartbeat_interval": 1, "grace_period": 2} | search
        words = max(8000, 32 * (fitness + 16))
        config = tiny_study_config(tmp_path, tiny_model_dir, fitness=fitness, corpus_words=words, search=search)
        return write_yaml(tmp_path / "space.yaml", config)

    return write


def load_config(path: Path) -> Config:
    return Config.model_validate(yaml.safe_load(path.read_text()))


def complete_trials(study: optuna.Study) -> list:
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def wait_for(condition, timeout: float, what: str):
    """Poll `condition` until it returns something true, and return that; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def run_together(command: list[str], count: int = 2) -> None:
    """Run `count` copies of a CLI command at once, each to success."""
    processes = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(count)
    ]
    for process in processes:
        _, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr[-2000:]


def require(reason: str | None) -> None:
    """Skip for a missing optional piece, or fail under CI=true, where everything must be there."""
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI=true: this must run)")
    pytest.skip(reason)


def postgres_available() -> bool:
    try:
        import sqlalchemy

        with sqlalchemy.create_engine(POSTGRES_URL).connect():
            return True
    except Exception:
        return False


needs_postgres = pytest.mark.skipif(
    not os.environ.get("CI") and not postgres_available(),
    reason="no PostgreSQL server on 127.0.0.1:5432 (under CI=true this test fails instead)",
)
