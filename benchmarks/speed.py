"""Calibration of the gguf speed model (issue 26, part a): predicted against measured tokens/s in llama.cpp, on
GGUF files of the embedded model (SmolLM2-135M-Instruct) from F16 to Q2_K.

The files:
- `f16`: the base model as our writer stores it (llama.cpp's converter's F16), the reference of every ratio;
- llama.cpp's presets (`targets.gguf.presets.PRESETS`: Q8_0 down to Q2_K) written by llama.cpp's own quantizer
  (`targets.gguf.llama_cpp.quantize`) from that F16 file, so each tensor has the type llama-quantize gives it
  (SmolLM2's 576-wide rows take no K-type, and fall back to Q4_0/Q5_0/Q5_1/Q8_0; only ffn_down takes K-types);
- plans of the gguf target (`targets.gguf.weights.GgufWeights`, our block quantizers with the calibration's
  importance): uniform IQ4_NL, MXFP4 and Q4_0 (output matrix included), and a mixed plan.

The speed table (`targets.gguf.speed.speed_table`) is measured first, in the same run (`--remeasure`, the
default), for every type the files hold; each file's prediction comes from its tensors' types and shapes (for the
plans, from the plan through the GGUF backend's units, checked equal to the file's). Each file is then timed in
llama.cpp paired with the F16 file: `--repeats` runs of each, alternately, each a 64-token prompt batch then 32
tokens decoded one at a time; its speed is the median ratio to the F16 file times the F16 file's median speed.
On one thread (the default) a timing is llama.cpp's CPU time in the calling thread, which the other processes of a
shared machine do not inflate by taking turns on its cores (they still share its caches and memory bandwidth).

With `--judge` (the default) each file is also scored by llama.cpp on held-out windows of the embedded pydoc text:
perplexity, and the mean per-token KL to the dense model in transformers.

    .venv/bin/python benchmarks/speed.py                 # results/benchmarks/speed.csv, .json and .png
    .venv/bin/python benchmarks/speed.py --quick         # 5 files, 2 repeats: the plumbing, in minutes
    .venv/bin/python benchmarks/speed.py --frontier      # parts (b) and (c), rows added to speed.csv

Parts (b) and (c) (`--frontier`): a gguf study of the embedded model under llama.cpp Q4_K_M's file size
(search_spaces/smollm2-q4km.yaml's space), predicting speed on one thread, searched for `--search-time` with a floor
at the preset's predicted decode speed (`min_speed: 1.0x q4_k_m`, part b), then resumed for as long with the floor at
1.3 times it (part c: a floor is a constraint, not part of the study's space, so the same study and its caches go on).
The searched file of each (the lowest fitness loss under the size and the floor) is exported, judged by llama.cpp on
the same held-out windows as the preset file llama-quantize writes (perplexity, KL to the dense model), and timed in
`--pairs` back-to-back pairs with that preset file (alternating order): the speed ratio's 95% interval is a
bootstrap over the pairs. (b) is met when the searched file's perplexity is below the preset's and the interval's
lower bound is at least 0.97; (c) when its measured decode speed is at least 1.3 times the preset's. Each phase
(studies, exports, judging, timings) is kept in results/speed-bench/frontier.json, so a rerun resumes after the
last phase done; the study resumes from its storage.

The GGUF files live in results/speed-bench[-quick]/ (not committed) and a rerun reuses them. The JSON beside the
CSV holds the rank correlation, the median absolute relative error, the threads, the CPU and its flags, the
llama.cpp build, and the load average before and after the timings.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from autocompress.calibration import collect_statistics
from autocompress.config import DataConfig
from autocompress.data import token_pools
from autocompress.files import write_text_atomically
from autocompress.metrics import dense_reference
from autocompress.models import EMBEDDED_MODEL, CompressibleLinear, compressible_linears, embedded_gguf, load_model
from autocompress.plan import CompressionPlan, LayerCompression
from autocompress.targets.gguf import speed
from autocompress.targets.gguf.file import gguf_layout, write_gguf_tensors
from autocompress.targets.gguf.llama_cpp import LlamaCppModel, Timing, llama_cpp_available, quantize
from autocompress.targets.gguf.weights import GgufWeights

ROOT = Path(__file__).resolve().parent.parent
PRESETS = (
    "q8_0",
    "q6_k",
    "q5_k_m",
    "q5_k_s",
    "q5_1",
    "q5_0",
    "q4_k_m",
    "q4_k_s",
    "q4_1",
    "q4_0",
    "q3_k_l",
    "q3_k_m",
    "q3_k_s",
    "q2_k",
)
QUICK_PRESETS = ("q8_0", "q4_k_m", "q2_k")
UNIFORM_PLANS = ("iq4_nl", "mxfp4", "q4_0")
QUICK_PLANS = ("iq4_nl",)
COLUMNS = [
    "row",
    "kind",
    "size_bytes",
    "heldout_ppl",
    "mean_kld",
    "predicted_decode_tps",
    "measured_decode_tps",
    "measured_prompt_tps",
    "threads",
]


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def plans() -> dict[str, CompressionPlan]:
    """The plans written through the gguf target: uniform types, and attention in Q8_0 with the MLP in Q4_0 and
    ffn_down in Q4_K (the output matrix Q8_0)."""
    found = {f"plan {name}": CompressionPlan.uniform(format=name, granularity="linear") for name in UNIFORM_PLANS}
    mixed = {
        f"model.layers.{layer}.mlp.{part}": LayerCompression(format="q4_0")
        for layer in range(30)
        for part in ("gate_proj", "up_proj")
    }
    mixed |= {f"model.layers.{layer}.mlp.down_proj": LayerCompression(format="q4_k") for layer in range(30)}
    found["plan mixed"] = CompressionPlan(default=LayerCompression(format="q8_0"), layers=mixed, granularity="linear")
    return found


def write_files(folder: Path, quick: bool, model, tokenizer, calibration: torch.Tensor) -> list[dict]:
    """Every file of the benchmark (written once; a rerun reuses them), with the tensors its prediction uses."""
    folder.mkdir(parents=True, exist_ok=True)
    base = folder / "f16.gguf"
    if not base.is_file():
        say("writing the F16 file")
        write_gguf_tensors(model, tokenizer, {}, base, tokenizer_source=embedded_gguf())
    rows = [{"row": "f16", "kind": "reference", "path": base}]
    for preset in QUICK_PRESETS if quick else PRESETS:
        path = folder / f"{preset}.gguf"
        if not path.is_file():
            say(f"llama.cpp quantizes {preset}")
            quantize(base, path, preset)
        rows.append({"row": f"llama.cpp {preset}", "kind": "preset", "path": path})

    linears = [*compressible_linears(model), CompressibleLinear("lm_head", "", model.lm_head)]
    statistics_of = {}

    def calibration_statistics():
        if not statistics_of:
            say("calibration statistics for the plans' importance")
            statistics_of.update(collect_statistics(model, linears, calibration, {"input_sq_norms"}))
        return statistics_of

    weights = GgufWeights(model, "linear", calibration_statistics, folder / "blocks", gguf_layout(model, tokenizer))
    chosen = plans()
    for name, plan in chosen.items():
        if quick and name.removeprefix("plan ") not in QUICK_PLANS:
            continue
        path = folder / f"{name.replace(' ', '-')}.gguf"
        if not path.is_file():
            say(f"writing {name}")
            write_gguf_tensors(model, tokenizer, weights.blocks_of(plan), path, tokenizer_source=embedded_gguf())
        tensors, blocks = speed.plan_tensors(weights, plan, model.config)
        _, from_file, file_blocks = speed.file_architecture(path)
        if sorted(tensors) != sorted(from_file) or blocks != file_blocks:
            raise AssertionError(f"{name}: the plan's matrices differ from its file's")
        rows.append({"row": name, "kind": "plan", "path": path, "tensors": tensors, "blocks": blocks})
    return rows


def paired_speeds(reference: LlamaCppModel, path: Path, threads: int, repeats: int) -> tuple[Timing, list[Timing]]:
    """The file's timing as the median ratio to the reference's in back-to-back pairs (alternating order), times
    the reference's median; and the reference's timings, for its own median."""
    prompt_tokens, decode_tokens = speed.PROMPT_TOKENS, speed.DECODE_TOKENS
    with speed.timing_model(path, threads, prompt_tokens, decode_tokens) as model:
        prompt = speed._prompt(model, prompt_tokens)
        for warm in (reference, model):
            warm.timings(prompt, 2)
        ratios, references = [], []
        for repeat in range(repeats):
            pair = [reference, model] if repeat % 2 == 0 else [model, reference]
            timed = {id(one): one.timings(prompt, decode_tokens) for one in pair}
            ours, theirs = timed[id(model)], timed[id(reference)]
            ratios.append((ours.prompt_s / theirs.prompt_s, ours.decode_s / theirs.decode_s))
            references.append(theirs)
    base = speed.median_timing(references)
    return Timing(
        prompt_s=statistics.median(ratio[0] for ratio in ratios) * base.prompt_s,
        decode_s=statistics.median(ratio[1] for ratio in ratios) * base.decode_s,
    ), references


def judge(path: Path, heldout: torch.Tensor, reference: torch.Tensor, threads: int) -> tuple[float, float]:
    """llama.cpp's held-out perplexity of a file, and its mean per-token KL to the dense model; kept in
    judged.json beside the files (for this file's size and the window count), so a rerun reads it."""
    store = path.parent / "judged.json"
    judged = json.loads(store.read_text()) if store.is_file() else {}
    key = f"{path.name}:{path.stat().st_size}:{heldout.shape[0]}x{heldout.shape[1]}"
    if key not in judged:
        say(f"judging {path.name}")
        with LlamaCppModel(path, n_ctx=heldout.shape[1], n_threads=threads) as model:
            metrics = model.evaluate(heldout, reference)
        judged[key] = [float(np.exp(metrics.ce)), float(metrics.kl)]
        write_text_atomically(store, json.dumps(judged, indent=1))
    return tuple(judged[key])


def rank_correlation(first: pd.Series, second: pd.Series) -> float:
    return float(np.corrcoef(first.rank(), second.rank())[0, 1])


def plot(frame: pd.DataFrame, summary: dict, path: Path) -> None:
    figure = Figure(figsize=(12, 5.5))
    for axis, (measured, predicted, label) in zip(
        figure.subplots(1, 2),
        [
            ("measured_decode_tps", "predicted_decode_tps", "decode"),
            ("measured_prompt_tps", "predicted_prompt_tps", "prompt"),
        ],
        strict=True,
    ):
        colors = {"reference": "black", "preset": "tab:blue", "plan": "tab:orange"}
        for kind, group in frame.groupby("kind"):
            axis.scatter(group[measured], group[predicted], color=colors[kind], label=kind, zorder=3)
        for _, row in frame.iterrows():
            axis.annotate(
                row["row"].replace("llama.cpp ", ""),
                (row[measured], row[predicted]),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
        low = min(frame[measured].min(), frame[predicted].min()) * 0.95
        high = max(frame[measured].max(), frame[predicted].max()) * 1.05
        axis.plot([low, high], [low, high], color="gray", linewidth=0.8, label="predicted = measured")
        axis.set_xlabel(f"measured {label} tokens/s (llama.cpp)")
        axis.set_ylabel(f"predicted {label} tokens/s (speed table)")
        stats = summary[label]
        axis.set_title(
            f"{label}: rank correlation {stats['rank_correlation']:.3f}, median |error| {stats['median_abs_error']:.1%}"
        )
        axis.legend(fontsize=8)
        axis.grid(alpha=0.3)
    figure.suptitle(
        f"SmolLM2-135M GGUF files in llama.cpp, {summary['threads']} thread(s), {summary['cpu']}; "
        f"load average {summary['load_before'][0]:.1f} → {summary['load_after'][0]:.1f}",
        fontsize=10,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=120)


FRONTIER_PARTS = {
    "b": {
        "row": "(b) searched at Q4_K_M's size, not slower",
        "kind": "frontier",
        "floor": "1.0x q4_k_m",
        "multiple": 1.0,
    },
    "c": {
        "row": "(c) searched at 1.3x Q4_K_M's decode speed",
        "kind": "speed-budget",
        "floor": "1.3x q4_k_m",
        "multiple": 1.3,
    },
}
PRESET_ROW = "llama.cpp q4_k_m (the reference of b and c)"


def frontier_config(floor: str, threads: int, search_seconds: float) -> dict:
    """The main job's space (search_spaces/smollm2-q4km.yaml) with a speed floor predicted on `threads`."""
    import yaml

    raw = yaml.safe_load((ROOT / "search_spaces" / "smollm2-q4km.yaml").read_text())
    raw["search"] |= {"min_speed": floor, "speed_threads": threads, "timeout": search_seconds}
    return raw


def searched_trial(study, multiple: float) -> dict:
    """The searched plan: the lowest fitness loss under the size budget at `multiple` times the Q4_K_M preset's
    predicted decode speed or more; when no plan the search scored meets that floor, the fastest one under the size
    budget (`meets_floor` false), so that what the search reached is still measured."""
    from autocompress.frontier import frontier_of
    from autocompress.record import StudyRecord, scored_records

    record = StudyRecord.of(study)
    ceiling = record.config.search.budget.max_bytes(record.dense_bytes, record.config)
    floor = multiple * record.speed.presets["q4_k_m"]
    under = sorted(frontier_of(scored_records(study), ceiling, floor), key=lambda item: item.loss)
    meets = bool(under)
    if not under:
        fits = [item for item in scored_records(study) if item.size_bytes <= ceiling]
        under = sorted(fits, key=lambda item: (-item.predicted_decode_tps, item.loss))
    best = under[0]
    return {
        "meets_floor": meets,
        "trial": best.number,
        "loss": best.loss,
        "seed": best.baseline or ("uniform" if best.seed else ""),
        "predicted_decode_tps": best.predicted_decode_tps,
        "floor_tps": floor,
        "preset_predicted_tps": record.speed.presets["q4_k_m"],
        "trials": len(scored_records(study)),
        "trials_at_floor": len([item for item in scored_records(study) if item.predicted_decode_tps >= floor]),
    }


def paired_ratio(preset: Path, searched: Path, threads: int, pairs: int) -> dict:
    """Decode and prompt timings of the searched file and the preset's in back-to-back pairs (alternating order):
    the searched file's speed over the preset's per pair, their median and the bootstrap 95% interval of the mean."""
    prompt_tokens, decode_tokens = speed.PROMPT_TOKENS, speed.DECODE_TOKENS
    with (
        speed.timing_model(preset, threads, prompt_tokens, decode_tokens) as theirs,
        speed.timing_model(searched, threads, prompt_tokens, decode_tokens) as ours,
    ):
        prompt = speed._prompt(ours, prompt_tokens)
        for model in (theirs, ours):
            model.timings(prompt, 2)
        timed: list[tuple[Timing, Timing]] = []
        for repeat in range(pairs):
            order = [theirs, ours] if repeat % 2 == 0 else [ours, theirs]
            result = {id(model): model.timings(prompt, decode_tokens) for model in order}
            timed.append((result[id(ours)], result[id(theirs)]))
    ratios = np.array([their.decode_s / mine.decode_s for mine, their in timed])
    generator = np.random.default_rng(0)
    means = generator.choice(ratios, size=(10000, len(ratios))).mean(axis=1)
    return {
        "pairs": pairs,
        "decode_ratios": ratios.tolist(),
        "decode_ratio_median": float(np.median(ratios)),
        "decode_ratio_mean": float(ratios.mean()),
        "decode_ratio_ci": [float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))],
        "searched_decode_tps": float(np.median([1 / mine.decode_s for mine, _ in timed])),
        "preset_decode_tps": float(np.median([1 / their.decode_s for _, their in timed])),
        "searched_prompt_tps": float(np.median([prompt_tokens / mine.prompt_s for mine, _ in timed])),
        "preset_prompt_tps": float(np.median([prompt_tokens / their.prompt_s for _, their in timed])),
    }


def run_frontier(args: argparse.Namespace) -> None:
    """Parts (b) and (c), phase by phase (see the module's description), resuming from frontier.json."""
    import optuna

    from autocompress.config import Config
    from autocompress.export import export_trial
    from autocompress.record import StudyLocation, StudyRecord, trial_records
    from autocompress.search import run_search

    folder = ROOT / "results" / "speed-bench"
    folder.mkdir(parents=True, exist_ok=True)
    state_path = folder / "frontier.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}

    def done(key: str, value) -> None:
        state[key] = value
        write_text_atomically(state_path, json.dumps(state, indent=1))

    model, tokenizer = load_model(EMBEDDED_MODEL, device="cpu")
    base, preset = folder / "f16.gguf", folder / "q4_k_m.gguf"
    if not base.is_file():
        say("writing the F16 file")
        write_gguf_tensors(model, tokenizer, {}, base, tokenizer_source=embedded_gguf())
    if not preset.is_file():
        say("llama.cpp quantizes q4_k_m")
        quantize(base, preset, "q4_k_m")
    pools = token_pools(DataConfig(), tokenizer)
    heldout = pools.heldout[: args.windows]
    dense = dense_reference(model, heldout, batch_size=2)
    del model
    location = StudyLocation.resolve("speed-q4km", folder / "studies")
    for part, setting in FRONTIER_PARTS.items():
        if f"{part}:study" not in state:
            say(f"part ({part}): searching with min_speed {setting['floor']} for {args.search_time:.0f} s")
            config = Config.model_validate(frontier_config(setting["floor"], args.threads, args.search_time))
            study = run_search(config, location, progress=False)
            done(f"{part}:study", searched_trial(study, setting["multiple"]))
        chosen = state[f"{part}:study"]
        if f"{part}:export" not in state:
            say(f"part ({part}): exporting trial {chosen['trial']}")
            study = optuna.load_study(study_name=location.name, storage=location.storage_url)
            trial = trial_records(study)[chosen["trial"]]
            how = f"lowest fitness loss under Q4_K_M's size at {setting['floor']} predicted decode speed"
            written = export_trial(
                StudyRecord.of(study), location, trial, folder / f"searched-{part}", "gguf", True, how
            )
            done(f"{part}:export", {"path": str(written.path / "model.gguf"), "bytes": written.weights_bytes})
        if f"{part}:timing" not in state:
            say(f"part ({part}): {args.pairs} timing pairs against llama.cpp's Q4_K_M file")
            searched = Path(state[f"{part}:export"]["path"])
            done(f"{part}:timing", paired_ratio(preset, searched, args.threads, args.pairs))
    judged = {name: judge(path, heldout, dense, args.threads) for name, path in [("preset", preset)]}
    for part in FRONTIER_PARTS:
        judged[part] = judge(Path(state[f"{part}:export"]["path"]), heldout, dense, args.threads)
    write_frontier_rows(state, judged, preset, args)


def write_frontier_rows(state: dict, judged: dict, preset: Path, args: argparse.Namespace) -> None:
    """The rows of (b), (c) and the preset they were timed against, added to speed.csv (replacing earlier ones);
    the figures and verdicts in speed-frontier.json; and speed-frontier.png."""
    out = ROOT / "results" / "benchmarks"
    reference = state["b:timing"]
    rows = [
        {
            "row": PRESET_ROW,
            "kind": "preset",
            "size_bytes": preset.stat().st_size,
            "heldout_ppl": judged["preset"][0],
            "mean_kld": judged["preset"][1],
            "predicted_decode_tps": state["b:study"]["preset_predicted_tps"],
            "measured_decode_tps": reference["preset_decode_tps"],
            "measured_prompt_tps": reference["preset_prompt_tps"],
            "threads": args.threads,
        }
    ]
    summary: dict = {"threads": args.threads, "search_seconds": args.search_time, "windows": args.windows}
    for part, setting in FRONTIER_PARTS.items():
        timing, chosen = state[f"{part}:timing"], state[f"{part}:study"]
        path = Path(state[f"{part}:export"]["path"])
        ppl, kld = judged[part]
        rows.append(
            {
                "row": setting["row"],
                "kind": setting["kind"],
                "size_bytes": path.stat().st_size,
                "heldout_ppl": ppl,
                "mean_kld": kld,
                "predicted_decode_tps": chosen["predicted_decode_tps"],
                "measured_decode_tps": timing["searched_decode_tps"],
                "measured_prompt_tps": timing["searched_prompt_tps"],
                "threads": args.threads,
            }
        )
        low = timing["decode_ratio_ci"][0]
        if part == "b":
            met = ppl < judged["preset"][0] and low >= 0.97 and path.stat().st_size <= preset.stat().st_size
            claim = "held-out perplexity below the preset's, size no larger, speed ratio's 95% lower bound >= 0.97"
        else:
            met = timing["decode_ratio_median"] >= 1.3
            claim = "measured decode speed (median paired ratio) at least 1.3 times the preset's"
        summary[part] = chosen | timing | {"heldout_ppl": ppl, "mean_kld": kld, "claim": claim, "met": bool(met)}
    summary["preset"] = {"heldout_ppl": judged["preset"][0], "mean_kld": judged["preset"][1]}
    summary["b_met_by"] = [  # (b)'s claim of each searched file: the faster search may reach it too
        part
        for part in FRONTIER_PARTS
        if judged[part][0] < judged["preset"][0]
        and state[f"{part}:timing"]["decode_ratio_ci"][0] >= 0.97
        and Path(state[f"{part}:export"]["path"]).stat().st_size <= preset.stat().st_size
    ]
    path = out / "speed.csv"
    earlier = pd.read_csv(path) if path.is_file() else pd.DataFrame(columns=COLUMNS)
    names = {row["row"] for row in rows}
    frame = pd.concat([earlier[~earlier["row"].isin(names)], pd.DataFrame(rows)], ignore_index=True)
    frame[COLUMNS].to_csv(path, index=False, float_format="%.6g")
    write_text_atomically(out / "speed-frontier.json", json.dumps(summary, indent=1))
    plot_frontier(rows, summary, out / "speed-frontier.png")
    print(pd.DataFrame(rows)[COLUMNS].to_string(index=False))
    print(f"(b)'s claim (better perplexity, no larger, not slower) holds for the files of: {summary['b_met_by']}")
    for part in FRONTIER_PARTS:
        item = summary[part]
        low, high = item["decode_ratio_ci"]
        print(
            f"({part}) {'met' if item['met'] else 'NOT met'}: ppl {item['heldout_ppl']:.3f} vs "
            f"{summary['preset']['heldout_ppl']:.3f}; decode ratio median {item['decode_ratio_median']:.3f}, "
            f"95% CI [{low:.3f}, {high:.3f}] over {item['pairs']} pairs"
        )


def plot_frontier(rows: list[dict], summary: dict, path: Path) -> None:
    """Held-out perplexity against measured decode tokens/s for the preset and the searched files, each searched
    file's paired speed ratio and interval in its label."""
    figure = Figure(figsize=(7.5, 4.8))
    axis = figure.subplots()
    colours = {"preset": "tab:blue", "frontier": "tab:orange", "speed-budget": "tab:green"}
    for row in rows:
        label = row["row"]
        part = next((part for part, item in FRONTIER_PARTS.items() if item["row"] == label), None)
        if part is not None:
            low, high = summary[part]["decode_ratio_ci"]
            label += f": ratio {summary[part]['decode_ratio_median']:.2f} [{low:.2f}, {high:.2f}]"
        axis.scatter(row["measured_decode_tps"], row["heldout_ppl"], s=60, color=colours[row["kind"]], label=label)
    axis.set_xlabel(f"measured decode tokens/s (llama.cpp, {summary['threads']} thread)")
    axis.set_ylabel("held-out perplexity (llama.cpp)")
    axis.set_title("SmolLM2-135M at Q4_K_M's size: searched files against the preset", fontsize=10)
    axis.legend(fontsize=7)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--table-repeats", type=int, default=speed.REPEATS)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--keep-table", action="store_true", help="reuse a cached speed table instead of remeasuring")
    parser.add_argument("--no-judge", action="store_true", help="leave heldout_ppl and mean_kld empty")
    parser.add_argument("--windows", type=int, default=4, help="held-out windows to judge each file on")
    parser.add_argument("--files-only", action="store_true", help="write and judge the files; time nothing")
    parser.add_argument("--frontier", action="store_true", help="parts (b) and (c) instead of part (a)")
    parser.add_argument("--search-time", type=float, default=600, help="seconds each study of (b), (c) searches")
    parser.add_argument("--pairs", type=int, default=20, help="timing pairs of (b), (c) against the preset")
    args = parser.parse_args()
    unavailable = llama_cpp_available()
    if unavailable:
        raise SystemExit(unavailable)
    torch.set_num_threads(args.threads)
    if args.frontier:
        run_frontier(args)
        return
    suffix = "-quick" if args.quick else ""
    folder = ROOT / "results" / f"speed-bench{suffix}"
    out = ROOT / "results" / "benchmarks"
    out.mkdir(parents=True, exist_ok=True)

    model, tokenizer = load_model(EMBEDDED_MODEL, device="cpu")
    pools = token_pools(DataConfig(), tokenizer)
    rows = write_files(folder, args.quick, model, tokenizer, pools.calibration[:4])
    repeats = 2 if args.quick else args.repeats
    heldout = pools.heldout[: args.windows]
    dense = dense_reference(model, heldout, batch_size=2) if not args.no_judge else None
    judged = {row["row"]: judge(row["path"], heldout, dense, args.threads) for row in rows} if dense is not None else {}
    if args.files_only:
        return

    load_before = os.getloadavg()
    architecture = speed.Architecture.of_config(model.config)
    types = set()
    for row in rows:
        _, tensors, blocks = speed.file_architecture(row["path"])
        row.setdefault("tensors", tensors)
        row.setdefault("blocks", blocks)
        types |= {type_name for type_name, _ in row["tensors"]}
    say(f"speed table for {sorted(types)} on {args.threads} thread(s); load average {load_before}")
    table = speed.speed_table(
        architecture,
        sorted(types),
        args.threads,
        repeats=2 if args.quick else args.table_repeats,
        progress=say,
        remeasure=not args.keep_table,
    )
    reference_timings: list[Timing] = []
    with speed.timing_model(rows[0]["path"], args.threads, speed.PROMPT_TOKENS, speed.DECODE_TOKENS) as reference:
        for row in rows[1:]:
            say(f"timing {row['row']}")
            timing, references = paired_speeds(reference, row["path"], args.threads, repeats)
            reference_timings += references
            row["measured"] = timing
    load_after = os.getloadavg()
    reference_median = speed.median_timing(reference_timings)
    rows[0]["measured"] = reference_median  # the reference, timed in every pair

    records = []
    for row in rows:
        predicted = table.predict(row["tensors"], row["blocks"])
        measured: Timing = row["measured"]
        ppl, kld = judged.get(row["row"], (None, None))
        records.append(
            {
                "row": row["row"],
                "kind": row["kind"],
                "size_bytes": row["path"].stat().st_size,
                "heldout_ppl": ppl,
                "mean_kld": kld,
                "predicted_decode_tps": predicted.decode_tps,
                "measured_decode_tps": 1 / measured.decode_s,
                "measured_prompt_tps": speed.PROMPT_TOKENS / measured.prompt_s,
                "threads": args.threads,
                "predicted_prompt_tps": predicted.prompt_tps,
            }
        )
    frame = pd.DataFrame(records)
    summary = {
        "threads": args.threads,
        "repeats": repeats,
        "files": len(frame),
        "prompt_tokens": speed.PROMPT_TOKENS,
        "decode_tokens": speed.DECODE_TOKENS,
        "reference_decode_tps": 1 / reference_median.decode_s,
        "reference_prompt_tps": speed.PROMPT_TOKENS / reference_median.prompt_s,
        "load_before": list(load_before),
        "load_after": list(load_after),
        "cpu": table.machine["cpu"],
        "cpu_flags": table.machine["cpu_flags"],
        "system_info": table.machine["system_info"],
        "llama_cpp_python": table.machine["llama_cpp_python"],
        "platform": platform.platform(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "table": table.to_json() | {"machine": None},
        "rows": records,
    }
    for label in ("decode", "prompt"):
        measured, predicted = frame[f"measured_{label}_tps"], frame[f"predicted_{label}_tps"]
        errors = (predicted / measured - 1).abs()
        summary[label] = {
            "rank_correlation": rank_correlation(measured, predicted),
            "median_abs_error": float(errors.median()),
            "max_abs_error": float(errors.max()),
        }
    frame[COLUMNS].to_csv(out / f"speed{suffix}.csv", index=False, float_format="%.6g")
    write_text_atomically(out / f"speed{suffix}.json", json.dumps(summary, indent=1))
    plot(frame, summary, out / f"speed{suffix}.png")
    print(frame[[*COLUMNS, "predicted_prompt_tps"]].to_string(index=False))
    for label in ("decode", "prompt"):
        stats = summary[label]
        print(
            f"{label}: rank correlation {stats['rank_correlation']:.3f}, median |error| "
            f"{stats['median_abs_error']:.1%} (max {stats['max_abs_error']:.1%})"
        )
    print(f"load average before {load_before}, after {load_after}; {args.threads} thread(s)")


if __name__ == "__main__":
    main()
