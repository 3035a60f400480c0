"""Nothing lost, nothing trusted that should not be: failures inside a trial, kills, full disks, corrupted caches,
destructive paths, untrusted inputs and content-keyed caches.

The fault injections that take processes (SIGKILL at random moments, a full disk, a locked storage) live in
`benchmarks/faults.py`, which runs them at full size and writes `results/benchmarks/faults.csv`; here they run
small enough for the test suite, and each must survive with no data lost.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import struct
import tomllib
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import autocompress.compress
import autocompress.measurement
from autocompress.cli import build_parser, main
from autocompress.config import Config, size_limit
from autocompress.errors import UserError
from autocompress.models import file_digest, model_fingerprint, unit_names
from autocompress.plan import CompressionPlan, LayerCompression
from autocompress.search import StudyLocation, run_search
from autocompress.search.space import SearchSpace
from autocompress.search.study import load_existing
from autocompress.session import CompressionSession
from autocompress.targets.artifact import (
    MANIFEST_FILE,
    export_compressed,
    load,
    package_versions,
    prepare_out_dir,
    write_hf_folder,
)
from autocompress.variants import VariantDatabase
from benchmarks.faults import (
    GGUF_FORMATS,
    corrupt_caches,
    corrupt_gguf_blocks,
    fill_the_disk_while_building_variants,
    fill_the_disk_while_caching,
    fuzz_gguf_headers,
    kill_at_exact_lines,
    kill_at_random_moments,
    lock_the_study_database,
    race_generation_workers,
    truncate_an_artifact,
)
from tests.conftest import POSTGRES_URL, complete_trials, load_config, needs_postgres, tiny_study_config, write_yaml

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def config(tmp_path: Path, tiny_model_dir: Path) -> Config:
    return Config.model_validate(tiny_study_config(tmp_path, tiny_model_dir))


def every_linear_compressed() -> CompressionPlan:
    return CompressionPlan.uniform(sparsity=0.3, bits=4, pruning="wanda", quantization="rtn", group_size=32)


def first_block_dense_second_pruned() -> CompressionPlan:
    return CompressionPlan(
        default=LayerCompression(),
        layers={"model.layers.1": LayerCompression(sparsity=0.6, bits=8)},
        pruning="wanda",
        quantization="rtn",
        group_size=32,
    )


def raise_at_call(monkeypatch: pytest.MonkeyPatch, owner: object, name: str, k: int, error: BaseException) -> None:
    """Make `owner.name` raise `error` on its k-th call (1-based), and work as before otherwise."""
    real = getattr(owner, name)
    calls = {"count": 0}

    def failing(*args, **kwargs):
        calls["count"] += 1
        if calls["count"] == k:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, failing)


def assert_dense(session: CompressionSession) -> None:
    for linear in session.linears:
        assert torch.equal(linear.module.weight.data.cpu(), session.dense_weights[linear.name]), linear.name


# 1. Stitching is transactional.


@pytest.mark.parametrize("error", [RuntimeError("not positive definite (simulated)"), KeyboardInterrupt()])
@pytest.mark.parametrize("k", [1, 3, 8, 14])  # of the tiny model's 14 Linears
def test_a_stitch_failing_at_the_kth_linear_leaves_the_session_as_a_fresh_one_would_score(
    config: Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, k: int, error: BaseException
) -> None:
    session = CompressionSession(config, cache_dir=tmp_path / "cache")
    session.measure(first_block_dense_second_pruned())  # the session already holds a plan when the next one fails
    with monkeypatch.context() as patch:
        raise_at_call(patch, autocompress.compress, "compress_weight", k, error)
        with pytest.raises(type(error)):
            session.stitch(every_linear_compressed())

    after_failure = session.measure(first_block_dense_second_pruned()).metrics
    fresh = CompressionSession(config, cache_dir=tmp_path / "fresh").measure(first_block_dense_second_pruned()).metrics
    assert (after_failure.kl, after_failure.ce) == (fresh.kl, fresh.ce)
    session.restore_dense()
    assert_dense(session)


@pytest.mark.parametrize("k", [2, 9])
def test_a_stitch_failing_to_load_the_kth_stored_variant_is_rolled_back_too(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, k: int
) -> None:
    config = Config.model_validate(tiny_study_config(tmp_path, tiny_model_dir, search={"database": "on"}))
    session = CompressionSession(config, cache_dir=tmp_path / "cache")
    with monkeypatch.context() as patch:
        raise_at_call(patch, VariantDatabase, "load", k, OSError("variant unreadable (simulated)"))
        with pytest.raises(OSError):
            session.stitch(every_linear_compressed())
    after_failure = session.measure(first_block_dense_second_pruned()).metrics
    fresh = CompressionSession(config, cache_dir=tmp_path / "cache").measure(first_block_dense_second_pruned()).metrics
    assert after_failure.kl == fresh.kl
    session.restore_dense()
    assert_dense(session)


def test_trials_raising_at_random_points_of_stitch_and_measure_leave_every_complete_trial_scored_as_fresh(
    tmp_path: Path, space_file, monkeypatch: pytest.MonkeyPatch
) -> None:
    chance = random.Random(13)
    config, location = load_config(space_file(max_failures=50)), StudyLocation.resolve("faulty", tmp_path)
    with monkeypatch.context() as patch:
        for owner, name in [(autocompress.compress, "compress_weight"), (autocompress.measurement, "evaluate")]:
            real = getattr(owner, name)

            def sometimes_failing(*args, _real=real, **kwargs):
                if chance.random() < 0.015:
                    raise RuntimeError("injected fault")
                return _real(*args, **kwargs)

            patch.setattr(owner, name, sometimes_failing)
        with contextlib.suppress(RuntimeError):  # a fault in the closing held-out judging ends the run
            run_search(config, location, n_trials=12, progress=False)
    study = run_search(config, location, n_trials=12, progress=False)  # the next run finishes the job

    failed = [trial for trial in study.trials if trial.state.name == "FAIL"]
    assert failed and all(trial.user_attrs["fail_reason"] == "RuntimeError: injected fault" for trial in failed)
    assert len(complete_trials(study)) >= 12
    fresh = CompressionSession(config, cache_dir=tmp_path / "fresh")
    space = SearchSpace(config, unit_names(fresh.model, config.compression.granularity))
    for trial in complete_trials(study):
        assert trial.user_attrs["loss"] == fresh.measure(space.plan_from_params(trial.params)).metrics.kl


def test_a_stitch_failing_at_the_kth_linear_in_a_ray_worker_leaves_its_later_trials_scored_as_fresh(
    tmp_path: Path, space_file
) -> None:
    if not os.environ.get("CI"):
        pytest.importorskip("ray.tune", reason="Ray Tune is not installed (pip install -e '.[ray]')")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    from autocompress.search.ray_backend import run_ray_search

    faults = tmp_path / "faults.log"  # the worker's 3rd and 20th compress_weight calls raise: Linears of two trials
    config, location = load_config(space_file(max_failures=50)), StudyLocation.resolve("ray-faulty", tmp_path)
    hook = {"PYTHONPATH": str(ROOT), "AUTOCOMPRESS_TEST_FAIL_AT": "3,20", "AUTOCOMPRESS_TEST_FAULT_LOG": str(faults)}
    ray.init(
        num_cpus=1,
        object_store_memory=200 * 2**20,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"worker_process_setup_hook": "tests.ray_fault_hook.fail_at_listed_calls", "env_vars": hook},
    )
    try:
        study = run_ray_search(config, location, n_trials=8, progress=False, concurrency=1)
    finally:
        ray.shutdown()

    injected = faults.read_text().split("\n")[:-1]
    failed = [trial for trial in study.trials if trial.state.name == "FAIL"]
    assert injected and len(failed) == len(injected), (injected, [trial.user_attrs for trial in failed])
    assert all(trial.user_attrs["fail_reason"] == "RuntimeError: not positive definite (simulated)" for trial in failed)
    fresh = CompressionSession(config, cache_dir=tmp_path / "fresh")
    space = SearchSpace(config, unit_names(fresh.model, config.compression.granularity))
    for trial in complete_trials(study):  # the worker's session held the failed trial's Linears before these
        assert trial.user_attrs["loss"] == fresh.measure(space.plan_from_params(trial.params)).metrics.kl


def test_a_study_whose_trials_keep_failing_stops_after_max_failures_in_a_row_and_exits_2_saying_why_in_one_line(
    tmp_path: Path, space_file, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    def not_positive_definite(*args, **kwargs):
        raise RuntimeError("Hessian not positive definite (simulated)")

    monkeypatch.setattr(autocompress.compress, "compress_weight", not_positive_definite)
    arguments = ["search", str(space_file(max_failures=3)), "--study", "failing", "--results", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_info:
        main([*arguments, "--n-trials", "50", "--quiet"])

    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [
        "autocompress: error: study 'failing' stopped after 3 failed trials in a row; the last: RuntimeError: "
        "Hessian not positive definite (simulated)"
    ]
    study = load_existing(StudyLocation.resolve("failing", tmp_path))[0]
    states = [trial.state.name for trial in study.trials if trial.state.is_finished()]  # seeds may still wait
    assert states[-3:] == ["FAIL"] * 3 and "FAIL" not in states[:-3][-1:]  # the third failure in a row stopped it
    assert len(states) < 50


# The fault-injection suite (benchmarks/faults.py at full size).


@pytest.fixture
def kill_space(tmp_path: Path, tiny_model_dir: Path) -> Path:
    search = {"heartbeat_interval": 1, "grace_period": 2}
    return write_yaml(tmp_path / "space.yaml", tiny_study_config(tmp_path, tiny_model_dir, fitness=16, search=search))


@pytest.fixture
def variant_space(tmp_path: Path, tiny_model_dir: Path) -> Path:
    config = tiny_study_config(tmp_path, tiny_model_dir, search={"database": "on"})
    return write_yaml(tmp_path / "variants.yaml", config)


def test_sigkill_at_random_moments_of_a_sqlite_study_loses_and_duplicates_no_completed_trial(
    tmp_path: Path, kill_space: Path
) -> None:
    run = kill_at_random_moments(kill_space, tmp_path / "results", n_trials=10, kills=2, seed=0)
    assert (run.survived, run.data_lost) == (2, 0)


@needs_postgres
def test_sigkill_at_random_moments_of_a_postgresql_study_loses_and_duplicates_no_completed_trial(
    tmp_path: Path, kill_space: Path
) -> None:
    run = kill_at_random_moments(kill_space, tmp_path / "results", n_trials=10, kills=2, seed=1, storage=POSTGRES_URL)
    assert (run.survived, run.data_lost) == (2, 0)


def test_a_full_disk_while_writing_the_variant_database_is_one_line_and_the_next_run_completes_it(
    tmp_path: Path, variant_space: Path
) -> None:
    run = fill_the_disk_while_building_variants(variant_space, tmp_path / "results", n_trials=4)
    assert (run.survived, run.data_lost) == (1, 0)


def test_corrupted_cache_files_are_computed_again_and_the_study_continues_with_the_same_figures(
    tmp_path: Path, kill_space: Path
) -> None:
    run = corrupt_caches(kill_space, tmp_path / "results", n_trials=4)
    assert run.injected >= 2 and (run.survived, run.data_lost) == (run.injected, 0)


def test_a_study_database_locked_by_another_process_is_waited_for_and_the_study_continues(
    tmp_path: Path, kill_space: Path
) -> None:
    run = lock_the_study_database(kill_space, tmp_path / "results", n_trials=4, hold_s=3)
    assert (run.survived, run.data_lost) == (1, 0)


def test_a_truncated_artifact_is_refused_in_one_line(tmp_path: Path, config: Config, kill_space: Path) -> None:
    artifact = export_of(config, tmp_path, first_block_dense_second_pruned())
    run = truncate_an_artifact(artifact, kill_space)
    assert run.survived == run.injected == 2


def export_of(config: Config, tmp_path: Path, plan: CompressionPlan) -> Path:
    session = CompressionSession(config, cache_dir=tmp_path / "cache")
    compressed = session.compress_for_export(plan)
    provenance = {"base_model": config.model.model_dump(mode="json"), "data": config.data.model_dump(mode="json")}
    return export_compressed(session.model, session.tokenizer, plan, compressed, tmp_path / "artifact", provenance)


# 2. --overwrite replaces only an earlier export of ours, or an empty folder.


def test_overwrite_refuses_a_folder_that_is_not_an_earlier_export_and_deletes_nothing(tmp_path: Path) -> None:
    study = tmp_path / "results" / "demo"
    (study / "cache").mkdir(parents=True)
    (study / "study.db").write_bytes(b"trials")
    project = tmp_path / "project"
    project.mkdir()
    (project / MANIFEST_FILE).write_text(json.dumps({"format": "someone-else"}))
    for folder in (study, project):
        before = sorted(path.relative_to(folder) for path in folder.rglob("*"))
        with pytest.raises(UserError, match="not an earlier export"):
            prepare_out_dir(folder, overwrite=True)
        assert sorted(path.relative_to(folder) for path in folder.rglob("*")) == before


def test_overwrite_replaces_an_earlier_export_or_an_empty_folder(tmp_path: Path, config: Config) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert prepare_out_dir(empty, overwrite=True) == empty
    artifact = export_of(config, tmp_path, first_block_dense_second_pruned())
    session = CompressionSession(config, cache_dir=tmp_path / "cache")
    plan = every_linear_compressed()
    export_compressed(session.model, session.tokenizer, plan, session.compress_for_export(plan), artifact, {}, True)
    assert CompressionPlan.model_validate(json.loads((artifact / MANIFEST_FILE).read_text())["plan"]) == plan


def test_export_overwrite_of_the_study_folder_is_a_one_line_error(tmp_path: Path, space_file, capsys) -> None:
    out = tmp_path / "results"
    main(["search", str(space_file()), "--study", "s", "--results", str(out), "--n-trials", "2", "--quiet"])
    before = sorted(path.relative_to(out) for path in out.rglob("*"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--study", "s", "--results", str(out), "--trial", "0", "--out", str(out / "s"), "--overwrite"])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "not an earlier export" in lines[0]
    assert sorted(path.relative_to(out) for path in out.rglob("*")) == before


# 3. Nothing read from an artifact or a storage switches on remote code or unpickling.


@pytest.mark.parametrize("flag", ["trust_remote_code", "allow_pickle"])
def test_evaluate_refuses_an_artifact_whose_base_model_asks_to_run_code(
    tmp_path: Path, config: Config, kill_space: Path, flag: str, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AUTOCOMPRESS_ALLOW_PICKLE", raising=False)
    monkeypatch.delenv("AUTOCOMPRESS_TRUST_REMOTE_CODE", raising=False)
    artifact = export_of(config, tmp_path, first_block_dense_second_pruned())
    manifest = json.loads((artifact / MANIFEST_FILE).read_text())
    manifest["provenance"]["base_model"][flag] = True
    (artifact / MANIFEST_FILE).write_text(json.dumps(manifest))
    loaded = []
    monkeypatch.setattr("autocompress.evaluate.load_model", lambda **options: loaded.append(options))
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", str(artifact), "--data", str(kill_space)])
    assert exit_info.value.code == 2 and not loaded
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and flag in lines[0] and f"--{flag.replace('_', '-')}" in lines[0]


def test_a_worker_refuses_a_stored_config_that_asks_to_run_code_unless_its_own_command_line_does(
    tmp_path: Path, tiny_model_dir: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AUTOCOMPRESS_TRUST_REMOTE_CODE", raising=False)
    config = tiny_study_config(tmp_path, tiny_model_dir)
    config["model"]["trust_remote_code"] = True  # as anyone who can write to the shared database may have put it
    space = write_yaml(tmp_path / "space.yaml", config)
    out = str(tmp_path / "results")
    main(["search", str(space), "--study", "shared", "--results", out, "--n-trials", "0", "--quiet"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["worker", "--study", "shared", "--results", out, "--n-trials", "1", "--quiet"])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "trust_remote_code" in lines[0] and "--trust-remote-code" in lines[0]
    main(["worker", "--study", "shared", "--results", out, "--n-trials", "1", "--quiet", "--trust-remote-code"])
    assert "ran trials" in capsys.readouterr().out


# 4. Cache keys cover content.


def test_a_hessian_shared_by_q_k_v_is_stored_once_and_read_back_shared(config: Config, tmp_path: Path) -> None:
    first = CompressionSession(config, cache_dir=tmp_path / "cache")
    computed = {name: stats.hessian.clone() for name, stats in first.statistics({"hessian"}).items()}
    path = first.cache_dir / "hessian.safetensors"
    assert len(load_file(path)) == 2 * 4 + 1  # per block the attention, o, MLP and down inputs; n_tokens

    again = CompressionSession(config, cache_dir=tmp_path / "cache").statistics({"hessian"})
    assert again.keys() == computed.keys()
    assert all(torch.equal(again[name].hessian, hessian) for name, hessian in computed.items())
    q, k = again["model.layers.0.self_attn.q_proj"], again["model.layers.0.self_attn.k_proj"]
    assert q.hessian is k.hessian, "read back as one tensor, not one copy per Linear"


def test_editing_a_corpus_file_in_place_changes_the_cache_key(config: Config, tmp_path: Path) -> None:
    before = CompressionSession(config, cache_dir=tmp_path / "cache").cache_dir
    corpus = Path(config.data.files[0])
    words = corpus.read_text().split()
    corpus.write_text(" ".join(reversed(words)))  # same size, same words, other windows
    assert CompressionSession(config, cache_dir=tmp_path / "cache").cache_dir != before


def test_changing_a_local_model_s_weights_changes_its_fingerprint(tmp_path: Path, tiny_model_dir: Path) -> None:
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    before = model_fingerprint(str(folder), None)
    tensors = load_file(folder / "model.safetensors")
    name = next(iter(tensors))
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] += 1.0
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    assert model_fingerprint(str(folder), None) != before


def test_a_hub_model_s_fingerprint_is_its_revision(tiny_model) -> None:
    tiny_model.config._commit_hash = "a" * 40
    first = model_fingerprint("org/model", tiny_model)
    tiny_model.config._commit_hash = "b" * 40
    assert model_fingerprint("org/model", tiny_model) != first


def test_a_large_weight_file_is_hashed_by_samples_and_still_changes_with_its_header(tmp_path: Path) -> None:
    big = tmp_path / "model.safetensors"
    with open(big, "wb") as file:
        file.truncate(2 * 2**30)  # sparse: 2 GiB that take no disk
    before = file_digest(big)
    with open(big, "r+b") as file:
        file.write(b"{header}")
    assert file_digest(big) != before


# 5. Config mistakes are one-line errors before any model loads.


@pytest.mark.parametrize(
    ("section", "fields", "named"),
    [
        ("compression", {"pattern": "2:4"}, "pattern 2:4"),
        ("search", {"heartbeat_interval": 10, "grace_period": 5}, "grace_period"),
        ("search", {"max_size": -5}, "must be positive"),
        ("search", {"max_size": 1.5}, "ambiguous"),
        ("compression", {"quantization": "nf4"}, "search.bits"),
    ],
)
def test_config_mistakes_are_one_line_errors_before_any_model_loads(
    tmp_path: Path, tiny_model_dir: Path, section: str, fields: dict, named: str, capsys, monkeypatch
) -> None:
    config = tiny_study_config(tmp_path, tiny_model_dir)  # sparsity 0, 0.3, 0.6 and bits 4, 8, 16
    config[section] |= fields
    monkeypatch.setattr("autocompress.session.load_model", lambda **_: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit) as exit_info:
        main(["search", str(write_yaml(tmp_path / "space.yaml", config)), "--results", str(tmp_path / "results")])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("autocompress: error:") and named in lines[0]


@pytest.mark.parametrize(
    ("spelling", "dense_bytes", "expected"),
    [
        (80_000_000, 1000, 80_000_000),
        ("80MB", 1000, 80_000_000),
        ("1.5GiB", 1, 1_610_612_736),
        ("123", 10, 123),
        ("50%", 1000, 500),
        ("150%", 1000, 1500),
        (0.5, 1000, 500),
        ("0.25", 1000, 250),
    ],
)
def test_a_size_limit_has_one_meaning_per_spelling(spelling: object, dense_bytes: int, expected: int) -> None:
    assert size_limit(spelling).max_bytes(dense_bytes) == expected


def test_the_search_config_resolves_its_size_limit_once_parsed() -> None:
    assert Config.model_validate({"search": {"max_size": "50%"}}).search.max_bytes(1000) == 500
    assert Config().search.max_bytes(1000) is None


def test_a_preset_name_is_a_size_of_gguf_studies_and_a_misspelt_one_is_refused() -> None:
    assert size_limit("Q4_K_M").preset == "q4_k_m"
    with pytest.raises(ValueError, match=r"'q4_km' is not a size nor a llama\.cpp preset"):
        size_limit("q4_km")
    with pytest.raises(ValueError, match=r"names a llama\.cpp file's size, a budget of target gguf only"):
        Config.model_validate({"search": {"max_size": "q4_k_m"}})


# 6. A float32 model's artifact is the evaluated model.


def test_the_exported_model_computes_exactly_the_logits_the_search_evaluated(tmp_path: Path, tiny_model_dir) -> None:
    config = Config.model_validate(tiny_study_config(tmp_path, tiny_model_dir, compression={"pruning": "sparsegpt"}))
    plan = CompressionPlan(
        default=LayerCompression(sparsity=0.3),  # pruned only: kept values stored in 16 bits
        layers={"model.layers.1": LayerCompression(sparsity=0.3, bits=4)},
        pruning="sparsegpt",
        quantization="rtn",
        group_size=32,
    )
    session = CompressionSession(config, cache_dir=tmp_path / "cache")
    session.stitch(plan)
    tokens = session.pools.fitness
    with torch.no_grad():
        evaluated = session.model(tokens).logits
    artifact = export_of(config, tmp_path, plan)
    exported, _ = load(artifact)
    with torch.no_grad():
        assert torch.equal(exported(tokens).logits, evaluated)


def test_a_float32_value_beyond_float16_s_range_is_a_one_line_error(tmp_path: Path, tiny_model_dir: Path) -> None:
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    tensors = load_file(folder / "model.safetensors")
    name = next(key for key in tensors if key.endswith("norm.weight"))
    tensors[name][0] = 1e6
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = Config.model_validate(tiny_study_config(tmp_path, folder))
    with pytest.raises(UserError, match=f"{name} holds values up to 1e\\+06, beyond the range of float16"):
        CompressionSession(config)


# 7. Packaging.


def test_every_third_party_package_autocompress_imports_is_declared_with_its_floor() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [*project["dependencies"], *(dep for deps in project["optional-dependencies"].values() for dep in deps)]
    names = {dep.split("[")[0].split("=")[0].split(">")[0].split("<")[0].strip().lower() for dep in declared}
    for needed in ("numpy", "filelock", "optuna"):
        assert needed in names, needed
    assert "optuna>=5.0" in project["dependencies"]  # trial.set_constraint


# Issue 23. 1. A study's storage names a model; it runs no code of that model's unless this command line says so.


def tampered_study(tmp_path: Path, tiny_model_dir: Path, space_file) -> tuple[str, Path]:
    """A finished study whose stored config was then edited, as anyone handing over a study.db could, to load a
    folder whose config maps to its own Python (which leaves a marker file when imported) with remote code on."""
    import optuna

    out = tmp_path / "results"
    main(["search", str(space_file()), "--study", "handed", "--results", str(out), "--n-trials", "2", "--quiet"])
    folder = tmp_path / "remote-code-model"
    shutil.copytree(tiny_model_dir, folder)
    marker = tmp_path / "code-ran"
    (folder / "evil.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).touch()\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class EvilConfig(LlamaConfig):\n    pass\n"
        "class EvilModel(LlamaForCausalLM):\n    config_class = EvilConfig\n"
    )
    model_config = json.loads((folder / "config.json").read_text())
    model_config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(model_config))
    study = optuna.load_study(study_name="handed", storage=f"sqlite:///{out / 'handed' / 'study.db'}")
    stored = study.user_attrs["autocompress:config"]
    stored["model"] |= {"name": str(folder), "trust_remote_code": True}
    study.set_user_attr("autocompress:config", stored)
    return str(out), marker


@pytest.mark.parametrize(
    "command",
    [["export", "--trial", "0", "--out", "ARTIFACT"], ["report", "--no-sensitivity"], ["frontier"]],
    ids=["export", "report", "frontier"],
)
def test_a_command_reading_a_stored_config_that_asks_for_remote_code_refuses_in_one_line_and_runs_none(
    tmp_path: Path, tiny_model_dir: Path, space_file, command: list[str], capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AUTOCOMPRESS_TRUST_REMOTE_CODE", raising=False)
    out, marker = tampered_study(tmp_path, tiny_model_dir, space_file)
    arguments = [command[0], "--study", "handed", "--results", out] + [
        str(tmp_path / "artifact") if word == "ARTIFACT" else word for word in command[1:]
    ]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(arguments)
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1
    assert "trust_remote_code" in lines[0] and "--trust-remote-code" in lines[0]
    assert not marker.exists()
    assert build_parser().parse_args([*arguments, "--trust-remote-code"]).trust_remote_code


# 2. A full disk is one line and exit 2, and the next run re-runs what it failed.


def test_a_full_disk_while_trials_cache_what_they_compute_is_one_line_and_the_next_run_scores_every_seed(
    tmp_path: Path, kill_space: Path
) -> None:
    run = fill_the_disk_while_caching(kill_space, tmp_path / "results", n_trials=6)
    assert (run.survived, run.data_lost) == (1, 0)


# 3. A study is created whole or not at all, and a rerun completes its seeding.

UNIFORM_SEEDS = 5  # the tiny space's sparsity levels at 16 bits and bit-widths unpruned, (0, 16) once


def test_a_kill_between_the_writes_that_create_a_study_is_finished_by_the_next_run(
    tmp_path: Path, kill_space: Path
) -> None:
    points = [("optuna.study.study:Study.set_user_attr", k) for k in (2, 3)]
    run = kill_at_exact_lines("kill", kill_space, tmp_path / "results", 6, points, seeds=UNIFORM_SEEDS)
    assert (run.injected, run.survived, run.data_lost) == (2, 2, 0)


def test_a_kill_between_seed_enqueues_leaves_a_study_whose_next_run_enqueues_the_rest(
    tmp_path: Path, kill_space: Path
) -> None:
    points = [("optuna.study.study:Study.enqueue_trial", 3)]
    run = kill_at_exact_lines("kill", kill_space, tmp_path / "results", 6, points, seeds=UNIFORM_SEEDS)
    assert (run.injected, run.survived, run.data_lost) == (1, 1, 0)


# 4. A generations search re-runs a seed whose process was killed.


def test_a_seed_killed_in_a_generations_search_is_scored_by_the_next_run(tmp_path: Path, tiny_model_dir: Path) -> None:
    search = {
        "sparsity": [0.1, 0.2, 0.3, 0.4, 0.5],
        "bits": [16],
        "budget": {"sparsity": 0.3},
        "generations": {"offspring": 2, "stages": [0.5, 1.0], "survivors": [2, 1]},
        "heartbeat_interval": 1,
        "grace_period": 2,
    }
    config = tiny_study_config(tmp_path, tiny_model_dir, search=search)
    space = write_yaml(tmp_path / "generations.yaml", config)
    points = [("autocompress.search.objective:Objective.score", 2)]
    run = kill_at_exact_lines("kill", space, tmp_path / "results", 3, points, seeds=2)
    assert (run.injected, run.survived, run.data_lost) == (1, 1, 0)


# 5. A GGUF file is read by one validating reader: whatever is wrong with it is one line, in bounded memory.


def test_every_malformed_gguf_file_to_evaluate_or_to_load_as_a_model_is_one_line_and_exit_2_in_bounded_memory(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    run = fuzz_gguf_headers(tmp_path / "evaluated", count=200)
    assert run.survived == run.injected == 200
    study = tiny_study_config(tmp_path, tiny_model_dir)
    run = fuzz_gguf_headers(tmp_path / "models", count=60, seed=1, config=study)
    assert run.survived == run.injected == 60


def test_a_gguf_declaring_an_array_of_2_62_elements_is_refused_before_anything_is_allocated(tmp_path: Path) -> None:
    from autocompress.gguf_reader import read_gguf

    header = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1) + b"a" + struct.pack("<IIQ", 9, 0, 2**62)
    assert len(header) == 49
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "model.gguf").write_bytes(header)
    with pytest.raises(UserError, match="more than the 0 bytes left in the file can hold"):
        read_gguf(folder / "model.gguf")
    with pytest.raises(UserError, match="not an earlier export"):  # written_by_us reads it with the same reader
        prepare_out_dir(folder, overwrite=True)
    assert (folder / "model.gguf").read_bytes() == header


# 6. --overwrite removes only a folder whose autocompress.json an export wrote.


def test_overwrite_keeps_a_folder_whose_autocompress_json_is_not_an_export_s_record(tmp_path: Path) -> None:
    folder = tmp_path / "thesis"
    folder.mkdir()
    (folder / "autocompress.json").write_text(json.dumps({"editor": "vim"}))
    (folder / "thesis.txt").write_text("four years of work")
    with pytest.raises(UserError, match="not an earlier export"):
        prepare_out_dir(folder, overwrite=True)
    assert (folder / "thesis.txt").read_text() == "four years of work"


def test_overwrite_replaces_a_hugging_face_folder_an_export_wrote(tmp_path: Path, tiny_model, tokenizer) -> None:
    provenance = {"base_model": {"name": "tiny"}, "study": "s", "versions": package_versions()}
    folder = write_hf_folder(tiny_model, tokenizer, tmp_path / "hf", provenance=provenance)
    assert prepare_out_dir(folder, overwrite=True) == folder


# 7-10. Plausible mistakes are one line, before any model loads, with no secret printed.


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        (["search", "SPACE", "--timeout", "nan"], "--timeout"),
        (["search", "SPACE", "--timeout", "abc"], "--timeout"),
        (["search", "SPACE", "--timeout", "-5"], "--timeout"),
        (["search", "SPACE", "--n-trials", "-3"], "--n-trials"),
        (["export", "--study", "s", "--pick", "worst", "--out", "x"], "--pick"),
    ],
)
def test_a_bad_command_line_argument_is_one_line_naming_it_and_exit_2(
    tmp_path: Path, arguments: list[str], named: str, capsys
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "missing.yaml") if word == "SPACE" else word for word in arguments])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1
    assert lines[0].startswith("autocompress: error:") and named in lines[0]


def test_a_device_this_machine_lacks_and_a_binary_config_are_one_line_errors(
    tmp_path: Path, tiny_model_dir: Path, capsys
) -> None:
    config = tiny_study_config(tmp_path, tiny_model_dir)
    config["model"]["device"] = "cuda:63"
    binary = tmp_path / "weights.yaml"
    binary.write_bytes(bytes(range(256)) * 4)
    for path, named in ((write_yaml(tmp_path / "cuda.yaml", config), "model.device"), (binary, "not a text file")):
        with pytest.raises(SystemExit) as exit_info:
            main(["apply", str(path)])
        lines = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(lines) == 1 and named in lines[0]


def test_a_storage_url_s_password_is_never_printed(capsys) -> None:
    from autocompress.search.storage import masked_url

    url = "postgresql+psycopg2://autocompress:s3cret-pw@127.0.0.1:1/none"
    assert masked_url(url) == "postgresql+psycopg2://autocompress:***@127.0.0.1:1/none"
    assert masked_url("sqlite:///results/demo/study.db") == "sqlite:///results/demo/study.db"
    with pytest.raises(SystemExit) as exit_info:
        main(["frontier", "--study", "demo", "--storage", url])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and "s3cret-pw" not in error and "autocompress:***@" in error


def test_an_impossible_size_budget_creates_no_study_so_the_corrected_config_runs_under_its_name(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    from tests.test_generations import size_budget_config

    location = StudyLocation.resolve("budget", tmp_path / "results")
    impossible = Config.model_validate(size_budget_config(tmp_path, tiny_model_dir, size="1kB"))
    with pytest.raises(UserError, match="below the smallest plan"):
        run_search(impossible, location, n_trials=1, progress=False)
    corrected = Config.model_validate(size_budget_config(tmp_path, tiny_model_dir, size="35%"))
    assert complete_trials(run_search(corrected, location, n_trials=1, progress=False))


def test_a_changed_search_space_and_a_bad_storage_are_refused_before_the_model_loads(
    tmp_path: Path, space_file, capsys
) -> None:
    out = str(tmp_path / "results")
    main(["search", str(space_file()), "--study", "s", "--results", out, "--n-trials", "1", "--quiet"])
    unloadable = load_config(space_file()).model_dump(mode="json")
    unloadable["model"]["name"] = str(tmp_path / "no-such-model")  # a search that reached the model would say so
    space = write_yaml(tmp_path / "changed.yaml", unloadable)
    storage = "postgresql+psycopg2://autocompress:pw@127.0.0.1:1/none"
    for arguments, named in ((["--results", out], "different search space"), (["--storage", storage], "storage")):
        capsys.readouterr()
        with pytest.raises(SystemExit):
            main(["search", str(space), "--study", "s", *arguments, "--n-trials", "2", "--quiet"])
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and named in lines[0], lines


# 11. Caches are checked against what was written, not trusted.


def test_a_cached_student_changed_on_disk_or_cut_short_is_distilled_again_to_the_same_weights(
    tmp_path: Path, tiny_model
) -> None:
    from autocompress.config import DistillationConfig
    from autocompress.distillation import measure_importance
    from autocompress.students import StudentTrainer, weights_digest

    torch.manual_seed(0)
    calibration, fitness = torch.randint(0, 256, (4, 16)), torch.randint(0, 256, (2, 16))
    settings = DistillationConfig(steps=2, batch_size=2, report_every=1)

    def trainer() -> StudentTrainer:
        importance = lambda: measure_importance(tiny_model, calibration)  # noqa: E731
        return StudentTrainer(tiny_model, importance, calibration, fitness, settings, 2, tmp_path, "key")

    shape = {**trainer().shape_of(CompressionPlan.uniform()), "intermediate_size": 32}
    torch.manual_seed(1)
    student, curve = trainer().distilled(shape, None)
    digest = weights_digest(student)
    (path,) = (tmp_path / "students").glob("*.safetensors")
    assert [(step, kl) for step, kl in trainer().distilled(shape, None)[1]] == curve  # read back from the cache
    original = path.read_bytes()
    for damaged in (original[:-9], original[:-64] + bytes(b ^ 0xFF for b in original[-64:])):
        path.write_bytes(damaged)
        torch.manual_seed(1)
        again, again_curve = trainer().distilled(shape, None)
        assert weights_digest(again) == digest and again_curve == curve
        with safe_open(path, "pt") as stored:  # and stored whole again
            assert stored.metadata()["sha256"] == digest


def test_gguf_block_files_flipped_cut_short_or_without_their_digest_are_quantized_again_and_the_study_goes_on(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    compression = {"target": "gguf", "granularity": "linear"}
    search = {"sparsity": [0.0], "bits": [16], "formats": GGUF_FORMATS, "seeds": "none"}
    config = tiny_study_config(tmp_path, tiny_model_dir, compression=compression, search=search)
    run = corrupt_gguf_blocks(write_yaml(tmp_path / "gguf.yaml", config), tmp_path / "results", n_trials=2, files=3)
    assert (run.injected, run.survived, run.data_lost) == (3, 3, 0)


# 12. Generation workers record each plan once: on one machine, and on several machines sharing a PostgreSQL study.


@pytest.mark.parametrize(
    "storage", [pytest.param(None, id="sqlite"), pytest.param(POSTGRES_URL, id="postgresql", marks=needs_postgres)]
)
def test_generation_workers_racing_to_record_the_plans_they_all_scored_record_each_once(
    tmp_path: Path, tiny_model_dir: Path, storage: str | None
) -> None:
    """On PostgreSQL each worker has a results folder of its own, as on separate machines: no file lock is common."""
    search = {
        "sparsity": [0.1, 0.2, 0.3, 0.4, 0.5],
        "bits": [16],
        "budget": {"sparsity": 0.3},
        "generations": {"offspring": 2, "stages": [0.5, 1.0], "survivors": [2, 1]},
    }
    config = tiny_study_config(tmp_path, tiny_model_dir, compression={"granularity": "linear"}, search=search)
    space = write_yaml(tmp_path / "generations.yaml", config)
    run = race_generation_workers(space, tmp_path / "results", rounds=1, trials_per_round=2, storage=storage)
    assert run.injected >= 1 and (run.survived, run.data_lost) == (run.injected, 0)


def test_a_phi3_model_under_the_gguf_target_takes_llama_cpp_s_phi3_tensor_names_and_presets(tmp_path: Path) -> None:
    from transformers import Phi3Config

    from autocompress.models import meta_model
    from autocompress.targets.gguf.weights import gguf_tensors, preset_seeds, space_levels

    folder = tmp_path / "phi3"
    Phi3Config(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    ).save_pretrained(folder)
    raw = tiny_study_config(tmp_path, folder, compression={"target": "gguf", "granularity": "linear"})
    raw["search"] |= {"sparsity": [0.0], "bits": [16], "formats": ["q4_0", "q8_0", "f16"], "seeds": "none"}
    config = Config.model_validate(raw)
    levels = space_levels(config)  # before any weight loads
    tensors = gguf_tensors(meta_model(config.model), "linear")
    assert {tensor.gguf_name for tensor in tensors} >= {"blk.0.attn_qkv.weight", "blk.1.ffn_up.weight"}
    model_config = meta_model(config.model).config
    assert any(seed.params for seed in preset_seeds(tensors, model_config, levels))
