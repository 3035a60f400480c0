"""llama.cpp's own quantization presets against searched GGUF files, judged by llama.cpp, on the embedded model.

What it measures, on the embedded SmolLM2-135M-Instruct and its pydoc text (256-token windows):
- the base model as an F16 GGUF (our writer, as llama.cpp's converter stores it);
- llama.cpp's presets Q2_K, Q3_K_M, Q4_K_M, Q5_K_M and Q6_K, written by its own `llama-quantize --imatrix` from
  that F16 file, with an importance matrix written (`targets.gguf.llama_cpp.write_imatrix`) from our calibration
  statistics on the same calibration windows the search uses (the mean x_j^2 per input column of each decoder
  Linear; like `llama-imatrix` by default, none for the output matrix);
- beside each preset, our reproduction of it: llama.cpp's type per tensor (`targets.gguf.presets.preset_types`,
  which copies llama-quantize's fallbacks for SmolLM2's 576-wide rows that 256-weight blocks do not divide),
  quantized by our block quantizers (`targets.gguf.blocks.quantize_rows`, same importance) and written by our
  writer; the CSV says how many tensors came out byte-identical to llama.cpp's;
- phase 2: a gguf study (`compression.target: gguf`, one GGUF type per Linear and for the tied embedding) and,
  at each preset's file size, the frontier member with the lowest fitness KL whose file is no larger, exported
  with `autocompress.export.export_trial(..., format="gguf")`.
- or, with `--phase budget`, a size-budget study in generations at each of Q3_K_M's and Q4_K_M's file sizes
  (`budget: {size: q3_k_m}`, computed from the model, metadata included), searched for `--budget-seconds`, its
  best plan under the ceiling exported, and beside it the study's `additive` seed (each unit's error at each type
  alone, the least summed error under the ceiling by a knapsack over bytes: llama.cpp PR #15550's and AutoRound
  AutoScheme's allocation, no search), exported as a row of its own.

Every file is scored the same way: loaded in llama.cpp (llama-cpp-python, `targets.gguf.llama_cpp.LlamaCppModel`),
every token of every window of the whole held-out pool predicted, perplexity from the summed log-probabilities.
Each file is compared with the llama.cpp preset of its size by paired per-window differences (the same windows):
a bootstrap 95% interval (resampling windows) of the mean per-token log-prob difference, and of the share of the
preset's perplexity gap to the F16 model that the file closes. The target of issue 14 (item 9): at the sizes of
llama.cpp's Q3_K_M and Q4_K_M, a searched file with lower perplexity than the preset, closing >= 25% of its gap.

The searched levels exclude q4_0 and q4_1: the embedded model's weights already lie on a Q4_1 grid in groups of
32, so re-quantizing to those is nearly free and would flatter the search (llama.cpp's Q2_K and Q3_K_M presets
fall back to Q4_0 on the 576-wide rows, so they keep that advantage: it is theirs, not ours).

    .venv/bin/python benchmarks/gguf_presets.py --phase presets  # phase 1 alone: base, presets, reproductions
    .venv/bin/python benchmarks/gguf_presets.py                  # phase 1 (cached), then the study and its files
    .venv/bin/python benchmarks/gguf_presets.py --quick          # a few minutes: Q4_K_M only, 8 windows, 10 trials
    .venv/bin/python benchmarks/gguf_presets.py --phase budget --budget-seconds 1800  # size budgets at Q3_K_M, Q4_K_M

Needs llama-cpp-python (`pip install -e '.[gguf]'`) and llama-quantize (`benchmarks/build_llama_cpp.sh`). Writes
results/benchmarks/gguf[-quick].csv and .png; the GGUF files, the imatrix, per-window scores and the study live in
results/gguf-bench[-quick]/ (not committed), and a rerun reuses what is there. (The script is not named gguf.py:
Python puts a script's folder first on sys.path, so a benchmarks/gguf.py would shadow the gguf package for every
benchmark here.)
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import subprocess
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gguf
import numpy as np
import pandas as pd
import torch
from allocation import prepare_run  # a sibling benchmark's helper
from matplotlib.figure import Figure
from safetensors.torch import load_file, save_file

from autocompress.calibration import collect_statistics
from autocompress.config import Config, DataConfig
from autocompress.data import TokenPools, token_pools
from autocompress.files import write_atomically, write_text_atomically
from autocompress.methods import LayerStatistics
from autocompress.metrics import gap_closed, paired_difference
from autocompress.models import EMBEDDED_MODEL, compressible_linears, embedded_gguf, load_model, round_model_to_storage
from autocompress.targets.gguf.blocks import BLOCK_TYPES, GgufBlocks, quantize_rows
from autocompress.targets.gguf.file import write_gguf_tensors
from autocompress.targets.gguf.llama_cpp import (
    LlamaCppModel,
    gguf_statistics,
    llama_cpp_available,
    llama_cpp_tool,
    write_imatrix,
)
from autocompress.targets.gguf.presets import is_quantized, preset_types
from autocompress.targets.gguf.weights import gguf_tensors, importance

if TYPE_CHECKING:
    from autocompress.targets.gguf.weights import UnitTensor  # a unit's tensor: its unit, module, GGUF name and shape

Log = Callable[[str], None]

PRESETS = ("q2_k", "q3_k_m", "q4_k_m", "q5_k_m", "q6_k")
TARGET_PRESETS = ("q3_k_m", "q4_k_m")  # where issue 14 asks a searched file to beat llama.cpp
TARGET_CLOSURE = 0.25  # ... closing at least this share of the preset's perplexity gap to F16
EXCLUDED_LEVELS = ("q4_0", "q4_1")  # the embedded weights' own grid (Q4_1 in groups of 32): nearly free
SEARCH_LEVELS = ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q8_0", "q5_0", "q5_1", "iq4_nl", "iq4_xs")
SUBSTITUTE = {"q4_0": "iq4_nl", "q4_1": "iq4_nl"}  # same 4.5 bits per weight as Q4_0, a level the search has
EXCLUSION_NOTE = (
    "searched levels exclude q4_0 and q4_1: the embedded weights already lie on a Q4_1 grid in groups of 32, so "
    "re-quantizing to them is nearly free"
)


@dataclass(frozen=True)
class Settings:
    mode: str
    seq_len: int
    calibration: int
    fitness: int
    heldout: int
    trials: int  # finished trials of the study, the preset seeds included
    presets: tuple[str, ...]
    plain: bool  # also llama.cpp's presets without an importance matrix
    llama_threads: int


FULL = Settings("full", 256, 32, 8, 64, 120, PRESETS, False, 2)
QUICK = Settings("quick", 256, 32, 8, 8, 10, ("q4_k_m",), False, 2)


def data_section(settings: Settings) -> dict[str, Any]:
    """One data config for both phases: the calibration windows (the imatrix's) and the held-out ones are the
    study's own (the pools are cut from one seeded shuffle, calibration first)."""
    return {
        "source": "pydoc",
        "seq_len": settings.seq_len,
        "calibration": settings.calibration,
        "fitness": settings.fitness,
        "heldout": settings.heldout,
        "batch_size": 4,
        "seed": 0,
    }


def search_levels() -> list[str]:
    """The GGUF types the study may give a unit: llama.cpp's k-quants and 32-block types, MXFP4 where the gguf
    package knows it, never the source grid's q4_0/q4_1."""
    levels = [*SEARCH_LEVELS, *(["mxfp4"] if "mxfp4" in BLOCK_TYPES else [])]
    assert not set(levels) & set(EXCLUDED_LEVELS)
    return levels


def study_config(settings: Settings) -> Config:
    return Config.model_validate(
        {
            "model": {"name": EMBEDDED_MODEL, "dtype": "float32", "device": "auto"},
            "data": data_section(settings),
            "compression": {"target": "gguf", "quantization": "rtn", "granularity": "linear"},
            "search": {
                "sparsity": [0.0],
                "formats": search_levels(),
                "objective": "pareto",
                "loss": "kl",
                "sampler": "tpe",
                "seed": 0,
                "seeds": "none",  # the target seeds llama.cpp's presets that its levels hold; see substitute_seeds
                "n_trials": settings.trials,
            },
        }
    )


# ---------------------------------------------------------------- inputs


@dataclass
class Inputs:
    """The base model as llama.cpp's F16 file holds it, the token pools and the calibration statistics."""

    model: torch.nn.Module
    tokenizer: Any
    pools: TokenPools
    statistics: dict[str, LayerStatistics]  # per decoder Linear (module name): input_sq_norms, n_tokens
    tensors: list[UnitTensor]  # the 2-D tensors a preset sets the type of (Linears, tied embedding)


def digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()


def load_inputs(settings: Settings, work: Path, log: Log) -> Inputs:
    model, tokenizer = load_model(EMBEDDED_MODEL, dtype="float32", device="cpu")
    round_model_to_storage(model)  # llama.cpp quantizes from the F16 file: the same float16 values
    pools = token_pools(DataConfig.model_validate(data_section(settings)), tokenizer)
    linears = compressible_linears(model)
    path = work / f"calibration-{digest(pools.calibration)[:16]}.safetensors"
    if path.is_file():
        cached = load_file(path)
        statistics = {
            linear.name: LayerStatistics(input_sq_norms=cached[linear.name], n_tokens=int(cached["n_tokens"]))
            for linear in linears
        }
    else:
        began = time.perf_counter()
        statistics = collect_statistics(model, linears, pools.calibration, {"input_sq_norms"}, batch_size=4)
        tensors = {name: stats.input_sq_norms.cpu().clone() for name, stats in statistics.items()}  # shared ones too
        n_tokens = next(iter(statistics.values())).n_tokens
        write_atomically(path, lambda temporary: save_file({**tensors, "n_tokens": torch.tensor(n_tokens)}, temporary))
        log(f"calibration: {len(statistics)} Linears, {n_tokens} tokens ({time.perf_counter() - began:.0f} s)")
    return Inputs(model, tokenizer, pools, statistics, gguf_tensors(model, "linear"))


def sha256(path: Path) -> str:
    hasher = hashlib.sha256()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 22), b""):
            hasher.update(chunk)
    return hasher.hexdigest()


def llama_cpp_build(tool: Path) -> dict[str, str]:
    """What benchmarks/build_llama_cpp.sh recorded of the llama.cpp build (vendored commit, build number)."""
    info = tool.parent.parent / "BUILD_INFO"
    build = {"llama_cpp_python": "", "llama_cpp_commit": "", "llama_cpp_build": ""}
    for line in info.read_text().splitlines() if info.is_file() else []:
        if line.startswith("llama-cpp-python "):
            build["llama_cpp_python"] = line.split(" ", 1)[1]
        elif line.startswith("llama.cpp commit "):
            build["llama_cpp_commit"] = line.split(" ", 2)[2]
        elif line.startswith("version"):
            build["llama_cpp_build"] = line.strip()
    return build


def scoring_kernels() -> str:
    """The CPU paths of the llama-cpp-python build that scores the files (its system info line)."""
    import llama_cpp

    return llama_cpp.llama_print_system_info().decode().strip()


# ---------------------------------------------------------------- files


def write_base(inputs: Inputs, path: Path) -> None:
    """The base model as an F16 GGUF: every 2-D tensor in F16, the rest in F32, as llama.cpp's converter stores it."""
    metadata = {"benchmark": "gguf", "file": "base model, F16"}
    write_gguf_tensors(inputs.model, inputs.tokenizer, {}, path, metadata, tokenizer_source=embedded_gguf())


def llama_quantize(tool: Path, source: Path, target: Path, preset: str, imatrix: Path | None, threads: int) -> None:
    """llama.cpp's own `llama-quantize [--imatrix FILE] SOURCE TARGET PRESET THREADS`; its log beside the file."""
    partial = target.with_name(f".{target.name}.partial")  # renamed into place once llama-quantize succeeds
    command = [str(tool), *(["--imatrix", str(imatrix)] if imatrix else []), str(source), str(partial)]
    command += [preset.upper(), str(threads)]
    done = subprocess.run(command, capture_output=True, text=True)
    target.with_suffix(".log").write_text(" ".join(command) + "\n" + done.stdout + done.stderr)
    if done.returncode != 0:
        partial.unlink(missing_ok=True)
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"llama-quantize {preset} failed ({done.returncode}): {' / '.join(tail)}")
    partial.replace(target)


def preset_tensor_types(inputs: Inputs, preset: str) -> dict[str, str]:
    """llama.cpp's type for each 2-D tensor (by GGUF name) under `preset`, with an importance matrix."""
    config = inputs.model.config
    return preset_types(
        preset,
        [(tensor.gguf_name, tensor.shape) for tensor in inputs.tensors],
        config.num_hidden_layers,
        n_head=config.num_attention_heads,
        n_head_kv=config.num_key_value_heads,
        imatrix=True,
    )


def write_typed(inputs: Inputs, types: Mapping[str, str], path: Path, metadata: Mapping[str, Any]) -> None:
    """A GGUF file whose 2-D tensors take `types` (by GGUF name), quantized by our block quantizers with the
    calibration's importance where the type uses one (the statistics llama-quantize got: decoder Linears only)."""
    tensors = {}
    for tensor in inputs.tensors:
        kind = types[tensor.gguf_name]
        if not is_quantized(kind):
            continue  # the writer's F16
        stats = inputs.statistics.get(tensor.statistics_of or "")
        weights = importance(stats) if stats is not None and BLOCK_TYPES[kind].uses_importance else None
        weight = inputs.model.get_submodule(tensor.module).weight.detach().float().cpu()
        tensors[f"{tensor.module}.weight"] = GgufBlocks(kind, quantize_rows(weight, kind, weights))
    write_gguf_tensors(inputs.model, inputs.tokenizer, tensors, path, dict(metadata), tokenizer_source=embedded_gguf())


def file_types(path: Path) -> dict[str, str]:
    return {tensor.name: tensor.tensor_type.name.lower() for tensor in gguf.GGUFReader(path).tensors}


def types_summary(types: Mapping[str, str]) -> str:
    return " ".join(f"{name}x{count}" for name, count in sorted(Counter(types.values()).items()))


def identical_tensors(ours: Path, theirs: Path) -> tuple[int, int, int]:
    """(tensors byte-identical, tensors of the same type, tensors) of `theirs` found in `ours`."""
    mine = {tensor.name: tensor for tensor in gguf.GGUFReader(ours).tensors}
    same = same_type = total = 0
    for tensor in gguf.GGUFReader(theirs).tensors:
        total += 1
        other = mine.get(tensor.name)
        if other is None or other.tensor_type != tensor.tensor_type:
            continue
        same_type += 1
        a = np.ascontiguousarray(tensor.data).reshape(-1).view(np.uint8)
        b = np.ascontiguousarray(other.data).reshape(-1).view(np.uint8)
        same += bool(np.array_equal(a, b))
    return same, same_type, total


# ---------------------------------------------------------------- scoring in llama.cpp


def window_nll(path: Path, tokens: torch.Tensor, threads: int, work: Path) -> np.ndarray:
    """llama.cpp's summed negative log-likelihood of each window's predicted tokens (all but the first), every
    window from an empty cache; cached by the file's and the windows' digests."""
    file_digest, tokens_digest = sha256(path), digest(tokens)
    cache = work / "nll" / f"{path.parent.name}-{path.stem}.json"
    if cache.is_file():
        stored = json.loads(cache.read_text())
        if stored["sha256"] == file_digest and stored["tokens"] == tokens_digest:
            return np.array(stored["nll"], dtype=np.float64)
    sums = []
    runtime = LlamaCppModel(path, n_ctx=tokens.shape[1], n_threads=threads)
    try:
        for window, predicted in zip(tokens, runtime.iter_log_probs(tokens), strict=True):
            sums.append(-predicted[:-1].double().gather(-1, window[1:, None]).sum().item())
    finally:
        runtime.close()
    text = json.dumps({"sha256": file_digest, "tokens": tokens_digest, "file": str(path), "nll": sums})
    write_text_atomically(cache, text)
    return np.array(sums, dtype=np.float64)


def ppl(nll: np.ndarray, tokens_per_window: int) -> float:
    return float(np.exp(nll.sum() / (len(nll) * tokens_per_window)))


def paired(
    nll: np.ndarray, preset: np.ndarray, base: np.ndarray, tokens_per_window: int, seed: int = 0
) -> dict[str, float]:
    """A file against the preset of its size on the same windows: the mean per-token log-prob difference (file
    minus preset, in nats; negative is better), the share of the preset's perplexity gap to F16 the file closes,
    each with a paired bootstrap 95% interval (windows resampled, the same draw for the three files)."""
    per_token = [values / tokens_per_window for values in (nll, preset, base)]
    delta = paired_difference(per_token[0], per_token[1], seed)
    return {
        "delta_nll_per_token": delta["delta"],
        "delta_ci_low": delta["ci_low"],
        "delta_ci_high": delta["ci_high"],
        **gap_closed(*per_token, seed=seed),
        "windows_better": delta["windows_lower"],
    }


# ---------------------------------------------------------------- phase 1


@dataclass
class File:
    """One GGUF file of the comparison and what is known of it before it is scored."""

    row: str  # e.g. "llama.cpp q4_k_m imatrix"
    kind: str  # base | llama.cpp | ours | searched
    preset: str | None  # the preset it stands beside (its size's)
    path: Path
    seconds: float = 0.0  # to write it
    extra: dict[str, Any] | None = None


def phase_presets(settings: Settings, inputs: Inputs, work: Path, tool: Path, log: Log) -> tuple[list[File], Path]:
    """The F16 base file, the imatrix, and for each preset llama.cpp's file (and ours beside it)."""
    files: list[File] = []
    base = work / "files" / "base-f16.gguf"
    if not base.is_file():
        began = time.perf_counter()
        write_base(inputs, base)
        log(f"base F16: {base.stat().st_size:,} bytes, {time.perf_counter() - began:.0f} s")
    files.append(File("base F16", "base", None, base))
    imatrix = work / "files" / "imatrix.gguf"
    n_layers = inputs.model.config.num_hidden_layers
    write_imatrix(imatrix, gguf_statistics(inputs.statistics, n_layers), chunk_size=settings.seq_len)  # cheap
    for preset in settings.presets:
        theirs = work / "files" / f"llama.cpp-{preset}-imatrix.gguf"
        if not theirs.is_file():
            began = time.perf_counter()
            llama_quantize(tool, base, theirs, preset, imatrix, settings.llama_threads)
            log(f"llama.cpp {preset} imatrix: {theirs.stat().st_size:,} bytes, {time.perf_counter() - began:.0f} s")
        command = f"llama-quantize --imatrix {imatrix.name} {base.name} {theirs.name} {preset.upper()}"
        files.append(File(f"llama.cpp {preset} imatrix", "llama.cpp", preset, theirs, extra={"command": command}))
        if settings.plain:
            plain = work / "files" / f"llama.cpp-{preset}.gguf"
            if not plain.is_file():
                llama_quantize(tool, base, plain, preset, None, settings.llama_threads)
            command = f"llama-quantize {base.name} {plain.name} {preset.upper()}"
            files.append(
                File(f"llama.cpp {preset} (no imatrix)", "llama.cpp-plain", preset, plain, extra={"command": command})
            )
        ours = work / "files" / f"ours-{preset}.gguf"
        expected = preset_tensor_types(inputs, preset)
        seconds = 0.0
        if not ours.is_file():
            began = time.perf_counter()
            write_typed(inputs, expected, ours, {"benchmark": "gguf", "file": f"our reproduction of {preset}"})
            seconds = time.perf_counter() - began
        same, same_type, total = identical_tensors(ours, theirs)
        llama_types = file_types(theirs)
        predicted = sum(llama_types.get(name) == kind for name, kind in expected.items())
        extra = {
            "tensors_identical": same,
            "tensors_same_type": same_type,
            "tensors": total,
            "preset_types_match": f"{predicted}/{len(expected)}",
        }
        files.append(File(f"ours {preset} (reproduction)", "ours", preset, ours, seconds, extra))
        log(f"ours {preset}: {same}/{total} tensors byte-identical to llama.cpp's, {same_type} of the same type")
    return files, imatrix


# ---------------------------------------------------------------- phase 2


def substitute_seeds(inputs: Inputs, space: Any, presets: Sequence[str]) -> list[tuple[str, dict[str, str]]]:
    """The presets whose types the study's levels do not hold (Q2_K and Q3_K_M give the 576-wide rows Q4_0) with
    IQ4_NL, of the same bytes, in place of Q4_0/Q4_1: starting points at those presets' sizes."""
    by_name = {tensor.gguf_name: tensor for tensor in inputs.tensors}
    seeds = []
    for preset in presets:
        types = preset_tensor_types(inputs, preset)
        if not set(types.values()) & set(SUBSTITUTE):
            continue  # the target seeds it as it is
        params = {}
        for name, kind in types.items():
            unit = by_name[name].unit
            level = SUBSTITUTE.get(kind, kind)
            if level not in space.levels_of(unit):
                break
            if len(space.levels_of(unit)) > 1:
                params[f"{unit}.format"] = level
        else:
            seeds.append((f"llama.cpp {preset}, q4_0 -> iq4_nl", params))
    return seeds


def phase_search(
    settings: Settings, inputs: Inputs, work: Path, preset_bytes: Mapping[str, int], log: Log
) -> tuple[list[File], dict[str, Any]]:
    """Run (or resume) the gguf study, then export, at each preset's file size, the frontier member with the lowest
    fitness KL whose exported file is no larger than the preset's."""
    import optuna

    from autocompress.export import export_trial
    from autocompress.frontier import frontier_of
    from autocompress.record import StudyLocation, StudyRecord, seed_attrs, trial_records
    from autocompress.search.driver import FINISHED, StopAfterFailures
    from autocompress.search.objective import Objective
    from autocompress.search.study import open_study, prepare_study, study_session

    config = study_config(settings)  # a config validation error until the gguf target is wired
    began = time.perf_counter()
    location = StudyLocation.resolve("gguf-search", work)
    session, space = study_session(config, location.cache_dir, progress=True)
    study, created = open_study(config, location, space, config.search.seed)
    if created:
        for baseline, params in substitute_seeds(inputs, space, settings.presets):
            study.enqueue_trial(params, user_attrs=seed_attrs([baseline]), skip_if_exists=True)
    prepare_study(study, session, space, location)
    setup_s = time.perf_counter() - began
    log(f"study set up in {setup_s:.0f} s; {len(space.units)} units")
    searching = time.perf_counter()
    if len(study.get_trials(deepcopy=False, states=FINISHED)) < settings.trials:
        # run_search without its held-out judging of the whole frontier in transformers: llama.cpp judges here
        study.optimize(
            Objective(config, session, space, StudyRecord.of(study).max_bytes()),
            catch=(Exception,),
            callbacks=[
                optuna.study.MaxTrialsCallback(settings.trials, states=FINISHED),
                StopAfterFailures(config.search.max_failures),
            ],
        )
    search_s = time.perf_counter() - searching
    record, records = StudyRecord.of(study), trial_records(study)
    complete = [item for item in records if item.scored]
    trial_s = [item.duration_s for item in complete if item.duration_s]
    log(f"search: {len(complete)} complete trials in {search_s:.0f} s")
    del session
    gc.collect()

    by_unit: dict[str, list[UnitTensor]] = {}
    for tensor in inputs.tensors:
        by_unit.setdefault(tensor.unit, []).append(tensor)
    files, exported = [], {}
    overhead = 0  # what an export adds to the accounted bytes (its provenance and plan), learnt from the exports
    for preset, limit in preset_bytes.items():
        members = sorted(frontier_of(records, limit - overhead), key=lambda item: (item.loss, item.number))
        for chosen in members[:3]:  # an export whose metadata pushes it past the limit: the next member
            out = work / "searched" / f"trial-{chosen.number}"
            if chosen.number not in exported:
                exporting = time.perf_counter()
                result = export_trial(
                    record, location, chosen, out, format="gguf", overwrite=True,
                    chosen_by=f"lowest fitness KL within llama.cpp {preset}'s {limit:,} bytes",
                )  # fmt: skip
                exported[chosen.number] = (result, time.perf_counter() - exporting)
            result, seconds = exported[chosen.number]
            path = Path(result.path) / "model.gguf"
            overhead = max(overhead, path.stat().st_size - chosen.size_bytes)
            if path.stat().st_size > limit:
                log(f"trial {chosen.number}: {path.stat().st_size:,} bytes on disk > {limit:,}; the next member")
                continue
            plan = space.plan_from_params(chosen.params)
            expected = {}
            for unit, tensors in by_unit.items():
                level = plan.layers.get(unit, plan.default).format
                expected |= {tensor.gguf_name: level for tensor in tensors}
            written = file_types(path)
            extra = {
                "trial": chosen.number,
                "trial_is_seed": chosen.seed,
                "trial_baseline": chosen.baseline,
                "fitness_kl": chosen.loss,
                "accounted_bytes": result.accounted_bytes,
                "trial_size_bytes": chosen.size_bytes,  # what the search counted (the export adds its provenance)
                "plan_types_match": f"{sum(written.get(n) == k for n, k in expected.items())}/{len(expected)}",
            }
            files.append(File(f"searched at {preset} size", "searched", preset, path, seconds, extra))
            log(f"{preset}: trial {chosen.number} (fitness KL {chosen.loss:.4f}, {path.stat().st_size:,} bytes)")
            break
        else:
            log(f"{preset}: no frontier member fits in {limit:,} bytes")
    summary = {
        "trials_complete": len(complete),
        "study_setup_s": setup_s,
        "search_s": search_s,
        "median_trial_s": float(np.median(trial_s)) if trial_s else None,
        "frontier_size": len(frontier_of(records)),
    }
    return files, summary


def phase_budget(
    settings: Settings, inputs: Inputs, work: Path, preset_bytes: Mapping[str, int], seconds: float, log: Log
) -> tuple[list[File], dict[str, Any]]:
    """At each target preset's file size, a size-budget study in generations (`budget: {size: q4_k_m}`: the file
    llama-quantize writes with that preset, computed by `targets.gguf.preset_sizes`, less what an export adds to the
    accounted bytes) searched for `seconds`, then its best recorded plan under the ceiling (lowest fitness KL)
    exported."""
    from autocompress.export import export_trial
    from autocompress.frontier import frontier_of
    from autocompress.record import StudyLocation, StudyRecord, seed_attrs, trial_records
    from autocompress.search.driver import ProgressBar
    from autocompress.search.objective import Objective
    from autocompress.search.runner import run_generations
    from autocompress.search.study import (
        fitted_under_ceiling,
        open_study,
        prepare_study,
        study_session,
        study_size_ceiling,
    )

    files, summary = [], {}
    for preset in [preset for preset in TARGET_PRESETS if preset in preset_bytes]:
        limit = preset_bytes[preset]
        base = study_config(settings).model_dump(mode="json")
        base["search"] |= {"budget": {"size": preset}, "generations": {}, "sampler": "evolution"}
        base["search"]["baselines"] = ["uniform", "additive"]
        config = Config.model_validate(base)
        ceiling = config.search.budget.max_bytes(0, config)
        location = StudyLocation.resolve(f"gguf-budget-{preset}", work)
        session, space = study_session(config, location.cache_dir, progress=True)
        study, created = open_study(config, location, space, config.search.seed)
        if created:  # the study fits the presets it holds under the ceiling itself; these hold iq4_nl for q4_0
            ceiling_of = study_size_ceiling(session, space)
            for baseline, params in substitute_seeds(inputs, space, [preset]):
                name = f"{baseline} fitted under the budget"
                fitted = fitted_under_ceiling(space, ceiling_of, params)
                study.enqueue_trial(fitted, user_attrs=seed_attrs([name]), skip_if_exists=True)
        prepare_study(study, session, space, location)
        objective = Objective(config, session, space, StudyRecord.of(study).max_bytes())
        began = time.perf_counter()
        bar = ProgressBar(study, 10**9, enabled=False)
        search = run_generations(study, objective, 10**9, seconds, config.search.seed, bar)
        search_s = time.perf_counter() - began
        record, records = StudyRecord.of(study), trial_records(study)
        under = sorted(frontier_of(records, ceiling), key=lambda item: (item.loss, item.number))
        log(f"{preset}: {search.evaluations} plans scored, {len(records)} trials, in {search_s:.0f} s")
        del session, objective, search
        gc.collect()
        if not under:
            log(f"{preset}: no recorded plan under {ceiling:,} bytes")
            continue
        chosen = under[0]
        exporting = time.perf_counter()
        result = export_trial(
            record, location, chosen, work / "budget" / preset, format="gguf", overwrite=True,
            chosen_by=f"lowest fitness KL under the size budget of llama.cpp {preset}'s {limit:,} bytes",
        )  # fmt: skip
        path = Path(result.path) / "model.gguf"
        if path.stat().st_size > limit:
            log(f"{preset}: the export is {path.stat().st_size:,} bytes, over llama.cpp's {limit:,}")
            continue
        extra = {
            "trial": chosen.number,
            "trial_is_seed": chosen.seed,
            "trial_baseline": chosen.baseline,
            "fitness_kl": chosen.loss,
            "accounted_bytes": result.accounted_bytes,
            "trial_size_bytes": chosen.size_bytes,
            "budget_bytes": ceiling,
            "budget_search_s": round(search_s),
            "budget_trials": len(records),
            "budget_plans_scored": sum(item.generation_evaluations or 1 for item in records),
        }
        row = f"searched under a size budget at {preset} size"
        files.append(File(row, "budget", preset, path, time.perf_counter() - exporting, extra))
        log(f"{preset}: trial {chosen.number} (fitness KL {chosen.loss:.4f}, {path.stat().st_size:,} bytes)")
        additive = next((item for item in records if item.baseline == "additive" and item.scored), None)
        if additive is not None:  # the study's own seed: each unit's error alone, a knapsack over bytes
            exporting = time.perf_counter()
            result = export_trial(
                record, location, additive, work / "additive" / preset, format="gguf", overwrite=True,
                chosen_by=f"the additive allocation under the size budget of llama.cpp {preset}'s {limit:,} bytes",
            )  # fmt: skip
            path = Path(result.path) / "model.gguf"
            extra = {"trial": additive.number, "fitness_kl": additive.loss, "budget_bytes": ceiling}
            extra |= {"accounted_bytes": result.accounted_bytes, "trial_size_bytes": additive.size_bytes}
            seconds = time.perf_counter() - exporting
            files.append(File(f"additive allocation at {preset} size", "additive", preset, path, seconds, extra))
            log(f"{preset}: additive, trial {additive.number} (fitness KL {additive.loss:.4f})")
        summary[f"budget_{preset}_search_s"] = round(search_s)
    return files, summary


# ---------------------------------------------------------------- rows, figure


def relative(path: Path, folder: Path) -> str:
    try:
        return str(path.resolve().relative_to(folder.resolve()))
    except ValueError:
        return str(path)


def build_rows(
    files: Sequence[File],
    scores: Mapping[Path, np.ndarray],
    eval_s: Mapping[Path, float],
    common: Mapping[str, Any],
) -> pd.DataFrame:
    tokens_per_window = common["seq_len"] - 1
    base = next(file for file in files if file.kind == "base")
    presets = {file.preset: file for file in files if file.kind == "llama.cpp"}
    rows = []
    for file in files:
        nll = scores[file.path]
        types = file_types(file.path)
        row: dict[str, Any] = {
            "row": file.row,
            "kind": file.kind,
            "preset": file.preset,
            "size_bytes": file.path.stat().st_size,
            "size_mb": file.path.stat().st_size / 1e6,
            "heldout_ppl": ppl(nll, tokens_per_window),
            "heldout_nll_per_token": nll.sum() / (len(nll) * tokens_per_window),
        }
        reference = presets.get(file.preset)
        if reference is not None and reference is not file:
            row |= paired(nll, scores[reference.path], scores[base.path], tokens_per_window)
            row["preset_size_bytes"] = reference.path.stat().st_size
        if file.kind in ("searched", "budget") and file.preset in TARGET_PRESETS:
            below = row["heldout_ppl"] < ppl(scores[reference.path], tokens_per_window)
            met = below and row["gap_closed"] >= TARGET_CLOSURE
            row["target"] = f"ppl below llama.cpp {file.preset} imatrix, >= {TARGET_CLOSURE:.0%} of its gap closed"
            row["target_met"] = bool(met)
        row |= dict(file.extra or {})
        row |= {
            "types": types_summary({name: kind for name, kind in types.items() if kind not in ("f32",)}),
            "sha256": sha256(file.path),
            "file": relative(file.path, common["work"]),
            "write_s": file.seconds,
            "eval_s": eval_s.get(file.path),
        }
        rows.append(row)
    frame = pd.DataFrame(rows)
    for column in frame.columns:  # whole numbers stay whole beside the rows that lack them
        values = frame[column].dropna()
        if len(values) and all(isinstance(value, int | np.integer) and not isinstance(value, bool) for value in values):
            frame[column] = frame[column].astype("Int64")
    for key, value in common.items():
        if key != "work":
            frame[key] = value
    return frame


def plot(frame: pd.DataFrame, path: Path) -> None:
    figure = Figure(figsize=(7.5, 4.8))
    axes = figure.subplots()
    base = frame[frame["kind"] == "base"].iloc[0]
    styles = {
        "llama.cpp": ("o", "tab:blue", "llama.cpp preset (imatrix)"),
        "llama.cpp-plain": ("s", "tab:gray", "llama.cpp preset (no imatrix)"),
        "ours": ("x", "tab:orange", "our reproduction of the preset"),
        "searched": ("*", "tab:red", "searched (frontier member at the preset's size)"),
        "budget": ("P", "tab:green", "searched under the preset's size as a budget"),
        "additive": ("D", "tab:purple", "additive allocation (each unit's error alone, knapsack over bytes)"),
    }
    for kind, (marker, color, label) in styles.items():
        part = frame[frame["kind"] == kind]
        if part.empty:
            continue
        size = 140 if kind in ("searched", "budget") else 50
        axes.scatter(part["size_mb"], part["heldout_ppl"], marker=marker, color=color, s=size, label=label, zorder=3)
        if kind == "llama.cpp":
            for _, row in part.iterrows():
                axes.annotate(row["preset"].upper(), (row["size_mb"], row["heldout_ppl"]), fontsize=8,
                              xytext=(5, 5), textcoords="offset points")  # fmt: skip
    axes.axhline(base["heldout_ppl"], color="black", linestyle="--", linewidth=1,
                 label=f"F16 ({base['size_mb']:.1f} MB): {base['heldout_ppl']:.2f}")  # fmt: skip
    axes.ticklabel_format(axis="x", useOffset=False, style="plain")
    axes.set_xlabel("file size on disk (MB)")
    axes.set_ylabel("held-out perplexity (llama.cpp)")
    windows, tokens = frame["heldout_windows"].iloc[0], frame["heldout_tokens_scored"].iloc[0]
    axes.set_title(f"SmolLM2-135M in llama.cpp: presets vs searched ({windows} windows, {tokens:,} tokens)",
                   fontsize=10)  # fmt: skip
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    write_atomically(path, lambda temporary: figure.savefig(temporary, dpi=120))


def merged_with_earlier(frame: pd.DataFrame, out: Path) -> pd.DataFrame:
    """The run's rows, and the rows of an earlier run in `out` that this run has no row of (phase 2 of another
    kind, say), kept only when that run scored the same held-out tokens with the same llama.cpp kernels (its CPU
    paths round differently: an AVX2 build and an AVX-512 one differ in the third decimal of a preset's perplexity),
    so every row compares alike."""
    if not out.is_file():
        return frame
    earlier = pd.read_csv(out)
    if "scoring_kernels" not in earlier:
        return frame
    alike = (earlier["heldout_tokens_scored"] == frame["heldout_tokens_scored"].iloc[0]) & (
        earlier["scoring_kernels"] == frame["scoring_kernels"].iloc[0]
    )
    kept = earlier[alike & ~earlier["row"].isin(frame["row"])]
    return pd.concat([frame, kept], ignore_index=True) if not kept.empty else frame


def write_outputs(frame: pd.DataFrame, out: Path) -> None:
    frame = merged_with_earlier(frame, out)
    write_text_atomically(out, frame.to_csv(index=False, float_format="%.6g"))
    plot(frame, out.with_suffix(".png"))


# ---------------------------------------------------------------- main


def score_all(files: Sequence[File], tokens: torch.Tensor, settings: Settings, work: Path, log: Log) -> tuple:
    scores, seconds = {}, {}
    for file in files:
        began = time.perf_counter()
        scores[file.path] = window_nll(file.path, tokens, settings.llama_threads, work)
        seconds[file.path] = time.perf_counter() - began
        log(f"{file.row}: ppl {ppl(scores[file.path], tokens.shape[1] - 1):.3f} ({seconds[file.path]:.0f} s)")
    return scores, seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    phases = (
        "presets: phase 1 alone (base, llama.cpp presets, our reproductions); all: then the study (default); "
        "budget: phase 1, then size-budget studies at Q3_K_M's and Q4_K_M's sizes"
    )
    parser.add_argument("--phase", choices=("presets", "all", "budget"), default="all", help=phases)
    parser.add_argument("--budget-seconds", type=float, default=1800, help="search time of each size-budget study")
    parser.add_argument("--quick", action="store_true", help="a few minutes: Q4_K_M only, 8 held-out windows")
    parser.add_argument("--trials", type=int, help="finished trials of the study (default: 120 full, 10 quick)")
    parser.add_argument("--heldout", type=int, help="held-out windows of 256 tokens (default: 64 full, 8 quick)")
    parser.add_argument("--presets", help=f"comma-separated (default: {','.join(PRESETS)})")
    parser.add_argument("--plain", action="store_true", help="also llama.cpp's presets without an imatrix")
    parser.add_argument("--work", type=Path, help="files, scores, study (default: results/gguf-bench[-quick])")
    parser.add_argument("--out", type=Path, help="CSV (default: results/benchmarks/gguf[-quick].csv)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--llama-threads", type=int, default=2, help="llama.cpp threads (default 2)")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    overrides = {
        "trials": args.trials,
        "heldout": args.heldout,
        "presets": tuple(args.presets.split(",")) if args.presets else None,
        "plain": args.plain or None,
        "llama_threads": args.llama_threads,
    }
    settings = replace(settings, **{key: value for key, value in overrides.items() if value is not None})
    unavailable = llama_cpp_available()
    tool = llama_cpp_tool("llama-quantize")
    if unavailable or tool is None:
        print(unavailable or "llama-quantize not found: run benchmarks/build_llama_cpp.sh", file=sys.stderr)
        return 2
    work, out, log = prepare_run("gguf", args.quick, args.work, args.out, args.threads)
    log(f"{settings.mode} run, phase {args.phase}: {settings}")
    began = time.perf_counter()
    inputs = load_inputs(settings, work, log)
    tokens = inputs.pools.heldout
    files, imatrix = phase_presets(settings, inputs, work, tool, log)
    scores, seconds = score_all(files, tokens, settings, work, log)
    common: dict[str, Any] = {
        "work": work,
        "mode": settings.mode,
        "heldout_windows": int(tokens.shape[0]),
        "heldout_tokens_scored": int(tokens.shape[0] * (tokens.shape[1] - 1)),
        "seq_len": settings.seq_len,
        "calibration_windows": settings.calibration,
        "fitness_windows": settings.fitness,
        "imatrix_sha256": sha256(imatrix),
        **llama_cpp_build(tool),
        "scoring_kernels": scoring_kernels(),
        "llama_threads": settings.llama_threads,
        "phase1_s": time.perf_counter() - began,
        "notes": EXCLUSION_NOTE,
    }
    frame = build_rows(files, scores, seconds, common)
    write_outputs(frame, out)
    log(f"phase 1 done in {common['phase1_s']:.0f} s; wrote {out}")
    if args.phase == "presets":
        return 0
    preset_bytes = {file.preset: file.path.stat().st_size for file in files if file.kind == "llama.cpp"}
    searching = time.perf_counter()
    try:
        if args.phase == "budget":
            searched, summary = phase_budget(settings, inputs, work, preset_bytes, args.budget_seconds, log)
        else:
            searched, summary = phase_search(settings, inputs, work, preset_bytes, log)
    except Exception as error:  # phase 1's figures stand; say why phase 2 did not
        traceback.print_exc()
        log(f"phase 2 failed: {type(error).__name__}: {str(error).strip().splitlines()[0] if str(error) else ''}")
        return 1
    search_scores, search_seconds = score_all(searched, tokens, settings, work, log)
    common |= summary | {"searched_levels": " ".join(search_levels()), "trials": settings.trials}
    common["phase2_s"] = time.perf_counter() - searching
    frame = build_rows([*files, *searched], scores | search_scores, seconds | search_seconds, common)
    write_outputs(frame, out)
    log(f"phase 2 done in {common['phase2_s']:.0f} s; wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
