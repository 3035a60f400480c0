"""From a study to a shipped model: export (compressed, hf, gguf), evaluate, report.html, and the safety checks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import optuna
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from autocompress.cli import main
from autocompress.config import Config
from autocompress.errors import UserError
from autocompress.frontier import frontier_points
from autocompress.methods import QuantSpec
from autocompress.methods.quantization import quantize_rtn
from autocompress.models import ALLOW_PICKLE_ENV, load_model
from autocompress.plan import CompressionPlan
from autocompress.record import StudyRecord, TrialRecord, trial_records
from autocompress.search import SearchSpace, StudyLocation, run_search
from autocompress.search.study import load_existing
from autocompress.sensitivity import study_sensitivity
from autocompress.session import CompressionSession
from autocompress.targets.artifact import load, read_manifest
from autocompress.targets.gguf.file import encode_blocks, gguf_type_for
from tests.conftest import random_text, tiny_tokenizer

QType = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny Llama wide enough that the safetensors header stays well under 2% of a compressed artifact."""
    folder = tmp_path_factory.mktemp("llama-256")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        eos_token_id=1,
        bos_token_id=1,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def study(tmp_path_factory, model_dir: Path):
    """A searched 6-trial study of per-block sparsity and bits; returns (results folder, location, config)."""
    folder = tmp_path_factory.mktemp("study")
    corpus = folder / "corpus.txt"
    corpus.write_text(random_text(6000, seed=3))
    raw = {
        "model": {"name": str(model_dir), "device": "cpu"},
        "data": {
            "source": "files",
            "files": [str(corpus)],
            "seq_len": 32,
            "calibration": 4,
            "fitness": 4,
            "heldout": 4,
        },
        "compression": {"pruning": "wanda", "quantization": "rtn", "group_size": 32},
        "search": {"sparsity": [0.0, 0.5], "bits": [4, 8, 16], "n_trials": 6, "seed": 0},
    }
    config_file = folder / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(raw))
    config = Config.model_validate(raw)
    location = StudyLocation.resolve("tiny", folder / "results")
    run_search(config, location, n_trials=6, progress=False)
    return {"results": folder / "results", "location": location, "config": config, "config_file": config_file}


def run_cli(capsys, *argv: object) -> str:
    main([str(arg) for arg in argv])
    return capsys.readouterr().out


def export(capsys, study, *argv: object) -> str:
    """`autocompress export --study tiny --results <the study's results> ...`; its standard output."""
    return run_cli(capsys, "export", "--study", "tiny", "--results", study["results"], *argv)


def refused(capsys, *argv: object) -> str:
    """Run the CLI expecting a one-line user error (exit code 2); return that line."""
    with pytest.raises(SystemExit) as exit_info:
        main([str(arg) for arg in argv])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("autocompress: error: "), lines
    return lines[0]


@pytest.fixture(scope="module")
def best_artifact(study, tmp_path_factory):
    """`export --pick best` into a fresh folder; returns its path and the frontier point it came from."""
    path = tmp_path_factory.mktemp("artifacts") / "best"
    main(["export", "--study", "tiny", "--results", str(study["results"]), "--pick", "best", "--out", str(path)])
    study_object, record = load_existing(study["location"])
    search = record.config.search
    best = frontier_points(record, trial_records(study_object), None, search.alpha, search.beta)[0]
    return {"path": path, "point": best, "study": study_object}


def test_export_best_then_evaluate_matches_the_frontier(study, best_artifact, capsys) -> None:
    figures = json.loads(run_cli(capsys, "evaluate", best_artifact["path"], "--json", "--new-tokens", 8))
    point = best_artifact["point"]
    assert abs(figures["size_on_disk_bytes"] - point.size_bytes) / point.size_bytes < 0.02
    assert abs(figures["heldout_ppl"] - point.heldout_ppl) / point.heldout_ppl < 0.01
    for key in ("heldout_ppl", "size_on_disk_bytes", "load_s", "tokens_per_s"):
        assert figures[key] > 0 and figures[f"dense_{key}"] > 0, key
    dense_ppl = StudyRecord.of(best_artifact["study"]).dense_heldout.ppl
    assert figures["dense_heldout_ppl"] == pytest.approx(dense_ppl, rel=1e-4)
    assert figures["trial"] == point.trial and figures["study"] == "tiny"

    provenance = read_manifest(best_artifact["path"])["provenance"]
    assert provenance["base_model"]["name"] == study["config"].model.name
    assert provenance["data"] == study["config"].data.model_dump(mode="json")
    assert provenance["metrics"]["size_bytes"] == point.size_bytes
    assert provenance["heldout"]["ppl"] == pytest.approx(point.heldout_ppl)
    assert provenance["export_fitness_loss"] == pytest.approx(provenance["metrics"]["loss"], rel=1e-4, abs=1e-6)


def test_evaluate_prints_a_table_and_takes_other_data(study, best_artifact, capsys, tmp_path) -> None:
    table = run_cli(capsys, "evaluate", best_artifact["path"], "--no-dense", "--new-tokens", 4)
    assert "held-out perplexity" in table and "tokens/s" in table
    other = tmp_path / "other.txt"
    other.write_text(random_text(3000, seed=11))
    data_file = tmp_path / "data.yaml"
    data_file.write_text(yaml.safe_dump({"data": {"source": "files", "files": [str(other)], "seq_len": 16}}))
    figures = json.loads(
        run_cli(capsys, "evaluate", best_artifact["path"], "--data", data_file, "--json", "--no-dense")
    )
    assert figures["heldout_tokens"] == 16 * 16 and "dense_heldout_ppl" not in figures


def test_evaluate_reports_kld_statistics_and_compares_against_another_artifact(
    study, best_artifact, capsys, tmp_path
) -> None:
    """Beside perplexity, the statistics llama-perplexity --kl-divergence reports, to the dense base; --against
    scores another export on the same windows and gives paired differences with bootstrap intervals."""
    other = tmp_path / "worst"
    worst = max((item for item in trial_records(best_artifact["study"]) if item.scored), key=lambda item: item.loss)
    export(capsys, study, "--trial", worst.number, "--out", other)
    figures = json.loads(
        run_cli(capsys, "evaluate", best_artifact["path"], "--json", "--new-tokens", 4, "--against", other)
    )
    for key in ("heldout_mean_kld", "heldout_kld_99_9", "heldout_median_kld", "heldout_same_top_p", "heldout_rms_dp"):
        assert figures[key] > 0 and figures["against"][key] > 0, key
    assert figures["heldout_median_kld"] <= figures["heldout_kld_99_9"] and figures["heldout_same_top_p"] <= 1
    compared = figures["comparison"]
    assert compared["windows"] == figures["heldout_windows"] == 4
    nll = compared["nll_per_token"]
    own, theirs = figures["heldout_ppl"], figures["against"]["heldout_ppl"]
    assert nll["delta"] == pytest.approx(np.log(own) - np.log(theirs), abs=1e-6)
    assert nll["ci_low"] <= nll["delta"] <= nll["ci_high"]
    kld = compared["kld_per_token"]
    assert kld["delta"] == pytest.approx(figures["heldout_mean_kld"] - figures["against"]["heldout_mean_kld"], abs=1e-6)
    assert "gap_closed" in compared
    table = run_cli(capsys, "evaluate", best_artifact["path"], "--new-tokens", 4, "--against", other)
    assert "99.9% KLD" in table and "same top p" in table and "RMS Δp" in table
    assert "artifact minus --against on the same 4 windows" in table


def test_export_a_given_trial_reproduces_its_logits(study, tmp_path, capsys) -> None:
    study_object, record = load_existing(study["location"])
    config = record.config
    trial = next(  # a plan that both prunes and quantizes when the search found one
        (t for t in study_object.trials if any(v == 0.5 for v in t.params.values()) and 4 in t.params.values()),
        study_object.trials[-1],
    )
    out = json.loads(export(capsys, study, "--trial", trial.number, "--out", tmp_path / "art", "--json"))
    assert out["trial"] == trial.number and out["format"] == "compressed"
    assert abs(out["weights_bytes"] - TrialRecord.of(trial).size_bytes) / TrialRecord.of(trial).size_bytes < 0.02

    session = CompressionSession(config, cache_dir=study["location"].cache_dir)
    space = SearchSpace(config, list(dict.fromkeys(linear.block for linear in session.linears)))
    plan = space.plan_from_params(trial.params)
    session.stitch(plan)
    loaded, tokenizer = load(tmp_path / "art")
    assert CompressionPlan.model_validate(read_manifest(tmp_path / "art")["plan"]) == plan
    tokens = session.pools.heldout
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens).logits, session.model(tokens).logits, rtol=0, atol=2e-3)
    generated = loaded.generate(tokens[:1, :8], max_new_tokens=4, do_sample=False, pad_token_id=1)
    assert generated.shape == (1, 12)
    assert tokenizer is not None


def test_export_refuses_what_it_cannot_do(study, best_artifact, capsys, tmp_path) -> None:
    common = ("export", "--study", "tiny", "--results", study["results"])
    assert "no trial 99" in refused(capsys, *common, "--trial", 99, "--out", tmp_path / "a")
    assert "go with --pick best" in refused(capsys, *common, "--trial", 0, "--alpha", 2, "--out", tmp_path / "b")
    assert "not empty" in refused(capsys, *common, "--pick", "best", "--out", best_artifact["path"])
    assert "no study storage" in refused(capsys, "export", "--study", "nope", "--pick", "best", "--out", tmp_path)
    assert "max-size" in refused(capsys, *common, "--pick", "best", "--max-size", "huge", "--out", tmp_path / "c")


def test_a_corrupted_artifact_is_refused_through_the_cli(best_artifact, capsys, tmp_path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(best_artifact["path"], broken)
    weights = broken / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert "checksum mismatch" in refused(capsys, "evaluate", broken)
    weights.write_bytes(bytes(data[: len(data) // 3]))
    assert "truncated or corrupted" in refused(capsys, "evaluate", broken, "--json")
    (broken / "manifest.json").unlink()
    assert "not an autocompress artifact" in refused(capsys, "evaluate", broken)


def test_format_hf_is_a_plain_folder_transformers_loads(study, best_artifact, capsys, tmp_path) -> None:
    trial = best_artifact["point"].trial
    path = tmp_path / "hf"
    export(capsys, study, "--trial", trial, "--out", path, "--format", "hf")
    dense = AutoModelForCausalLM.from_pretrained(path)
    loaded, _ = load(best_artifact["path"])
    assert dense.dtype == torch.float32  # the dense dtype of the study's model
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(dense(tokens).logits, loaded(tokens).logits, rtol=0, atol=2e-3)
    provenance = json.loads((path / "autocompress.json").read_text())
    assert provenance["format"] == "hf" and provenance["trial"] == trial and "plan" in provenance


def test_format_gguf_reads_back_with_the_expected_types(study, best_artifact, capsys, tmp_path) -> None:
    study_object, _ = load_existing(study["location"])
    trial = next(t for t in study_object.trials if 4 in t.params.values())  # some block at 4 bits, group size 32
    path = tmp_path / "gguf"
    export(capsys, study, "--trial", trial.number, "--out", path, "--format", "gguf")
    reader = gguf.GGUFReader(path / "model.gguf")
    types = {tensor.name: tensor.tensor_type for tensor in reader.tensors}
    assert "output.weight" not in types  # tied to token_embd, as llama.cpp expects
    assert types["token_embd.weight"] == QType.F16 and types["blk.0.attn_norm.weight"] == QType.F32
    for block in (0, 1):
        bits = trial.params.get(f"model.layers.{block}.bits", 16)
        expected = {4: QType.Q4_1, 8: None, 16: QType.F16}[bits]  # 8-bit asymmetric: Q8_0 or F16 (see serving)
        if expected is not None:
            assert types[f"blk.{block}.ffn_down.weight"] == expected, (block, bits)
    assert reader.fields["general.architecture"].contents() == "llama"
    plan = CompressionPlan.model_validate_json(reader.fields["autocompress.plan"].contents())
    assert plan.layers  # the plan travels in the file
    assert json.loads(reader.fields["autocompress.provenance"].contents())["trial"] == trial.number

    exported = AutoModelForCausalLM.from_pretrained(path, gguf_file="model.gguf", dtype=torch.float32)
    session = CompressionSession(study["config"], cache_dir=study["location"].cache_dir)
    space = SearchSpace(study["config"], list(dict.fromkeys(linear.block for linear in session.linears)))
    session.stitch(space.plan_from_params(trial.params))
    tokens = session.pools.heldout
    with torch.no_grad():
        torch.testing.assert_close(exported(tokens).logits, session.model(tokens).logits, rtol=0, atol=5e-3)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_gguf_blocks_decode_to_the_weights_the_model_computes_with(bits: int, symmetric: bool) -> None:
    weight = torch.randn(8, 128, generator=torch.Generator().manual_seed(bits))
    mask = torch.rand(8, 128, generator=torch.Generator().manual_seed(1)) > 0.4
    quantized = quantize_rtn(weight * mask, mask, QuantSpec(bits=bits, group_size=64, symmetric=symmetric))
    expected = (quantized.dequantize() * mask).numpy()
    qtype, reason = gguf_type_for(quantized, 128)
    if qtype is None:  # only asymmetric 8-bit codes may fall outside Q8_0's signed bytes
        assert bits == 8 and not symmetric and "signed byte" in reason
        return
    decoded = gguf.quants.dequantize(encode_blocks(quantized, mask, qtype), qtype)
    if qtype in (QType.Q4_1, QType.Q5_1):  # d·q + m: m = -scale·zero is rounded to float16
        np.testing.assert_allclose(decoded, expected, rtol=0, atol=2e-3 * np.abs(expected).max())
    else:
        np.testing.assert_array_equal(decoded, expected)
    assert (decoded[~mask.numpy()] == 0).all() or qtype in (QType.Q4_1, QType.Q5_1)


def test_gguf_refuses_groups_it_cannot_hold() -> None:
    weight = torch.randn(4, 96, generator=torch.Generator().manual_seed(0))
    assert gguf_type_for(quantize_rtn(weight, None, QuantSpec(4, 48, False)), 96)[0] is None
    assert gguf_type_for(quantize_rtn(weight, None, QuantSpec(4, -1, True)), 96)[0] == QType.Q4_0
    assert gguf_type_for(quantize_rtn(weight, None, QuantSpec(4, 64, True)), 96)[0] == QType.Q4_0  # 64 + 32
    ragged = torch.randn(4, 80, generator=torch.Generator().manual_seed(0))
    assert gguf_type_for(quantize_rtn(ragged, None, QuantSpec(4, 32, True)), 80)[0] is None


def test_report_writes_a_self_contained_html(study, capsys) -> None:
    printed = run_cli(capsys, "report", "--study", "tiny", "--results", study["results"])
    assert "report.html" in printed
    page = (study["location"].out_dir / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == 4  # frontier, allocation, history, sensitivity
    assert "<table" in page and "http://" not in page and "https://" not in page
    assert (study["location"].out_dir / "report.md").is_file()
    reopened = optuna.load_study(study_name="tiny", storage=study["location"].storage_url)
    profile = study_sensitivity(reopened, StudyRecord.of(reopened))
    assert profile["units"] == ["model.layers.0", "model.layers.1"]
    assert profile["setting"] == {"sparsity": 0.5, "bits": 4}
    assert all(value > 0 for value in profile["values"].values())


# --- pickle -------------------------------------------------------------------------------------------------------


@pytest.fixture
def pickled_model_dir(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.delenv(ALLOW_PICKLE_ENV, raising=False)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
    )
    folder = tmp_path / "pickled"
    config.save_pretrained(folder)
    torch.save(LlamaForCausalLM(config).state_dict(), folder / "pytorch_model.bin")
    tiny_tokenizer().save_pretrained(folder)
    assert (tmp_path / "pickled" / "pytorch_model.bin").is_file()
    return tmp_path / "pickled"


def test_pickled_checkpoints_are_refused_unless_allowed(pickled_model_dir: Path, monkeypatch) -> None:
    with pytest.raises(UserError, match=r"pickled weights \(pytorch_model.bin\).*--allow-pickle"):
        load_model(str(pickled_model_dir), device="cpu")
    model, _ = load_model(str(pickled_model_dir), device="cpu", allow_pickle=True)
    assert model.config.hidden_size == 32
    monkeypatch.setenv(ALLOW_PICKLE_ENV, "1")  # what --allow-pickle sets
    assert load_model(str(pickled_model_dir), device="cpu")[0].config.hidden_size == 32


def test_the_cli_refuses_pickle_in_one_line(pickled_model_dir: Path, tmp_path: Path, capsys) -> None:
    config = tmp_path / "pickled.yaml"
    config.write_text(yaml.safe_dump({"model": {"name": str(pickled_model_dir), "device": "cpu"}}))
    assert "--allow-pickle" in refused(capsys, "apply", config, "--sparsity", "0.5")
    assert Config.model_validate({"model": {"allow_pickle": True}}).model.allow_pickle
    assert "allow_pickle" not in Config().model_dump()["model"]  # old studies' fingerprints stay as they were
