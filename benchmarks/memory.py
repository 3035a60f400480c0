"""Peak memory and disk of a Hessian recipe: measured on the embedded model, scaled by shapes to Llama-3-8B.

The recipe is `search_spaces/llama3-8b-overnight.yaml`'s compression (SparseGPT + GPTQ, groups of 128, asymmetric)
and its levels (sparsity 0.0..0.7 by 0.1 × bits 3, 4, 8, 16: 31 variants per Linear, the dense one left out).

Measured (one child process per Hessian budget, so each peak is its own): SmolLM2-135M on the demo's pools builds
its layer-variant database from scratch. `peak_rss_mb` is the process's peak resident memory (model load included),
`hessians_held_peak_mb` the most Hessian bytes held at once (tensors shared by q/k/v and gate/up counted once),
`passes` the calibration passes and `block_forwards` the decoder blocks they ran (a pass stops after its group's
last block), `database_mb` the variant files on disk and `database_accounted_mb` the same files by shapes alone
(`codecs.stored_bytes`), which is what the 8B row uses.

Scaled (no weights loaded: the Llama-3-8B architecture on the meta device, the recipe's pools): the same groups
and byte formulas, plus what else a study keeps: the host copy of the dense Linears (`dense_copy_mb`, in bf16) and
the fitness reference log-probabilities (float16, `reference_mb`, in memory and cached on disk). GPU figures add
the model's own bf16 weights, the held Hessians and `search.reuse_memory_mb` of kept block inputs. The host peak is
the larger of the whole bf16 model while it loads (it is read on the host, then moved) and the dense copy with the
reference, plus the process itself (`PROCESS_MB`), which the 2-block run below showed missing.

Measured at real shapes (`--shapes llama3-8b --blocks 2`): a random model with Llama-3-8B's shapes, keeping two
decoder blocks and the full embedding and head (1.49 G parameters, float32 on the CPU), runs the pipeline of
`benchmarks/shapes_pipeline.py` one child process per phase (model, calibration, variants, gguf, study, export), each
phase's peak resident memory its own. A phase's figures are kept in `<work>/phases.json` as it ends, so a run that
stops resumes at the next phase. Rows `how=measured` hold each phase's seconds, peak RSS and disk, beside rows
`how=scaled by shapes` of what the formulas above predict for the same shapes, pools and levels.

    .venv/bin/python benchmarks/memory.py --budgets 4000            # the recipe's levels: about 40 minutes
    .venv/bin/python benchmarks/memory.py --budgets 30 --levels few # a small budget's peaks, in minutes
    .venv/bin/python benchmarks/memory.py --shapes llama3-8b --blocks 2   # real shapes on the CPU: about an hour

Writes results/benchmarks/memory.csv (a row replaces the earlier one of its model, budget, levels and phase).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import pandas as pd
import torch
import yaml
from shapes_pipeline import PHASES, SHAPES, Pipeline, PoolSizes, architecture

from autocompress.codecs import resolve, stored_bytes
from autocompress.codecs.packing import packed_length
from autocompress.compress import sparsity_pattern
from autocompress.config import Config
from autocompress.methods.pruning import pruned_per_row
from autocompress.models import CompressibleLinear, compressible_linears
from autocompress.plan import CompressionPlan
from autocompress.session import hessian_groups
from autocompress.variants import variant_settings

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "search_spaces" / "llama3-8b-overnight.yaml"
MB = 10**6
VOCAB = 128256  # Llama-3's
PARAMETERS_8B = 8_030_261_248


def recipe() -> dict:
    return yaml.safe_load(RECIPE.read_text())


LEVELS = {"recipe": None, "few": {"sparsity": [0.0, 0.5], "bits": [4, 16]}}  # few: peaks alone, in minutes


def embedded_config(budget_mb: float, levels: str = "recipe") -> Config:
    """The recipe's compression and levels (or `few` of them) on the embedded model and the demo's pools."""
    demo = yaml.safe_load((ROOT / "search_spaces" / "smollm2-demo.yaml").read_text())
    search = LEVELS[levels] or recipe()["search"]
    return Config.model_validate(
        {
            "model": demo["model"],
            "data": demo["data"],
            "compression": recipe()["compression"],
            "search": {
                "sparsity": search["sparsity"],
                "bits": search["bits"],
                "database": "on",
                "hessian_memory_mb": budget_mb,
            },
        }
    )


def unique_bytes(tensors: list[torch.Tensor]) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in {id(t): t for t in tensors}.values())


def accounted_database_bytes(linears: list[CompressibleLinear], config: Config, value_bytes: int) -> int:
    """The variant files' payload by shapes alone: every Linear at every level of the recipe. A pruned-only variant
    keeps its values in the model's dtype (`value_bytes` each: the exact values the model computes with)."""
    plan = CompressionPlan(**config.compression.plan_options())
    pattern = sparsity_pattern(plan)
    total = 0
    for setting in variant_settings(config.search.sparsity_levels(), config.search.precision_levels()):
        codec = resolve(setting, plan)
        for linear in linears:
            out_features, in_features = linear.module.out_features, linear.module.in_features
            kept = out_features * (in_features - pruned_per_row(in_features, setting.sparsity, pattern))
            if setting.format is None and setting.bits >= 16:
                total += packed_length(out_features * in_features, 1) + kept * value_bytes
            else:
                total += stored_bytes(codec, out_features, in_features, None if setting.sparsity == 0.0 else kept)
    return total


SHARED_INPUT = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up", "up_proj": "gate_up"}


def shared_hessian_bytes(group: list[CompressibleLinear]) -> int:
    """A group's float32 Hessians as calibration holds them: one per distinct input (q/k/v, gate/up share)."""
    by_input = {}
    for linear in group:
        role = linear.name.rsplit(".", 1)[-1]
        by_input[linear.block, SHARED_INPUT.get(role, role)] = linear.module.in_features**2 * 4
    return sum(by_input.values())


def block_forwards(groups: list[list[CompressibleLinear]], blocks: list[str]) -> int:
    """Decoder blocks run per calibration batch over all passes: each pass runs up to its group's last block."""
    return sum(blocks.index(group[-1].block) + 1 for group in groups)


def measure(budget_mb: float, levels: str) -> dict:
    """In this process: build the embedded model's database at one Hessian budget; the figures as a dict."""
    import autocompress.session
    from autocompress.session import CompressionSession

    config = embedded_config(budget_mb, levels)
    held_peak = 0
    collect = autocompress.session.collect_statistics

    def measured(model, linears, tokens, needs, *args):
        nonlocal held_peak
        statistics = collect(model, linears, tokens, needs, *args)
        if "hessian" in needs:
            held_peak = max(held_peak, unique_bytes([stats.hessian for stats in statistics.values()]))
        return statistics

    autocompress.session.collect_statistics = measured
    with tempfile.TemporaryDirectory(prefix="memory-") as folder:
        session = CompressionSession(config, cache_dir=Path(folder))
        began = time.perf_counter()
        report = session.build_database()
        build_s = time.perf_counter() - began
        disk = session.database().disk_usage()
        blocks = list(dict.fromkeys(linear.block for linear in session.linears))
        return {
            "hessian_memory_mb": budget_mb,
            "levels": levels,
            "groups": len(session.hessian_groups),
            "passes": session.hessian_passes,
            "block_forwards": block_forwards(session.hessian_groups, blocks),
            "variants": report.variants,
            "build_s": round(build_s, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB),
            "hessians_held_peak_mb": round(held_peak / MB, 1),
            "hessians_all_mb": round(shared_hessian_bytes(session.linears) / MB, 1),
            "database_mb": round(disk.bytes / MB, 1),
            "database_accounted_mb": round(
                accounted_database_bytes(session.linears, config, session.linears[0].module.weight.element_size()) / MB,
                1,
            ),
        }


def llama3_8b_linears() -> list[CompressibleLinear]:
    from transformers import LlamaConfig, LlamaForCausalLM

    architecture = LlamaConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=VOCAB,
    )
    with torch.device("meta"):
        return compressible_linears(LlamaForCausalLM(architecture))


def scaled(budget_mb: float) -> dict:
    """The 8B recipe's figures from shapes alone, by the formulas the measured rows check."""
    data, search = recipe()["data"], recipe()["search"]
    config = embedded_config(budget_mb)
    linears = llama3_8b_linears()
    groups = hessian_groups(linears, int(budget_mb * MB))
    blocks = list(dict.fromkeys(linear.block for linear in linears))
    weights = sum(linear.module.weight.numel() for linear in linears)
    reference = data["fitness"] * data["seq_len"] * VOCAB * 2  # float16 log-probabilities, on the host
    held = max(shared_hessian_bytes(group) for group in groups)
    largest = max(linear.module.in_features for linear in linears) ** 2 * 4
    # on the GPU: building, the held Hessians and GPTQ's two float32 working copies of the largest one; scoring,
    # the kept block inputs and a batch's float32 logits with their log-softmax
    building = held + 2 * largest
    scoring = Config.model_validate({"search": search}).search.reuse_memory_mb * MB
    scoring += 2 * data["batch_size"] * data["seq_len"] * VOCAB * 4
    database = accounted_database_bytes(linears, config, value_bytes=2)  # bfloat16
    artifact = search["max_size"] * PARAMETERS_8B * 2
    return {
        "hessian_memory_mb": budget_mb,
        "levels": "recipe",
        "groups": len(groups),
        "passes": len(groups),
        "block_forwards": block_forwards(groups, blocks),
        "variants": len(linears) * len(variant_settings(config.search.sparsity_levels(), search["bits"])),
        "hessians_held_peak_mb": round(held / MB),
        "hessians_all_mb": round(shared_hessian_bytes(linears) / MB),
        "database_accounted_mb": round(database / MB),
        "database_unpacked_mb": round(weights * 31 / MB),
        "dense_copy_mb": round(weights * 2 / MB),
        "reference_mb": round(reference / MB),
        "gpu_peak_mb": round((PARAMETERS_8B * 2 + max(building, scoring)) / MB),
        # the whole bf16 model while it loads (on the host, then moved), later the dense copy and the reference
        "host_peak_mb": round((max(PARAMETERS_8B * 2, weights * 2 + reference) + PROCESS_MB * MB) / MB),
        # exporting a plan at the recipe's max_size: its tensors held twice while written (the 2-block run's export)
        "export_host_peak_mb": round((weights * 2 + reference + 2 * artifact + PROCESS_MB * MB) / MB),
        "disk_mb": round((database + reference) / MB),
    }


def key_text(value: str) -> str:
    """A key cell as text that numbers written alike share ("4000" and "4000.0")."""
    try:
        return str(float(value))
    except ValueError:
        return value


def write(row: dict, path: Path) -> None:
    """Add `row` to the CSV, replacing an earlier row of the same model, kind, budget, levels and phase."""
    key = ["model", "how", "hessian_memory_mb", "levels", "phase"]
    row = {"phase": ""} | row | {"date": datetime.now().strftime("%Y-%m-%d %H:%M")}
    frame = pd.DataFrame([{name: "" if value is None else str(value) for name, value in row.items()}])
    if path.is_file():
        earlier = pd.read_csv(path, dtype=str, keep_default_na=False)  # other rows as written, never reformatted
        if "phase" not in earlier:
            earlier["phase"] = ""
        same = (earlier[key].map(key_text) == frame[key].map(key_text).iloc[0]).all(axis=1)
        frame = pd.concat([earlier[~same], frame], ignore_index=True).fillna("")
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False)
    print(row, flush=True)


SHAPES_POOLS = PoolSizes(seq_len=128, calibration=8, fitness=4, heldout=2, batch_size=4)
SHAPES_BUDGET_MB = 4000.0  # the default search.hessian_memory_mb


def shapes_pipeline(shapes: str, blocks: int, work: Path) -> Pipeline:
    """Float32 on the CPU: SparseGPT + GPTQ variants and q4_k blocks of the first block's attention Linears, one
    generation."""
    return Pipeline(
        work,
        shapes,
        blocks,
        "cpu",
        "float32",
        SHAPES_POOLS,
        variant_blocks=1,  # the Hessians of both blocks are held (one group); the variants built for the first
        variant_linears=4,  # block's attention Linears (GPTQ on down_proj alone would take most of an hour here)
        gguf_blocks=1,
        gguf_types=["q4_k"],
        generations=1,
        hessian_memory_mb=SHAPES_BUDGET_MB,
        gguf_linears=4,  # q, k, v and o: 42 M weights, minutes on a shared core
    )


def shapes_phase(pipeline: Pipeline, phase: str) -> dict:
    """In this process: one phase's figures and the process's peak resident memory."""
    figures = pipeline.run(phase)
    return figures | {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB)}


PROCESS_MB = 360  # a Python process with torch, transformers and autocompress imported (measured)
# Bytes per element of the largest tensor that rounding a loaded float32 model to its float16 storage
# (`models.round_to_storage`) holds at its peak beyond the model: a float16 copy, the boolean masks of its range
# check, and the tensor's pages both as read from the memory-mapped file and as rewritten. Measured: a peak 543 MB
# above the rounded model for a 65.5 M-element float32 embedding (8.3 bytes per element).
ROUNDING_BYTES_PER_ELEMENT = 8.3


def rounding_transient(model: torch.nn.Module, value_bytes: int) -> int:
    """What rounding a loaded model to its 16-bit storage holds at its peak beyond the model; nothing for a model
    loaded in 16 bits (stored as is)."""
    if value_bytes <= 2:
        return 0
    return int(max(parameter.numel() for parameter in model.parameters()) * ROUNDING_BYTES_PER_ELEMENT)


def predicted_for_shapes(pipeline: Pipeline) -> dict[str, dict]:
    """What the scaling formulas (`scaled`'s) predict for the run of `pipeline`, by phase: the Hessians held, the
    variant files, the reference, and each phase's peak resident memory on the CPU, where the host holds what
    `scaled` puts on the GPU (the model's own weights, the held Hessians and GPTQ's working copies, a batch's logits)
    besides what it keeps on the host (the dense copy of the Linears, the reference).

    `peak_rss_mb_before_fix` leaves out what the 2-block run showed missing: the process itself, the rounding of a
    float32 model to its float16 storage as it loads (`rounding_transient`: 4.4 GB for a 128k x 4096 embedding),
    and the export's tensors, held twice while written."""
    config = pipeline.variants_config()
    value_bytes = getattr(torch, pipeline.dtype).itemsize
    with torch.device("meta"):
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM(pipeline.architecture)
    linears = compressible_linears(model)
    parameters = sum(parameter.numel() for parameter in model.parameters())
    built = pipeline.variant_linears_of(linears)
    groups = [group for group in hessian_groups(linears, int(pipeline.hessian_memory_mb * MB)) if group[0] in built]
    held = max(shared_hessian_bytes(group) for group in groups)
    largest = max(linear.module.in_features for linear in built) ** 2 * 4
    pools, vocab = pipeline.pools, pipeline.architecture.vocab_size
    reference = pools.fitness * pools.seq_len * vocab * 2
    logits = 2 * pools.batch_size * pools.seq_len * vocab * 4
    weights = sum(linear.module.weight.numel() for linear in linears)
    model_bytes, dense_copy = parameters * value_bytes, weights * value_bytes
    session = model_bytes + dense_copy + logits
    # the study's plans (4-bit in groups of 128 with a float16 scale and a 4-bit zero-point) beside the rest in 16 bits
    artifact = (parameters - weights) * 2 + weights * (0.5 + 2.5 / 128)
    loading = model_bytes + rounding_transient(model, value_bytes)  # the session's model, as it loads
    peaks = {
        "model": model_bytes,
        "calibration": session + reference,
        "variants": session + held + 2 * largest,
        "gguf": session,
        "study": session + reference,
        "export": session + reference,
    }
    figures = {
        "model": {"model_mb": round(model_bytes / MB)},
        "calibration": {"reference_mb": round(reference / MB)},
        "variants": {
            "hessians_held_mb": round(held / MB),
            "variants_mb": round(accounted_database_bytes(built, config, value_bytes) / MB),
        },
    }
    predicted = {}
    # the artifact's tensors as export writes them, twice: what the 2-block run's export peak showed missing
    written = {"export": 2 * artifact}
    for phase, peak in peaks.items():
        fixed = (peak if phase == "model" else max(peak + written.get(phase, 0), loading)) + PROCESS_MB * MB
        predicted[phase] = figures.get(phase, {}) | {
            "peak_rss_mb": round(fixed / MB),
            "peak_rss_mb_before_fix": round(peak / MB),
        }
    return predicted


def run_shapes(shapes: str, blocks: int, work: Path, csv: Path, phases: list[str]) -> None:
    """The predicted rows, then each phase not yet in `<work>/phases.json` in a child process, its measured row
    written as it ends (a phase that did not finish has no measured row)."""
    work.mkdir(parents=True, exist_ok=True)
    state_path = work / "phases.json"
    done = json.loads(state_path.read_text()) if state_path.is_file() else {}
    pipeline = shapes_pipeline(shapes, blocks, work)
    model = f"{shapes} shapes, {pipeline.architecture.num_hidden_layers} blocks"
    common = {"model": model, "hessian_memory_mb": SHAPES_BUDGET_MB, "levels": "few"}
    for phase, figures in predicted_for_shapes(pipeline).items():
        write(common | {"how": "scaled by shapes", "phase": phase} | figures, csv)
    for phase in done:
        print(f"{phase}: measured earlier, {done[phase]}", flush=True)
        write(common | {"how": "measured", "phase": phase} | done[phase], csv)
    for phase in phases:
        if phase in done:
            continue
        command = [sys.executable, __file__, "--shapes", shapes, "--blocks", str(blocks), "--work", str(work)]
        result = subprocess.run([*command, "--phase", phase], capture_output=True, text=True, check=False)
        if result.returncode:
            raise SystemExit(f"the {phase} phase failed:\n{result.stderr[-3000:]}")
        done[phase] = json.loads(result.stdout.splitlines()[-1])
        state_path.write_text(json.dumps(done, indent=1))  # small: a rename is not needed to survive a kill here
        write(common | {"how": "measured", "phase": phase} | done[phase], csv)
    print(f"wrote {csv}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", type=float, nargs="+", default=[4000, 30], help="search.hessian_memory_mb")
    parser.add_argument("--levels", choices=tuple(LEVELS), default="recipe", help="the measured builds' levels")
    parser.add_argument("--child", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--scaled-only", action="store_true", help="write the Llama-3-8B rows scaled by shapes alone")
    parser.add_argument("--csv", type=Path, default=ROOT / "results" / "benchmarks" / "memory.csv")
    parser.add_argument("--shapes", choices=tuple(SHAPES), help="measure a random model of these shapes instead")
    parser.add_argument("--blocks", type=int, default=2, help="with --shapes: the decoder blocks kept")
    parser.add_argument("--work", type=Path, help="with --shapes: the model, caches and phases.json (resumable)")
    parser.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)
    parser.add_argument(
        "--phases", choices=PHASES, nargs="+", default=list(PHASES), help="with --shapes: these, in this order"
    )
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(measure(args.child, args.levels)))
        return
    if args.shapes is not None:
        try:
            architecture(args.shapes, args.blocks)
        except ValueError as error:
            parser.error(str(error))
        work = args.work or Path(tempfile.gettempdir()) / f"autocompress-memory-{args.shapes}-{args.blocks}"
        if args.phase is not None:
            print(json.dumps(shapes_phase(shapes_pipeline(args.shapes, args.blocks, work), args.phase)))
        else:
            run_shapes(args.shapes, args.blocks, work, args.csv, args.phases)
        return
    for budget in args.budgets:
        write({"model": "Llama-3-8B", "how": "scaled by shapes"} | scaled(budget), args.csv)
    for budget in [] if args.scaled_only else args.budgets:
        command = [sys.executable, __file__, "--child", str(budget), "--levels", args.levels]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode:
            raise SystemExit(f"the measurement at {budget} MB failed:\n{result.stderr[-3000:]}")
        write({"model": "smollm2-135m", "how": "measured"} | json.loads(result.stdout.splitlines()[-1]), args.csv)
    print(f"wrote {args.csv}")


if __name__ == "__main__":
    main()
