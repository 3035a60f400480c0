"""How fast GGUF blocks are quantized: llama.cpp's own quantizer against the numpy port, on 1 and N workers, and the
hours this projects for Llama-3-8B on a 16-core host.

Measured: one weight of a realistic shape (default 1024×4096, Gaussian with 1% outliers ×8) with an imatrix-like
importance (exp of a Gaussian per input column, as a calibration's mean x² spreads), quantized into each type by
`targets.gguf.quantize.quantize_rows`: `native` (`ggml_quantize_chunk` of llama-cpp-python's libggml-base, rows
split across threads) and `numpy` (the port, rows split across processes), plus the numpy port on threads, which
the module does not use (the GIL), to show why. Each row is the best of at least `--repeats` runs, repeated until
they took `--min-seconds`, after one warm-up run that starts any worker processes: `seconds` of wall clock, and
`cpu_seconds` that this process's threads and its worker processes ran. The host is shared: its 1-minute load
average is recorded with each row. Where it is loaded, a process gets only part of a core, so wall-clock rates
(`mweights_per_s`) understate a core's speed, and N workers may not get N cores; the rate per CPU second
(`mweights_per_cpu_s`) is what one dedicated core would deliver.

Projected, not measured: `projected_8b_hours_16_cores` is the weights a gguf study quantizes in Llama-3-8B (every
decoder Linear, token_embd and output, counted from its shapes: 8.03 G) divided by 16 times the row's one-worker
rate per CPU second: it assumes 16 dedicated cores each as fast as one core here, and rows split linearly across
them (rows are independent, and each worker writes its own rows). `..._from_wall` divides by the wall-clock rate
on this loaded host instead: a pessimistic bound. The `all` rows sum the types: a study that offers every type
quantizes every tensor into each.

    .venv/bin/python benchmarks/blocks.py                      # about 15 minutes on 2 loaded cores
    .venv/bin/python benchmarks/blocks.py --types q4_k q8_0 --repeats 1

Writes results/benchmarks/blocks.csv.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from autocompress.targets.gguf import blocks as gguf_blocks
from autocompress.targets.gguf.quantize import native_quantizer, quantize_rows
from autocompress.targets.gguf.weights import GGUF_LEVELS, gguf_tensors, unit_levels

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "results" / "benchmarks" / "blocks.csv"
TYPES = [level for level in GGUF_LEVELS if level != "f16"]  # f16 is a rounding, not a quantizer
PROJECTED_CORES = 16


def llama3_8b_weights(types: list[str]) -> dict[str, int]:
    """Weights a gguf study of Llama-3-8B quantizes into each type, from its shapes (on the meta device)."""
    config = LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=False,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    tensors = gguf_tensors(model, "linear")
    allowed = unit_levels(tensors, types)
    return {level: sum(t.shape[0] * t.shape[1] for t in tensors if level in allowed[t.unit]) for level in types}


def inputs(rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = np.random.default_rng(0)
    weight = (generator.standard_normal((rows, cols)) * 0.02).astype(np.float32)
    weight[generator.random(weight.shape) < 0.01] *= 8
    importance = np.exp(2 * generator.standard_normal(cols)).astype(np.float32)
    return torch.from_numpy(weight), torch.from_numpy(importance)


def numpy_on_threads(weight: torch.Tensor, name: str, importance: torch.Tensor, workers: int) -> np.ndarray:
    """The numpy port with rows split across threads: what the module does not do."""
    parts = torch.tensor_split(weight, workers)
    with ThreadPoolExecutor(workers) as pool:
        return np.concatenate(list(pool.map(lambda part: gguf_blocks.quantize_rows(part, name, importance), parts)))


def cpu_seconds() -> float:
    """CPU time (user and system) of this process's threads (to the nanosecond) and of its live child processes,
    the numpy port's workers (in clock ticks, 10 ms)."""
    children = psutil.Process().children(recursive=True)
    return time.process_time() + sum(sum(child.cpu_times()[:2]) for child in children)


def best_seconds(run: Callable[[], np.ndarray], repeats: int, min_seconds: float) -> tuple[float, float]:
    """The least wall-clock and the least CPU seconds of at least `repeats` runs, repeated until they took
    `min_seconds` together, after a warm-up run (which starts the worker processes and loads the library)."""
    run()
    wall = cpu = float("inf")
    runs, total = 0, 0.0
    while runs < repeats or total < min_seconds:
        began, began_cpu = time.perf_counter(), cpu_seconds()
        run()
        seconds = time.perf_counter() - began
        wall, cpu = min(wall, seconds), min(cpu, cpu_seconds() - began_cpu)
        runs, total = runs + 1, total + seconds
    return wall, cpu


def projected_hours(weights: int, mweights_per_s: float, workers: int) -> float | None:
    """Hours for `weights` on PROJECTED_CORES cores each at a one-worker row's rate; None for other rows."""
    return round(weights / (PROJECTED_CORES * mweights_per_s * 1e6) / 3600, 3) if workers == 1 else None


def host() -> str:
    """The CPU's model name (Linux), else the machine type."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", nargs="+", default=TYPES, choices=TYPES)
    parser.add_argument("--shape", nargs=2, type=int, default=[1024, 4096], metavar=("ROWS", "COLS"))
    parser.add_argument("--workers", type=int, default=2, help="the N of the N-worker rows (default: 2)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per row at least (default: 2)")
    parser.add_argument("--min-seconds", type=float, default=3.0, help="and runs until they took this long")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args()
    native = native_quantizer()
    if native.library is None:
        raise SystemExit(f"benchmarks/blocks.py compares with llama.cpp's quantizer: {native.missing}")
    weight, importance = inputs(*args.shape)
    per_type_8b = llama3_8b_weights(args.types)
    configurations = [
        ("native", "threads", 1, lambda name: quantize_rows(weight, name, importance, native=True, workers=1)),
        ("native", "threads", args.workers, lambda name: quantize_rows(weight, name, importance, workers=args.workers)),
        ("numpy", "-", 1, lambda name: quantize_rows(weight, name, importance, native=False, workers=1)),
        (
            "numpy",
            "processes",
            args.workers,
            lambda name: quantize_rows(weight, name, importance, native=False, workers=args.workers),
        ),
        ("numpy", "threads", args.workers, lambda name: numpy_on_threads(weight, name, importance, args.workers)),
    ]
    rows = []
    for name in args.types:
        expected = gguf_blocks.quantize_rows(weight, name, importance)
        for path, parallel, workers, run in configurations:
            if not np.array_equal(run(name), expected):
                raise SystemExit(f"{name} {path} {parallel} x{workers}: the bytes differ from the numpy port's")
            seconds, cpu = best_seconds(lambda run=run, name=name: run(name), args.repeats, args.min_seconds)
            rate, cpu_rate = weight.numel() / seconds / 1e6, weight.numel() / cpu / 1e6

            rows.append(
                {
                    "type": name,
                    "path": path,
                    "parallel": parallel,
                    "workers": workers,
                    "shape": f"{args.shape[0]}x{args.shape[1]}",
                    "importance": True,
                    "seconds": round(seconds, 3),
                    "cpu_seconds": round(cpu, 3),
                    "mweights_per_s": round(rate, 3),
                    "mweights_per_cpu_s": round(cpu_rate, 3),
                    "load_avg_1m": round(os.getloadavg()[0], 2),
                    "host_cores": os.cpu_count(),
                    "weights_8b": per_type_8b[name],
                    "projected_8b_hours_16_cores": projected_hours(per_type_8b[name], cpu_rate, workers),
                    "projected_8b_hours_16_cores_from_wall": projected_hours(per_type_8b[name], rate, workers),
                }
            )
            print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    for path in ("native", "numpy"):
        single = table[(table.path == path) & (table.workers == 1)]
        rows.append(
            {
                "type": f"all ({len(single)} types)",
                "path": path,
                "parallel": "-",
                "workers": 1,
                "weights_8b": int(single.weights_8b.sum()),
                "projected_8b_hours_16_cores": round(float(single.projected_8b_hours_16_cores.sum()), 2),
                "projected_8b_hours_16_cores_from_wall": round(
                    float(single.projected_8b_hours_16_cores_from_wall.sum()), 2
                ),
            }
        )
    table = pd.DataFrame(rows)
    table["host"] = host()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.output, index=False)
    print(table.to_string(index=False))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
