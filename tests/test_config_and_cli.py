"""The study config and the `autocompress` command: bad input is one line on stderr and exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from autocompress.cli import main
from autocompress.config import Config, load_config
from autocompress.errors import UserError

ERROR_PREFIX = "autocompress: error:"


def write_config(folder: Path, config: dict | str, name: str = "study.yaml") -> Path:
    path = folder / name
    path.write_text(config if isinstance(config, str) else yaml.safe_dump(config), encoding="utf-8")
    return path


def tiny_config(model_dir: Path, corpus: Path, **data: object) -> dict:
    """A config for the tiny model on a generated text file, small enough to run in a second."""
    pools = {"seq_len": 16, "calibration": 4, "fitness": 2, "heldout": 4, "batch_size": 4}
    return {
        "model": {"name": str(model_dir), "device": "cpu"},
        "data": {"source": "files", "files": [str(corpus)], **pools, **data},
    }


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run `autocompress ARGV` in this process: (exit code, stdout, stderr)."""
    try:
        main(argv)
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def error_line(code: int, err: str) -> str:
    """The one error line of a failed run; fails unless it exited 2 with exactly that line and no traceback."""
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(ERROR_PREFIX)
    return lines[0]


# --- the config alone -------------------------------------------------------------------------------------------


def test_an_empty_mapping_is_the_embedded_default_config(tmp_path):
    config = load_config(write_config(tmp_path, {}))
    assert config == Config()
    assert (config.model.name, config.data.source) == ("smollm2-135m", "pydoc")


def test_the_demo_search_space_is_a_valid_config():
    demo = Path(__file__).parent.parent / "search_spaces" / "smollm2-demo.yaml"
    assert load_config(demo).model.name == "smollm2-135m"


@pytest.mark.parametrize(
    "path", sorted((Path(__file__).parent.parent / "search_spaces").glob("*.yaml")), ids=lambda path: path.name
)
def test_every_shipped_search_space_is_a_valid_config(path: Path) -> None:
    assert load_config(path).search.n_trials >= 1


def test_an_unknown_field_is_named(tmp_path):
    path = write_config(tmp_path, {"model": {"nmae": "x"}})
    with pytest.raises(UserError, match=r"study\.yaml: model\.nmae: Extra inputs are not permitted"):
        load_config(path)


def test_an_unknown_section_is_named(tmp_path):
    with pytest.raises(UserError, match=r"study\.yaml: pruning: Extra inputs"):
        load_config(write_config(tmp_path, {"pruning": {"method": "wanda"}}))


def test_an_out_of_range_value_is_named_with_its_bound(tmp_path):
    with pytest.raises(UserError, match=r"data\.seq_len: Input should be greater than or equal to 8"):
        load_config(write_config(tmp_path, {"data": {"seq_len": 4}}))


def test_a_compression_choice_the_plan_rejects_is_named(tmp_path):
    with pytest.raises(UserError, match=r"compression\.pruning: unknown pruning method 'prune-it'"):
        load_config(write_config(tmp_path, {"compression": {"pruning": "prune-it"}}))


def test_an_incomplete_data_source_is_named(tmp_path):
    with pytest.raises(UserError, match=r"data: source 'files' needs at least one path in data\.files"):
        load_config(write_config(tmp_path, {"data": {"source": "files"}}))


def test_several_problems_report_the_first_and_count_the_rest(tmp_path):
    with pytest.raises(UserError, match=r"\(and 1 more\)$"):
        load_config(write_config(tmp_path, {"data": {"seq_len": 4, "calibration": 0}}))


def test_a_missing_config_file_is_named(tmp_path):
    with pytest.raises(UserError, match=r"config .*missing\.yaml: cannot read it"):
        load_config(tmp_path / "missing.yaml")


def test_invalid_yaml_is_reported_with_its_line(tmp_path):
    with pytest.raises(UserError, match=r"study\.yaml: invalid YAML at line 3"):
        load_config(write_config(tmp_path, "model:\n  name: x\n   dtype: float32\n"))


def test_a_config_that_is_not_a_mapping_is_refused(tmp_path):
    with pytest.raises(UserError, match="expected a mapping of sections"):
        load_config(write_config(tmp_path, "- model\n- data\n"))


# --- the command: bad input -------------------------------------------------------------------------------------


def test_an_unknown_config_field_exits_2_with_one_line_naming_it(tmp_path, capsys):
    path = write_config(tmp_path, {"data": {"seq_lenght": 64}})
    code, out, err = run_main(["apply", str(path)], capsys)
    assert "data.seq_lenght" in error_line(code, err)
    assert out == ""


def test_an_out_of_range_value_exits_2_with_one_line_naming_it(tmp_path, capsys):
    code, _, err = run_main(["apply", str(write_config(tmp_path, {"data": {"heldout": 0}}))], capsys)
    assert "data.heldout: Input should be greater than or equal to 1" in error_line(code, err)


def test_a_missing_config_file_exits_2_with_one_line_naming_it(tmp_path, capsys):
    code, _, err = run_main(["apply", str(tmp_path / "nowhere.yaml")], capsys)
    line = error_line(code, err)
    assert "nowhere.yaml" in line
    assert "cannot read" in line


def test_invalid_yaml_exits_2_with_one_line_naming_it(tmp_path, capsys):
    code, _, err = run_main(["apply", str(write_config(tmp_path, "data: {seq_len: 8\n"))], capsys)
    assert "invalid YAML" in error_line(code, err)


def test_an_unknown_model_exits_2_with_one_line_naming_it(tmp_path, capsys, write_corpus):
    missing = tmp_path / "no-such-model"
    path = write_config(tmp_path, tiny_config(missing, write_corpus(500)))
    code, _, err = run_main(["apply", str(path)], capsys)
    line = error_line(code, err)
    assert f"model: folder {missing} not found" in line


def test_unreadable_data_exits_2_with_one_line_naming_it(tmp_path, capsys, tiny_model_dir):
    path = write_config(tmp_path, tiny_config(tiny_model_dir, tmp_path / "no-such-text.txt"))
    code, _, err = run_main(["apply", str(path), "--json"], capsys)
    line = error_line(code, err)
    assert "cannot read" in line
    assert "no-such-text.txt" in line


def test_too_little_data_exits_2_with_one_line_naming_the_counts(tmp_path, capsys, tiny_model_dir, write_corpus):
    path = write_config(tmp_path, tiny_config(tiny_model_dir, write_corpus(50)))
    code, _, err = run_main(["apply", str(path), "--json"], capsys)
    assert "gives 3 windows of 16 tokens, but the pools ask for 10" in error_line(code, err)


def test_an_invalid_bit_width_exits_2_with_one_line_naming_it(tmp_path, capsys):
    code, _, err = run_main(["apply", str(write_config(tmp_path, {})), "--bits", "7"], capsys)
    assert "plan: bits: Input should be 2, 3, 4, 5, 6, 8 or 16" in error_line(code, err)


def test_an_unknown_method_exits_2_with_one_line_listing_the_known_ones(tmp_path, capsys):
    code, _, err = run_main(["apply", str(write_config(tmp_path, {})), "--method", "zip"], capsys)
    line = error_line(code, err)
    assert "--method: unknown method 'zip'" in line
    assert "wanda" in line
    assert "rtn" in line


def test_an_unreadable_plan_file_exits_2_with_one_line_naming_it(tmp_path, capsys):
    argv = ["apply", str(write_config(tmp_path, {})), "--plan", str(tmp_path / "plan.json")]
    code, _, err = run_main(argv, capsys)
    assert "--plan: cannot read" in error_line(code, err)


def test_an_invalid_plan_file_exits_2_with_one_line_naming_the_field(tmp_path, capsys):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"default": {"sparsity": 1.5}}), encoding="utf-8")
    code, _, err = run_main(["apply", str(write_config(tmp_path, {})), "--plan", str(plan)], capsys)
    assert "plan: default.sparsity" in error_line(code, err)


def test_the_installed_command_reports_a_bad_config_in_one_line_without_a_traceback(tmp_path):
    path = write_config(tmp_path, {"model": {"dtype": "float32", "colour": "blue"}})
    command = [sys.executable, "-c", "from autocompress.cli import main; main()", "apply", str(path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        f"{ERROR_PREFIX} config {path}: model.colour: Extra inputs are not permitted"
    ]


# --- the command: apply -----------------------------------------------------------------------------------------

RESULT_KEYS = {"dense_ppl", "heldout_ppl", "kl", "size_bytes", "size_ratio"}


@pytest.fixture
def tiny_study(tmp_path, tiny_model_dir, write_corpus) -> Path:
    return write_config(tmp_path, tiny_config(tiny_model_dir, write_corpus(2000)))


def apply_json(argv: list[str], capsys) -> dict:
    code, out, err = run_main(["apply", *argv, "--json"], capsys)
    assert code == 0, err
    return json.loads(out)


def test_apply_with_an_identity_plan_prints_json_with_zero_kl_and_full_size(tiny_study, capsys):
    result = apply_json([str(tiny_study)], capsys)
    assert set(result) >= RESULT_KEYS
    assert result["kl"] == pytest.approx(0.0, abs=1e-9)
    assert result["size_ratio"] == 1.0
    assert result["size_bytes"] == 2 * 90_432  # every parameter of the tiny model, in 16 bits, embeddings once
    assert result["heldout_ppl"] == pytest.approx(result["dense_ppl"])
    assert 100 < result["dense_ppl"] < 1000  # a random model on a 202-word vocabulary: close to uniform


def test_apply_with_sparsity_and_bits_costs_some_kl_and_saves_size(tiny_study, capsys):
    result = apply_json([str(tiny_study), "--sparsity", "0.5", "--bits", "4", "--method", "magnitude"], capsys)
    assert result["kl"] > 0
    assert result["size_ratio"] < 0.75
    assert result["heldout_ppl"] != result["dense_ppl"]


def test_apply_reads_a_plan_file(tiny_study, tmp_path, capsys):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"layers": {"model.layers.1": {"bits": 8}}, "group_size": -1}), encoding="utf-8")
    result = apply_json([str(tiny_study), "--plan", str(plan)], capsys)
    quantized = [name for name, size in result["per_layer_bytes"].items() if name.startswith("model.layers.1.")]
    assert len(quantized) == 7
    assert result["per_layer_bytes"]["model.layers.0.mlp.down_proj"] == 64 * 128 * 2
    assert result["per_layer_bytes"]["model.layers.1.mlp.down_proj"] == 64 * 128 + 64 * 2 + 64
    assert 0 < result["kl"] < 0.01


def test_apply_without_json_prints_a_readable_summary(tiny_study, capsys):
    code, out, _ = run_main(["apply", str(tiny_study)], capsys)
    assert code == 0
    assert "dense held-out perplexity" in out
    assert "KL to dense" in out
    assert "100.0% of fp16" in out
