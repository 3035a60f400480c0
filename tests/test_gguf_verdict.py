"""The main job's verdict: a gguf study searched under a preset's size ends with llama.cpp's judgement of the searched
file against the preset's (`targets.gguf.verdict`), the figures `evaluate --against` reports on the same files."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import pytest

from autocompress.cli import main
from autocompress.config import Config, load_config
from autocompress.targets.gguf.llama_cpp import llama_cpp_available
from autocompress.targets.gguf.verdict import budget_preset
from tests.conftest import CLI, require, tiny_study_config, write_yaml
from tests.test_gguf_export import SEQ_LEN, bpe_tokenizer, tiny_model

LEVELS = ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q8_0"]


def test_a_search_time_limit_is_read_from_the_config_in_seconds_or_as_a_duration(tmp_path: Path) -> None:
    raw = tiny_study_config(tmp_path, tmp_path / "model")
    assert Config.model_validate(raw | {"search": raw["search"] | {"timeout": "8m"}}).search.timeout == 480
    assert Config.model_validate(raw | {"search": raw["search"] | {"timeout": 90}}).search.timeout == 90
    with pytest.raises(ValueError, match="invalid duration '8 minutes'"):
        Config.model_validate(raw | {"search": raw["search"] | {"timeout": "8 minutes"}})


def test_the_main_job_searches_at_q4_k_ms_size_for_eight_minutes_without_the_source_grids_types() -> None:
    config = load_config(Path(__file__).parents[1] / "search_spaces" / "smollm2-q4km.yaml")
    assert budget_preset(config) == "q4_k_m" and config.search.generations is not None
    assert config.search.timeout == 480
    assert not {"q4_0", "q4_1"} & set(config.search.formats)


def test_a_search_under_a_preset_size_ends_with_llama_cpps_verdict_against_the_preset(tmp_path: Path) -> None:
    """`search` writes verdict.md, verdict.csv and verdict.png, and prints the table; the three files are in
    results/<study>/verdict/, and the searched file's figures equal `evaluate searched --against preset`'s; `report`
    reprints the verdict without judging again while the searched trial stands."""
    require(llama_cpp_available())
    model_dir = tmp_path / "model"
    tiny_model("mistral").save_pretrained(model_dir)
    bpe_tokenizer().save_pretrained(model_dir)
    generations = {"offspring": 4, "stages": [0.5, 1.0], "survivors": [2, 1]}
    search = {"sparsity": [0.0], "bits": [16], "formats": LEVELS, "budget": {"size": "q4_k_m"}, "seeds": "none"}
    raw = tiny_study_config(
        tmp_path,
        model_dir,
        compression={"target": "gguf", "granularity": "linear"},
        search=search | {"generations": generations, "loss": "kl", "n_trials": 14, "timeout": "5m"},
    )
    raw["data"] |= {"seq_len": SEQ_LEN, "heldout": 4}
    config = write_yaml(tmp_path / "verdict.yaml", raw)
    results = tmp_path / "results"
    ran = subprocess.run([*CLI, "search", str(config), "--results", str(results), "--quiet"], capture_output=True)
    assert ran.returncode == 0, ran.stderr.decode()[-2000:]
    out = results / "verdict"
    printed = ran.stdout.decode()
    assert "| preset | searched | gap closed | 95% CI |" in printed
    assert (out / "verdict.md").read_text().strip() in printed
    assert (out / "verdict.png").stat().st_size > 0
    with (out / "verdict.csv").open() as handle:
        rows = {row["file"].split(" (")[0].split(",")[0]: row for row in csv.DictReader(handle)}
    searched, preset, base = rows["searched"], rows["llama.cpp Q4_K_M"], rows["F16 base"]
    folder = out / "verdict"
    assert Path(searched["path"]) == folder / "searched" / "model.gguf"
    assert Path(preset["path"]) == folder / "q4_k_m" / "model.gguf"
    assert Path(base["path"]) == folder / "base-f16.gguf"
    assert int(searched["size_bytes"]) <= int(preset["size_bytes"]) < int(base["size_bytes"])
    assert searched["verdict"] in (
        "beats the preset",
        "loses to the preset",
        "ties with the preset (the 95% interval spans zero)",
    )
    assert searched["verdict"].split(" (")[0] in (out / "verdict.md").read_text()

    evaluated = subprocess.run(
        [*CLI, "evaluate", searched["path"], "--against", preset["path"], "--json"],
        capture_output=True,
        check=True,
    )
    result = json.loads(evaluated.stdout)
    compared = result["comparison"]
    assert float(searched["heldout_ppl"]) == pytest.approx(result["heldout_ppl"], rel=1e-9)
    assert float(preset["heldout_ppl"]) == pytest.approx(result["against"]["heldout_ppl"], rel=1e-9)
    assert float(searched["heldout_mean_kld"]) == pytest.approx(result["heldout_mean_kld"], rel=1e-9)
    assert float(searched["gap_closed"]) == pytest.approx(compared["gap_closed"], rel=1e-9)
    assert float(searched["gap_closed_ci_low"]) == pytest.approx(compared["gap_closed_ci_low"], rel=1e-9)
    assert float(searched["delta_nll_per_token"]) == pytest.approx(compared["nll_per_token"]["delta"], rel=1e-9)
    assert int(searched["windows_better"]) == compared["nll_per_token"]["windows_lower"]

    before = (out / "verdict.csv").stat().st_mtime_ns
    reported = subprocess.run(
        [*CLI, "report", "--study", "verdict", "--results", str(results), "--no-sensitivity"],
        capture_output=True,
        check=True,
    )
    assert "| preset | searched | gap closed | 95% CI |" in reported.stdout.decode()
    assert (out / "verdict.csv").stat().st_mtime_ns == before


def preset_budget_study(folder: Path, formats: list[str]) -> Path:
    """A config file of a generations study of a tiny Mistral under Q4_K_M's size with `formats` as its levels."""
    model_dir = folder / "model"
    tiny_model("mistral").save_pretrained(model_dir)
    bpe_tokenizer().save_pretrained(model_dir)
    generations = {"offspring": 2, "stages": [0.5, 1.0], "survivors": [2, 1]}
    search = {"sparsity": [0.0], "bits": [16], "formats": formats, "budget": {"size": "q4_k_m"}, "seeds": "none"}
    raw = tiny_study_config(
        folder, model_dir, compression={"target": "gguf"}, search=search | {"generations": generations, "loss": "kl"}
    )
    raw["data"] |= {"seq_len": SEQ_LEN, "heldout": 2}
    return write_yaml(folder / "verdict.yaml", raw)


@pytest.mark.parametrize(
    ("formats", "n_trials", "why"),
    [
        (LEVELS, 0, "no trial fit the budget's"),  # the search recorded nothing (a time limit too short)
        (["q3_k", "q5_k", "q6_k", "q8_0"], 2, "cannot reproduce its file: it gives model.layers.0.self_attn.q_proj"),
    ],
    ids=["no trial under the budget", "levels without the presets' types"],
)
def test_a_search_that_cannot_be_judged_ends_in_one_line_and_writes_no_verdict(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], formats: list[str], n_trials: int, why: str
) -> None:
    """The study stands (exit 0, its trials kept); the verdict it cannot have is said in one line, and not a file of
    it is written."""
    config = preset_budget_study(tmp_path, formats)
    results = tmp_path / "results"
    main(["search", str(config), "--results", str(results), "--n-trials", str(n_trials), "--quiet"])
    printed = capsys.readouterr().out.splitlines()
    (line,) = [line for line in printed if "llama.cpp verdict" in line]
    assert line.startswith("no llama.cpp verdict against Q4_K_M: ") and why in line
    assert not [path for path in (results / "verdict").iterdir() if path.name.startswith("verdict")]


def test_a_preset_budget_no_plan_of_the_levels_fits_is_refused_before_the_model_loads_or_a_study_is_stored(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Q2_K's file is smaller than every plan of q8_0 and f16: refused in one line from the model's config alone (the
    folder holds no weights), and no storage is written."""
    model_dir = tmp_path / "model"
    tiny_model("mistral").config.save_pretrained(model_dir)  # the config alone: loading the model would fail
    bpe_tokenizer().save_pretrained(model_dir)
    generations = {"offspring": 2, "stages": [0.5, 1.0], "survivors": [2, 1]}
    search = {"sparsity": [0.0], "bits": [16], "formats": ["q8_0", "f16"], "budget": {"size": "q2_k"}}
    raw = tiny_study_config(
        tmp_path, model_dir, compression={"target": "gguf"}, search=search | {"generations": generations}
    )
    config = write_yaml(tmp_path / "impossible.yaml", raw)
    results = tmp_path / "results"
    with pytest.raises(SystemExit) as exit_info:
        main(["search", str(config), "--results", str(results)])
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2
    assert line.startswith("autocompress: error: search.budget: the size budget of ") and "smallest plan" in line
    assert not results.exists()
