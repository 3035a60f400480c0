"""A `compression.target: gguf` study from end to end: llama.cpp's presets seeded beside the searched mixes, every
size the exact bytes of the file, and `export` writing the very blocks the search scored, which llama.cpp runs as
we measured them."""

from __future__ import annotations

import subprocess
from pathlib import Path

import gguf
import optuna
import pytest

from autocompress.config import load_config
from autocompress.metrics import log_probs
from autocompress.record import StudyLocation, StudyRecord, scored_records
from autocompress.search.space import SearchSpace
from autocompress.session import CompressionSession
from autocompress.targets.gguf.llama_cpp import llama_cpp_available
from tests.conftest import CLI, tiny_study_config, write_yaml
from tests.test_gguf_export import (
    SEQ_LEN,
    activation_rounding,
    bpe_tokenizer,
    kl,
    llama_cpp_log_probs,
    require,
    tiny_model,
)

LEVELS = ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q8_0"]


def size_budget_config(folder: Path, size: str, compression: dict | None = None, **search: object) -> dict:
    """A tiny Mistral saved into `folder` as a gguf study in generations under the size budget `size`."""
    model_dir = folder / "model"
    tiny_model("mistral").save_pretrained(model_dir)
    bpe_tokenizer().save_pretrained(model_dir)
    generations = {"offspring": 4, "stages": [0.5, 1.0], "survivors": [2, 1]}
    levels = {"sparsity": [0.0], "bits": [16], "formats": LEVELS, "budget": {"size": size}}
    raw = tiny_study_config(
        folder,
        model_dir,
        compression={"target": "gguf"} | (compression or {}),
        search=levels | {"generations": generations, "loss": "kl"} | search,
    )
    raw["data"] |= {"seq_len": SEQ_LEN, "heldout": 2}
    return raw


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 12-trial gguf study (the 9 presets, 3 sampled mixes) of a tiny Mistral (rows of 256 and 512: every K-type
    fits) with a byte-level BPE tokenizer, run by the CLI; returns its config file and results folder."""
    folder = tmp_path_factory.mktemp("gguf-study")
    model_dir = folder / "model"
    tiny_model("mistral").save_pretrained(model_dir)
    bpe_tokenizer().save_pretrained(model_dir)
    raw = tiny_study_config(
        folder,
        model_dir,
        compression={"target": "gguf", "granularity": "linear"},
        search={"sparsity": [0.0], "bits": [16], "formats": LEVELS, "seeds": "none", "n_trials": 12, "loss": "kl"},
    )
    raw["data"] |= {"seq_len": SEQ_LEN, "heldout": 2}
    config = write_yaml(folder / "gguf.yaml", raw)
    results = folder / "results"
    subprocess.run([*CLI, "search", str(config), "--results", str(results), "--quiet"], check=True)
    return config, results


def study_record(results: Path) -> tuple[optuna.Study, StudyRecord, StudyLocation]:
    location = StudyLocation.resolve("gguf", results, None)
    study = optuna.load_study(study_name="gguf", storage=location.storage_url)
    return study, StudyRecord.of(study), location


def test_the_presets_are_seeded_beside_the_searched_mixes(study: tuple[Path, Path]) -> None:
    _config, results = study
    optuna_study, record, _location = study_record(results)
    trials = scored_records(optuna_study)
    baselines = {trial.baseline for trial in trials if trial.baseline}
    assert {"llama.cpp q2_k", "llama.cpp q3_k_m", "llama.cpp q4_k_m", "llama.cpp q6_k"} <= baselines
    assert any(not trial.seed for trial in trials)  # and sampled mixes
    assert record.units[-2:] == ["model.embed_tokens", "lm_head"]  # the embedding and output are units
    assert record.dense_bytes > max(trial.size_bytes for trial in trials)  # the F16 file's


def test_every_block_a_trial_may_take_was_built_before_the_trials(study: tuple[Path, Path]) -> None:
    _config, results = study
    _study, record, _location = study_record(results)
    stored = {(path.parent.name, path.stem) for path in results.rglob("gguf/*/*.npy")}
    levels = [*LEVELS, "f16"]  # bits [16]: a unit may stay at the F16 file's type
    assert stored == {(unit, level) for unit in record.units for level in levels}  # one tensor per unit here


def test_the_exported_file_is_the_measured_model_at_the_promised_size(study: tuple[Path, Path]) -> None:
    """Its types are the plan's, its size within 0.5% of the trial's (the provenance is what differs), and the
    model llama.cpp reads computes what the search scored: llama.cpp's next-token distributions differ from ours
    only by the 8-bit rounding its kernels apply to activations (measured on our model: `floor`)."""
    config_path, results = study
    optuna_study, record, location = study_record(results)
    chosen = min(scored_records(optuna_study), key=lambda trial: trial.size_bytes)
    out = results / "export"
    command = [*CLI, "export", "--study", "gguf", "--results", str(results), "--trial", str(chosen.number)]
    subprocess.run([*command, "--out", str(out), "--format", "gguf"], check=True, capture_output=True)
    path = out / "model.gguf"
    assert abs(path.stat().st_size - chosen.size_bytes) <= 0.005 * chosen.size_bytes

    plan = SearchSpace.of_record(record).plan_from_params(chosen.params)
    stored = {tensor.name: tensor.tensor_type.name.lower() for tensor in gguf.GGUFReader(path).tensors}
    assert stored["blk.1.ffn_down.weight"] == plan.setting("model.layers.1.mlp.down_proj", "model.layers.1").format
    assert stored["token_embd.weight"] == plan.layers["model.embed_tokens"].format

    require(llama_cpp_available())
    session = CompressionSession(load_config(config_path), cache_dir=location.cache_dir)
    session.stitch(plan)
    tokens = session.pools.fitness
    ours = log_probs(session.model, tokens)
    types = {f"{tensor.module}.weight": level for tensor, level in levels(session, plan)}
    hooks = activation_rounding(session.model, types)
    floor = kl(log_probs(session.model, tokens), ours)
    for hook in hooks:
        hook.remove()
    theirs = llama_cpp_log_probs(path, tokens)
    print(f"llama.cpp vs the search's model: KL {kl(theirs, ours):.1e}, 8-bit activation floor {floor:.1e}")
    assert kl(theirs, ours) <= max(1e-3, 1.25 * floor)


def levels(session: CompressionSession, plan) -> list:
    chosen = session.weights.levels(plan)
    return [(tensor, chosen[tensor.unit]) for tensor in session.weights.tensors]


def test_a_gguf_study_exports_only_gguf(study: tuple[Path, Path], tmp_path: Path) -> None:
    _config, results = study
    command = [
        *CLI,
        "export",
        "--study",
        "gguf",
        "--results",
        str(results),
        "--trial",
        "0",
        "--out",
        str(tmp_path / "out"),
    ]
    result = subprocess.run([*command, "--format", "compressed"], capture_output=True, text=True)
    assert result.returncode == 2
    assert "which only gguf stores" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_size_budget_searches_gguf_types_under_a_byte_ceiling(tmp_path: Path) -> None:
    """Generations over GGUF types at most 30% of the F16 file's bytes, the presets seeded beside the uniform mix."""
    from autocompress.config import Config
    from autocompress.record import TrialRecord
    from autocompress.search import run_search

    raw = size_budget_config(tmp_path, "30%", compression={"granularity": "linear"})
    study = run_search(
        Config.model_validate(raw), StudyLocation.resolve("size", tmp_path / "results"), n_trials=16, progress=False
    )
    records = scored_records(study)
    ceiling = int(0.3 * StudyRecord.of(study).dense_bytes)
    assert len(records) >= 16
    assert any(record.baseline == "uniform" for record in records)
    assert any((record.baseline or "").startswith("llama.cpp") for record in records)
    fitted = [record for record in records if (record.baseline or "").endswith("fitted under the budget")]
    assert len(fitted) == 1 and fitted[0].size_bytes <= ceiling  # the smallest preset over 30%, a few units lower
    # Seeds run in the order they help: the plans at the ceiling, the presets under it largest first (possible
    # parents), then the one preset over it that the fitted seed comes from; larger presets are not scored at all.
    seeds = sorted((record for record in records if record.seed), key=lambda record: record.number)
    assert [record.baseline for record in seeds[:2]] == [fitted[0].baseline, "uniform"]
    presets = seeds[2:]
    under = [record.size_bytes for record in presets if record.size_bytes <= ceiling]
    assert under and [record.size_bytes for record in presets[: len(under)]] == sorted(under, reverse=True)
    assert [record.baseline for record in presets[len(under) :]] == [fitted[0].baseline.split(" fitted")[0]]
    generated = [record for record in records if record.generation_evaluations is not None]
    assert generated and all(record.size_bytes <= ceiling for record in generated)
    assert all(
        TrialRecord.of(trial).parent is not None
        for trial in study.trials
        if trial.number in {record.number for record in generated}
    )


def test_a_budget_named_by_preset_is_the_preset_file_with_the_export_metadata_inside(tmp_path: Path) -> None:
    """`budget: {size: q4_k_m}`: every plan a generation tries stays under Q4_K_M's file less what an export adds,
    and the best one exported (`export --max-size q4_k_m`), provenance and plan included, is no larger than the file
    of llama.cpp's Q4_K_M types; `frontier --max-size q4_k_m` lists only such plans, and a misspelt preset is one
    line, exit 2."""
    import json

    from autocompress.config import Config
    from autocompress.search import run_search
    from autocompress.targets.gguf.file import gguf_layout
    from autocompress.targets.gguf.preset_sizes import preset_ceiling, preset_file_bytes
    from autocompress.targets.gguf.presets import preset_types

    raw = size_budget_config(tmp_path, "q4_k_m", compression={"granularity": "linear"})
    model_dir = tmp_path / "model"
    model = tiny_model("mistral")  # the saved model: tiny_model is seeded
    config = Config.model_validate(raw)
    results = tmp_path / "results"
    study = run_search(config, StudyLocation.resolve("preset", results), n_trials=16, progress=False)

    file_bytes, ceiling = preset_file_bytes(config, "q4_k_m"), preset_ceiling(config, "q4_k_m")
    model.config._name_or_path = str(model_dir)  # the name the file records, as when loaded from the folder
    layout = gguf_layout(model, bpe_tokenizer())
    matrices = [key for key, slot in layout.slots.items() if len(slot.shape) == 2]
    types = preset_types(
        "q4_k_m",
        [(layout.slots[key].name, layout.slots[key].shape) for key in matrices],
        model.config.num_hidden_layers,
        n_head=model.config.num_attention_heads,
        n_head_kv=model.config.num_key_value_heads,
        imatrix=True,
    )
    by_name = {slot.name: key for key, slot in layout.slots.items()}
    assert file_bytes == layout.file_bytes({by_name[name]: kind for name, kind in types.items() if kind != "f16"})
    assert file_bytes - 64_000 < ceiling < file_bytes
    records = scored_records(study)
    generated = [record for record in records if record.generation_evaluations is not None]
    assert generated and all(record.size_bytes <= ceiling for record in generated)

    listed = subprocess.run(
        [*CLI, "frontier", "--study", "preset", "--results", str(results), "--max-size", "q4_k_m", "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert all(point["size_bytes"] <= ceiling for point in json.loads(listed.stdout))
    out = tmp_path / "best"
    exported = [*CLI, "export", "--study", "preset", "--results", str(results), "--pick", "best"]
    subprocess.run([*exported, "--max-size", "q4_k_m", "--out", str(out)], check=True, capture_output=True)
    assert (out / "model.gguf").stat().st_size <= file_bytes

    refused = subprocess.run(
        [*CLI, "frontier", "--study", "preset", "--results", str(results), "--max-size", "q4_km"],
        capture_output=True,
        text=True,
    )
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert "not a size nor a llama.cpp preset" in refused.stderr


def test_a_size_budget_seeds_the_additive_allocation_from_each_units_error_alone(tmp_path: Path) -> None:
    """`baselines: [uniform, additive]`: each unit's error at each GGUF type alone (cached), the least summed error
    under the ceiling as a knapsack over bytes, enqueued as the seed `additive` and scored under the ceiling."""
    from autocompress.additive import knapsack, unit_errors
    from autocompress.allocation import size_ceiling
    from autocompress.config import Config
    from autocompress.search import run_search
    from autocompress.search.study import study_session

    raw = size_budget_config(tmp_path, "30%", baselines=["uniform", "additive"])
    config = Config.model_validate(raw)
    location = StudyLocation.resolve("additive", tmp_path / "results")
    study = run_search(config, location, n_trials=10, progress=False)
    records = scored_records(study)
    ceiling = int(0.3 * StudyRecord.of(study).dense_bytes)
    additive = [record for record in records if record.baseline == "additive"]
    assert len(additive) == 1 and additive[0].size_bytes <= ceiling
    assert "additive@size" in StudyRecord.of(study).baselines

    session, space = study_session(config, location.cache_dir)
    assert list((location.cache_dir / session.inputs_key / "profiles").glob("additive-*.json"))
    windows = max(1, len(session.pools.fitness) // 4)
    errors = unit_errors(session, space, windows)  # from the cache: the seed's own measurement
    assert all(errors[unit][-1] == 0.0 and len(errors[unit]) == len(space.levels_of(unit)) for unit in space.units)
    assert all(max(values) > 0 for values in errors.values())
    ceiling_of = size_ceiling(session, space, ceiling)
    expected = knapsack(errors, ceiling_of.unit_bytes, ceiling - ceiling_of.fixed)
    params = {f"{unit}.format": space.levels_of(unit)[index] for unit, index in expected.items()}
    assert {key: value for key, value in additive[0].params.items()} == {
        key: value for key, value in params.items() if key in additive[0].params
    }
