"""The search: an Optuna study over per-unit plans that survives kills, failures and concurrent workers."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time
import uuid
from contextlib import closing
from pathlib import Path

import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState

from autocompress.cli import main
from autocompress.frontier import frontier_of
from autocompress.record import TrialRecord, scored_records
from autocompress.search import StudyLocation, run_search
from autocompress.search.driver import ProgressBar
from autocompress.search.storage import open_storage
from tests.conftest import CLI, POSTGRES_URL, complete_trials, load_config, needs_postgres, run_together, wait_for


def test_a_search_writes_trials_frontier_plot_and_report(tmp_path: Path, space_file) -> None:
    location = StudyLocation.resolve("tiny", tmp_path / "results")
    study = run_search(load_config(space_file()), location, n_trials=10, progress=False)

    assert len(complete_trials(study)) >= 10
    for name in ("trials.csv", "frontier.csv", "pareto.png", "report.md"):
        assert (location.out_dir / name).stat().st_size > 0, name
    trials = pd.read_csv(location.out_dir / "trials.csv")
    assert {"number", "state", "loss", "size_bytes", "size_ratio", "objective", "seconds", "stitch_s", "eval_s"} <= set(
        trials.columns
    )
    assert any(column.endswith(".sparsity") for column in trials.columns)
    frontier = pd.read_csv(location.out_dir / "frontier.csv")
    assert {"trial", "loss", "size_bytes", "size_ratio", "objective", "heldout_ppl", "heldout_kl"} <= set(
        frontier.columns
    )
    assert frontier["heldout_ppl"].notna().all() and frontier["heldout_kl"].notna().all()


def test_the_frontier_is_non_dominated_and_keeps_every_non_dominated_uniform_seed(tmp_path: Path, space_file) -> None:
    study = run_search(load_config(space_file()), StudyLocation.resolve("tiny", tmp_path), n_trials=10, progress=False)
    scored = scored_records(study)
    front = {record.number: record for record in frontier_of(scored)}

    def dominates(theirs: TrialRecord, mine: TrialRecord) -> bool:
        return (
            theirs.loss <= mine.loss
            and theirs.size_bytes <= mine.size_bytes
            and (theirs.loss, theirs.size_bytes) != (mine.loss, mine.size_bytes)
        )

    for number, mine in front.items():
        for other in scored:
            assert not dominates(other, mine), f"trial {other.number} dominates frontier member {number}"
    seeds = [record for record in scored if record.seed]
    assert len(seeds) == 5  # three sparsity levels at 16 bits, two more bit-widths unpruned
    for seed in seeds:
        beaten = any(dominates(other, seed) for other in scored)
        tied = any((member.loss, member.size_bytes) == (seed.loss, seed.size_bytes) for member in front.values())
        assert beaten or seed.number in front or tied


def test_scalar_objective_minimizes_alpha_loss_plus_beta_size(tmp_path: Path, space_file) -> None:
    study = run_search(
        load_config(space_file(objective="scalar", alpha=2.0, beta=0.5)),
        StudyLocation.resolve("tiny", tmp_path),
        n_trials=6,
        progress=False,
    )
    assert len(study.directions) == 1
    for trial in complete_trials(study):
        record = TrialRecord.of(trial)
        assert trial.value == pytest.approx(2.0 * record.loss + 0.5 * record.size_ratio)


def test_a_size_limit_keeps_larger_plans_off_the_frontier(tmp_path: Path, space_file) -> None:
    study = run_search(
        load_config(space_file(max_size=0.6)), StudyLocation.resolve("tiny", tmp_path), n_trials=8, progress=False
    )
    assert any(TrialRecord.of(trial).size_ratio > 0.6 for trial in complete_trials(study))
    dense_bytes = (
        TrialRecord.of(complete_trials(study)[0]).size_bytes / TrialRecord.of(complete_trials(study)[0]).size_ratio
    )
    front = frontier_of(scored_records(study), max_bytes=int(0.6 * dense_bytes))
    assert front and all(record.size_ratio <= 0.6 for record in front)
    assert all(
        TrialRecord.of(trial).size_over_limit > 0
        for trial in complete_trials(study)
        if TrialRecord.of(trial).size_ratio > 0.6
    )


def test_running_search_again_continues_the_study(tmp_path: Path, space_file) -> None:
    config, location = load_config(space_file()), StudyLocation.resolve("tiny", tmp_path)
    first = run_search(config, location, n_trials=6, progress=False)
    numbers = {trial.number for trial in complete_trials(first)}
    second = run_search(config, location, n_trials=9, progress=False)
    assert numbers <= {trial.number for trial in complete_trials(second)}
    assert len(complete_trials(second)) == 9


def test_a_changed_search_space_is_refused_on_resume(tmp_path: Path, space_file, capsys) -> None:
    out = tmp_path / "results"
    main(["search", str(space_file()), "--study", "s", "--results", str(out), "--n-trials", "2", "--quiet"])
    changed = space_file(bits=[2, 16])
    with pytest.raises(SystemExit) as exit_info:
        main(["search", str(changed), "--study", "s", "--results", str(out), "--n-trials", "3", "--quiet"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "different search space" in error[0]


@pytest.mark.parametrize(
    ("search", "named"),
    [
        ({"sampler": "annealing"}, "search.sampler"),
        ({"bits": [7]}, "bits"),
        ({"budget": 3}, "search.budget"),
        ({"sparsity": {"low": 0, "high": 0.5, "step": 0.2}}, "whole number of steps"),
    ],
)
def test_bad_search_yaml_gives_a_one_line_error(tmp_path: Path, space_file, search: dict, named: str) -> None:
    result = subprocess.run(
        [*CLI, "search", str(space_file(**search)), "--results", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("autocompress: error:") and named in lines[0]


def test_frontier_command_prints_ranked_json_with_heldout_figures(tmp_path: Path, space_file, capsys) -> None:
    out = tmp_path / "results"
    main(["search", str(space_file()), "--study", "f", "--results", str(out), "--n-trials", "6", "--quiet"])
    capsys.readouterr()
    main(["frontier", "--study", "f", "--results", str(out), "--json", "--alpha", "1", "--beta", "2"])
    points = json.loads(capsys.readouterr().out)
    assert points and all(point["heldout_ppl"] > 1 for point in points)
    objectives = [point["loss"] + 2 * point["size_ratio"] for point in points]
    assert objectives == sorted(objectives)
    assert [point["objective"] for point in points] == pytest.approx(objectives)


def test_frontier_of_an_unknown_study_is_a_one_line_error(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["frontier", "--study", "nothing-here", "--results", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "run `autocompress search` first" in capsys.readouterr().err


def test_resume_after_kill_9_loses_no_trial_and_reruns_the_stale_one(tmp_path: Path, space_file) -> None:
    space = space_file(fitness=64)  # trials long enough to be killed in the middle of one
    out = tmp_path / "results"
    command = [*CLI, "search", str(space), "--study", "k", "--results", str(out), "--n-trials", "8", "--quiet"]
    storage_url = f"sqlite:///{out / 'k' / 'study.db'}"

    def killable() -> bool:
        """Two trials complete and one being scored: past its first heartbeat (a trial killed before it never
        goes stale) and with all its parameters sampled (a retry keeps what the killed trial had)."""
        params_of = "(SELECT COUNT(*) FROM trial_params p WHERE p.trial_id = t.trial_id)"
        beating = "EXISTS (SELECT 1 FROM trial_heartbeats h WHERE h.trial_id = t.trial_id)"
        try:
            with closing(sqlite3.connect(out / "k" / "study.db", timeout=5)) as database:
                complete = database.execute(f"SELECT {params_of} FROM trials t WHERE state = 'COMPLETE'").fetchall()
                running = database.execute(
                    f"SELECT {params_of} FROM trials t WHERE state = 'RUNNING' AND {beating}"
                ).fetchall()
        except sqlite3.Error:  # not created yet
            return False
        return len(complete) >= 2 and any(row in complete for row in running)

    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(killable, 180, "two complete trials and one running with a heartbeat")
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    before = optuna.load_study(study_name="k", storage=storage_url)
    completed_before = {trial.number: trial.values for trial in complete_trials(before)}
    stale = [trial.number for trial in before.get_trials(deepcopy=False, states=(TrialState.RUNNING,))]
    assert stale

    time.sleep(3)  # past the grace period: the killed trial's heartbeat is stale
    subprocess.run(command, check=True, timeout=300, capture_output=True)

    after = optuna.load_study(study_name="k", storage=open_storage(storage_url))
    completed_after = {trial.number: trial.values for trial in complete_trials(after)}
    assert len(completed_after) >= 8
    for number, values in completed_before.items():
        assert completed_after[number] == values
    assert after.trials[stale[0]].state == TrialState.FAIL
    retried = [trial for trial in complete_trials(after) if trial.system_attrs.get("failed_trial") == stale[0]]
    assert len(retried) == 1, "the killed trial is re-run once"
    assert retried[0].params == after.trials[stale[0]].params


def storage_urls() -> list:
    postgres = pytest.param(
        POSTGRES_URL,
        id="postgresql",
        marks=needs_postgres,
    )
    return [pytest.param(None, id="sqlite"), postgres]


@pytest.mark.parametrize("storage", storage_urls())
def test_two_concurrent_searches_on_one_study_lose_and_duplicate_no_trial(
    tmp_path: Path, space_file, storage: str | None
) -> None:
    study_name = f"concurrent-{uuid.uuid4().hex[:8]}"
    out = tmp_path / "results"
    command = [
        *CLI,
        "search",
        str(space_file(fitness=16, grace_period=30)),
        "--study",
        study_name,
        "--results",
        str(out),
        "--n-trials",
        "12",
        "--quiet",
    ]
    if storage:
        command += ["--storage", storage]
    run_together(command)

    url = storage or f"sqlite:///{out / study_name / 'study.db'}"
    study = optuna.load_study(study_name=study_name, storage=url)
    try:
        trials = study.get_trials(deepcopy=False)
        complete = complete_trials(study)
        assert len(complete) >= 12
        assert all(trial.state == TrialState.COMPLETE for trial in trials)
        assert len({trial.number for trial in trials}) == len(trials)
        seeds = [json.dumps(trial.params, sort_keys=True) for trial in complete if TrialRecord.of(trial).seed]
        assert len(seeds) == 5 and len(set(seeds)) == 5, "each uniform seed is evaluated exactly once"
    finally:
        if storage:
            optuna.delete_study(study_name=study_name, storage=url)


def test_the_progress_bar_of_a_search_with_a_time_limit_counts_its_seconds_and_shows_its_trials() -> None:
    study = optuna.create_study(directions=["minimize", "minimize"])
    bar = ProgressBar(study, n_trials=1000, enabled=True, timeout=480)
    try:
        assert (bar.bar.n, bar.bar.total) == (0, 480)  # not 0 of 1000 trials: the time limit ends this search
        bar.began -= 120  # two minutes into the search, three trials finished
        for _ in range(3):
            study.add_trial(optuna.trial.create_trial(values=[0.1, 0.5]))
        bar.add(study, 3)
        assert bar.bar.n == 120 and "trials=3" in bar.bar.postfix
        bar.began -= 600  # past the limit, scoring the last plan it started
        bar.add(study, 1)
        assert bar.bar.n == 480
    finally:
        bar.close()
    untimed = ProgressBar(study, n_trials=40, enabled=True)
    try:
        assert (untimed.bar.n, untimed.bar.total) == (3, 40)  # without a time limit, the trials wanted
    finally:
        untimed.close()
