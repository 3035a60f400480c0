"""Text sources into three disjoint pools of token windows: calibration, fitness, held-out."""

from __future__ import annotations

import json

import pytest
import torch

import autocompress.data
from autocompress.config import DataConfig
from autocompress.data import embedded_texts, file_texts, load_texts, split_pools, token_pools, token_windows
from autocompress.errors import UserError

EOS = 1


def numbered_windows(count: int, seq_len: int = 4) -> torch.Tensor:
    """Windows whose first token is their index: every window is different, and says where it came from."""
    windows = torch.arange(count * seq_len).reshape(count, seq_len)
    windows[:, 0] = torch.arange(count)
    return windows


def window_ids(pool: torch.Tensor) -> set[int]:
    return set(pool[:, 0].tolist())


def files_config(*paths, **fields) -> DataConfig:
    return DataConfig(source="files", files=[str(path) for path in paths], **fields)


# --- windows ----------------------------------------------------------------------------------------------------


def test_texts_are_joined_with_the_end_of_sequence_token_and_cut_into_full_windows(tokenizer):
    windows = token_windows(["w1 w2", "w3"], tokenizer, seq_len=2)
    w1, w2, w3 = 3, 4, 5  # ids of the tiny vocabulary: <unk> 0, </s> 1, w0 2, w1 3...
    assert windows.tolist() == [[w1, w2], [EOS, w3]]  # the trailing </s> does not fill a window and is dropped
    assert windows.dtype == torch.long


def test_a_text_shorter_than_one_window_gives_no_window(tokenizer):
    assert token_windows(["w1 w2"], tokenizer, seq_len=8).shape == (0, 8)


# --- pools ------------------------------------------------------------------------------------------------------


def test_the_pools_have_the_configured_sizes():
    pools = split_pools(numbered_windows(20), calibration=5, fitness=3, heldout=4, seed=0)
    assert pools.calibration.shape == (5, 4)
    assert pools.fitness.shape == (3, 4)
    assert pools.heldout.shape == (4, 4)


def test_no_window_is_in_two_pools():
    pools = split_pools(numbered_windows(20), calibration=5, fitness=3, heldout=4, seed=0)
    calibration, fitness, heldout = map(window_ids, (pools.calibration, pools.fitness, pools.heldout))
    assert len(calibration) + len(fitness) + len(heldout) == 12
    assert not calibration & fitness
    assert not calibration & heldout
    assert not fitness & heldout


def test_pools_that_use_every_window_still_do_not_overlap():
    pools = split_pools(numbered_windows(12), calibration=5, fitness=3, heldout=4, seed=3)
    everything = window_ids(pools.calibration) | window_ids(pools.fitness) | window_ids(pools.heldout)
    assert everything == set(range(12))


def test_the_pools_are_the_same_for_the_same_seed():
    first = split_pools(numbered_windows(50), calibration=10, fitness=5, heldout=5, seed=7)
    again = split_pools(numbered_windows(50), calibration=10, fitness=5, heldout=5, seed=7)
    assert torch.equal(first.calibration, again.calibration)
    assert torch.equal(first.fitness, again.fitness)
    assert torch.equal(first.heldout, again.heldout)


def test_a_different_seed_draws_different_pools():
    first = split_pools(numbered_windows(50), calibration=10, fitness=5, heldout=5, seed=0)
    other = split_pools(numbered_windows(50), calibration=10, fitness=5, heldout=5, seed=1)
    assert not torch.equal(first.calibration, other.calibration)


def test_pools_are_drawn_from_the_whole_text_not_its_beginning():
    pools = split_pools(numbered_windows(100), calibration=10, fitness=5, heldout=5, seed=0)
    assert max(window_ids(pools.calibration) | window_ids(pools.fitness) | window_ids(pools.heldout)) >= 20


def test_too_little_text_is_a_user_error_naming_the_counts():
    with pytest.raises(
        UserError, match=r"gives 10 windows of 4 tokens.*ask for 12 \(calibration 5 \+ fitness 3 \+ heldout 4\)"
    ):
        split_pools(numbered_windows(10), calibration=5, fitness=3, heldout=4, seed=0)


# --- sources ----------------------------------------------------------------------------------------------------


def test_pools_from_a_txt_file_are_disjoint_windows_of_its_tokens(tokenizer, write_corpus):
    path = write_corpus(2000)
    config = files_config(path, seq_len=16, calibration=20, fitness=10, heldout=10, seed=0)
    pools = token_pools(config, tokenizer)
    assert pools.calibration.shape == (20, 16)
    assert pools.fitness.shape == (10, 16)
    assert pools.heldout.shape == (10, 16)
    rows = [tuple(row) for pool in (pools.calibration, pools.fitness, pools.heldout) for row in pool.tolist()]
    assert len(set(rows)) == 40  # random text: distinct windows, so none is shared between pools
    assert all(2 <= token <= 201 or token == EOS for row in rows for token in row)  # no <unk>


def test_the_same_config_gives_the_same_pools(tokenizer, write_corpus):
    path = write_corpus(2000)
    config = files_config(path, seq_len=16, calibration=20, fitness=10, heldout=10, seed=0)
    first, again = token_pools(config, tokenizer), token_pools(config, tokenizer)
    assert torch.equal(first.heldout, again.heldout)


def test_a_file_too_small_for_the_pools_is_a_user_error_naming_the_counts(tokenizer, write_corpus):
    path = write_corpus(100)  # 100 words + </s>: 6 windows of 16
    config = files_config(path, seq_len=16, calibration=4, fitness=2, heldout=2)
    with pytest.raises(UserError, match=r"gives 6 windows of 16 tokens, but the pools ask for 8"):
        token_pools(config, tokenizer)


def test_a_txt_file_is_one_text(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("w1 w2\nw3\n\nw4", encoding="utf-8")
    assert file_texts([str(path)], "text") == ["w1 w2\nw3\n\nw4"]


def test_a_jsonl_file_is_one_text_per_record_from_the_text_column(tmp_path):
    path = tmp_path / "a.jsonl"
    records = [{"body": "w1 w2", "id": 1}, {"body": "w3", "id": 2}]
    path.write_text("\n".join(json.dumps(record) for record in records) + "\n\n", encoding="utf-8")
    assert file_texts([str(path)], "body") == ["w1 w2", "w3"]


def test_several_files_are_read_in_order(tmp_path):
    (tmp_path / "a.txt").write_text("w1", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text('{"text": "w2"}\n', encoding="utf-8")
    config = files_config(tmp_path / "a.txt", tmp_path / "b.jsonl")
    assert load_texts(config) == ["w1", "w2"]


def test_a_jsonl_line_without_the_text_column_is_a_user_error_naming_file_and_line(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "w1"}\n{"body": "w2"}\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"a\.jsonl:2 is not a JSON object with 'text'"):
        file_texts([str(path)], "text")


def test_a_jsonl_line_that_is_not_json_is_a_user_error(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text("not json\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"a\.jsonl:1"):
        file_texts([str(path)], "text")


def test_a_missing_file_is_a_user_error_naming_it(tmp_path):
    with pytest.raises(UserError, match=r"cannot read .*missing\.txt"):
        file_texts([str(tmp_path / "missing.txt")], "text")


def test_a_file_that_is_not_utf8_is_a_user_error(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("café".encode("latin-1"))
    with pytest.raises(UserError, match=r"cannot read .*latin1\.txt"):
        file_texts([str(path)], "text")


def test_a_file_that_is_neither_txt_nor_jsonl_is_a_user_error(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("w1,w2", encoding="utf-8")
    with pytest.raises(UserError, match=r"a\.csv is neither \.txt nor \.jsonl"):
        file_texts([str(path)], "text")


def test_files_holding_only_whitespace_are_a_user_error(tmp_path):
    path = tmp_path / "blank.txt"
    path.write_text("  \n\n", encoding="utf-8")
    with pytest.raises(UserError, match="holds no text"):
        load_texts(files_config(path))


def test_the_files_source_needs_at_least_one_file():
    with pytest.raises(ValueError, match="at least one path"):
        DataConfig(source="files")


def test_the_embedded_pydoc_source_is_non_empty_english_text():
    texts = embedded_texts()
    assert len(texts) > 50
    assert sum(len(text) for text in texts) > 100_000
    assert all(isinstance(text, str) for text in texts)
    assert any("def" in text for text in texts)


def test_the_default_source_is_the_embedded_pydoc_text():
    assert DataConfig().source == "pydoc"
    assert load_texts(DataConfig()) == embedded_texts()


# --- a dataset split ---------------------------------------------------------------------------------------------


def write_dataset(folder, records: int):
    """A local dataset folder (what `datasets.load_dataset(path)` reads, as it reads a hub dataset): record i is
    15 times the word w{i // 20}, so a window's words say which part of the split it came from."""
    folder.mkdir()
    lines = [json.dumps({"text": " ".join([f"w{index // 20}"] * 15), "id": index}) for index in range(records)]
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def dataset_config(folder, **fields) -> DataConfig:
    return DataConfig(source="dataset", dataset=str(folder), **{"seq_len": 16, "calibration": 20, **fields})


def test_pools_from_a_dataset_split_are_disjoint_full_windows(tokenizer, tmp_path):
    pools = token_pools(dataset_config(write_dataset(tmp_path / "set", 4000), fitness=10, heldout=10), tokenizer)
    assert (pools.calibration.shape, pools.fitness.shape, pools.heldout.shape) == ((20, 16), (10, 16), (10, 16))
    assert 0 not in pools.calibration  # no <unk>: every word was in the vocabulary


def test_a_dataset_split_is_sampled_across_its_records_and_tokenized_only_as_far_as_the_pools_need(
    tokenizer, tmp_path, monkeypatch
):
    tokenized = []
    original = autocompress.data.joined_ids
    monkeypatch.setattr(
        autocompress.data, "joined_ids", lambda texts, tok: tokenized.extend(texts) or original(texts, tok)
    )
    pools = token_pools(dataset_config(write_dataset(tmp_path / "set", 4000), fitness=10, heldout=10), tokenizer)
    assert len(tokenized) == autocompress.data.DATASET_BATCH  # 40 windows of 16 need 40 records of 16 tokens
    words = {int(token) - 2 for pool in (pools.calibration, pools.fitness, pools.heldout) for token in pool.flatten()}
    assert max(words - {-1}) > 100, "records from the whole split, not its first few hundred"


def test_the_same_dataset_and_seed_give_the_same_pools_and_another_seed_others(tokenizer, tmp_path):
    folder = write_dataset(tmp_path / "set", 4000)
    first, again = (token_pools(dataset_config(folder), tokenizer) for _ in range(2))
    other = token_pools(dataset_config(folder, seed=1), tokenizer)
    assert torch.equal(first.calibration, again.calibration)
    assert not torch.equal(first.calibration, other.calibration)


def test_a_dataset_split_too_small_for_the_pools_is_a_user_error_naming_the_counts(tokenizer, tmp_path):
    with pytest.raises(UserError, match=r"gives 15 windows of 16 tokens, but the pools ask for 52"):
        token_pools(dataset_config(write_dataset(tmp_path / "set", 15)), tokenizer)


def test_a_dataset_that_cannot_be_loaded_or_lacks_the_column_is_a_user_error_naming_it(tokenizer, tmp_path):
    with pytest.raises(UserError, match=r"dataset '.*missing' cannot be loaded"):
        token_pools(dataset_config(tmp_path / "missing"), tokenizer)
    with pytest.raises(UserError, match=r"has no column 'body'; it has \['text', 'id'\]"):
        token_pools(dataset_config(write_dataset(tmp_path / "set", 10), text_column="body"), tokenizer)
