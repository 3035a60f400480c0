"""The layer-variant database, stitched trials and staged fitness, on the tiny model."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState
from safetensors.torch import load_file

import autocompress.session
from autocompress.calibration import collect_statistics
from autocompress.compress import apply_plan, statistics_needed
from autocompress.config import Config
from autocompress.data import token_pools
from autocompress.frontier import frontier_of
from autocompress.models import compressible_linears, load_model, round_model_to_storage, round_to_storage
from autocompress.plan import CompressionPlan, LayerCompression
from autocompress.record import StudyRecord, TrialRecord, trial_records
from autocompress.search import SearchSpace, StudyLocation, run_search
from autocompress.search.objective import stage_windows
from autocompress.session import CompressionSession
from autocompress.variants import VariantDatabase, load_variant_file, variant_settings
from tests.conftest import tiny_study_config, write_yaml


@pytest.fixture
def write_config(tmp_path: Path, tiny_model_dir: Path):
    """A config for the tiny model with SparseGPT + GPTQ; keyword arguments override `search` fields."""

    def write(fitness: int = 4, compression: dict | None = None, **search: object) -> Config:
        config = tiny_study_config(
            tmp_path,
            tiny_model_dir,
            fitness=fitness,
            calibration=8,
            compression={"pruning": "sparsegpt", "quantization": "gptq"} | (compression or {}),
            search={"bits": [3, 4, 16], "n_trials": 6, "database": "on"} | search,
        )
        write_yaml(tmp_path / "space.yaml", config)
        return Config.model_validate(config)

    return write


def directly_compressed(config: Config, plan: CompressionPlan) -> dict[str, torch.Tensor]:
    """The weights of a fresh model compressed with apply_plan, with statistics collected afresh, and rounded
    to what an artifact stores as a session's are: every tensor before, the pruned-only Linears after."""
    model, tokenizer = load_model(**config.model.model_dump())
    round_model_to_storage(model)
    pools = token_pools(config.data, tokenizer)
    linears = compressible_linears(model)
    statistics = collect_statistics(model, linears, pools.calibration, statistics_needed(plan), config.data.batch_size)
    apply_plan(model, plan, statistics)
    for linear in linears:
        if plan.setting(linear.name, linear.block).bits >= 16:  # kept values stored at 16 bits
            round_to_storage(linear.module.weight.data, linear.name)
    return {linear.name: linear.module.weight.detach().clone() for linear in linears}


def resident_weights(session: CompressionSession) -> dict[str, torch.Tensor]:
    return {linear.name: linear.module.weight.detach().clone() for linear in session.linears}


def mixed_plan(config: Config, session: CompressionSession, shift: int = 0) -> CompressionPlan:
    """Every Linear at a different (sparsity, precision) of the space, combinations included."""
    settings = variant_settings(config.search.sparsity_levels(), config.search.precision_levels())
    layers = {linear.name: settings[(i + shift) % len(settings)] for i, linear in enumerate(session.linears)}
    return CompressionPlan(layers=layers, **(config.compression.plan_options() | {"granularity": "linear"}))


@pytest.mark.parametrize("quantization", ["gptq", "gptq-actorder", "rtn"])
def test_a_stitched_model_equals_the_directly_compressed_one(tmp_path: Path, write_config, quantization) -> None:
    config = write_config(compression={"quantization": quantization})
    session = CompressionSession(config, cache_dir=tmp_path / "cache")
    assert session.use_database
    report = session.build_database()
    assert report.computed == report.variants == len(session.linears) * 8
    first, second = mixed_plan(config, session), mixed_plan(config, session, shift=3)
    session.stitch(first)  # then the second: only what differs is swapped
    session.stitch(second)
    stitched = resident_weights(session)
    direct = directly_compressed(config, second)
    for name, weight in direct.items():
        assert torch.equal(stitched[name], weight), name
    assert session.database().computed == report.computed, "stitching computed nothing the build had not"


def test_hessians_are_held_one_block_at_a_time_and_give_the_variants_of_one_pass(
    tmp_path: Path, write_config, monkeypatch
) -> None:
    config = write_config(hessian_memory_mb=0.001)  # less than one block's Hessians: every block is a group
    session = CompressionSession(config, cache_dir=tmp_path / "cache")
    blocks = list(dict.fromkeys(linear.block for linear in session.linears))
    assert [[linear.block for linear in group] for group in session.hessian_groups] == [
        [block] * sum(linear.block == block for linear in session.linears) for block in blocks
    ]
    held_at_each_pass = []
    collect = autocompress.session.collect_statistics

    def spy(model, linears, tokens, needs, *args):
        if "hessian" in needs:
            held_at_each_pass.append((len(session._held_hessians), {linear.block for linear in linears}))
        return collect(model, linears, tokens, needs, *args)

    monkeypatch.setattr(autocompress.session, "collect_statistics", spy)
    session.build_database()
    assert held_at_each_pass == [(0, {block}) for block in blocks], "one pass per block, the last one dropped first"
    assert session._held_hessians == {}, "none held once the variants are stored"
    plan = mixed_plan(config, session)
    session.stitch(plan)
    stitched = resident_weights(session)
    for name, weight in directly_compressed(config, plan).items():  # all Hessians from one pass
        assert torch.equal(stitched[name], weight), name


def test_a_budget_holding_every_block_calibrates_them_in_one_pass(tmp_path: Path, write_config) -> None:
    session = CompressionSession(write_config(), cache_dir=tmp_path / "cache")  # 4000 MB by default
    assert [len(group) for group in session.hessian_groups] == [len(session.linears)]
    session.build_database()
    assert session.hessian_passes == 1


def test_an_export_compressed_block_by_block_stores_what_one_pass_of_all_hessians_gives(
    tmp_path: Path, write_config
) -> None:
    config = write_config()
    plan = CompressionPlan.uniform(0.5, 3, **config.compression.plan_options())
    one_pass = CompressionSession(config, cache_dir=tmp_path / "one")
    by_block = CompressionSession(
        config.model_copy(update={"search": config.search.model_copy(update={"hessian_memory_mb": 0.001})}),
        cache_dir=tmp_path / "blocks",
    )
    expected, compressed = one_pass.compress_for_export(plan), by_block.compress_for_export(plan)
    assert by_block.hessian_passes == len(by_block.hessian_groups) == 2
    assert set(compressed) == set(expected) == {linear.name for linear in by_block.linears}
    for name, stored in compressed.items():
        assert torch.equal(stored.quantized.codes, expected[name].quantized.codes), name
        assert torch.equal(stored.mask, expected[name].mask), name
    direct = directly_compressed(config, plan)  # every Hessian from one pass, compressed in place
    assert all(torch.equal(weight, direct[name]) for name, weight in resident_weights(by_block).items())


def test_format_levels_are_variants_of_their_own_and_stitch_exactly(tmp_path: Path, write_config) -> None:
    formats = ["int3", "int4-g64", "nf4", "mxfp4", "nvfp4", "fp8-e4m3-tensor", "fp16"]
    config = write_config(sparsity=[0.0, 0.5], bits=[16], formats=formats, compression={"pruning": "magnitude"})
    session = CompressionSession(config, cache_dir=tmp_path / "cache")
    assert session.use_database  # GPTQ, for the integer levels
    report = session.build_database()
    assert report.computed == report.variants == len(session.linears) * 13  # 2 × 7 levels, less the dense one
    folder = session.database().root / session.linears[0].name
    assert {path.name for path in folder.glob("s0.0000_*")} == {
        f"s0.0000_{name}.safetensors" for name in ("b3", "int4-g64", "nf4", "mxfp4", "nvfp4", "fp8-e4m3-tensor")
    }
    first, second = mixed_plan(config, session), mixed_plan(config, session, shift=5)
    assert {setting.format for setting in second.layers.values()} >= {"nf4", "mxfp4", "nvfp4", "fp8-e4m3-tensor"}
    session.stitch(first)
    session.stitch(second)
    stitched = resident_weights(session)
    for name, weight in directly_compressed(config, second).items():
        assert torch.equal(stitched[name], weight), name  # E8M0, E4M3 and tensor scales survive the store
    assert session.database().computed == report.computed


def test_stitching_loads_only_the_linears_whose_setting_changed(tmp_path: Path, write_config, monkeypatch) -> None:
    config = write_config()
    session = CompressionSession(config, cache_dir=tmp_path / "cache")
    session.build_database()
    loads: list[str] = []
    real_load = VariantDatabase.load

    def counting_load(self, name, setting):
        loads.append(name)
        return real_load(self, name, setting)

    monkeypatch.setattr(VariantDatabase, "load", counting_load)
    options = config.compression.plan_options()
    session.reference("fitness")  # computed once from the dense model, before any stitching
    session.stitch(CompressionPlan.uniform(sparsity=0.3, bits=4, **options))
    assert len(loads) == len(session.linears)
    loads.clear()
    one_block_changed = CompressionPlan(
        default=LayerCompression(sparsity=0.3, bits=4),
        layers={"model.layers.1": LayerCompression(sparsity=0.6, bits=4)},
        **options,
    )
    measured = session.measure(one_block_changed)
    assert sorted(loads) == sorted(linear.name for linear in session.linears if linear.block == "model.layers.1")
    assert measured.stitch_s > 0 and measured.eval_s > 0
    loads.clear()
    session.stitch(CompressionPlan(**options))  # back to dense: restored from the dense copy, nothing loaded
    assert loads == []
    for linear in session.linears:
        assert torch.equal(linear.module.weight, session.dense_weights[linear.name])


def test_variants_are_stored_compactly(tmp_path: Path, write_config) -> None:
    config = write_config(sparsity=[0.0, 0.5], bits=[4, 16])  # groups of 32: 2.5 bytes of scale + zero per group
    session = CompressionSession(config, cache_dir=tmp_path / "cache")
    session.build_database()
    database = session.database()
    weights = sum(weight.numel() for weight in session.dense_weights.values())
    payload = {}
    for setting in variant_settings([0.0, 0.5], [4, 16]):
        paths = [database.path(linear.name, setting) for linear in session.linears]
        tensors = sum(value.numel() * value.element_size() for path in paths for value in load_file(path).values())
        assert sum(path.stat().st_size for path in paths) - tensors < 500 * len(paths)  # the JSON headers
        payload[(setting.sparsity, setting.bits)] = tensors / weights
    # What the artifact stores (the codec's form): 4-bit codes, float16 scales, 4-bit zero-points.
    assert payload[(0.0, 4)] == pytest.approx(0.5 + 2.5 / 32)
    assert payload[(0.5, 4)] == pytest.approx(0.25 + 1 / 8 + 2.5 / 32)  # codes of the kept half, a 1-bit mask
    assert payload[(0.5, 16)] == pytest.approx(0.5 * 4 + 1 / 8)  # the kept half in the model's float32, the mask
    name = session.linears[0].name
    stored = load_variant_file(database.path(name, LayerCompression(sparsity=0.5, bits=4)))
    assert (stored == 0).float().mean().item() == pytest.approx(0.5, abs=0.02)


_SLOW_BUILD = """
import sys, time
from autocompress import methods
from autocompress.config import Config
from autocompress.session import CompressionSession
import yaml

real = methods.PRUNERS["sparsegpt"]
def slow(*args, **kwargs):
    time.sleep(0.4)
    return real.function(*args, **kwargs)
methods.PRUNERS["sparsegpt"] = methods.Method(slow, real.needs)
config = Config.model_validate(yaml.safe_load(open(sys.argv[1])))
session = CompressionSession(config, cache_dir=__import__("pathlib").Path(sys.argv[2]))
session.build_database()
print("finished", flush=True)
"""


def test_the_database_resumes_after_a_kill_without_recomputing_or_corrupt_files(tmp_path: Path, write_config) -> None:
    config = write_config(sparsity=[0.0, 0.5], bits=[4, 16])
    cache = tmp_path / "cache"
    process = subprocess.Popen(
        [sys.executable, "-c", _SLOW_BUILD, str(tmp_path / "space.yaml"), str(cache)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )

    def stored() -> list[Path]:  # whole files only: a writer's temporary is ".<name>.safetensors.<random>.safetensors"
        return sorted(
            path for path in cache.rglob("*.safetensors") if "variants" in path.parts and not path.name.startswith(".")
        )

    try:
        deadline = time.monotonic() + 240
        while len(stored()) < 6 and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.02)
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    before = {path: (path.stat().st_mtime_ns, path.read_bytes()) for path in stored()}
    total = 14 * 3  # 14 Linears x (0.5, 16), (0, 4), (0.5, 4)
    assert 6 <= len(before) < total, f"the kill came at {len(before)} of {total} variants"

    session = CompressionSession(config, cache_dir=cache)
    report = session.build_database()
    assert report.computed == total - len(before)
    after = stored()
    assert len(after) == total
    for path, (mtime, content) in before.items():
        assert path.stat().st_mtime_ns == mtime and path.read_bytes() == content, f"{path} was rewritten"
    leftovers = [path for path in cache.rglob(".*") if path.name != ".lock"]
    assert leftovers == []
    plan = mixed_plan(config, session)
    session.stitch(plan)
    direct = directly_compressed(config, plan)
    for name, weight in resident_weights(session).items():
        assert torch.equal(weight, direct[name]), name


def test_staged_measurement_adds_up_to_the_whole_pool(tmp_path: Path, write_config) -> None:
    config = write_config(fitness=8)
    session = CompressionSession(config, cache_dir=tmp_path / "cache")
    plan = CompressionPlan.uniform(sparsity=0.3, bits=4, **config.compression.plan_options())
    whole = session.measure(plan)
    seen = []
    staged = session.measure(plan, stages=[2, 4, 8], on_stage=lambda *args: seen.append(args[:2]))
    assert seen == [(0, 2), (1, 4)]
    assert [count for count, _ in staged.stages] == [2, 4, 8]
    assert staged.metrics.kl == pytest.approx(whole.metrics.kl, rel=1e-5)
    assert staged.metrics.ce == pytest.approx(whole.metrics.ce, rel=1e-5)
    assert staged.metrics.n_tokens == whole.metrics.n_tokens
    assert stage_windows(8, [0.25, 0.5, 1.0]) == [2, 4, 8]
    assert stage_windows(3, [0.25, 0.5, 1.0]) == [1, 2, 3]
    assert stage_windows(8, [1.0]) == [8]


def test_staged_fitness_never_puts_a_plan_on_the_frontier_on_a_partial_score(tmp_path: Path, write_config) -> None:
    config = write_config(
        fitness=8, stages=[0.25, 0.5, 1.0], stage_margin=0.0, sampler="random", n_trials=14, database="off",
        compression={"pruning": "wanda", "quantization": "rtn"},
    )  # fmt: skip
    location = StudyLocation.resolve("staged", tmp_path / "results")
    study = run_search(config, location, n_trials=14, progress=False)
    pruned = study.get_trials(states=(TrialState.PRUNED,))
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert pruned, "with no margin some random plans are pruned after a partial score"
    for trial in pruned:
        assert TrialRecord.of(trial).loss is None and TrialRecord.of(trial).partial_windows < 8
        assert TrialRecord.of(trial).pruned_by in {member.number for member in complete}
    # A pruned plan with the best partial loss of all would still not be on the frontier.
    front = frontier_of(trial_records(study))
    assert front and all(member.state == TrialState.COMPLETE for member in front)
    session = CompressionSession(config, cache_dir=location.cache_dir)
    space = SearchSpace(config, list(dict.fromkeys(linear.block for linear in session.linears)))
    for member in front:
        stages = member.stage_losses
        assert [count for count, _ in stages] == [2, 4, 8]
        full = session.measure(space.plan_from_params(member.params)).metrics.kl
        assert member.loss == pytest.approx(full, rel=1e-5)
        assert stages[-1][1] == pytest.approx(full, rel=1e-5)


def test_a_pruned_trial_with_a_low_partial_loss_stays_off_the_frontier(tmp_path: Path) -> None:
    study = optuna.create_study(directions=["minimize", "minimize"])
    complete = optuna.trial.create_trial(
        values=[0.5, 0.5], user_attrs={"loss": 0.5, "size_bytes": 100, "size_ratio": 0.5}
    )
    pruned = optuna.trial.create_trial(
        state=TrialState.PRUNED, user_attrs={"partial_loss": 0.01, "size_bytes": 50, "size_ratio": 0.25}
    )
    study.add_trials([complete, pruned])
    assert [record.number for record in frontier_of(trial_records(study))] == [0]


def test_a_scalar_staged_search_reports_intermediate_values(tmp_path: Path, write_config) -> None:
    config = write_config(fitness=4, stages=[0.5, 1.0], objective="scalar", sampler="random", database="off")
    study = run_search(config, StudyLocation.resolve("scalar", tmp_path / "results"), n_trials=5, progress=False)
    for trial in study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED)):
        assert 2 in trial.intermediate_values


def test_a_search_with_the_database_runs_end_to_end(tmp_path: Path, write_config) -> None:
    config = write_config(n_trials=8)
    location = StudyLocation.resolve("db", tmp_path / "results")
    study = run_search(config, location, n_trials=8, progress=False)
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) >= 8
    attr = StudyRecord.of(study).database
    variants = Path(attr["path"])
    assert variants.is_relative_to(location.cache_dir) and attr["files"] == 14 * 8 and attr["bytes"] > 0
    assert all(TrialRecord.of(trial).stitch_s >= 0 and TrialRecord.of(trial).eval_s > 0 for trial in complete)
    session = CompressionSession(config, cache_dir=location.cache_dir)
    space = SearchSpace(config, list(dict.fromkeys(linear.block for linear in session.linears)))
    best = min(complete, key=lambda trial: TrialRecord.of(trial).loss + TrialRecord.of(trial).size_ratio)
    measured = session.measure(space.plan_from_params(best.params))
    assert measured.metrics.kl == pytest.approx(TrialRecord.of(best).loss, rel=1e-5)
    assert session.database().computed == 0, "a second process reuses the stored variants"
