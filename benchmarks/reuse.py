"""Evaluations that reuse kept decoder-block inputs, timed on the embedded model (SmolLM2-135M, 30 blocks).

A base plan (every block Wanda 40% + RTN 8-bit, groups of 128) is stitched into the resident model; then plans that
differ from the previously scored one from some block on are scored on the demo's fitness pool (8 windows of 256
tokens, batches of 4). Each evaluation reusing kept inputs is followed by a full evaluation of the same plan (kept
inputs dropped first), and the speedup is the median of those pairs' ratios: the machine is shared, and its load
drifts more between scenarios than within a pair. Times are `Measurement.eval_s` (the stitch left out). Scenarios:
- a full evaluation recording the kept inputs against one with reuse off (the recording's overhead);
- from block k, k in 0, 10, 20, 29: the plan alternates between the base and the base with block k changed;
- random walk: each plan is the previous one with one random block at another level (an evolution's mutations);
- offspring: plans that are one parent with 1-3 level switches (2-6 blocks changed, as the evolution sampler makes
  them), scored one after another, so each reruns from the first block where it differs from the one before.

    .venv/bin/python benchmarks/reuse.py --threads 1 --repeats 2 --steps 8   # the committed CSV: 12 minutes

Writes results/benchmarks/reuse.csv (median ms per evaluation, reusing and full, speedup, kept MB).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

import pandas as pd
import torch

from autocompress.block_reuse import BlockInputCache
from autocompress.config import Config
from autocompress.plan import CompressionPlan, LayerCompression
from autocompress.session import CompressionSession

ROOT = Path(__file__).resolve().parents[1]
BASE_LEVEL = LayerCompression(sparsity=0.4, bits=8)
LEVELS = [LayerCompression(sparsity=sparsity, bits=bits) for sparsity in (0.25, 0.4, 0.6) for bits in (4, 8)]


def bench_config(fitness: int, seq_len: int) -> Config:
    return Config.model_validate(
        {
            "model": {"name": "smollm2-135m", "dtype": "float32", "device": "auto"},
            "data": {
                "source": "pydoc",
                "seq_len": seq_len,
                "calibration": 8,  # Wanda's input norms only; the quality of the plans is not the point here
                "fitness": fitness,
                "heldout": 4,
                "batch_size": 4,
                "seed": 0,
            },
            "compression": {"pruning": "wanda", "quantization": "rtn", "group_size": 128},
            "search": {"sparsity": [0.25, 0.4, 0.6], "bits": [4, 8]},
        }
    )


class Bench:
    def __init__(self, session: CompressionSession) -> None:
        self.session = session
        self.kept = session.block_inputs
        self.blocks = [f"model.layers.{index}" for index in range(len(self.kept.blocks))]
        self.batches = -(-len(session.pools.fitness) // session.batch_size)
        self.reuse_off = BlockInputCache(session.model, *session.pools.fitness.shape, memory_bytes=0)

    def plan(self, levels: dict[int, LayerCompression]) -> CompressionPlan:
        layers = {self.blocks[block]: level for block, level in levels.items() if level != BASE_LEVEL}
        return CompressionPlan(default=BASE_LEVEL, layers=layers, pruning="wanda", group_size=128)

    def measure(self, plan: CompressionPlan) -> tuple[float, float]:
        """(ms of the evaluation, mean block it started from over the batches)."""
        skipped = self.kept.blocks_skipped
        measured = self.session.measure(plan)
        return measured.eval_s * 1000, (self.kept.blocks_skipped - skipped) / self.batches

    def paired(self, plan: CompressionPlan) -> tuple[float, float, float]:
        """(ms reusing kept inputs, ms of a full evaluation of the same plan right after, start block): the machine
        is shared, so each speedup compares two evaluations made seconds apart. The full one, recording, leaves the
        kept inputs as the reusing one did."""
        reused_ms, start = self.measure(plan)
        self.kept.invalidate()
        full_ms, _ = self.measure(plan)
        return reused_ms, full_ms, start

    def recording_overhead(self, plan: CompressionPlan) -> tuple[float, float]:
        """(ms of a full evaluation with reuse off, ms of one recording the kept inputs), of the stitched plan."""
        self.session.block_inputs = self.reuse_off
        try:
            off_ms = self.session.measure(plan).eval_s * 1000
        finally:
            self.session.block_inputs = self.kept
        self.kept.invalidate()
        return off_ms, self.measure(plan)[0]


def run(fitness: int, seq_len: int, repeats: int, steps: int, log) -> list[dict]:
    session = CompressionSession(bench_config(fitness, seq_len))
    bench = Bench(session)
    n_blocks = len(bench.blocks)
    base = bench.plan({})
    changed = LayerCompression(sparsity=0.6, bits=4)
    common = {
        "model": "smollm2-135m",
        "blocks": n_blocks,
        "windows": fitness,
        "seq_len": seq_len,
        "batch_size": session.batch_size,
        "dtype": "float32",
        "threads": torch.get_num_threads(),
    }
    rows: list[dict] = []

    def add(scenario: str, first_changed: list[float], pairs: list[tuple[float, float, float]]) -> None:
        reused, full, starts = zip(*pairs, strict=True)
        speedups = [whole / part for part, whole, _ in pairs]
        row = {
            "scenario": scenario,
            "first_changed_block": round(statistics.mean(first_changed), 1),
            "start_block": round(statistics.mean(starts), 1),
            "evaluations": len(pairs),
            "ms_per_eval": round(statistics.median(reused), 1),
            "full_ms_per_eval": round(statistics.median(full), 1),
            "speedup": round(statistics.median(speedups), 2),
            "speedup_of_total": round(sum(full) / sum(reused), 2),
            "kept_mb": round(bench.kept.memory_bytes / 1e6, 1),
        }
        rows.append(common | row)
        log(f"{scenario}: {row['ms_per_eval']:.0f} vs {row['full_ms_per_eval']:.0f} ms, x{row['speedup']:.2f}")

    bench.measure(base)  # statistics, the dense reference, the first stitch
    overhead = [bench.recording_overhead(base) for _ in range(repeats + 1)]
    add("full evaluation recording kept inputs (vs reuse off)", [0], [(rec, off, 0) for off, rec in overhead])

    for first in (0, n_blocks // 3, 2 * n_blocks // 3, n_blocks - 1):
        other = bench.plan({first: changed})
        bench.measure(base)
        pairs = [bench.paired(plan) for _ in range(repeats) for plan in (other, base)]
        add(f"from block {first}", [first], pairs)

    chance = random.Random(0)
    levels = dict.fromkeys(range(n_blocks), BASE_LEVEL)
    bench.measure(bench.plan(levels))
    pairs, firsts = [], []
    for _ in range(steps):
        block = chance.randrange(n_blocks)
        levels[block] = chance.choice([level for level in LEVELS if level != levels[block]])
        pairs.append(bench.paired(bench.plan(levels)))
        firsts.append(block)
    log(f"random walk, mutated blocks {firsts}")
    add("random walk, one block a step", firsts, pairs)

    parent = {block: chance.choice(LEVELS) for block in range(n_blocks)}
    previous = dict(parent)
    bench.measure(bench.plan(parent))
    pairs, firsts = [], []
    for _ in range(steps):
        child = dict(parent)
        switches = min(chance.randint(1, 3), chance.randint(1, 3))  # as the evolution sampler, biased to one
        for block in chance.sample(range(n_blocks), 2 * switches):
            child[block] = chance.choice([level for level in LEVELS if level != parent[block]])
        pairs.append(bench.paired(bench.plan(child)))
        firsts.append(min((b for b in range(n_blocks) if child[b] != previous[b]), default=n_blocks))
        previous = child
    log(f"offspring, first changed blocks {firsts}")
    add("offspring of one parent, 1-3 switches", firsts, pairs)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fitness", type=int, default=8, help="fitness windows (the demo's 8)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=1, help="rounds of the two plans of each 'from block k'")
    parser.add_argument("--steps", type=int, default=10, help="plans of the random walk and of the offspring")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads; 1 times more steadily on a machine shared with others"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "benchmarks" / "reuse.csv")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    began = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - began:6.0f} s] {message}", flush=True)

    rows = run(args.fitness, args.seq_len, args.repeats, args.steps, log)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(args.out, index=False)
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
