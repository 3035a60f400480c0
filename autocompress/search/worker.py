"""Optuna-native workers: processes on any machine that join an existing study and run its trials.

A worker is the local search loop (`run_search`: the same Objective, sampler, stopping rule and outputs) with
the config the study was created with, read from the study's storage. Workers on one PostgreSQL study share
nothing but that storage and, optionally, the cache folder. RDB storages keep heartbeats of running trials;
`study.optimize` fails stale ones (a killed worker's) at each trial start and the retry callback enqueues them
again, so another worker re-runs them.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import optuna
from optuna.trial import FrozenTrial, TrialState

from autocompress.record import StudyLocation
from autocompress.search.driver import complete_count
from autocompress.search.runner import run_search
from autocompress.search.study import load_existing

CLI = [sys.executable, "-c", "from autocompress.cli import main; main()"]


class TrialLog:
    """The trials this process ran, for its closing line (which machine ran what)."""

    def __init__(self) -> None:
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.trials: list[FrozenTrial] = []

    def __call__(self, _study: optuna.Study, trial: FrozenTrial) -> None:
        self.trials.append(trial)

    def summary(self, study: optuna.Study) -> str:
        numbers = [trial.number for trial in self.trials]
        failed = sum(trial.state == TrialState.FAIL for trial in self.trials)
        return (
            f"worker {self.name} ran trials {numbers} ({failed} failed); "
            f"study {study.study_name!r} holds {complete_count(study)} complete trials"
        )


def run_worker(
    location: StudyLocation, n_trials: int | None = None, timeout: float | None = None, progress: bool = True
) -> optuna.Study:
    """Join the existing study at `location` and run trials until it holds `n_trials` complete ones.

    The study's model config comes from its storage, which anyone with access to it may have written: a worker
    refuses to switch on remote code or unpickling unless its own command line does (`load_existing`)."""
    _study, record = load_existing(location)
    config = record.config
    log = TrialLog()
    study = run_search(config, location, n_trials=n_trials, timeout=timeout, progress=progress, callbacks=[log])
    print(log.summary(study), flush=True)
    return study


def visible_gpus() -> list[str]:
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        return [device for device in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if device.strip()]
    import torch

    return [str(index) for index in range(torch.cuda.device_count())]


def worker_environments(n_workers: int) -> list[dict[str, str]]:
    """Each worker's environment: its share of the CPU threads and, with several GPUs, its own GPU."""
    threads = str(max(1, (os.cpu_count() or 1) // n_workers))
    gpus = visible_gpus()
    environments = []
    for index in range(n_workers):
        environment = dict(os.environ)
        environment.setdefault("OMP_NUM_THREADS", threads)
        if len(gpus) > 1:
            environment["CUDA_VISIBLE_DEVICES"] = gpus[index % len(gpus)]
        environments.append(environment)
    return environments


def run_workers(worker_args: list[str], n_workers: int) -> int:
    """Start `n_workers` worker processes with `worker_args` and wait for all; the first failing exit code."""
    processes = [
        subprocess.Popen([*CLI, "worker", *worker_args], env=environment)
        for environment in worker_environments(n_workers)
    ]

    def forward(signum: int, _frame) -> None:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signum)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        codes = [process.wait() for process in processes]
    except KeyboardInterrupt:
        forward(signal.SIGINT, None)
        codes = [process.wait() for process in processes]
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    codes = [code if code >= 0 else 128 - code for code in codes]  # killed by signal N: 128 + N, as shells say
    print(f"autocompress: {n_workers} workers finished (exit codes {codes})", flush=True)
    return next((code for code in codes if code != 0), 0)
