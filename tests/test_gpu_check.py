"""The GPU check's pipeline on the CPU (`benchmarks/gpu_check.py --device cpu --tiny`), and the search path's
imports, which a GPU machine without pandas and matplotlib must be able to run."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_check_runs_every_phase_on_a_tiny_model_on_the_cpu(tmp_path: Path) -> None:
    figures = tmp_path / "gpu.csv"
    command = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--tiny"]
    result = subprocess.run(
        [*command, "--work", str(tmp_path / "work"), "--csv", str(figures)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "gpu_check: passed" in result.stdout
    rows = {(row["phase"], row["figure"]): row["value"] for row in csv.DictReader(figures.open())}
    for phase in ("model", "calibration", "variants", "gguf", "study", "export"):
        assert float(rows[phase, "seconds"]) > 0
    assert int(rows["variants", "variants"]) == 21  # 7 Linears of one block, 3 SparseGPT + GPTQ levels each
    assert int(rows["study", "trials"]) == 3  # the uniform plan and two generations
    assert float(rows["study", "seconds_per_evaluation"]) > 0
    assert float(rows["export", "export_fitness_kl"]) == float(rows["export", "trial_kl"])
    assert float(rows["agreement", "relative_difference"]) <= 1e-4
    assert float(rows["agreement", "cpu_kl"]) > 0
    assert rows["imports", "pandas_or_matplotlib"] == ""  # a GPU machine without them runs every phase


def test_the_search_runs_without_importing_pandas_or_matplotlib() -> None:
    code = (
        "import sys\n"
        "import autocompress.search.runner, autocompress.search.study, autocompress.export, autocompress.cli\n"
        "print(sorted({name.split('.')[0] for name in sys.modules} & {'pandas', 'matplotlib'}))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert result.stdout.strip() == "[]"
