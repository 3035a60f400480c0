"""One command that runs a study's whole pipeline on a GPU machine without network, on a random Llama-3-8B.

    python benchmarks/gpu_check.py                       # CUDA: Llama-3-8B's shapes, all 32 blocks if they fit
    python benchmarks/gpu_check.py --device cpu --tiny   # the same phases on a tiny Llama, here and in CI

It builds the model randomly on the device (`benchmarks/shapes_pipeline.py`: Llama-3-8B's shapes in bfloat16, or a
tiny Llama in float32 with `--tiny`), feeds it synthetic token ids, and runs calibration, Hessians on the device,
SparseGPT + GPTQ variants of a few blocks, GGUF blocks of one block, a generations study of a few generations with
KL fitness, and an export of its best plan. It prints each phase's seconds, the seconds per evaluation of the
fitness pool and the peak GPU memory, then the agreement of one plan's KL scored on the CPU and on the device from
the same stored variants of a tiny model in float32 (at most 1e-4 relative, else it fails).

`--csv results/benchmarks/gpu.csv` adds its figures there as rows (phase, figure, value). Wheels it needs beyond
torch and transformers: `benchmarks/gpu_wheels.sh` gathers them, `benchmarks/gpu_check.sh` installs and runs.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

# what the pipeline imports beyond torch and transformers (pandas and matplotlib only write reports: not needed)
NEEDED = ("optuna", "alembic", "sqlalchemy", "pydantic", "yaml", "safetensors", "gguf", "compressed_tensors", "tqdm")
AGREEMENT = 1e-4
GIB = 2**30


def missing_modules() -> list[str]:
    return [name for name in NEEDED if importlib.util.find_spec(name) is None]


def blocks_that_fit(device: str) -> int:
    """Llama-3-8B's blocks whose bfloat16 weights, beside the embedding, head, Hessians of one block and a batch's
    logits, fit the GPU's free memory: all 32 on an 80 GB card."""
    import torch

    free, _total = torch.cuda.mem_get_info(torch.device(device))
    block = (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336) * 2  # q and o, k and v (8 of 32 heads), MLP
    fixed = 2 * 128256 * 4096 * 2 + 8 * GIB  # embedding and head; Hessians, GPTQ's copies and logits
    return max(1, min(32, (free - fixed) // block))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:1, cpu")
    parser.add_argument("--tiny", action="store_true", help="a tiny Llama instead of Llama-3-8B's shapes")
    parser.add_argument("--blocks", type=int, help="Llama-3-8B's decoder blocks kept (default: all that fit)")
    parser.add_argument("--work", type=Path, help="where the model, caches and study go (default: a temporary one)")
    parser.add_argument("--csv", type=Path, help="add the figures to this CSV (e.g. results/benchmarks/gpu.csv)")
    args = parser.parse_args()
    missing = missing_modules()
    if missing:
        raise SystemExit(f"gpu_check: missing modules {', '.join(missing)}: install the carried wheels first")
    import torch
    from shapes_pipeline import PHASES, Pipeline, PoolSizes, agreement, environment

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device here; pass --device cpu")
    if args.tiny:
        shapes, blocks, dtype = "tiny", None, "float32"
        pools = PoolSizes(seq_len=64, calibration=8, fitness=4, heldout=2, batch_size=4)
    else:
        shapes, dtype = "llama3-8b", "bfloat16"
        blocks = args.blocks or (blocks_that_fit(args.device) if args.device.startswith("cuda") else 2)
        pools = PoolSizes(seq_len=512, calibration=16, fitness=8, heldout=2, batch_size=4)
    began = time.perf_counter()
    figures: list[tuple[str, str, object]] = [(key, "", value) for key, value in environment().items()]
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as temporary:
        work = args.work or Path(temporary)
        work.mkdir(parents=True, exist_ok=True)
        pipeline = Pipeline(
            work / "model-run",
            shapes,
            blocks,
            args.device,
            dtype,
            pools,
            variant_blocks=1 if args.tiny else 2,
            gguf_blocks=1,
            gguf_types=["q4_k", "q6_k"],
            generations=2 if args.tiny else 3,
        )
        pipeline.work.mkdir(parents=True, exist_ok=True)
        print(f"gpu_check: {shapes} with {pipeline.architecture.num_hidden_layers} blocks, {dtype}, on {args.device}")
        for phase in PHASES:
            result = pipeline.run(phase)
            print(f"{phase:12s} " + "  ".join(f"{key}={value}" for key, value in result.items()), flush=True)
            figures += [(phase, key, value) for key, value in result.items()]
        check = agreement(work / "agreement", args.device)
    figures += [("agreement", key, value) for key, value in check.items()]
    evaluation = next(value for phase, key, value in figures if key == "seconds_per_evaluation")
    gpu_peaks = [value for _phase, key, value in figures if key == "gpu_peak_mb"]
    print(f"seconds per evaluation ({pools.fitness} x {pools.seq_len} tokens): {evaluation}")
    print(f"peak GPU memory: {f'{max(gpu_peaks)} MB' if gpu_peaks else 'none (no GPU used)'}")
    print(
        f"KL agreement, {check['device']} vs cpu (float32, same stored variants): {check['device_kl']:.8g} vs "
        f"{check['cpu_kl']:.8g}, {check['relative_difference']:.2e} relative (at most {AGREEMENT:g})"
    )
    # what a GPU machine lacks unless carried: only reports (which the check writes none of) may import them
    reporting = sorted({name.split(".")[0] for name in sys.modules} & {"pandas", "matplotlib"})
    print(f"pandas or matplotlib imported: {', '.join(reporting) or 'neither'}")
    figures.append(("imports", "pandas_or_matplotlib", " ".join(reporting)))
    total = round(time.perf_counter() - began, 1)
    print(f"total seconds: {total}")
    figures.append(("total", "seconds", total))
    if args.csv is not None:
        write(args.csv, figures, f"{shapes}-{pipeline.architecture.num_hidden_layers}-{args.device}")
    if check["relative_difference"] > AGREEMENT:
        raise SystemExit(f"gpu_check: the KL differs by {check['relative_difference']:.2e} relative between devices")
    print("gpu_check: passed")


def write(path: Path, figures: list[tuple[str, str, object]], run: str) -> None:
    new = not path.is_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    date = datetime.now().strftime("%Y-%m-%d %H:%M")
    with path.open("a", newline="") as file:
        writer = csv.writer(file)
        if new:
            writer.writerow(["date", "run", "phase", "figure", "value"])
        writer.writerows([date, run, phase, key, value] for phase, key, value in figures)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
