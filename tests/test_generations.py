"""EvoPress's generations: many plans scored per stored trial, selected in stages, resumable and shared by workers."""

from __future__ import annotations

import copy
import json
import os
import signal
import sqlite3
import subprocess
import threading
import time
import uuid
from contextlib import closing
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from pydantic import ValidationError

from autocompress.allocation import average_level
from autocompress.config import Config, GenerationsConfig, SearchConfig
from autocompress.errors import UserError
from autocompress.frontier import frontier_of
from autocompress.record import StudyLocation, StudyRecord, TrialRecord, scored_records
from autocompress.search import SearchSpace, generations, run_search
from autocompress.search.generations import GenerationSearch, selection_stages
from autocompress.search.objective import Objective
from autocompress.search.ray_backend import run_ray_search
from autocompress.search.storage import recording_lock
from autocompress.search.study import study_session
from autocompress.session import CompressionSession
from tests.conftest import CLI, POSTGRES_URL, needs_postgres, run_together, tiny_study_config, wait_for, write_yaml

BUDGET = {"sparsity": [0.1, 0.2, 0.3, 0.4, 0.5], "bits": [16], "budget": {"sparsity": 0.3}}
GENERATIONS = {"offspring": 6, "stages": [0.25, 1.0], "survivors": [3, 1]}


def generations_config(folder: Path, model_dir: Path, fitness: int = 8, **generations: object) -> dict:
    """The tiny model per Linear (14 units) at an average sparsity of 0.3, in generations of 6 offspring."""
    search = BUDGET | {"generations": GENERATIONS | generations, "heartbeat_interval": 1, "grace_period": 2}
    return tiny_study_config(folder, model_dir, fitness=fitness, compression={"granularity": "linear"}, search=search)


@pytest.mark.parametrize(
    ("generations", "message"),
    [
        ({"stages": [0.25, 0.5]}, "ending with 1.0"),
        ({"stages": [0.5, 0.25, 1.0], "survivors": [4, 2, 1]}, "increasing fractions"),
        ({"stages": [0.25, 1.0], "survivors": [4, 2, 1]}, "one count per stage"),
        ({"stages": [0.25, 1.0], "survivors": [4, 2]}, "end with 1"),
        ({"stages": [0.1, 0.5, 1.0], "survivors": [2, 2, 1]}, "decrease strictly"),
        ({"offspring": 3, "stages": [0.5, 1.0], "survivors": [4, 1]}, "cannot exceed the offspring"),
        ({"stages": [0.1, 0.5, 1.0], "survivors": [4, 1, 1]}, "decrease strictly"),
    ],
)
def test_bad_generation_settings_are_refused(generations: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        GenerationsConfig(**generations)


def test_generations_need_a_budget_and_their_own_stages() -> None:
    with pytest.raises(ValidationError, match="add budget"):
        SearchConfig(generations={})
    with pytest.raises(ValidationError, match=r"drop search\.stages"):
        SearchConfig(**BUDGET, generations={}, stages=[0.5, 1.0])
    search = SearchConfig(**BUDGET, generations={})
    assert search.generations == GenerationsConfig(offspring=16, stages=[0.0625, 0.25, 1.0], survivors=[4, 2, 1])
    assert search.stage_fractions() == [0.0625, 0.25, 1.0]  # the seeds keep their losses on the same windows


def test_stages_that_round_to_the_same_windows_are_one_stage_keeping_fewer() -> None:
    assert selection_stages(16, [0.0625, 0.25, 1.0], [4, 2, 1]) == [(1, 4), (4, 2), (16, 1)]
    assert selection_stages(4, [0.0625, 0.25, 1.0], [4, 2, 1]) == [(1, 2), (4, 1)]


def test_generations_are_refused_by_the_ray_backend_in_one_line(tmp_path: Path, tiny_model_dir: Path) -> None:
    config = Config.model_validate(generations_config(tmp_path, tiny_model_dir))
    with pytest.raises(UserError, match=r"search\.generations runs on the local backend"):
        run_ray_search(config, StudyLocation.resolve("g", tmp_path / "results"), n_trials=4, progress=False)


def recorded_by_generations(study: optuna.Study) -> list[TrialRecord]:
    return [record for record in scored_records(study) if record.generation_evaluations is not None]


def test_a_generations_search_records_only_fully_scored_plans_each_one_its_parent_s_best_offspring(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    config = Config.model_validate(generations_config(tmp_path, tiny_model_dir))
    location = StudyLocation.resolve("gen", tmp_path / "results")
    study = run_search(config, location, n_trials=14, progress=False)

    trials = study.get_trials(deepcopy=False)
    records = [TrialRecord.of(trial) for trial in trials]
    assert len(records) >= 14 and all(trial.state == TrialState.COMPLETE for trial in trials)
    assert sorted(name for record in records for name in record.baselines) == ["owl", "sensitivity", "uniform"]
    generated = recorded_by_generations(study)
    assert len(generated) >= 14 - 3
    # Stages: 2 windows of 8, 3 survivors, then the whole pool; the parent is scored once, when it is recorded.
    for record in generated:
        assert [windows for windows, _ in record.stage_losses] == [2, 8]
        assert record.stage_losses[-1][1] == pytest.approx(record.loss)
        assert 3 <= record.generation_evaluations <= 6 + 3  # the offspring, then the survivors on the rest
    # The parent of each generation is the best trial the study held when the generation began: before its first
    # recorded sibling (one generation's trials are recorded one after the other, with the same parent).
    by_number = {record.number: record for record in records}
    for record in generated:
        first = record.number
        while (
            first - 1 in by_number
            and by_number[first - 1] in generated
            and by_number[first - 1].parent == record.parent
        ):
            first -= 1
        earlier = [other for other in records if other.number < first]
        assert record.parent == min(earlier, key=lambda other: (other.loss, other.number)).number
    # Far fewer stored trials than scored plans, every one at the budget and none twice.
    session = CompressionSession(config, cache_dir=location.cache_dir)
    space = SearchSpace(config, session.units)
    plans = [space.plan_from_params(record.params) for record in records]
    assert len({plan.to_json() for plan in plans}) == len(plans)
    for plan in plans:
        assert average_level(plan, session.linears, "sparsity") == pytest.approx(0.3, abs=1e-9)
    # A loss put together stage by stage is the loss of scoring the whole pool at once.
    for record in generated[:3]:
        whole = session.measure(space.plan_from_params(record.params)).metrics
        assert whole.kl == pytest.approx(record.loss, rel=1e-5)
    # The frontier and the outputs read recorded trials as any others.
    assert frontier_of(scored_records(study))
    assert (location.out_dir / "frontier.csv").stat().st_size > 0 and (location.out_dir / "report.md").is_file()
    best = min(scored_records(study), key=lambda record: record.loss)
    uniform = next(record for record in records if record.baseline == "uniform")
    assert best.loss <= uniform.loss


def test_a_search_whose_budget_admits_few_plans_stops_once_it_holds_them_all(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    # Two blocks at an average sparsity of 0.3 over 0.2/0.3/0.4: three plans in all, far fewer than asked for.
    search = {"sparsity": [0.2, 0.3, 0.4], "bits": [16], "budget": {"sparsity": 0.3}, "generations": GENERATIONS}
    config = Config.model_validate(tiny_study_config(tmp_path, tiny_model_dir, search=search))
    study = run_search(config, StudyLocation.resolve("few", tmp_path / "results"), n_trials=50, progress=False)

    plans = {tuple(sorted(record.params.items())) for record in scored_records(study)}
    assert len(plans) == 3


def generation_trials_in(database: Path) -> int:
    try:
        with closing(sqlite3.connect(database, timeout=5)) as connection:
            query = "SELECT COUNT(*) FROM trial_user_attributes WHERE key = 'generation_evaluations'"
            return connection.execute(query).fetchone()[0]
    except sqlite3.Error:  # not created yet
        return 0


def test_a_killed_generations_search_resumes_from_its_best_recorded_trial(tmp_path: Path, tiny_model_dir: Path) -> None:
    space = write_yaml(tmp_path / "space.yaml", generations_config(tmp_path, tiny_model_dir, fitness=32))
    out = tmp_path / "results"
    command = [*CLI, "search", str(space), "--study", "k", "--results", str(out), "--n-trials", "40", "--quiet"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: generation_trials_in(out / "k" / "study.db") >= 2, 300, "two trials recorded by generations")
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    storage_url = f"sqlite:///{out / 'k' / 'study.db'}"
    before = optuna.load_study(study_name="k", storage=storage_url)
    recorded_before = {trial.number: trial.values for trial in before.get_trials(states=(TrialState.COMPLETE,))}
    best_before = min(scored_records(before), key=lambda record: (record.loss, record.number))
    assert not before.get_trials(states=(TrialState.RUNNING,)), "generations leave no running trial behind"

    subprocess.run(command, check=True, timeout=600, capture_output=True)

    after = optuna.load_study(study_name="k", storage=storage_url)
    complete = after.get_trials(states=(TrialState.COMPLETE,))
    assert len(recorded_before) < 40 <= len(complete)
    for number, values in recorded_before.items():
        assert after.trials[number].values == values, "no recorded trial is lost or changed"
    resumed = [TrialRecord.of(trial) for trial in complete if trial.number not in recorded_before]
    assert resumed and resumed[0].parent == best_before.number, "the first generation after the kill starts there"
    assert len({json.dumps(trial.params, sort_keys=True) for trial in complete}) == len(complete)


@pytest.mark.parametrize(
    "storage", [pytest.param(None, id="sqlite"), pytest.param(POSTGRES_URL, id="postgresql", marks=needs_postgres)]
)
def test_two_workers_run_generations_on_one_study_sharing_their_best(
    tmp_path: Path, tiny_model_dir: Path, storage: str | None
) -> None:
    study_name = f"generations-{uuid.uuid4().hex[:8]}"
    out = tmp_path / "results"
    space = write_yaml(tmp_path / "space.yaml", generations_config(tmp_path, tiny_model_dir, fitness=16))
    command = [*CLI, "search", str(space), "--study", study_name, "--results", str(out), "--n-trials", "30", "--quiet"]
    if storage:
        command += ["--storage", storage]
    run_together(command)
    url = storage or f"sqlite:///{out / study_name / 'study.db'}"
    study = optuna.load_study(study_name=study_name, storage=url)
    try:
        trials = study.get_trials(deepcopy=False)
        records = [TrialRecord.of(trial) for trial in trials]
        assert len(trials) >= 30 and all(trial.state == TrialState.COMPLETE for trial in trials)
        generated = recorded_by_generations(study)
        workers = {record.worker for record in generated}
        assert len(workers) == 2, "both workers ran generations"
        plans = [json.dumps(record.params, sort_keys=True) for record in generated]
        assert len(set(plans)) == len(plans), "workers on one machine record each plan once"
        seeds = [record for record in records if record.seed]
        assert len(seeds) == len({json.dumps(record.params, sort_keys=True) for record in seeds}) <= 3
        numbers = {record.number for record in records}
        for record in generated:
            assert record.parent in numbers and record.parent < record.number
    finally:
        if storage:
            optuna.delete_study(study_name=study_name, storage=url)


def test_two_workers_that_scored_the_same_plan_record_it_once(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = generations_config(tmp_path, tiny_model_dir)
    raw["search"]["baselines"] = ["uniform"]
    config = Config.model_validate(raw)
    location = StudyLocation.resolve("once", tmp_path / "results")
    study = run_search(config, location, n_trials=1, progress=False, write_reports=False)  # its seed
    session, space = study_session(config, location.cache_dir)
    objective = Objective(config, session, space, StudyRecord.of(study).max_bytes())
    lock = recording_lock(location.storage_url, "once", location.out_dir)
    workers = [GenerationSearch(study, objective, seed=0, recording_lock=lock) for _ in range(2)]
    for worker in workers:
        worker.read_study()
    plan = workers[0].offspring(workers[0].parent())[0]
    for windows, _ in workers[0].stages:
        assert workers[0].score(plan, windows)
    # Each worker holds the plan scored and finds it missing from the study; the write that records it is slowed,
    # so that without the lock the second worker would check the study while the first one is writing.
    real_add = generations.add_scored_trial

    def slow_add(*args: object, **kwargs: object) -> None:
        time.sleep(0.5)
        real_add(*args, **kwargs)

    monkeypatch.setattr(generations, "add_scored_trial", slow_add)
    start = threading.Barrier(2)

    def record(worker: GenerationSearch) -> None:
        start.wait()
        worker.record_new([copy.deepcopy(plan)], parent=None, evaluations=1)

    threads = [threading.Thread(target=record, args=(worker,)) for worker in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    key = workers[0].key(plan.params)
    recorded = [trial for trial in study.get_trials(deepcopy=False) if workers[0].key(trial.params) == key]
    assert len(recorded) == 1 and sum(worker.recorded for worker in workers) == 1


FORMATS = ["int2-g32", "int3-g32", "int4-g32", "int8", "fp16"]


def size_budget_config(folder: Path, model_dir: Path, size: str = "35%", **search: object) -> dict:
    """The tiny model per Linear over named levels under a byte ceiling, in generations of 6 offspring."""
    search = {
        "sparsity": [0.0],
        "bits": [16],
        "formats": FORMATS,
        "budget": {"size": size},
        "generations": GENERATIONS,
    } | search
    return tiny_study_config(folder, model_dir, fitness=8, compression={"granularity": "linear"}, search=search)


@pytest.mark.parametrize(
    ("search", "message"),
    [
        ({"generations": None}, "searched in generations"),
        ({"sparsity": [0.0, 0.5]}, "single sparsity level"),
        ({"baselines": ["owl"]}, "baselines are uniform and additive"),
        ({"budget": {"size": "1.5"}}, "ambiguous"),
        ({"budget": {"bits": 3.0}}, "give a size budget"),
        ({"budget": {"size": "40%", "bits": 3.0}}, "exactly one of"),
    ],
)
def test_bad_size_budgets_are_refused_in_one_line(tmp_path: Path, tiny_model_dir: Path, search, message) -> None:
    raw = size_budget_config(tmp_path, tiny_model_dir, **search)
    raw["search"] = {key: value for key, value in raw["search"].items() if value is not None}
    with pytest.raises(ValidationError, match=message):
        Config.model_validate(raw)


def test_a_size_budget_s_bytes_per_unit_add_up_to_the_target_s_own_accounting(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    import random

    from autocompress.search.study import study_size_ceiling

    config = Config.model_validate(size_budget_config(tmp_path, tiny_model_dir))
    session = CompressionSession(config, cache_dir=tmp_path / "cache")
    space = SearchSpace(config, session.units)
    ceiling = study_size_ceiling(session, space)
    assert ceiling.ceiling == int(0.35 * session.dense_bytes)
    rng = random.Random(0)
    for _ in range(5):
        allocation = {unit: rng.randrange(len(FORMATS)) for unit in space.units}
        params = {f"{unit}.format": FORMATS[index] for unit, index in allocation.items()}
        assert ceiling.total(allocation) == session.size(space.plan_from_params(params)).total_bytes
    uniform = ceiling.initial()
    assert ceiling.fits(uniform)
    assert not any(  # at the ceiling: no unit can be raised one level more
        ceiling.fits(uniform | {unit: index + 1}) for unit, index in uniform.items() if index + 1 < len(FORMATS)
    )
    for _ in range(20):
        assert ceiling.fits(ceiling.mutate(uniform, rng, 3))


def test_a_size_budget_below_the_smallest_plan_is_a_user_error(tmp_path: Path, tiny_model_dir: Path) -> None:
    config = Config.model_validate(size_budget_config(tmp_path, tiny_model_dir, size="1kB"))
    with pytest.raises(UserError, match="below the smallest plan"):
        run_search(config, StudyLocation.resolve("small", tmp_path / "results"), n_trials=4, progress=False)


def test_every_plan_of_a_size_budget_search_fits_under_its_ceiling(tmp_path: Path, tiny_model_dir: Path) -> None:
    config = Config.model_validate(size_budget_config(tmp_path, tiny_model_dir))
    location = StudyLocation.resolve("size", tmp_path / "results")
    study = run_search(config, location, n_trials=10, progress=False)
    records = scored_records(study)
    ceiling = int(0.35 * StudyRecord.of(study).dense_bytes)
    assert len(records) >= 10
    uniform = next(record for record in records if record.baseline == "uniform")
    assert uniform.size_bytes <= ceiling
    generated = recorded_by_generations(study)
    assert generated and all(record.size_bytes <= ceiling for record in generated)
    assert len({json.dumps(record.params, sort_keys=True) for record in records}) == len(records)
    assert min(record.loss for record in records) <= uniform.loss
    levels = {record.params[name] for record in generated for name in record.params}
    assert len(levels) > 2, "the search mixes named levels"


def test_the_generations_recipe_is_valid() -> None:
    from autocompress.config import load_config

    config = load_config(Path(__file__).parent.parent / "search_spaces" / "smollm2-generations.yaml")
    assert config.search.budget.dimension == "sparsity" and config.search.generations.survivors == [4, 2, 1]
