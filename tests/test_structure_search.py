"""Structural levels searched under `target: gguf`: each block's shape a trial parameter beside the GGUF types, its
alternatives trained once by block-local distillation before the trials, stitched in and rolled back, counted as
the deci file stores them, and exported as a deci GGUF that llama.cpp runs as we measured it."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path

import gguf
import numpy as np
import optuna
import pytest
import torch
from filelock import FileLock
from optuna.distributions import CategoricalDistribution
from optuna.trial import FixedTrial

from autocompress.block_distillation import AlternativeStore
from autocompress.cli import main
from autocompress.config import load_config
from autocompress.metrics import log_probs
from autocompress.plan import BlockStructure, CompressionPlan
from autocompress.record import StudyLocation, StudyRecord, scored_records
from autocompress.search.space import SearchSpace
from autocompress.session import CompressionSession
from autocompress.structure import block_shapes, is_structured
from autocompress.targets.gguf.file import PLAN_KEY, write_gguf_tensors
from autocompress.targets.gguf.llama_cpp import llama_cpp_available
from autocompress.targets.gguf.speed import plan_tensors
from autocompress.targets.gguf.structured import AlternativeTensor, storable_level
from tests.conftest import CLI, require, tiny_study_config, write_yaml
from tests.test_gguf_export import SEQ_LEN, activation_rounding, bpe_tokenizer, kl, llama_cpp_log_probs
from tests.test_structure import config_only_folder, four_block_config, gguf_study
from tests.test_structure_gguf import teacher

STRUCTURE = {"ffn": [1, 0.75, 0.5], "kv_groups": [2, 1, 0], "drop_blocks": True, "distillation": {"steps": 3}}
FORMATS = ["q4_k", "q6_k", "q8_0"]


# --- the search space -------------------------------------------------------------------------------------------


def test_each_blocks_shape_is_a_trial_parameter_and_every_seed_keeps_the_teachers(tmp_path: Path) -> None:
    folder = config_only_folder(tmp_path / "model", four_block_config())
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("w " * 100)
    config = load_config(
        write_yaml(
            tmp_path / "space.yaml", gguf_study(folder, corpus, ffn=[1, 0.5], kv_groups=[2, 1, 0], drop_blocks=True)
        )
    )
    units = [f"model.layers.{index}" for index in range(4)] + ["model.embed_tokens", "lm_head"]
    space = SearchSpace(config, units)
    assert space.structure_choices["model.layers.0.kv_groups"] == [1, 2]  # the first block keeps its attention
    assert "model.layers.3.removed" not in space.structure_choices  # nor is the last block removed
    assert space.distribution_of("model.layers.2.ffn") == CategoricalDistribution([0.5, 1.0])

    chosen = {"model.layers.1.removed": True, "model.layers.2.kv_groups": 0, "model.layers.2.ffn": 0.5}
    params = space.teacher_structure_params() | chosen | {f"{unit}.format": "q8_0" for unit in units}
    plan = space.plan_for(FixedTrial(params))
    assert plan.structure == {
        "model.layers.1": BlockStructure(removed=True),
        "model.layers.2": BlockStructure(ffn=0.5, kv_groups=0),
    }  # the teacher's 2 groups and full width are not named
    assert space.plan_from_params(plan.to_params()) == plan

    for seed in space.seeds():
        assert space.plan_from_params(seed).structure == {}
        assert all(key in seed for key in space.structure_choices)  # fixed: a sampler never draws a seed's shape
    assert json.loads(space.fingerprint())["structure"]["drop_blocks"] is True


def test_a_type_a_shapes_rows_cannot_take_is_stored_as_llama_cpp_falls_back() -> None:
    """SmolLM2's FFN widths: ½ (768) takes K-types on ffn_down, ¾ (1152) and ¼ (384) only 32-block types."""
    assert storable_level("q4_k", 768) == "q4_k"
    assert storable_level("q4_k", 1152) == "q5_0"
    assert storable_level("q6_k", 384) == "q8_0"
    assert storable_level("iq4_xs", 384) == "iq4_nl"
    assert storable_level("q8_0", 384) == "q8_0"
    assert storable_level("q4_k", 100) == "f16"


# --- a study from the command line ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A gguf study with structure of a random four-block Llama (FFN 512: ¾ is 384 channels, which K-types do not
    split) run by the CLI; returns its config file and results folder."""
    folder = tmp_path_factory.mktemp("structure-study")
    model_dir = folder / "model"
    teacher().save_pretrained(model_dir)
    bpe_tokenizer().save_pretrained(model_dir)
    search = {"sparsity": [0.0], "bits": [16], "formats": FORMATS, "n_trials": 12, "loss": "kl", "structure": STRUCTURE}
    raw = tiny_study_config(folder, model_dir, compression={"target": "gguf"}, search=search)
    raw["data"] |= {"seq_len": SEQ_LEN, "heldout": 2}
    config = write_yaml(folder / "structure.yaml", raw)
    results = folder / "results"
    subprocess.run([*CLI, "search", str(config), "--results", str(results), "--quiet"], check=True)
    return config, results


def study_record(results: Path) -> tuple[optuna.Study, StudyRecord, StudyLocation]:
    location = StudyLocation.resolve("structure", results, None)
    study = optuna.load_study(study_name="structure", storage=location.storage_url)
    return study, StudyRecord.of(study), location


def structural_trials(results: Path) -> list:
    optuna_study, record, _ = study_record(results)
    space = SearchSpace.of_record(record)
    return [trial for trial in scored_records(optuna_study) if space.plan_from_params(trial.params).structure]


def test_the_study_searches_shapes_beside_types_from_alternatives_trained_once(study: tuple[Path, Path]) -> None:
    _config, results = study
    optuna_study, record, location = study_record(results)
    space = SearchSpace.of_record(record)
    seeds = [trial for trial in scored_records(optuna_study) if trial.seed]
    assert seeds and all(not space.plan_from_params(trial.params).structure for trial in seeds)
    assert structural_trials(results), "no sampled trial changed a block's shape"
    (summary_path,) = location.cache_dir.glob("*/structure/*/alternatives.json")
    summary = json.loads(summary_path.read_text())
    trained = [entry for entry in summary["alternatives"] if entry["steps"]]
    assert trained and all(entry["seconds"] > 0 for entry in trained)
    assert summary["store_bytes"] == sum(path.stat().st_size for path in summary_path.parent.glob("*.safetensors"))
    kinds = {(entry["block"], entry["kind"], entry["level"]) for entry in summary["alternatives"]}
    assert (1, "ffn", 0) in kinds and (0, "attention", 0) not in kinds  # block 1 may go; block 0 keeps attention


@pytest.fixture(scope="module")
def session_and_plan(study: tuple[Path, Path]):
    """A session of the study (its alternatives read back from the store) and its smallest structural plan."""
    config_path, results = study
    _, record, location = study_record(results)
    smallest = min(structural_trials(results), key=lambda trial: trial.size_bytes)
    plan = SearchSpace.of_record(record).plan_from_params(smallest.params)
    session = CompressionSession(load_config(config_path), cache_dir=location.cache_dir)
    return session, plan, smallest


def test_a_stitched_structural_plan_is_the_plan_built_afresh_and_rolls_back(session_and_plan, study) -> None:
    session, plan, trial = session_and_plan
    tokens = session.pools.fitness
    dense = log_probs(session.model, tokens)
    other = plan.model_copy(update={"structure": {"model.layers.2": BlockStructure(removed=True)}})
    session.stitch(other)  # another plan first: stitching replaces its shapes and types
    size = session.stitch(plan)
    stitched = log_probs(session.model, tokens)
    assert size.total_bytes == trial.size_bytes
    assert session.measure(plan).metrics.kl == pytest.approx(trial.loss, rel=1e-5)

    config_path, _ = study
    fresh = CompressionSession(load_config(config_path), cache_dir=session.cache_dir.parent)
    fresh.stitch(plan)
    assert block_shapes(fresh.model) == block_shapes(session.model)
    assert torch.equal(log_probs(fresh.model, tokens), stitched)

    session.restore_dense()
    assert not is_structured(session.model)
    assert torch.equal(log_probs(session.model, tokens), dense)


def test_the_deci_file_holds_the_bytes_accounted_and_llama_cpp_computes_what_was_scored(
    session_and_plan, tmp_path: Path
) -> None:
    session, plan, _trial = session_and_plan
    size = session.stitch(plan)
    blocks = session.weights.blocks_of(plan)
    path = tmp_path / "model.gguf"
    write_gguf_tensors(session.model, session.tokenizer, blocks, path)
    assert path.stat().st_size == size.total_bytes
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.architecture"].contents() == "deci"
    widths = reader.fields["deci.feed_forward_length"].contents()
    assert widths == [shape.intermediate_size for shape in block_shapes(session.model)]
    stored = {tensor.name: tensor.tensor_type.name.lower() for tensor in reader.tensors}
    for tensor in session.weights.active(plan):
        level = session.weights.levels(plan)[tensor.unit]
        assert stored[tensor.gguf_name] == storable_level(level, tensor.shape[1])
    assert any(isinstance(tensor, AlternativeTensor) for tensor in session.weights.active(plan))
    # what the speed model sees: the file's own matrices
    matrices, _blocks = plan_tensors(session.weights, plan, session.model.config)
    computed = [tensor for tensor in reader.tensors if len(tensor.shape) == 2 and tensor.name != "token_embd.weight"]
    assert sorted(shape for _, shape in matrices) == sorted(
        tuple(reversed(tensor.shape.tolist())) for tensor in computed
    )

    require(llama_cpp_available())
    tokens = session.pools.fitness
    ours = log_probs(session.model, tokens)
    hooks = activation_rounding(session.model, {key: tensor.type for key, tensor in blocks.items()})
    floor = kl(log_probs(session.model, tokens), ours)
    for hook in hooks:
        hook.remove()
    theirs = llama_cpp_log_probs(path, tokens)
    print(f"llama.cpp vs the search's structural model: KL {kl(theirs, ours):.1e}, floor {floor:.1e}")
    assert kl(theirs, ours) <= max(1e-3, 1.25 * floor)


@pytest.mark.slow  # two more processes load torch, the model and llama.cpp
def test_export_writes_the_trial_as_a_deci_gguf_that_evaluate_runs(study: tuple[Path, Path], tmp_path: Path) -> None:
    _config, results = study
    trial = min(structural_trials(results), key=lambda trial: trial.size_bytes)
    out = tmp_path / "out"
    command = [*CLI, "export", "--study", "structure", "--results", str(results), "--trial", str(trial.number)]
    exported = subprocess.run([*command, "--out", str(out), "--json"], check=True, capture_output=True, text=True)
    assert json.loads(exported.stdout)["accounted_bytes"] == trial.size_bytes
    path = out / "model.gguf"
    assert gguf.GGUFReader(path).fields["general.architecture"].contents() == "deci"
    require(llama_cpp_available())
    evaluated = subprocess.run([*CLI, "evaluate", str(path), "--json"], check=True, capture_output=True, text=True)
    result = json.loads(evaluated.stdout)
    assert result["runtime"] == "llama.cpp" and result["trial"] == trial.number
    assert "speed_note" not in result and result["predicted_decode_tps"] > 0  # predicted at its blocks' shapes
    assert result["heldout_kl"] == pytest.approx(result["predicted_heldout_kl"], rel=0.05, abs=2e-3)


def test_a_structural_plan_given_as_json_exports_and_applies_as_its_trial_does(
    study: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`export --plan` writes the deci GGUF that exporting the plan's trial writes (the same tensors, the plan read
    back from the file), which llama.cpp runs; `apply --plan` measures the plan at the trial's size."""
    config_path, results = study
    trial = min(structural_trials(results), key=lambda trial: trial.size_bytes)
    _, record, _ = study_record(results)
    plan = SearchSpace.of_record(record).plan_from_params(trial.params)
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(plan.to_json())
    exported = {}
    for name, chosen in (("plan", ["--plan", str(plan_path)]), ("trial", ["--trial", str(trial.number)])):
        out = tmp_path / name
        main(["export", "--study", "structure", "--results", str(results), *chosen, "--out", str(out), "--json"])
        result = json.loads(capsys.readouterr().out)
        assert result["accounted_bytes"] == trial.size_bytes
        exported[name] = gguf.GGUFReader(out / "model.gguf")
    from_plan, from_trial = exported["plan"], exported["trial"]
    assert from_plan.fields["general.architecture"].contents() == "deci"
    assert CompressionPlan.from_json(from_plan.fields[PLAN_KEY].contents()) == plan
    assert [(tensor.name, tensor.tensor_type) for tensor in from_plan.tensors] == [
        (tensor.name, tensor.tensor_type) for tensor in from_trial.tensors
    ]
    assert all(
        np.array_equal(ours.data, theirs.data)
        for ours, theirs in zip(from_plan.tensors, from_trial.tensors, strict=True)
    )

    main(["apply", str(config_path), "--plan", str(plan_path), "--json"])
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["size_bytes"] == trial.size_bytes

    require(llama_cpp_available())
    tokens = CompressionSession(load_config(config_path), cache_dir=None).pools.fitness
    assert torch.isfinite(llama_cpp_log_probs(tmp_path / "plan" / "model.gguf", tokens)).all()


def test_a_structural_plan_a_config_trains_no_alternatives_for_is_refused_before_the_model_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A gguf config without search.structure (another target: `test_structure`): one line, exit 2, no model."""
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(CompressionPlan(structure={"model.layers.1": BlockStructure(ffn=0.5)}).to_json())
    search = {"sparsity": [0.0], "bits": [16], "formats": FORMATS}
    raw = tiny_study_config(tmp_path, tmp_path / "no-model", compression={"target": "gguf"}, search=search)
    config = write_yaml(tmp_path / "plain.yaml", raw)
    with pytest.raises(SystemExit) as exit_info:
        main(["apply", str(config), "--plan", str(plan_path)])
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and "the config has none; give it a search.structure" in line


def test_workers_on_one_cache_train_different_blocks_and_read_back_the_rest(tmp_path: Path) -> None:
    """A block whose lock another worker holds is skipped, the others trained first, and it is waited for: here the
    holder lets go only once every other block is stored, so this process trains that block last."""
    model_dir = tmp_path / "model"
    teacher().save_pretrained(model_dir)
    bpe_tokenizer().save_pretrained(model_dir)
    structure = {"ffn": [1, 0.5], "distillation": {"steps": 1}}
    search = {"sparsity": [0.0], "bits": [16], "formats": FORMATS, "structure": structure}
    raw = tiny_study_config(tmp_path, model_dir, compression={"target": "gguf"}, search=search)
    raw["data"] |= {"seq_len": SEQ_LEN}
    session = CompressionSession(load_config(write_yaml(tmp_path / "space.yaml", raw)), cache_dir=tmp_path / "cache")
    weights = session.weights
    folder = weights.store_folder
    folder.mkdir(parents=True)
    others = [AlternativeStore(folder).path((index, "ffn", 256)) for index in (0, 2, 3)]
    holding = threading.Event()

    def hold_until_the_others_are_stored() -> None:  # another worker, training block 1
        with FileLock(folder / ".block1.lock"):
            holding.set()
            deadline = time.monotonic() + 300  # never hangs the suite: a failure shows in the order asserted below
            while not all(path.is_file() for path in others) and time.monotonic() < deadline:
                time.sleep(0.05)

    holder = threading.Thread(target=hold_until_the_others_are_stored)
    holder.start()
    holding.wait()
    weights.build_alternatives()
    holder.join()
    last = AlternativeStore(folder).path((1, "ffn", 256))
    assert all(path.stat().st_mtime_ns <= last.stat().st_mtime_ns for path in others)
    assert sorted(key[0] for key in weights.built_now) == [0, 1, 2, 3]
    summary = json.loads((folder / "alternatives.json").read_text())
    assert len(summary["alternatives"]) == 4


@pytest.mark.slow  # a study of generations, its alternatives trained first
def test_a_size_budget_below_what_types_alone_reach_is_met_by_searching_shapes(tmp_path: Path) -> None:
    """Generations under a ceiling no plan of the teacher's shapes fits: the uniform seed narrows blocks until it
    fits, and every plan the generations record is under the ceiling, its size the exact size of its file."""
    from autocompress.config import Config
    from autocompress.search import run_search

    model_dir = tmp_path / "model"
    teacher().save_pretrained(model_dir)
    bpe_tokenizer().save_pretrained(model_dir)
    structure = {"ffn": [1, 0.5], "kv_groups": [2, 1], "drop_blocks": True, "distillation": {"steps": 1}}
    generations = {"offspring": 4, "stages": [0.5, 1.0], "survivors": [2, 1]}
    search = {
        "sparsity": [0.0],
        "bits": [16],
        "formats": ["q4_k", "q8_0"],
        "budget": {"size": "20%"},  # below q4_k everywhere (4.5 bits of 16)
        "generations": generations,
        "loss": "kl",
        "structure": structure,
    }
    raw = tiny_study_config(tmp_path, model_dir, compression={"target": "gguf"}, search=search)
    raw["data"] |= {"seq_len": SEQ_LEN, "heldout": 2}
    location = StudyLocation.resolve("budget", tmp_path / "results")
    study = run_search(Config.model_validate(raw), location, n_trials=8, progress=False)
    record = StudyRecord.of(study)
    ceiling = int(0.2 * record.dense_bytes)
    space = SearchSpace.of_record(record)
    records = scored_records(study)
    uniform = next(trial for trial in records if trial.baseline == "uniform")
    assert space.plan_from_params(uniform.params).structure and uniform.size_bytes <= ceiling
    generated = [trial for trial in records if trial.generation_evaluations is not None]
    assert generated and all(trial.size_bytes <= ceiling for trial in generated)
    session = CompressionSession(Config.model_validate(raw), cache_dir=location.cache_dir)
    best = min(generated, key=lambda trial: trial.loss)
    assert session.size(space.plan_from_params(best.params)).total_bytes == best.size_bytes


def test_the_additive_seed_chooses_block_shapes_where_types_alone_cannot_fit(tmp_path: Path) -> None:
    """`baselines: [additive]` with `search.structure`: each block's shapes measured alone beside each unit's types,
    the knapsack over both; under a ceiling no plan of the teacher's shapes fits, the seed narrows or removes blocks
    and is a plan under the ceiling, its size the exact size of its file."""
    from autocompress.additive import additive_allocation
    from autocompress.config import Config
    from autocompress.search import run_search
    from autocompress.search.study import study_size_ceiling

    model_dir = tmp_path / "model"
    teacher().save_pretrained(model_dir)
    bpe_tokenizer().save_pretrained(model_dir)
    structure = {"ffn": [1, 0.5], "kv_groups": [2, 1], "drop_blocks": True, "distillation": {"steps": 1}}
    search = {
        "sparsity": [0.0],
        "bits": [16],
        "formats": ["q4_k", "q8_0"],
        "budget": {"size": "20%"},  # below q4_k everywhere (4.5 bits of 16)
        "baselines": ["uniform", "additive"],
        "generations": {"offspring": 2, "stages": [0.5, 1.0], "survivors": [2, 1]},
        "loss": "kl",
        "structure": structure,
    }
    raw = tiny_study_config(tmp_path, model_dir, compression={"target": "gguf"}, search=search)
    raw["data"] |= {"seq_len": SEQ_LEN, "heldout": 2}
    location = StudyLocation.resolve("additive", tmp_path / "results")
    study = run_search(Config.model_validate(raw), location, n_trials=2, progress=False)
    record = StudyRecord.of(study)
    space = SearchSpace.of_record(record)
    (seed,) = [trial for trial in scored_records(study) if trial.baseline == "additive"]
    plan = space.plan_from_params(seed.params)
    assert plan.structure and seed.size_bytes <= int(0.2 * record.dense_bytes)
    session = CompressionSession(Config.model_validate(raw), cache_dir=location.cache_dir)
    assert session.size(plan).total_bytes == seed.size_bytes
    session_space = SearchSpace(session.config, session.units, session.unit_levels())
    ceiling = study_size_ceiling(session, session_space)
    teachers = {unit: len(ceiling.levels[unit]) - 1 if unit in ceiling.shapes else 0 for unit in ceiling.units}
    assert not ceiling.fits(teachers)  # the teacher's shapes at the smallest types: over the ceiling
    assert ceiling.params_of(additive_allocation(session, session_space, ceiling), "format") == seed.params
    assert list((location.cache_dir / session.inputs_key / "profiles").glob("additive-structure-*.json"))
