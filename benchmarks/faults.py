"""Fault injection: kill, fill, corrupt and lock a study, and check that nothing is lost.

Each injection runs a small study of the tests' tiny random Llama through the real CLI and returns a `FaultRun`:
how many faults it injected, how many the study survived (the next run continued it correctly, or refused in
one line), and how much data was lost (a completed trial missing or changed, a trial completed twice, a stored
file that does not read back whole). `tests/test_faults.py` runs them small; this script runs them at full size
(a 30-trial study killed 10 times, on SQLite and, when a server is there, PostgreSQL) and writes
`results/benchmarks/faults.csv`.

    python benchmarks/faults.py [--n-trials 30] [--kills 10] [--storage postgresql+psycopg2://...] [--kinds ...]

Besides, kills at exact lines (between the writes that create a study, between its seed enqueues, during a
generations search's seed), a full disk under the study's caches (a small tmpfs where this process may mount one),
and a fuzz pass of malformed GGUF files given to `evaluate` and as a model, each to end in one line and exit 2
within a memory bound.
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
import yaml
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
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
        return {}  # killed before it created its storage (a loaded machine may take seconds to import)
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


KILLER = """
import importlib, os, signal, sys
target, k = sys.argv[1], int(sys.argv[2])
module, _, attribute = target.partition(":")
owner_path, _, name = attribute.rpartition(".")
owner = importlib.import_module(module)
for part in filter(None, owner_path.split(".")):
    owner = getattr(owner, part)
real, calls = getattr(owner, name), [0]
def killed_at_the_kth_call(*args, **kwargs):
    calls[0] += 1
    if calls[0] == k:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)
setattr(owner, name, killed_at_the_kth_call)
from autocompress.cli import main
main(sys.argv[3:])
"""


def killed_at(target: str, k: int, arguments: list[str]) -> bool:
    """Run the CLI with `arguments`, SIGKILLed just before the k-th call of `target` ('module:Class.method');
    whether the kill happened (the command did not reach that call otherwise)."""
    process = subprocess.run(
        [sys.executable, "-c", KILLER, target, str(k), *arguments], capture_output=True, text=True, timeout=600
    )
    if process.returncode != -signal.SIGKILL:
        print(f"{target} was not called {k} times: exit {process.returncode}; {process.stderr[-500:]}")
    return process.returncode == -signal.SIGKILL


def seed_plans_not_complete(url: str, study: str) -> int:
    """Seed plans (uniform or baseline) of the study with no complete trial."""
    trials = optuna.load_study(study_name=study, storage=url).get_trials()
    seeds = {seed_plan(trial) for trial in trials if trial.user_attrs.get("seed")}
    return len(seeds - {seed_plan(trial) for trial in trials if trial.state == TrialState.COMPLETE})


def seed_plan(trial: optuna.trial.FrozenTrial) -> str:
    """A trial's plan as text: the parameters it was enqueued with, else those it was given."""
    return json.dumps(trial.system_attrs.get("fixed_params", trial.params), sort_keys=True)


def kill_at_exact_lines(
    kind: str, space: Path, out: Path, n_trials: int, points: list[tuple[str, int]], seeds: int
) -> FaultRun:
    """SIGKILL `autocompress search` just before the k-th call of each (target, k) in `points`, each on a fresh
    study, then run it again: the study must be completed with all of its `seeds` seed plans scored once, nothing
    duplicated, every stored file whole, and `frontier` must read it."""
    began = time.perf_counter()
    injected = survived = lost = 0
    for target, k in points:
        study = f"line-{uuid.uuid4().hex[:8]}"
        url = storage_url(out, study, None)
        command = search_command(space, out, study, n_trials, None)
        if not killed_at(target, k, command[len(CLI) :]):
            continue
        injected += 1
        before = completed(url, study)
        time.sleep(2.5)  # past the tiny study's grace period: a killed trial is stale and re-run
        finished = subprocess.run(command, capture_output=True, text=True, timeout=600)
        frontier = subprocess.run(
            [*CLI, "frontier", "--study", study, "--results", str(out)], capture_output=True, text=True
        )
        after = completed(url, study)
        missing = seed_plans_not_complete(url, study) if finished.returncode == 0 else seeds
        trials = optuna.load_study(study_name=study, storage=url).get_trials()
        seeded = len({seed_plan(trial) for trial in trials if trial.user_attrs.get("seed")})
        damage = lost_trials(before, after) + duplicated_trials(url, study) + broken_files(out / study) + missing
        ok = finished.returncode == 0 and frontier.returncode == 0 and len(after) >= n_trials and seeded >= seeds
        lost += damage
        survived += ok and damage == 0
    return FaultRun(kind, injected, survived, lost, time.perf_counter() - began)


@contextlib.contextmanager
def small_filesystem(folder: Path, size: str = "4k") -> Iterator[bool]:
    """A tmpfs of `size` mounted on `folder` while the context lasts, grown to 256 MiB by `grow_filesystem`;
    yields False (mounting nothing) where this process may not mount one."""
    folder.mkdir(parents=True, exist_ok=True)
    mounted = (
        os.geteuid() == 0
        and subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)]).returncode == 0
    )
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(folder)], check=True)


def grow_filesystem(folder: Path) -> None:
    subprocess.run(["mount", "-o", "remount,size=256m", str(folder)], check=True)


@contextlib.contextmanager
def safetensors_writes_fail_for_want_of_space() -> Iterator[None]:
    """Every safetensors write of the caches fails as safetensors reports a full disk, a file begun."""
    import autocompress.variants

    def save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 1000)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    with mock.patch.object(autocompress.variants, "save_file", save_file):
        yield


def fill_the_disk_while_caching(space: Path, out: Path, n_trials: int) -> FaultRun:
    """The study's cache folder sits on a full disk (a 4 KiB tmpfs where this process can mount one, else every
    safetensors write fails as on a full disk) while trials compute and cache what they need: the command stops at
    the first such trial with one line and exit 2, and once space is freed the next run completes the study with
    every seed plan scored (the failed seeds re-run)."""
    from autocompress.cli import main

    began = time.perf_counter()
    study = f"full-cache-{uuid.uuid4().hex[:8]}"
    url = storage_url(out, study, None)
    arguments = ["search", str(space), "--study", study, "--results", str(out), "--n-trials", str(n_trials), "--quiet"]
    cache = out / study / "cache"
    with small_filesystem(cache) as mounted:
        if mounted:
            full = subprocess.run([*CLI, *arguments], capture_output=True, text=True, timeout=600)
            code, text = full.returncode, full.stderr
        else:
            code = None
            with safetensors_writes_fail_for_want_of_space(), contextlib.redirect_stderr(_Capture()) as stderr:
                try:
                    main(arguments)
                except SystemExit as exit_info:
                    code = exit_info.code
            text = stderr.text
        lines = text.strip().splitlines()
        refused = code == 2 and len(lines) == 1 and "no space left" in lines[0]
        lost = broken_files(out / study)
        if mounted:
            grow_filesystem(cache)
        finished = subprocess.run([*CLI, *arguments], capture_output=True, text=True, timeout=600)
        lost += broken_files(out / study)
    if finished.returncode != 0 or len(completed(url, study)) < n_trials or seed_plans_not_complete(url, study):
        lost += 1
    kind = "disk-full-cache-" + ("tmpfs" if mounted else "injected")
    return FaultRun(kind, 1, int(refused and lost == 0), lost, time.perf_counter() - began)


HUGE_COUNTS = (2**62, 2**63 - 1, 2**64 - 1, 2**32 + 1, 2**40)
FUZZ_PROVENANCE = "autocompress.provenance"


def fuzz_base_gguf(path: Path, provenance: str | None = None, provenance_as_int: bool = False) -> bytes:
    """A small, valid GGUF file the way an export writes one (metadata, a vocabulary array, our provenance, two
    tensors), whose base model is a folder that does not exist: a file that survives every check ends in that
    one-line error, or in llama.cpp's absence."""
    import gguf
    import numpy as np

    if provenance is None:
        data = {"source": "embedded", "seq_len": 32, "calibration": 2, "fitness": 2, "heldout": 2}
        provenance = json.dumps(
            {"study": "fuzz", "trial": 0, "data": data, "base_model": {"name": "/nonexistent/base-model"}}
        )
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("fuzz")
    writer.add_uint32("fuzz.count", 7)
    writer.add_float32("fuzz.scale", 0.5)
    writer.add_array("fuzz.tokens", ["<s>", "</s>", "a", "bc", "def"])
    writer.add_array("fuzz.ids", [1, 2, 3, 4, 5, 6, 7])
    if provenance_as_int:
        writer.add_uint32(FUZZ_PROVENANCE, 12)
    else:
        writer.add_string(FUZZ_PROVENANCE, provenance)
    writer.add_tensor("fuzz.weight", np.arange(128, dtype=np.float32).reshape(4, 32))
    writer.add_tensor("fuzz.bias", np.ones(32, dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


def mutated_ggufs(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """`count` malformed GGUF files: cut short, counts and lengths made huge, value, element and tensor types
    made wrong, dimensions and offsets out of range, bytes of the header flipped, and provenance that is not JSON,
    not an object, of the wrong type or with fields of the wrong type; besides a text file and an empty file."""
    import struct

    chance = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    base = fuzz_base_gguf(folder / "base.gguf")
    header_end = base.index(b"fuzz.bias") + 64  # the tensor infos end soon after the last name

    def after(name: bytes) -> int:
        return base.index(name) + len(name)

    counts = [8, 16]  # the tensor count, the key-value count
    counts += [base.index(key) - 8 for key in (b"fuzz.count", b"fuzz.tokens", b"fuzz.ids", FUZZ_PROVENANCE.encode())]
    counts += [after(b"fuzz.tokens") + 8, after(b"fuzz.ids") + 8]  # array lengths
    counts += [after(FUZZ_PROVENANCE.encode()) + 4, after(b"fuzz.weight") + 4]  # a string's length, a dimension
    types = [after(key) for key in (b"fuzz.count", b"fuzz.scale", b"fuzz.tokens", b"fuzz.ids")]
    types += [after(b"fuzz.tokens") + 4, after(b"fuzz.ids") + 4]  # element types
    tensor_fields = [after(b"fuzz.weight"), after(b"fuzz.weight") + 4 + 16, after(b"fuzz.bias") + 4 + 8]
    tensor_fields += [after(b"fuzz.bias") + 4 + 8 + 4]  # n_dims, the weight's and bias's type, the bias's offset
    bad_provenance = [
        "not json {",
        "[1, 2, 3]",
        '"a string"',
        "",
        json.dumps({"data": {"seq_len": "long"}, "base_model": {"name": "/nonexistent/base-model"}}),
        json.dumps({"data": {"source": "embedded", "seq_len": 32}, "base_model": "not an object"}),
        json.dumps({"data": {"source": "embedded", "seq_len": 32}}),
        json.dumps({"data": 7, "base_model": {"name": 3}}),
        json.dumps({"data": {"source": "embedded"}, "base_model": {"name": "/x", "trust_remote_code": True}}),
    ]
    files: list[bytes] = [b"this is a text file, not a model\n", b""]
    for index, text in enumerate(bad_provenance):
        files.append(fuzz_base_gguf(folder / f"provenance-{index}.gguf", text))
    files.append(fuzz_base_gguf(folder / "provenance-int.gguf", provenance_as_int=True))
    utf8 = bytearray(base)
    utf8[after(FUZZ_PROVENANCE.encode()) + 4 + 8 + 2] = 0xFF  # invalid UTF-8 inside the provenance string
    files.append(bytes(utf8))
    kinds = ["truncate", "count", "type", "tensor", "flip"]
    while len(files) < count:
        kind = kinds[len(files) % len(kinds)]
        data = bytearray(base)
        if kind == "truncate":
            data = data[: chance.randrange(0, len(base))]
        elif kind == "count":
            struct.pack_into("<Q", data, chance.choice(counts), chance.choice(HUGE_COUNTS))
        elif kind == "type":
            struct.pack_into("<I", data, chance.choice(types), chance.choice([9, 8, 12, 13, 255, 2**31, 7]))
        elif kind == "tensor":
            struct.pack_into("<I", data, chance.choice(tensor_fields), chance.choice([5, 99, 2**31, 2**32 - 1, 40]))
        else:
            for _ in range(chance.randint(1, 4)):
                data[chance.randrange(0, header_end)] = chance.randrange(256)
        if bytes(data) != base:
            files.append(bytes(data))
    paths = []
    for index, data in enumerate(files[:count]):
        path = folder / f"mutated-{index:03d}.gguf"
        path.write_bytes(data)
        paths.append(path)
    return paths


FUZZ_RUNNER = """
import contextlib, io, json, resource, sys
from autocompress.cli import main
import autocompress.targets.gguf.evaluation, autocompress.evaluate  # everything imported before the bound
with open("/proc/self/status") as status:
    virtual = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
bound = virtual + int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (bound, bound))
command, config = sys.argv[2], json.loads(sys.argv[3])
for path in sys.argv[4:]:
    stderr, code = io.StringIO(), None
    arguments = ["evaluate", path, "--no-dense"]
    if command == "apply":  # the file as the model a config names
        with open(path + ".yaml", "w") as written:
            json.dump(config | {"model": {"name": path, "device": "cpu"}}, written)
        arguments = ["apply", path + ".yaml"]
    try:
        with contextlib.redirect_stderr(stderr):
            main(arguments)
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    except BaseException as error:
        stderr.write(f"uncaught {type(error).__name__}: {error}\\nmore\\n")
        code = -1
    print(json.dumps({"path": path, "code": code, "stderr": stderr.getvalue()}), flush=True)
"""


def fuzz_gguf_headers(
    folder: Path, count: int = 200, seed: int = 0, memory_bound: int = 2**30, config: dict | None = None
) -> FaultRun:
    """`count` malformed GGUF files (`mutated_ggufs`) each given to `autocompress evaluate` (or, with a study
    `config`, to `autocompress apply` as its model), in one process whose address space may grow by only
    `memory_bound` bytes past what its imports take: each must end in one line and exit 2. What does not is
    written to stdout."""
    began = time.perf_counter()
    paths = mutated_ggufs(folder, count, seed)
    command = "evaluate" if config is None else "apply"
    process = subprocess.run(
        [sys.executable, "-c", FUZZ_RUNNER, str(memory_bound), command, json.dumps(config or {}), *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    results = [json.loads(line) for line in process.stdout.splitlines() if line.startswith("{")]
    survived = 0
    for result in results:
        lines = result["stderr"].strip().splitlines()
        if result["code"] == 2 and len(lines) == 1 and lines[0].startswith("autocompress: error:"):
            survived += 1
        else:
            print(f"not one line and exit 2: {result['path']}: {result['code']}: {result['stderr'][-300:]}")
    if len(results) < len(paths):
        print(f"the fuzzing process stopped after {len(results)} files: {process.stderr[-500:]}")
    return FaultRun(f"gguf-header-fuzz-{command}", len(paths), survived, 0, time.perf_counter() - began)


GGUF_CORRUPTIONS = ("flipped", "truncated", "undigested")
GGUF_FORMATS = ["q4_0", "q5_1", "q8_0"]  # types whose blocks of 32 weights fit the tiny model's rows of 64


def corrupt_gguf_blocks(space: Path, out: Path, n_trials: int, files: int, seed: int = 0) -> FaultRun:
    """`files` block files of a `target: gguf` study's block cache (`cache/<key>/gguf/<tensor>/<level>.npy`) at
    the levels of its `search.formats`, which every run checks before its trials (F16 blocks are checked as trials
    read them), damaged in turn three ways: bytes flipped at the file's length, cut short, and bytes flipped with
    the digest beside it deleted (a file no length check tells from a whole one). The next run must quantize each
    again, to the bytes and digest it first held (the first run's quantization: a fresh one), lose or change no
    trial, and continue the study. A damaged file kept as found counts as data lost: trials would decode it."""
    from autocompress.targets.gguf.weights import digest_path

    began = time.perf_counter()
    study = f"gguf-blocks-{uuid.uuid4().hex[:8]}"
    url = storage_url(out, study, None)
    subprocess.run(search_command(space, out, study, n_trials // 2, None), check=True, capture_output=True)
    before = completed(url, study)
    formats = yaml.safe_load(space.read_text())["search"]["formats"]
    stored = sorted(path for path in (out / study / "cache").rglob("gguf/*/*.npy") if path.stem in formats)
    chance = random.Random(seed)
    damaged = chance.sample(stored, min(files, len(stored)))
    originals = {path: (path.read_bytes(), digest_path(path).read_text()) for path in damaged}
    for index, path in enumerate(damaged):
        data = bytearray(path.read_bytes())
        corruption = GGUF_CORRUPTIONS[index % len(GGUF_CORRUPTIONS)]
        if corruption == "truncated":
            del data[chance.randrange(len(data) // 4, len(data)) :]
        else:
            for _ in range(chance.randint(1, 4)):  # in the blocks, past numpy's header
                data[chance.randrange(len(data) // 2, len(data))] ^= 0xFF
        if corruption == "undigested":
            digest_path(path).unlink()
        path.write_bytes(bytes(data))
    finished = subprocess.run(search_command(space, out, study, n_trials, None), capture_output=True, text=True)
    after = completed(url, study)
    healed = sum(
        path.is_file() and digest_path(path).is_file() and (path.read_bytes(), digest_path(path).read_text()) == kept
        for path, kept in originals.items()
    )
    lost = lost_trials(before, after) + broken_files(out / study) + len(damaged) - healed
    continued = finished.returncode == 0 and len(after) >= n_trials
    if not continued:
        print(
            f"the run after the damage did not finish the study: exit {finished.returncode}; {finished.stderr[-500:]}"
        )
    survived = healed if continued and lost == 0 else 0
    return FaultRun("corrupted-gguf-blocks", len(damaged), survived, lost, time.perf_counter() - began)


RACER = """
import json, os, sys, time
from pathlib import Path
import autocompress.search.generations as generations
delay, folder, workers = float(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
search = generations.GenerationSearch
real_add, real_init, real_run, real_score = generations.add_scored_trial, search.__init__, search.run, search.score
def slow_add(*args, **kwargs):  # the write that records a plan, slowed: the race window widened
    time.sleep(delay)
    return real_add(*args, **kwargs)
def one_seed(self, study, objective, seed, *args, **kwargs):  # every worker draws the same offspring
    real_init(self, study, objective, 0, *args, **kwargs)
def together(self, *args, **kwargs):  # the first generation starts once every worker is ready for it
    (folder / f"ready-{os.getpid()}").touch()
    deadline = time.monotonic() + 120
    while len(list(folder.glob("ready-*"))) < workers and time.monotonic() < deadline:
        time.sleep(0.01)
    return real_run(self, *args, **kwargs)
def logged(self, candidate, windows):  # a plan scored on the whole pool: one this worker goes on to record
    scored = real_score(self, candidate, windows)
    if scored and windows == self.stages[-1][0]:
        with open(folder / f"scored-{os.getpid()}.jsonl", "a") as log:
            log.write(json.dumps(candidate.params, sort_keys=True) + "\\n")
    return scored
generations.add_scored_trial, search.__init__, search.run, search.score = slow_add, one_seed, together, logged
from autocompress.cli import main
main(sys.argv[4:])
"""


def race_generation_workers(
    space: Path,
    out: Path,
    rounds: int,
    trials_per_round: int,
    workers: int = 2,
    delay: float = 0.5,
    storage: str | None = None,
) -> FaultRun:
    """`rounds` times, `workers` generation workers (`autocompress worker`, one process each, in the environments
    `worker --n-workers` gives its processes) continue one generations study by `trials_per_round` trials. On
    SQLite they share its results folder, as workers on one machine do; on a `storage` server (PostgreSQL) each
    has a results folder of its own, as workers on separate machines would, so no file lock is common to them.
    The race is forced: the workers start their first generation together, draw the same offspring (one seed) and
    take `delay` s over each write that records a plan, so they score the same plans and reach the write together.
    Each plan that more than one worker scored on the whole pool is a race injected; it survived when the study
    holds it once. Data lost: complete trials holding a plan another one holds, trials lost or changed, files that
    do not read back whole, and rounds that did not reach their trial count."""
    from autocompress.config import Config
    from autocompress.search import StudyLocation, run_search
    from autocompress.search.worker import worker_environments

    began = time.perf_counter()
    study = f"racing-{uuid.uuid4().hex[:8]}"
    url = storage_url(out, study, storage)
    config = Config.model_validate(yaml.safe_load(space.read_text()))
    run_search(config, StudyLocation.resolve(study, out, storage), n_trials=1, progress=False, write_reports=False)
    results = [out if storage is None else out / f"machine-{index}" for index in range(workers)]
    lost = 0
    raced: set[str] = set()
    try:
        for race in range(rounds):
            before = completed(url, study)
            folder = out / f"race-{race}"
            folder.mkdir(parents=True)
            command = ["worker", "--study", study, "--n-trials", str(len(before) + trials_per_round), "--quiet"]
            command += ["--storage", storage] if storage else []
            processes = [
                subprocess.Popen(
                    [
                        sys.executable,
                        "-c",
                        RACER,
                        str(delay),
                        str(folder),
                        str(workers),
                        *command,
                        "--results",
                        str(at),
                    ],
                    env=environment,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                for environment, at in zip(worker_environments(workers), results, strict=True)
            ]
            errors = [process.communicate(timeout=600)[1] for process in processes]
            failed = [error[-500:] for process, error in zip(processes, errors, strict=True) if process.returncode != 0]
            for stderr in failed:
                print(f"a racing worker failed: {stderr}")
            now = completed(url, study)
            lost += lost_trials(before, now) + bool(failed or len(now) < len(before) + trials_per_round)
            scored_by = [set(path.read_text().splitlines()) for path in folder.glob("scored-*.jsonl")]
            raced |= {plan for plan in set().union(*scored_by) if sum(plan in plans for plans in scored_by) > 1}
        trials = optuna.load_study(study_name=study, storage=url).get_trials(states=(TrialState.COMPLETE,))
    finally:
        if storage:
            with contextlib.suppress(KeyError):
                optuna.delete_study(study_name=study, storage=storage)
    holding = [json.dumps(trial.params, sort_keys=True) for trial in trials]
    lost += len(holding) - len(set(holding)) + broken_files(out)
    survived = sum(holding.count(plan) == 1 for plan in raced)
    kind = "racing-generation-workers" + ("" if storage is None else "-" + storage.split(":")[0].split("+")[0])
    return FaultRun(kind, len(raced), survived, lost, time.perf_counter() - began)


EARLIER_KINDS = ("sigkill", "disk-full-variants", "corrupted-cache", "locked-study-database", "truncated-artifact")
LINE_KINDS = ("kill-between-creation-writes", "kill-between-seed-enqueues", "kill-during-generation-seed")
NEW_KINDS = (*LINE_KINDS, "disk-full-cache", "gguf-header-fuzz", "corrupted-gguf-blocks", "racing-generation-workers")
UNIFORM_SEEDS = 5  # the tiny space's sparsity levels at 16 bits and bit-widths unpruned, (0, 16) once


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-trials", type=int, default=30)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument(
        "--storage", default="postgresql+psycopg2://postgres@127.0.0.1:5432/test", help="'' to skip PostgreSQL"
    )
    parser.add_argument(
        "--kinds",
        nargs="+",
        choices=[*EARLIER_KINDS, *NEW_KINDS],
        default=[*EARLIER_KINDS, *NEW_KINDS],
        help="fault kinds to run; their rows replace those of the same kinds in the CSV, the others are kept",
    )
    parser.add_argument("--fuzz-files", type=int, default=200, help="mutated GGUF files per fuzz pass")
    args = parser.parse_args()
    kinds = set(args.kinds)

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
        if "sigkill" in kinds:
            runs.append(kill_at_random_moments(space, work / "sqlite", args.n_trials, args.kills, seed=0))
            if args.storage and postgres_available():
                runs.append(kill_at_random_moments(space, work / "pg", args.n_trials, args.kills, 1, args.storage))
        if "disk-full-variants" in kinds:
            runs.append(fill_the_disk_while_building_variants(variant_space, work / "full", 6))
        if "corrupted-cache" in kinds:
            runs.append(corrupt_caches(space, work / "corrupt", 6))
        if "locked-study-database" in kinds:
            runs.append(lock_the_study_database(space, work / "locked", 6, hold_s=5))
            runs.append(lock_the_study_database(space, work / "locked-long", 6, hold_s=90))
        if "truncated-artifact" in kinds:
            artifact = work / "artifact"
            subprocess.run(search_command(space, work / "export", "e", 3, None), check=True, capture_output=True)
            subprocess.run(
                [
                    *CLI,
                    "export",
                    "--study",
                    "e",
                    "--results",
                    str(work / "export"),
                    "--trial",
                    "0",
                    "--out",
                    str(artifact),
                ],
                check=True,
                capture_output=True,
            )
            runs.append(truncate_an_artifact(artifact, space))
        generations = study_config | {
            "search": study_config["search"]
            | {
                "sparsity": [0.1, 0.2, 0.3, 0.4, 0.5],
                "bits": [16],
                "budget": {"sparsity": 0.3},
                "generations": {"offspring": 2, "stages": [0.5, 1.0], "survivors": [2, 1]},
            }
        }
        points = {
            "kill-between-creation-writes": (
                space,
                8,
                [("optuna.study.study:Study.set_user_attr", k) for k in (1, 2, 3)],
            ),
            "kill-between-seed-enqueues": (
                space,
                8,
                [("optuna.study.study:Study.enqueue_trial", k) for k in (2, 3, 4, 5)],
            ),
            "kill-during-generation-seed": (  # a generation records only a plan better than its parent: few trials
                write_yaml(work / "generations.yaml", generations),
                3,
                [("autocompress.search.objective:Objective.score", k) for k in (1, 2)],  # its 2 seeds
            ),
        }
        for kind in LINE_KINDS:
            if kind in kinds:
                kind_space, n_trials, kills = points[kind]
                seeds = UNIFORM_SEEDS if kind_space == space else 2
                runs.append(kill_at_exact_lines(kind, kind_space, work / kind, n_trials, kills, seeds))
                write_runs(runs)  # each kind's row as soon as it is measured
        if "disk-full-cache" in kinds:
            runs.append(fill_the_disk_while_caching(space, work / "full-cache", 8))
        if "gguf-header-fuzz" in kinds:
            runs.append(fuzz_gguf_headers(work / "fuzz-evaluate", args.fuzz_files))
            runs.append(fuzz_gguf_headers(work / "fuzz-apply", args.fuzz_files, seed=1, config=study_config))
        if "corrupted-gguf-blocks" in kinds:
            gguf = study_config | {
                "compression": study_config["compression"] | {"target": "gguf", "granularity": "linear"},
                "search": study_config["search"] | {"sparsity": [0.0], "bits": [16], "formats": GGUF_FORMATS},
            }
            runs.append(corrupt_gguf_blocks(write_yaml(work / "gguf.yaml", gguf), work / "gguf-blocks", 8, files=12))
        if "racing-generation-workers" in kinds:
            racing = generations | {"compression": generations["compression"] | {"granularity": "linear"}}
            racing_space = write_yaml(work / "racing.yaml", racing)
            runs.append(race_generation_workers(racing_space, work / "racing", 5, 6))
            if args.storage and postgres_available():
                runs.append(race_generation_workers(racing_space, work / "racing-pg", 5, 6, storage=args.storage))
    print(write_runs(runs).to_string(index=False))


def write_runs(runs: list[FaultRun]) -> pd.DataFrame:
    """Write `runs` into the CSV, replacing the rows of their kinds and keeping the others."""
    frame = pd.DataFrame([asdict(run) for run in runs])
    if RESULTS.is_file():
        earlier = pd.read_csv(RESULTS)
        frame = pd.concat([earlier[~earlier["kind"].isin(frame["kind"])], frame], ignore_index=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(RESULTS, index=False, float_format="%.1f")
    return frame


if __name__ == "__main__":
    main()
