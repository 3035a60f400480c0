"""Distributed studies: Ray Tune on a real local Ray cluster, and Optuna workers sharing a PostgreSQL study."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import uuid
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from autocompress.cli import main
from autocompress.config import Config
from autocompress.frontier import frontier_of
from autocompress.record import StudyRecord, TrialRecord, trial_records
from autocompress.report import TRIAL_COLUMNS
from autocompress.search import StudyLocation, run_search
from autocompress.search.heldout import heldout_figures
from autocompress.search.space import SearchSpace
from autocompress.session import CompressionSession
from tests.conftest import CLI, POSTGRES_URL, load_config, needs_postgres, random_text, tiny_study_config, wait_for
from tests.test_gguf_export import bpe_tokenizer
from tests.test_gguf_export import tiny_model as tiny_gguf_model
from tests.test_student_search import FAST_DISTILLATION, tiny_config

IN_CI = bool(os.environ.get("CI"))


# -- Ray Tune ---------------------------------------------------------------------------------------------------


def descendants() -> dict[int, str]:
    import psutil

    found = {}
    for process in psutil.Process().children(recursive=True):
        try:
            if process.status() != psutil.STATUS_ZOMBIE:
                found[process.pid] = " ".join(process.cmdline())[:80]
        except psutil.NoSuchProcess:
            pass
    return found


@pytest.fixture(scope="module")
def ray_cluster():
    """A real local Ray cluster of 2 CPUs for this module; afterwards no Ray process of it may be left."""
    if not IN_CI:
        pytest.importorskip("ray.tune", reason="Ray Tune is not installed (pip install -e '.[ray]')")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    before = set(descendants())
    context = ray.init(num_cpus=2, object_store_memory=200 * 2**20, include_dashboard=False, log_to_driver=False)
    try:
        yield context.address_info["gcs_address"]
    finally:
        ray.shutdown()
        deadline = time.monotonic() + 30
        while (left := {pid: line for pid, line in descendants().items() if pid not in before}) and (
            time.monotonic() < deadline
        ):
            time.sleep(0.2)
        assert not left, f"Ray processes left behind: {left}"


def trainable_processes() -> list:
    """Ray worker processes of this cluster busy with a trial (their title while they run one)."""
    import psutil

    busy = []
    for process in psutil.Process().children(recursive=True):
        try:
            if " ".join(process.cmdline()).startswith("ray::ImplicitFunc.train"):
                busy.append(process)
        except psutil.NoSuchProcess:
            pass
    return busy


def test_a_study_on_a_local_ray_cluster_is_the_same_study_and_a_restarted_driver_continues_it(
    ray_cluster: str, tmp_path: Path, space_file, capsys
) -> None:
    from autocompress.search.ray_backend import run_ray_search

    space = space_file(fitness=8)
    out = tmp_path / "results"
    location = StudyLocation.resolve("ray", out)
    study = run_ray_search(load_config(space), location, n_trials=7, progress=False, concurrency=2)

    trials = study.get_trials(deepcopy=False)
    assert [trial.state for trial in trials] == [TrialState.COMPLETE] * 7
    for trial in trials:  # recorded as the local backend records them
        record = TrialRecord.of(trial)
        assert all(getattr(record, column) is not None for column in TRIAL_COLUMNS), record
        assert trial.values == [TrialRecord.of(trial).loss, TrialRecord.of(trial).size_ratio]
    seeds = [trial for trial in trials if TrialRecord.of(trial).seed]
    sampled = [trial for trial in trials if not TrialRecord.of(trial).seed]
    assert len(seeds) == 5 and len({json.dumps(seed.params, sort_keys=True) for seed in seeds}) == 5
    assert max(seed.datetime_start for seed in seeds) <= min(trial.datetime_start for trial in sampled)
    for name in ("trials.csv", "frontier.csv", "pareto.png", "report.md"):
        assert (location.out_dir / name).stat().st_size > 0, name
    first = {trial.number: trial.values for trial in trials}

    # A second driver, through the CLI and --address, continues the study to 10 trials; one of its trial
    # workers is killed in the middle of a trial, and Tune re-runs that trial (FailureConfig).
    command = [*CLI, "search", str(space), "--study", "ray", "--results", str(out), "--n-trials", "10"]
    command += ["--backend", "ray", "--address", ray_cluster, "--cpus-per-trial", "1", "--quiet"]
    driver = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        victim = wait_for(trainable_processes, 180, "a Ray worker running a trial")[0]
        victim.send_signal(signal.SIGKILL)
        output, _ = driver.communicate(timeout=300)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    assert driver.returncode == 0, output[-3000:]

    after = optuna.load_study(study_name="ray", storage=location.storage_url)
    trials = after.get_trials(deepcopy=False)
    assert [trial.state for trial in trials] == [TrialState.COMPLETE] * 10, "the killed trial was re-run, not lost"
    assert {number: trials[number].values for number in first} == first
    errors = list((out / "ray" / "ray").glob("ray-*/trial_*/error.txt"))
    assert errors, "Tune saw the killed worker fail"

    capsys.readouterr()
    main(["frontier", "--study", "ray", "--results", str(out), "--json"])
    points = json.loads(capsys.readouterr().out)
    assert points and all(point["heldout_ppl"] > 1 and point["heldout_kl"] is not None for point in points)


def test_the_ray_searcher_asks_seeds_first_and_writes_trials_as_the_objective_recorded_them(
    tmp_path: Path, space_file
) -> None:
    """The driver's half of the Ray backend, without a cluster: OptunaSearch bound to our study."""
    pytest.importorskip("ray.tune", reason="Ray Tune is not installed (pip install -e '.[ray]')")
    from ray import cloudpickle
    from ray.tune.search import Searcher

    from autocompress.search.ray_backend import CONTEXT_KEY, RESULT_KEY, TRIAL_KEY, RayTrialContext, StudySearcher
    from autocompress.search.space import SearchSpace
    from autocompress.search.study import open_study

    config = load_config(space_file())
    space = SearchSpace(config, ["model.layers.0", "model.layers.1"])
    location = StudyLocation.resolve("driver", tmp_path)
    study, _ = open_study(config, location, space, seed=0)
    searcher = StudySearcher(study, space, n_trials=6, storage_url=location.storage_url)

    asked = {f"t{index}": searcher.suggest(f"t{index}") for index in range(6)}
    assert [asked[f"t{index}"][TRIAL_KEY] for index in range(6)] == list(range(6))
    assert [TrialRecord.of(trial).seed for trial in study.trials] == [True] * 5 + [False]
    contexts = [json.loads(asked[f"t{index}"][CONTEXT_KEY]) for index in range(6)]
    assert [context["seed"] for context in contexts] == [True] * 5 + [False]
    assert searcher.suggest("t6") is None, "six in flight for a target of six: wait"

    def scored_on_a_worker(config: dict, outcome: str = "COMPLETE") -> dict:
        """What score_trial reports, for an Objective that completes, prunes or fails the trial."""
        asked = json.loads(config[CONTEXT_KEY])
        params = {key: value for key, value in config.items() if key not in (TRIAL_KEY, CONTEXT_KEY)}
        context = RayTrialContext(config[TRIAL_KEY], asked["seed"], [])
        space.plan_from_params(params)
        values = None
        if outcome == "FAIL":
            context.writer.write(fail_reason="RuntimeError: CUDA out of memory")
        elif outcome == "PRUNED":
            context.writer.write(partial_loss=2.0)
        else:
            context.writer.write(loss=0.5, size_ratio=0.25, size_bytes=1000, size_over_limit=-1.0)
            values = [0.5, 0.25]
        return {RESULT_KEY: json.dumps(context.payload(outcome, values))}

    for index in range(4):
        searcher.on_trial_complete(f"t{index}", scored_on_a_worker(asked[f"t{index}"]))
    searcher.on_trial_complete("t4", scored_on_a_worker(asked["t4"], "PRUNED"))
    searcher.on_trial_complete("t5", scored_on_a_worker(asked["t5"], "FAIL"))
    trials = study.get_trials(deepcopy=False)
    states = [TrialState.COMPLETE] * 4 + [TrialState.PRUNED, TrialState.FAIL]
    assert [trial.state for trial in trials] == states
    assert trials[0].values == [0.5, 0.25] and TrialRecord.of(trials[0]).size_bytes == 1000
    assert TrialRecord.of(trials[0]).seed is True, "the seed mark set at enqueue time is kept"
    assert trials[0].system_attrs["constraints:size_over_limit"] == -1.0
    assert TrialRecord.of(trials[4]).partial_loss == 2.0
    assert TrialRecord.of(trials[5]).fail_reason == "RuntimeError: CUDA out of memory"

    asked["t6"] = searcher.suggest("t6")  # a failed trial does not count (a pruned one does): one more
    assert [member["number"] for member in json.loads(asked["t6"][CONTEXT_KEY])["peers"]] == [0]
    searcher.on_trial_complete("t6", None, error=True)  # Tune gave up on its worker
    assert "failed on every attempt" in TrialRecord.of(study.trials[6]).fail_reason
    asked["t7"] = searcher.suggest("t7")
    searcher.on_trial_complete("t7", scored_on_a_worker(asked["t7"]))
    assert searcher.suggest("t8") == Searcher.FINISHED
    searcher.close("driver left")

    copy = cloudpickle.loads(cloudpickle.dumps(searcher))  # as Tune keeps it, or ships it under Ray Client
    assert copy._ot_study.study_name == "driver" and len(copy._ot_study.trials) == 8
    assert copy.suggest("t9") == Searcher.FINISHED


def test_the_ray_preparer_adds_to_the_study_what_a_local_search_adds(tmp_path: Path, space_file) -> None:
    """Layer-variant database and baseline allocations: computed on a Ray worker, written by the driver."""
    pytest.importorskip("ray.tune", reason="Ray Tune is not installed (pip install -e '.[ray]')")
    from autocompress.search.ray_backend import StudyPreparer, WorkerSetup, write_prepared
    from autocompress.search.space import SearchSpace
    from autocompress.search.study import open_study, prepare_study

    budget = {"sparsity": [0.0, 0.2, 0.4], "bits": [16], "budget": {"sparsity": 0.2}, "database": "on"}
    config = load_config(space_file(**budget))
    preparer = StudyPreparer(WorkerSetup(config.model_dump(mode="json"), str(tmp_path / "cache")))
    space = SearchSpace(config, preparer.describe()["units"])
    studies = {}
    for name in ("ray", "local"):
        location = StudyLocation.resolve(name, tmp_path)
        studies[name], _ = open_study(config, location, space, seed=0)
        if name == "ray":
            directions = [direction.name.lower() for direction in studies[name].directions]
            prepared = preparer.prepare(name, directions, studies[name].user_attrs)
            write_prepared(studies[name], location, prepared)
            write_prepared(studies[name], location, preparer.prepare(name, directions, studies[name].user_attrs))
        else:
            prepare_study(studies[name], preparer.session, space, location)

    def enqueued(study: optuna.Study) -> list:
        waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        return [(trial.system_attrs["fixed_params"], trial.user_attrs) for trial in waiting]

    assert any(attrs.get("baseline") for _, attrs in enqueued(studies["local"]))
    assert enqueued(studies["ray"]) == enqueued(studies["local"]), "the same baselines, once"
    assert studies["ray"].user_attrs.keys() == studies["local"].user_attrs.keys()
    assert StudyRecord.of(studies["ray"]).database["files"] > 0


def test_ray_flags_without_the_ray_backend_are_a_one_line_error(tmp_path: Path, space_file, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["search", str(space_file()), "--results", str(tmp_path), "--gpus-per-trial", "1"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == "autocompress: error: --gpus-per-trial goes with --backend ray"


# -- every kind of plan under Ray: number formats, the vLLM and GGUF targets, students ---------------------------


def run_on_ray_as_locally(
    config: Config, tmp_path: Path, sampled: int, check_cache: Path | None = None
) -> optuna.Study:
    """Run `config` under Ray Tune (its seeds and `sampled` more trials) and check it is the study the local
    backend makes: the same seeds and baselines enqueued (a local search of 0 trials enqueues them), every trial
    complete and recorded with the local backend's fields, its loss and the frontier's held-out figures what a
    fresh local session measures for the same plan (with the study's cache when `check_cache` names it: students
    distilled on the workers, whose training is not repeated)."""
    from autocompress.search.ray_backend import run_ray_search

    local = run_search(config, StudyLocation.resolve("local", tmp_path / "local"), n_trials=0, progress=False)
    seeded = [
        (trial.system_attrs["fixed_params"], trial.user_attrs)
        for trial in local.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    ]
    location = StudyLocation.resolve("ray", tmp_path / "ray")
    study = run_ray_search(config, location, n_trials=len(seeded) + sampled, progress=False, concurrency=2)

    trials = study.get_trials(deepcopy=False)
    assert [trial.state for trial in trials] == [TrialState.COMPLETE] * (len(seeded) + sampled), [
        TrialRecord.of(trial).fail_reason for trial in trials
    ]
    first = zip(trials[: len(seeded)], seeded, strict=True)
    ran = [(trial.params, {key: trial.user_attrs.get(key) for key in attrs}) for trial, (_, attrs) in first]
    assert ran == seeded, "the seeds and baselines the local backend enqueues, in its order"
    record = StudyRecord.of(study)
    assert record.baselines == StudyRecord.of(local).baselines
    assert record.unit_levels == StudyRecord.of(local).unit_levels

    session = CompressionSession(config, cache_dir=check_cache or tmp_path / "fresh-cache")
    space = SearchSpace.of_record(record)
    for trial in trials:
        measured = TrialRecord.of(trial)
        assert all(getattr(measured, column) is not None for column in TRIAL_COLUMNS), measured
        assert trial.values == [measured.loss, measured.size_ratio]
        result = session.measure(space.plan_from_params(trial.params))
        loss = result.metrics.kl if config.search.loss == "kl" else result.metrics.ce
        assert measured.loss == pytest.approx(loss, rel=1e-5, abs=1e-7), trial.number
        assert measured.size_bytes == result.size.total_bytes, trial.number
    assert record.heldout and record.dense_heldout is not None
    for number, figures in record.heldout.items():
        here = heldout_figures(session, space, trials[number].params)
        assert (figures.ppl, figures.kl) == pytest.approx((here.ppl, here.kl), rel=1e-5), number
    assert (location.out_dir / "report.md").stat().st_size > 0
    return study


def test_a_ray_study_over_number_formats_is_the_local_study(ray_cluster: str, tmp_path: Path, tiny_model_dir) -> None:
    formats = {"sparsity": [0.0, 0.3], "bits": [16], "formats": ["nf4", "mxfp4", "fp8-e4m3", "fp16"]}
    config = Config.model_validate(tiny_study_config(tmp_path, tiny_model_dir, search=formats))
    run_on_ray_as_locally(config, tmp_path, sampled=2)


def test_a_ray_study_of_the_vllm_target_is_the_local_study(ray_cluster: str, tmp_path: Path, tiny_model_dir) -> None:
    levels = {"sparsity": [0.0], "bits": [16], "formats": ["int4", "int8-row", "fp8-e4m3", "fp16"]}
    compression = {"symmetric": True, "target": "vllm"}
    config = Config.model_validate(tiny_study_config(tmp_path, tiny_model_dir, compression=compression, search=levels))
    run_on_ray_as_locally(config, tmp_path, sampled=2)


def test_a_ray_study_of_the_gguf_target_is_the_local_study_with_its_presets(ray_cluster: str, tmp_path: Path) -> None:
    model_dir = tmp_path / "mistral"  # rows of 256 and 512: every K-type fits
    tiny_gguf_model("mistral").save_pretrained(model_dir)
    bpe_tokenizer().save_pretrained(model_dir)
    levels = {"sparsity": [0.0], "bits": [16], "formats": ["q4_k", "q6_k", "q8_0"], "seeds": "none"}
    compression = {"target": "gguf", "granularity": "linear"}
    raw = tiny_study_config(tmp_path, model_dir, compression=compression, search=levels)
    raw["data"] |= {"heldout": 2}
    study = run_on_ray_as_locally(Config.model_validate(raw), tmp_path, sampled=1)
    assert {"llama.cpp q4_k_m", "llama.cpp q6_k"} <= set(StudyRecord.of(study).baselines)


def test_a_ray_study_with_students_shares_their_distilled_models_and_judges_them_held_out(
    ray_cluster: str, tmp_path: Path, tiny_model_dir
) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(random_text(6000, seed=1))
    # pruner none: which student a pruner stops depends on which trials finished first, on a cluster
    distillation = FAST_DISTILLATION | {"pruner": "none"}
    student = {"num_layers": [1, 2], "intermediate_size": [64, 128], "distillation": distillation}
    config = Config.model_validate(tiny_config(tiny_model_dir, corpus, student=student))
    location = StudyLocation.resolve("ray", tmp_path / "ray")
    study = run_on_ray_as_locally(config, tmp_path, sampled=3, check_cache=location.cache_dir)

    students = [record for record in trial_records(study) if record.student]
    assert students, "a sampled plan distils a student"
    assert all(record.kd_curve[-1][0] == FAST_DISTILLATION["steps"] for record in students)
    shapes = {json.dumps(record.architecture, sort_keys=True) for record in students}
    assert len(list(location.cache_dir.rglob("students/*.safetensors"))) == len(shapes), "one per shape, shared"
    frontier = frontier_of(trial_records(study))
    assert any(member.student for member in frontier)
    assert StudyRecord.of(study).heldout.keys() == {member.number for member in frontier}, "judged held-out"


# -- Optuna workers on PostgreSQL --------------------------------------------------------------------------------


@pytest.fixture
def postgres_study(tmp_path: Path, space_file):
    """Create a study on PostgreSQL as a user would (`search --n-trials 0`); delete it afterwards."""
    created = []

    def create(fitness: int) -> tuple[str, Path]:
        name = f"workers-{uuid.uuid4().hex[:8]}"
        out = tmp_path / "results"
        run_search(
            load_config(space_file(fitness)), StudyLocation.resolve(name, out, POSTGRES_URL), n_trials=0, progress=False
        )
        created.append(name)
        return name, out

    yield create
    for name in created:
        optuna.delete_study(study_name=name, storage=POSTGRES_URL)


def ran_trials(output: str) -> dict[str, list[int]]:
    """Each worker's closing line: worker HOST:PID ran trials [numbers] ..."""
    return {
        name: json.loads(numbers) for name, numbers in re.findall(r"worker (\S+) ran trials (\[[0-9, ]*\])", output)
    }


@needs_postgres
def test_two_workers_on_a_postgresql_study_complete_it_with_no_lost_or_duplicated_trial(postgres_study) -> None:
    name, out = postgres_study(fitness=256)  # enough work for both, though one may start a little later
    command = [*CLI, "worker", "--study", name, "--storage", POSTGRES_URL, "--results", str(out)]
    result = subprocess.run(
        [*command, "--n-workers", "2", "--n-trials", "16"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]

    study = optuna.load_study(study_name=name, storage=POSTGRES_URL)
    trials = study.get_trials(deepcopy=False)
    assert all(trial.state == TrialState.COMPLETE for trial in trials)
    assert 16 <= len(trials) <= 17  # each worker stops at the target; the other may be finishing one
    by_worker = ran_trials(result.stdout)
    assert len(by_worker) == 2 and all(by_worker.values()), result.stdout
    numbers = [number for ran in by_worker.values() for number in ran]
    assert sorted(numbers) == [trial.number for trial in trials], "each trial was run by exactly one worker"
    seeds = [json.dumps(trial.params, sort_keys=True) for trial in trials if TrialRecord.of(trial).seed]
    assert len(seeds) == 5 and len(set(seeds)) == 5


@needs_postgres
def test_a_worker_killed_mid_trial_has_its_trial_re_run_by_the_other(postgres_study, tmp_path: Path) -> None:
    import sqlalchemy

    name, out = postgres_study(fitness=16)
    study = optuna.load_study(study_name=name, storage=POSTGRES_URL)
    engine = sqlalchemy.create_engine(POSTGRES_URL)
    # a target the workers never reach: the survivor is sure to be working when the killed trial goes stale
    command = [*CLI, "worker", "--study", name, "--storage", POSTGRES_URL, "--results", str(out), "--n-trials", "1000"]
    logs = [tmp_path / f"worker-{index}.log" for index in range(2)]
    workers = [subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log.open("w"), text=True) for log in logs]
    try:

        def both_mid_trial() -> dict[int, int]:
            """Trial id -> number of the running trials, when there are two and both have had a heartbeat."""
            running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            with engine.connect() as connection:
                beating = set(connection.execute(sqlalchemy.text("SELECT trial_id FROM trial_heartbeats")).scalars())
            alive = {trial._trial_id: trial.number for trial in running if trial._trial_id in beating}
            return alive if len(alive) == 2 else {}

        def first_frozen_mid_trial() -> dict[int, int]:
            """Stop the first worker; keep it stopped if it is then in a trial that has had a heartbeat."""
            workers[0].send_signal(signal.SIGSTOP)  # so it cannot finish or start a trial while we look
            alive = both_mid_trial()
            if not alive:
                workers[0].send_signal(signal.SIGCONT)
            return alive

        running = wait_for(first_frozen_mid_trial, 180, "both workers in the middle of a trial")
        workers[0].send_signal(signal.SIGKILL)
        workers[0].wait()

        def retry_complete() -> list:
            trials = study.get_trials(deepcopy=False)
            return [
                trial
                for trial in trials
                if trial.system_attrs.get("failed_trial") in running.values() and trial.state == TrialState.COMPLETE
            ]

        retried = wait_for(retry_complete, 180, "the killed worker's trial to be re-run")
        assert workers[1].poll() is None, logs[1].read_text()[-3000:]
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
        engine.dispose()

    trials = study.get_trials(deepcopy=False)
    failed = [trial for trial in trials if trial.state == TrialState.FAIL]
    assert len(failed) == 1 and failed[0].number in running.values(), "only the killed worker's trial went stale"
    assert len(retried) == 1 and retried[0].system_attrs["failed_trial"] == failed[0].number
    # the parameters the killed trial had drawn are kept (it may have died before drawing them all)
    assert failed[0].params.items() <= retried[0].params.items()
    assert retried[0].datetime_start > failed[0].datetime_start
    assert TrialRecord.of(retried[0]).scored
