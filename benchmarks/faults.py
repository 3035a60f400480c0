"""Fault injection: kill, fill, corrupt and lock a study, and check that nothing is lost.

Each injection runs a small study of the tests' tiny random Llama through the real CLI and returns a `FaultRun`:
how many faults it injected, how many the study survived (the next run continued it correctly, or refused in
one line), and how much data was lost (a completed trial missing or changed, a trial completed twice, a stored
file that does not read back whole). `tests/test_faults.py` runs them small; this script runs them at full size
(a 30-trial study killed 10 times, on SQLite and, when a server is there, PostgreSQL) and writes
`results/benchmarks/faults.csv`.

    python benchmarks/faults.py [--n-trials 30] [--kills 10] [--storage postgresql+psycopg2://...]
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from unittest import mock

import optuna
import pandas as pd
from optuna.trial import TrialState
from safetensors import SafetensorError
from safetensors.torch import load_file

CLI = [sys.executable, "-c", "from autocompress.cli import main; main()"]
RESULTS = Path(__file__).resolve().parent.parent / "results" / "benchmarks" / "faults.csv"


@dataclass(frozen=True)
class FaultRun:
    kind: str
    injected: int  # faults injected
    survived: int  # after which the next run continued correctly or refused in one line
    data_lost: int  # completed trials lost, changed or duplicated, and stored files that do not read back whole
    seconds: float


def search_command(space: Path, out: Path, study: str, n_trials: int, storage: str | None) -> list[str]:
    command = [
        *CLI,
        "search",
        str(space),
        "--study",
        study,
        "--results",
        str(out),
        "--n-trials",
        str(n_trials),
        "--quiet",
    ]
    return command + (["--storage", storage] if storage else [])


def storage_url(out: Path, study: str, storage: str | None) -> str:
    return storage or f"sqlite:///{out / study / 'study.db'}"


def completed(url: str, study: str) -> dict[int, tuple[float, ...]]:
    """Trial number -> objective values of every complete trial (empty while the study does not exist yet)."""
    try:
        loaded = optuna.load_study(study_name=study, storage=url)
    except KeyError:
        return {}
    return {trial.number: tuple(trial.values) for trial in loaded.get_trials(states=(TrialState.COMPLETE,))}


def lost_trials(before: dict[int, tuple[float, ...]], after: dict[int, tuple[float, ...]]) -> int:
    """Completed trials of `before` that `after` lacks or holds with other values."""
    return sum(after.get(number) != values for number, values in before.items())


def duplicated_trials(url: str, study: str) -> int:
    """Complete trials beyond one per retried trial, and beyond one per uniform seed plan."""
    trials = optuna.load_study(study_name=study, storage=url).get_trials(states=(TrialState.COMPLETE,))
    retries = [trial.system_attrs["failed_trial"] for trial in trials if "failed_trial" in trial.system_attrs]
    seeds = [json.dumps(trial.params, sort_keys=True) for trial in trials if trial.user_attrs.get("seed")]
    return len(retries) - len(set(retries)) + len(seeds) - len(set(seeds))


def broken_files(folder: Path) -> int:
    """Stored files (not a writer's hidden temporary ones) under `folder` that do not read back whole."""
    broken = 0
    for path in folder.rglob("*"):
        if not path.is_file() or path.name.startswith("."):
            continue
        try:
            if path.suffix == ".safetensors":
                load_file(path)
            elif path.suffix == ".csv":
                pd.read_csv(path)
            elif path.suffix == ".json":
                json.loads(path.read_text())
        except (SafetensorError, OSError, ValueError):
            broken += 1
    return broken


def refused_in_one_line(result: subprocess.CompletedProcess) -> bool:
    lines = result.stderr.strip().splitlines()
    return result.returncode == 2 and len(lines) == 1 and lines[0].startswith("autocompress: error:")


def kill_at_random_moments(
    space: Path, out: Path, n_trials: int, kills: int, seed: int = 0, storage: str | None = None
) -> FaultRun:
    """SIGKILL `autocompress search` at random moments (during start-up, trials, judging or writing outputs)
    `kills` times, then let it finish: every trial complete before a kill must be complete after, unchanged."""
    began = time.perf_counter()
    study = f"killed-{uuid.uuid4().hex[:8]}"
    url = storage_url(out, study, storage)
    command = search_command(space, out, study, n_trials, storage)
    chance = random.Random(seed)
    seen: dict[int, tuple[float, ...]] = {}
    lost = survived = 0
    try:
        for _ in range(kills):
            process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(chance.uniform(2.0, 14.0))
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
            now = completed(url, study)
            lost += lost_trials(seen, now)
            survived += lost_trials(seen, now) == 0
            seen |= now
            time.sleep(2.5)  # past the tiny study's grace period: the killed trial is stale and re-run
        finished = subprocess.run(command, capture_output=True, text=True, timeout=600)
        final = completed(url, study)
        lost += lost_trials(seen, final) + duplicated_trials(url, study) + broken_files(out / study)
        if finished.returncode != 0 or len(final) < n_trials:
            lost += 1
    finally:
        if storage:
            with contextlib.suppress(KeyError):
                optuna.delete_study(study_name=study, storage=storage)
    kind = "sigkill-" + ("sqlite" if storage is None else storage.split(":")[0].split("+")[0])
    return FaultRun(kind, kills, survived, lost, time.perf_counter() - began)


@contextlib.contextmanager
def disk_full_after(writes: int) -> Iterator[None]:
    """safetensors writes of the variant database fail with ENOSPC after `writes` of them, half a file written."""
    import autocompress.variants

    real = autocompress.variants.save_file
    count = {"writes": 0}

    def save_file(tensors, filename, metadata=None):
        count["writes"] += 1
        if count["writes"] > writes:
            Path(filename).write_bytes(b"\0" * 1000)  # what a full disk leaves: the start of the file
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))
        return real(tensors, filename, metadata=metadata)

    with mock.patch.object(autocompress.variants, "save_file", save_file):
        yield


def fill_the_disk_while_building_variants(space: Path, out: Path, n_trials: int, writes: int = 20) -> FaultRun:
    """The disk fills while the layer-variant database is written: the command refuses in one line, leaves no
    half-written variant, and the next run completes the database and the study."""
    from autocompress.cli import main

    began = time.perf_counter()
    study = f"full-{uuid.uuid4().hex[:8]}"
    arguments = ["search", str(space), "--study", study, "--results", str(out), "--n-trials", str(n_trials), "--quiet"]
    code = None
    with disk_full_after(writes), contextlib.redirect_stderr(_Capture()) as stderr:
        try:
            main(arguments)
        except SystemExit as exit_info:
            code = exit_info.code
    lines = stderr.text.strip().splitlines()
    refused = code == 2 and len(lines) == 1 and "no space left" in lines[0]
    lost = broken_files(out / study)
    finished = subprocess.run([*CLI, *arguments], capture_output=True, text=True, timeout=600)
    if finished.returncode != 0 or len(completed(storage_url(out, study, None), study)) < n_trials:
        lost += 1
    lost += broken_files(out / study)
    return FaultRun("disk-full-variants", 1, int(refused and lost == 0), lost, time.perf_counter() - began)


class _Capture:
    def __init__(self) -> None:
        self.text = ""

    def write(self, text: str) -> int:
        self.text += text
        return len(text)

    def flush(self) -> None:
        pass


def corrupt_caches(space: Path, out: Path, n_trials: int) -> FaultRun:
    """Every cache file of a study without a layer-variant database (calibration statistics, the fitness
    reference) overwritten with garbage or cut short: the next run computes them again, rewrites them whole
    with the same figures, and continues the study. (A corrupted variant is computed again when it is read:
    tests/test_variants.py.)"""
    began = time.perf_counter()
    study = f"corrupt-{uuid.uuid4().hex[:8]}"
    url = storage_url(out, study, None)
    subprocess.run(search_command(space, out, study, n_trials // 2, None), check=True, capture_output=True)
    before = completed(url, study)
    cached = sorted((out / study / "cache").rglob("*.safetensors"))
    originals = {
        path: {key: tensor.clone() for key, tensor in load_file(path).items()} for path in cached
    }  # not mapped
    for index, path in enumerate(cached):
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2] if index % 2 else b"garbage" * 10)
    finished = subprocess.run(search_command(space, out, study, n_trials, None), capture_output=True, text=True)
    after = completed(url, study)
    lost = lost_trials(before, after) + broken_files(out / study)
    lost += sum(
        not all((load_file(path)[key] == tensor).all() for key, tensor in tensors.items())
        for path, tensors in originals.items()
        if path.is_file()
    )
    survived = finished.returncode == 0 and len(after) >= n_trials and lost == 0
    return FaultRun("corrupted-cache", len(cached), len(cached) if survived else 0, lost, time.perf_counter() - began)


def truncate_an_artifact(artifact: Path, data_config: Path) -> FaultRun:
    """An exported artifact's weights and manifest cut short, in turn: `evaluate` refuses each in one line."""
    began = time.perf_counter()
    survived = 0
    names = ("model.safetensors", "manifest.json")
    for name in names:
        with tempfile.TemporaryDirectory() as scratch:
            copy = Path(scratch) / "artifact"
            subprocess.run(["cp", "-r", str(artifact), str(copy)], check=True)
            data = (copy / name).read_bytes()
            (copy / name).write_bytes(data[: len(data) // 2])
            result = subprocess.run(
                [*CLI, "evaluate", str(copy), "--data", str(data_config), "--no-dense"], capture_output=True, text=True
            )
            survived += refused_in_one_line(result)
    return FaultRun("truncated-artifact", len(names), survived, 0, time.perf_counter() - began)


def lock_the_study_database(space: Path, out: Path, n_trials: int, hold_s: float) -> FaultRun:
    """Another process holds the SQLite study database locked for `hold_s` seconds while `search` starts: it
    waits for the lock (SQLite's 60 s busy timeout) and continues the study, or refuses in one line if the lock
    outlasts the timeout; either way it loses nothing, and a run after the lock is gone finishes the study."""
    began = time.perf_counter()
    study = f"locked-{uuid.uuid4().hex[:8]}"
    url = storage_url(out, study, None)
    command = search_command(space, out, study, n_trials, None)
    subprocess.run(search_command(space, out, study, n_trials // 2, None), check=True, capture_output=True)
    before = completed(url, study)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sqlite3, sys, time; db = sqlite3.connect(sys.argv[1], isolation_level=None); "
            "db.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); time.sleep(float(sys.argv[2]))",
            str(out / study / "study.db"),
            str(hold_s),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        holder.stdout.readline()
        locked = subprocess.run(command, capture_output=True, text=True, timeout=600)
    finally:
        holder.kill()
        holder.wait()
    handled = locked.returncode == 0 or refused_in_one_line(locked)
    finished = subprocess.run(command, capture_output=True, text=True, timeout=600)
    after = completed(url, study)
    lost = lost_trials(before, after) + broken_files(out / study)
    survived = handled and finished.returncode == 0 and len(after) >= n_trials and lost == 0
    return FaultRun(f"locked-study-database-{hold_s:g}s", 1, int(survived), lost, time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-trials", type=int, default=30)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument(
        "--storage", default="postgresql+psycopg2://postgres@127.0.0.1:5432/test", help="'' to skip PostgreSQL"
    )
    args = parser.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import torch
    from transformers import LlamaForCausalLM

    from tests.conftest import postgres_available, tiny_llama_config, tiny_study_config, tiny_tokenizer, write_yaml

    runs: list[FaultRun] = []
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        model_dir = work / "tiny-llama"
        torch.manual_seed(0)
        LlamaForCausalLM(tiny_llama_config()).save_pretrained(model_dir)
        tiny_tokenizer().save_pretrained(model_dir)
        study_config = tiny_study_config(
            work, model_dir, fitness=16, search={"heartbeat_interval": 1, "grace_period": 2}
        )
        space = write_yaml(work / "space.yaml", study_config)
        database = study_config | {"search": study_config["search"] | {"database": "on"}}
        variant_space = write_yaml(work / "variants.yaml", database)
        runs.append(kill_at_random_moments(space, work / "sqlite", args.n_trials, args.kills, seed=0))
        if args.storage and postgres_available():
            runs.append(kill_at_random_moments(space, work / "pg", args.n_trials, args.kills, 1, args.storage))
        runs.append(fill_the_disk_while_building_variants(variant_space, work / "full", 6))
        runs.append(corrupt_caches(space, work / "corrupt", 6))
        runs.append(lock_the_study_database(space, work / "locked", 6, hold_s=5))
        runs.append(lock_the_study_database(space, work / "locked-long", 6, hold_s=90))
        artifact = work / "artifact"
        subprocess.run(search_command(space, work / "export", "e", 3, None), check=True, capture_output=True)
        subprocess.run(
            [*CLI, "export", "--study", "e", "--results", str(work / "export"), "--trial", "0", "--out", str(artifact)],
            check=True,
            capture_output=True,
        )
        runs.append(truncate_an_artifact(artifact, space))
    frame = pd.DataFrame([asdict(run) for run in runs])
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(RESULTS, index=False, float_format="%.1f")
    print(frame.to_string(index=False))


if __name__ == "__main__":
    main()
