"""Structure beside quantization, judged by llama.cpp: at llama.cpp's Q4_K_M and Q3_K_M file sizes of the embedded
model, and at 60% of Q3_K_M's bytes (about 56.1 MB, below the smallest file quantization alone can make), llama.cpp's
preset, the quant-only searched file and the jointly searched file (per-block structure plus quant levels).

Every figure comes from the product as a user runs it, through its command line:
- `autocompress search <yaml> --study NAME --timeout S --quiet`: each study's search, `S` the same for every study
  (`--search-seconds`); the size budget named by preset (`search.budget: {size: q4_k_m}`, which the project computes
  from the model: `targets.gguf.preset_sizes`), or in bytes at 60% of Q3_K_M's file less what an export adds;
- `autocompress frontier --study NAME --max-size LIMIT --json`: the recorded plan under the budget with the lowest
  fitness loss (the plan the study's verdict exports);
- `autocompress export --study NAME --trial N --format gguf`: its .gguf file;
- `autocompress evaluate FILE.gguf --json`: llama.cpp's held-out perplexity, KL statistics to the dense model (mean,
  99.9th percentile, same top token), prompt and decode tokens/s, every file on the same held-out windows.

The rows:
- preset: llama.cpp's preset as the project reproduces `llama-quantize --imatrix` (its type per tensor, its block
  bytes, the study's calibration windows as the importance matrix; byte-identical to llama.cpp's own files in
  results/benchmarks/gguf.csv): the preset's seed trial of a study whose levels are the presets' own types, run for
  its seeds alone, then exported like any trial. No preset exists at the 60% size.
- quant-only: a size-budget study over the GGUF types of `search_spaces/smollm2-q4km.yaml` (q4_0 and q4_1 left out:
  the embedded weights already lie on a Q4_1 grid). None at the 60% size: quantization alone cannot get there.
- joint: the same study with `search.structure` (FFN widths 1, 3/4, 1/2, 1/4; 3, 2, 1 or 0 key/value groups; blocks
  removed), its alternatives made by block-local distillation, and the quant-only study's chosen plan (teacher
  shapes) enqueued as a seed, so that it starts where quant alone ended.

It resumes by phase: each phase (the presets' study, each search, the distillation, each judging) writes its result
atomically to the state folder (`--work`/state) and a rerun skips what is there; a study interrupted mid-search
resumes from its storage (its `--timeout` then starts again). All studies share one cache folder (it is keyed by
content), so the distillation runs once, in the first joint study's set-up, and is timed there.

    .venv/bin/python benchmarks/structure.py --smoke                 # minutes: 4 held-out windows, 20 s searches
    nohup .venv/bin/python benchmarks/structure.py --search-seconds 600 > /tmp/structure.log 2>&1 &
    .venv/bin/python benchmarks/structure.py --phases presets,quant  # some phases; the CSV holds what has run

Writes results/benchmarks/structure.csv and structure.png, and structure.json beside them (the distillation
seconds, the database bytes, each phase's wall seconds and load average, the search seconds, which rows ran).
Studies, files and the state folder live in results/structure-bench/ (not committed). The command line runs from
the package this script imports (PYTHONPATH=CHECKOUT to run another checkout's).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import yaml
from matplotlib.figure import Figure

from autocompress.config import Config
from autocompress.files import write_text_atomically
from autocompress.models import EMBEDDED_MODEL
from autocompress.targets.gguf.preset_sizes import preset_ceiling, preset_file_bytes
from autocompress.targets.gguf.presets import preset_types

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ("q4_k_m", "q3_k_m")
SMALL = "q3_k_m-60pct"  # 60% of Q3_K_M's bytes: only structure gets there
SMALL_FRACTION = 0.6
SIZES = (*PRESETS, SMALL)
COLUMNS = (
    "row",
    "kind",
    "size_bytes",
    "heldout_ppl",
    "mean_kld",
    "kld_p999",
    "same_top_p",
    "prompt_tokens_per_s",
    "decode_tokens_per_s",
    "n_ff",
    "n_head",
    "search_s",
)
# The quant-only levels: the main job's (search_spaces/smollm2-q4km.yaml), q4_0 and q4_1 left out.
QUANT_LEVELS = ["q3_k", "q4_k", "q5_k", "q6_k", "iq4_nl", "q5_0", "q5_1", "q8_0", "f16"]
STRUCTURE = {"ffn": [1, 0.75, 0.5, 0.25], "kv_groups": [3, 2, 1, 0], "drop_blocks": True}
Log = Callable[[str], None]


@dataclass(frozen=True)
class Settings:
    smoke: bool
    search_seconds: float
    heldout: int
    calibration: int
    distillation_steps: int | None  # None: the product's default
    threads: int
    sizes: tuple[str, ...]  # the sizes whose phases run


def data_section(settings: Settings) -> dict[str, Any]:
    return {
        "source": "pydoc",
        "seq_len": 256,
        "calibration": settings.calibration,
        "fitness": 8,
        "heldout": settings.heldout,
        "batch_size": 4,
        "seed": 0,
    }


def base_config(settings: Settings, formats: list[str]) -> dict[str, Any]:
    return {
        "model": {"name": EMBEDDED_MODEL, "dtype": "float32", "device": "auto"},
        "data": data_section(settings),
        "compression": {"target": "gguf", "quantization": "rtn", "granularity": "linear"},
        "search": {
            "sparsity": [0.0],
            "formats": formats,
            "objective": "pareto",
            "loss": "kl",
            "seed": 0,
            "seeds": "none",
        },
    }


def presets_config(settings: Settings) -> dict[str, Any]:
    """A study whose levels are the types llama.cpp's Q4_K_M and Q3_K_M give the embedded model's tensors, so that
    the target seeds both presets; no budget, searched for its seeds alone."""
    config = Config.model_validate(base_config(settings, ["q8_0"]))
    types = set()
    for preset in PRESETS:
        types |= set(preset_types_of(config, preset).values())
    return base_config(settings, sorted(types))


def preset_types_of(config: Config, preset: str) -> dict[str, str]:
    from autocompress.models import meta_model
    from autocompress.targets.gguf.weights import gguf_tensors

    model = meta_model(config.model)
    tensors = gguf_tensors(model, config.compression.granularity)
    heads = model.config.num_attention_heads
    return preset_types(
        preset,
        [(tensor.gguf_name, tensor.shape) for tensor in tensors],
        model.config.num_hidden_layers,
        n_head=heads,
        n_head_kv=model.config.num_key_value_heads,
        imatrix=True,
    )


def budget_of(size: str, small_bytes: int) -> str | int:
    return small_bytes if size == SMALL else size


def search_config(settings: Settings, size: str, small_bytes: int, joint: bool) -> dict[str, Any]:
    config = base_config(settings, QUANT_LEVELS)
    config["search"] |= {"budget": {"size": budget_of(size, small_bytes)}, "generations": {}, "n_trials": 100000}
    if joint:
        structure = dict(STRUCTURE)
        if settings.distillation_steps is not None:
            structure["distillation"] = {"steps": settings.distillation_steps}
        config["search"]["structure"] = structure
    return config


def sizes(settings: Settings) -> dict[str, int]:
    """Each size's file bytes (the presets' computed by the project) and the 60% size's ceiling on the bytes a trial
    counts: 60% of Q3_K_M's file less what an export adds to a trial's bytes (as a preset's ceiling is)."""
    config = Config.model_validate(search_config(settings, PRESETS[0], 0, joint=False))
    files = {preset: preset_file_bytes(config, preset) for preset in PRESETS}
    small_file = int(SMALL_FRACTION * files["q3_k_m"])
    metadata = files["q3_k_m"] - preset_ceiling(config, "q3_k_m")
    return files | {SMALL: small_file, "small_ceiling": small_file - metadata}


# ---------------------------------------------------------------- running the product


class Bench:
    """The work folder, the state of finished phases, and the product's command line."""

    def __init__(self, work: Path, settings: Settings, log: Log) -> None:
        self.work = work
        self.state = work / "state"
        self.state.mkdir(parents=True, exist_ok=True)
        self.settings = settings
        self.log = log

    def done(self, phase: str) -> dict[str, Any] | None:
        path = self.state / f"{phase}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def finish(self, phase: str, result: Mapping[str, Any]) -> dict[str, Any]:
        record = {**result, "phase": phase, "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        write_text_atomically(self.state / f"{phase}.json", json.dumps(record, indent=1))
        return record

    def autocompress(self, *args: str) -> tuple[str, float]:
        """Run `autocompress ARGS`; its stdout and the wall seconds. Its output goes to a log beside the studies.
        A failure is raised with its last line."""
        command = [sys.executable, "-c", "from autocompress.cli import main; main()", *args]
        began = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, cwd=self.work)
        seconds = time.perf_counter() - began
        logs = self.work / "logs"
        logs.mkdir(exist_ok=True)
        with (logs / "commands.log").open("a") as handle:
            handle.write(f"$ autocompress {' '.join(args)}  # rc {done.returncode}, {seconds:.0f} s\n")
            handle.write(done.stdout[-20000:] + done.stderr[-20000:] + "\n")
        if done.returncode != 0:
            last = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1]
            raise PhaseFailed(f"autocompress {args[0]} {args[1] if len(args) > 1 else ''}: {last}")
        return done.stdout, seconds

    def config_file(self, name: str, config: Mapping[str, Any]) -> Path:
        Config.model_validate(config)  # a mistake here is the benchmark's, said before any study starts
        path = self.work / "configs" / f"{name}.yaml"
        path.parent.mkdir(exist_ok=True)
        write_text_atomically(path, yaml.safe_dump(dict(config), sort_keys=False))
        return path

    def study_folder(self, name: str) -> Path:
        """A study's folder, its cache a link to the shared one (keyed by content: calibration, GGUF blocks,
        distilled alternatives computed once for every study)."""
        folder = self.work / "studies" / name
        folder.mkdir(parents=True, exist_ok=True)
        shared = self.work / "cache"
        shared.mkdir(exist_ok=True)
        cache = folder / "cache"
        if not cache.exists():
            cache.symlink_to(shared.resolve(), target_is_directory=True)
        return folder

    def study_args(self, name: str) -> list[str]:
        self.study_folder(name)
        return ["--study", name, "--results", "studies"]


class PhaseFailed(Exception):
    pass


def load_average() -> float:
    return os.getloadavg()[0]


def run_phase(bench: Bench, phase: str, body: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any] | None:
    """A phase's stored result, or the phase run now and its result stored; None when it failed (said in the log)."""
    stored = bench.done(phase)
    if stored is not None:
        bench.log(f"{phase}: done before ({stored['finished']})")
        return stored
    bench.log(f"{phase}: starting (load average {load_average():.1f})")
    began, load = time.perf_counter(), load_average()
    try:
        result = body(*args)
    except PhaseFailed as error:
        bench.log(f"{phase}: FAILED: {error}")
        return None
    result |= {"wall_s": time.perf_counter() - began, "load_average_start": load, "load_average_end": load_average()}
    bench.log(f"{phase}: done in {result['wall_s']:.0f} s")
    return bench.finish(phase, result)


# ---------------------------------------------------------------- phases


def search(bench: Bench, study: str, config: Path) -> dict[str, Any]:
    """Search the study for the search seconds (a study whose levels cannot hold the preset its verdict would judge
    against ends without a verdict, saying why, and stands)."""
    args = ["search", str(config), *bench.study_args(study), "--timeout", f"{bench.settings.search_seconds:g}s"]
    _, wall = bench.autocompress(*args, "--quiet")
    return {"study": study, "search_s": searching_seconds(bench, study), "command_s": wall}


def searching_seconds(bench: Bench, study: str) -> float | None:
    """Seconds from the study's first trial's start to its last trial's end (seeds included), as its storage
    records them: the time it searched, set-up excluded."""
    trials = [trial for trial in open_study(bench, study).get_trials(deepcopy=False) if trial.datetime_complete]
    if not trials:
        return None
    start = min(trial.datetime_start for trial in trials)
    return (max(trial.datetime_complete for trial in trials) - start).total_seconds()


def open_study(bench: Bench, study: str):
    import optuna

    storage = f"sqlite:///{bench.work / 'studies' / study / 'study.db'}"
    return optuna.load_study(study_name=study, storage=storage)


def presets_phase(bench: Bench) -> dict[str, Any]:
    """The presets' study: levels that hold Q4_K_M's and Q3_K_M's types, run for its seeds (llama.cpp's presets)."""
    config = bench.config_file("presets", presets_config(bench.settings))
    args = ["search", str(config), *bench.study_args("presets"), "--quiet"]
    _, setup_s = bench.autocompress(*args, "--n-trials", "0")  # created: its preset seeds enqueued, in order
    seeds = {str(trial.user_attrs.get("baseline")): trial.number for trial in open_study(bench, "presets").trials}
    missing = [preset for preset in PRESETS if f"llama.cpp {preset}" not in seeds]
    if missing:
        raise PhaseFailed(f"the presets' study did not seed {', '.join(missing)}")
    needed = 1 + max(seeds[f"llama.cpp {preset}"] for preset in PRESETS)  # the seeds run first, in their order
    _, wall = bench.autocompress(*args, "--n-trials", str(needed))
    return {"study": "presets", "setup_s": setup_s, "command_s": wall, "trials": needed}


def preset_trial(bench: Bench, preset: str) -> int:
    import pandas as pd

    frame = pd.read_csv(bench.work / "studies" / "presets" / "trials.csv")
    rows = frame[(frame["baseline"] == f"llama.cpp {preset}") & (frame["state"] == "COMPLETE")]
    if rows.empty:
        raise PhaseFailed(f"the presets' study holds no complete seed of llama.cpp {preset}")
    return int(rows["number"].iloc[0])


def chosen_trial(bench: Bench, study: str, limit: str | int) -> dict[str, Any]:
    """The recorded plan under `limit` with the lowest fitness loss (the one a study's verdict exports)."""
    stdout, _ = bench.autocompress("frontier", *bench.study_args(study), "--max-size", str(limit), "--json")
    points = json.loads(stdout)
    if not points:
        raise PhaseFailed(f"study {study}: no recorded plan under {limit}")
    best = min(points, key=lambda point: (point["loss"], point["trial"]))
    return {
        "trial": best["trial"],
        "fitness_loss": best["loss"],
        "trial_bytes": best["size_bytes"],
        "baseline": best.get("baseline"),
    }


def judge(bench: Bench, study: str, trial: int, name: str) -> dict[str, Any]:
    """Export the trial as a .gguf file and let llama.cpp judge it on the held-out windows."""
    out = bench.work / "files" / name
    chosen = ["--trial", str(trial), "--out", str(out), "--format", "gguf", "--overwrite", "--json"]
    _, export_s = bench.autocompress("export", *bench.study_args(study), *chosen)
    path = out / "model.gguf"
    stdout, evaluate_s = bench.autocompress("evaluate", str(path), "--json", "--threads", str(bench.settings.threads))
    figures = json.loads(stdout)
    n_ff, n_head = block_shapes(path)
    return {
        "file": str(path.relative_to(bench.work)),
        "size_bytes": path.stat().st_size,
        "heldout_ppl": figures["heldout_ppl"],
        "mean_kld": figures.get("heldout_mean_kld"),
        "kld_p999": figures.get("heldout_kld_99_9"),
        "same_top_p": figures.get("heldout_same_top_p"),
        "prompt_tokens_per_s": figures.get("measured_prompt_tps"),
        "decode_tokens_per_s": figures.get("measured_decode_tps"),
        "n_ff": n_ff,
        "n_head": n_head,
        "dense_heldout_ppl": figures.get("dense_heldout_ppl"),
        "heldout_windows": figures.get("heldout_windows"),
        "speed_threads": figures.get("threads"),
        "export_s": export_s,
        "evaluate_s": evaluate_s,
    }


def block_shapes(path: Path) -> tuple[str, str]:
    """The per-block FFN widths and query heads a deci file holds (its per-layer arrays), or "base" for a file of
    the base architecture (every block the teacher's)."""
    reader = gguf.GGUFReader(path)
    architecture = str(reader.fields["general.architecture"].contents())
    if architecture != "deci":
        return "base", "base"

    def per_block(key: str) -> str:
        value = reader.fields[f"{architecture}.{key}"].contents()
        return " ".join(str(int(item)) for item in (value if isinstance(value, list) else [value]))

    return per_block("feed_forward_length"), per_block("attention.head_count")


def limit_of(size: str, known: Mapping[str, int]) -> str | int:
    """The --max-size a size's searched file is chosen under: the preset's name (its ceiling, as the budget), or the
    60% size's ceiling in bytes."""
    return known["small_ceiling"] if size == SMALL else size


def quant_phases(bench: Bench, known: Mapping[str, int]) -> None:
    for size in [size for size in PRESETS if size in bench.settings.sizes]:
        study = f"quant-{size}"
        config = bench.config_file(study, search_config(bench.settings, size, known["small_ceiling"], joint=False))
        searched = run_phase(bench, f"search-{study}", search, bench, study, config)
        if searched is None:
            continue
        run_phase(bench, f"judge-{study}", judge_chosen, bench, study, limit_of(size, known), searched)


def judge_chosen(bench: Bench, study: str, limit: str | int, searched: Mapping[str, Any]) -> dict[str, Any]:
    chosen = chosen_trial(bench, study, limit)
    return chosen | judge(bench, study, chosen["trial"], study) | {"search_s": searched["search_s"]}


def preset_phases(bench: Bench) -> None:
    if run_phase(bench, "search-presets", presets_phase, bench) is None:
        return
    for preset in [preset for preset in PRESETS if preset in bench.settings.sizes]:
        run_phase(bench, f"judge-preset-{preset}", judge_preset, bench, preset)


def judge_preset(bench: Bench, preset: str) -> dict[str, Any]:
    trial = preset_trial(bench, preset)
    return {"trial": trial} | judge(bench, "presets", trial, f"preset-{preset}")


def create_joint(bench: Bench, size: str, known: Mapping[str, int]) -> dict[str, Any]:
    """Create the joint study (its set-up: the block-local distillation, GGUF blocks, the target's seeds) without
    searching, so that the quant-only plan can be enqueued before its first trial."""
    study = f"joint-{size}"
    config = bench.config_file(study, search_config(bench.settings, size, known["small_ceiling"], joint=True))
    args = ["search", str(config), *bench.study_args(study), "--n-trials", "0", "--quiet"]
    _, wall = bench.autocompress(*args)
    cache = bench.work / "cache"
    return {"study": study, "setup_s": wall, "cache_bytes": folder_bytes(cache)}


def alternatives_summary(bench: Bench) -> dict[str, Any]:
    """What the block-local distillation wrote beside its alternatives (`alternatives.json` in the shared cache): the
    summed training seconds, the store's bytes, and per kind of alternative (FFN width, key/value groups) how many
    were trained, their median seconds, and how their held-out MSE compares with the untrained cut's."""
    found = sorted((bench.work / "cache").glob("*/structure/*/alternatives.json"))
    if not found:
        return {}
    written = json.loads(found[-1].read_text())
    trained = [alternative for alternative in written["alternatives"] if alternative["steps"] > 0]
    kinds: dict[str, list[dict[str, Any]]] = {}
    for alternative in trained:
        kinds.setdefault(f"{alternative['kind']}:{alternative['level']}", []).append(alternative)
    return {
        "training_s": written["training_seconds"],
        "store_bytes": written["store_bytes"],
        "trained": len(trained),
        "per_kind": {
            kind: {
                "trained": len(group),
                "median_s": statistics.median(item["seconds"] for item in group),
                "median_heldout_mse_over_cut": statistics.median(
                    item["heldout_mse"] / item["heldout_mse_cut"] for item in group
                ),
                "below_cut": sum(item["heldout_mse"] < item["heldout_mse_cut"] for item in group),
            }
            for kind, group in sorted(kinds.items())
        },
    }


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def seed_joint(bench: Bench, size: str, quant: Mapping[str, Any]) -> dict[str, Any]:
    """Enqueue the quant-only study's chosen plan in the joint study, every block at the teacher's shape: the
    structural parameters of the joint study's own llama.cpp preset seed (the teacher's shapes), the quant-only
    plan's levels."""
    from autocompress.record import enqueued_params, seed_attrs

    levels = open_study(bench, f"quant-{size}").trials[quant["trial"]].params
    joint_name = f"joint-{size}"
    joint = open_study(bench, joint_name)
    trials = joint.get_trials(deepcopy=False)
    presets = [trial for trial in trials if str(trial.user_attrs.get("baseline", "")).startswith("llama.cpp")]
    if not presets:
        raise PhaseFailed(f"{joint_name}: no llama.cpp preset seed to read the teacher's structural parameters from")
    structural = {key: value for key, value in enqueued_params(presets[0]).items() if not key.endswith(".format")}
    name = f"quant-only plan (trial {quant['trial']} of quant-{size})"
    joint.enqueue_trial(structural | levels, user_attrs=seed_attrs([name]), skip_if_exists=True)
    return {"seed": name, "structural_params": len(structural), "level_params": len(levels)}


def joint_phases(bench: Bench, known: Mapping[str, int]) -> None:
    first = PRESETS[0]
    distilled = run_phase(bench, "distillation", create_joint, bench, first, known)
    if distilled is None:
        return
    for size in [size for size in SIZES if size in bench.settings.sizes]:
        study = f"joint-{size}"
        if size != first and run_phase(bench, f"create-{study}", create_joint, bench, size, known) is None:
            continue
        quant = bench.done(f"judge-quant-{size}")
        if size in PRESETS and quant is None:
            bench.log(f"{study}: waits for judge-quant-{size} (its seed)")
            continue
        if quant is not None and run_phase(bench, f"seed-{study}", seed_joint, bench, size, quant) is None:
            continue
        config = bench.work / "configs" / f"{study}.yaml"
        searched = run_phase(bench, f"search-{study}", search, bench, study, config)
        if searched is None:
            continue
        run_phase(bench, f"judge-{study}", judge_chosen, bench, study, limit_of(size, known), searched)


# ---------------------------------------------------------------- outputs


def rows(bench: Bench, known: Mapping[str, int]) -> list[dict[str, Any]]:
    """The CSV's rows from the judgings done so far, in size order (largest first): preset, quant-only, joint."""
    out = []
    for size in SIZES:
        for kind, study in (("preset", "preset"), ("quant-only", "quant"), ("joint", "joint")):
            judged = bench.done(f"judge-{study}-{size}")
            if judged is None:
                continue
            label = size.upper() if size != SMALL else f"60% of Q3_K_M ({known[SMALL] / 1e6:.1f} MB)"
            out.append({"row": f"{label} {kind}", "kind": kind, **{key: judged.get(key) for key in COLUMNS[2:]}})
    return out


def write_outputs(bench: Bench, known: Mapping[str, int], out: Path) -> None:
    import pandas as pd

    table = rows(bench, known)
    frame = pd.DataFrame(table, columns=list(COLUMNS))
    write_text_atomically(out, frame.to_csv(index=False))
    phases = {path.stem: json.loads(path.read_text()) for path in sorted(bench.state.glob("*.json"))}
    distilled = phases.get("distillation", {})
    summary = {
        "search_seconds": bench.settings.search_seconds,
        "smoke": bench.settings.smoke,
        "sizes_bytes": dict(known),
        "distillation_s": distilled.get("setup_s"),
        "distillation_note": "wall seconds of the first joint study's set-up (block-local distillation of every "
        "alternative, plus the GGUF blocks the shared cache did not hold yet)",
        "database_bytes": distilled.get("cache_bytes"),
        "database_note": "bytes of the studies' shared cache folder after the distillation (calibration statistics, "
        "reference logits, GGUF blocks and the distilled alternatives)",
        "alternatives": alternatives_summary(bench),
        "alternatives_note": "from the distillation's alternatives.json: seconds of training alone (AdamW steps and "
        "the held-out MSE), the alternatives' store bytes, and per kind the held-out MSE of the trained alternative "
        "over its untrained importance cut's",
        "rows": [row["row"] for row in table],
        "phases": phases,
        "cpu_count": os.cpu_count(),
    }
    write_text_atomically(out.with_suffix(".json"), json.dumps(summary, indent=1, default=str))
    if table:
        plot(frame, known, out.with_suffix(".png"))


def plot(frame, known: Mapping[str, int], path: Path) -> None:
    """Held-out perplexity and decode speed against file size, one marker per kind; the sizes as dotted lines."""
    figure = Figure(figsize=(10, 4.2))
    ppl_axes, speed_axes = figure.subplots(1, 2)
    markers = {"preset": ("s", "tab:gray"), "quant-only": ("o", "tab:blue"), "joint": ("^", "tab:green")}
    for kind, (marker, colour) in markers.items():
        part = frame[frame["kind"] == kind]
        if part.empty:
            continue
        megabytes = part["size_bytes"].astype(float) / 1e6
        ppl_axes.scatter(megabytes, part["heldout_ppl"].astype(float), marker=marker, color=colour, s=60, label=kind)
        decode = part["decode_tokens_per_s"].astype(float)
        speed_axes.scatter(megabytes, decode, marker=marker, color=colour, s=60, label=kind)
    for axes in (ppl_axes, speed_axes):
        for size in SIZES:
            axes.axvline(known[size] / 1e6, color="black", linestyle=":", linewidth=0.8)
        axes.set_xlabel("file size (MB)")
        axes.legend(fontsize=8)
    ppl_axes.set_ylabel("held-out perplexity (llama.cpp)")
    speed_axes.set_ylabel("decode tokens/s (llama.cpp)")
    figure.suptitle("SmolLM2-135M: llama.cpp preset, quant-only search, structure + quant search", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--search-seconds",
        type=float,
        default=600,
        help="seconds each study searches, set-up excluded, the same for every study (default 600: the whole run "
        "fits an evening on a shared 2-core machine, far less search than a real run would give)",
    )
    parser.add_argument("--smoke", action="store_true", help="minutes: 20 s searches, 4 held-out windows, few steps")
    parser.add_argument(
        "--phases",
        default="presets,quant,joint",
        help="which: presets, quant, joint (default all); '' writes the outputs of the phases stored",
    )
    parser.add_argument("--work", type=Path, help="studies, files, state (default results/structure-bench[-smoke])")
    parser.add_argument("--out", type=Path, help="CSV (default results/benchmarks/structure[-smoke].csv)")
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp threads when judging (default 2)")
    parser.add_argument("--sizes", default=",".join(SIZES), help=f"whose phases run (default {','.join(SIZES)})")
    args = parser.parse_args(argv)
    phases = set(args.phases.split(",")) - {""}  # none: only the CSV, plot and summary from the stored phases
    if not phases <= {"presets", "quant", "joint"}:
        print(f"--phases: unknown {sorted(phases - {'presets', 'quant', 'joint'})}", file=sys.stderr)
        return 2
    chosen_sizes = tuple(args.sizes.split(","))
    if not set(chosen_sizes) <= set(SIZES):
        print(f"--sizes: unknown {sorted(set(chosen_sizes) - set(SIZES))}; known: {', '.join(SIZES)}", file=sys.stderr)
        return 2
    suffix = "-smoke" if args.smoke else ""
    settings = Settings(
        smoke=args.smoke,
        search_seconds=20 if args.smoke else args.search_seconds,
        heldout=4 if args.smoke else 16,
        calibration=8 if args.smoke else 32,
        distillation_steps=2 if args.smoke else None,
        threads=args.threads,
        sizes=chosen_sizes,
    )
    work = (args.work or ROOT / "results" / f"structure-bench{suffix}").resolve()
    out = (args.out or ROOT / "results" / "benchmarks" / f"structure{suffix}.csv").resolve()
    out.parent.mkdir(parents=True, exist_ok=True)

    def log(line: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)

    bench = Bench(work, settings, log)
    known = sizes(settings)
    log(f"sizes: {json.dumps(known)}; search {settings.search_seconds:g} s per study; work {work}")
    if "presets" in phases:
        preset_phases(bench)
    if "quant" in phases:
        quant_phases(bench, known)
    if "joint" in phases:
        joint_phases(bench, known)
    write_outputs(bench, known, out)
    log(f"wrote {out} ({len(rows(bench, known))} rows), {out.with_suffix('.json').name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
