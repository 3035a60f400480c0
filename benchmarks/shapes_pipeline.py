"""A random model with a real model's shapes, run through a study's whole pipeline one phase at a time.

No weights or text need to travel: the model is built randomly with the shapes of `SHAPES` (Llama-3-8B's, or a tiny
Llama for tests), keeping the first `blocks` decoder blocks and the full embedding and head, and saved as a model
folder with a word-level tokenizer of one token per vocabulary entry; its corpus is random words of that vocabulary,
so the token pools are synthetic token ids. The phases are those a study runs:

- `model`: build and save the random model;
- `calibration`: the calibration pool's input norms (Wanda, GGUF imatrix) and the dense fitness reference;
- `variants`: Hessians, then SparseGPT + GPTQ variants of the first `variant_blocks` blocks (the layer-variant
  database, as a Hessian study builds it);
- `gguf`: llama.cpp blocks of the first `gguf_blocks` blocks' Linears, with the calibration's imatrix;
- `study`: a generations study (Wanda + RTN at a sparsity budget, KL fitness) of a few generations;
- `export`: the study's best plan written as an artifact.

`benchmarks/gpu_check.py` runs them in one process on a GPU, `benchmarks/memory.py --shapes` one child process each
(its peak resident memory its own), both through `Pipeline`.
"""

from __future__ import annotations

import gc
import os
import random
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from autocompress.config import Config
from autocompress.models import CompressibleLinear
from autocompress.plan import CompressionPlan, LayerCompression
from autocompress.record import StudyLocation
from autocompress.session import CompressionSession
from autocompress.variants import variant_settings

MB = 10**6
SHAPES = {
    "llama3-8b": {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "max_position_embeddings": 8192,
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
    },
    # rows of 256 and 512: every GGUF K-type fits
    "tiny": {
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 512,
        "max_position_embeddings": 1024,
        "tie_word_embeddings": False,
    },
}
SPECIAL_TOKENS = ["<unk>", "</s>"]
PHASES = ("model", "calibration", "variants", "gguf", "study", "export")
VARIANT_LEVELS = {"sparsity": [0.0, 0.5], "bits": [4, 16]}  # SparseGPT + GPTQ: 3 variants per Linear
STUDY_LEVELS = {"sparsity": [0.0, 0.25, 0.5], "bits": [4]}  # Wanda + RTN at an average sparsity of 0.25


def architecture(shapes: str, blocks: int | None) -> LlamaConfig:
    """The named shapes, keeping the first `blocks` decoder blocks (all by default)."""
    fields = dict(SHAPES[shapes])
    if blocks is not None:
        if not 1 <= blocks <= fields["num_hidden_layers"]:
            raise ValueError(f"--blocks must lie in 1..{fields['num_hidden_layers']} for {shapes}, got {blocks}")
        fields["num_hidden_layers"] = blocks
    return LlamaConfig(**fields, eos_token_id=1, bos_token_id=1, pad_token_id=None)


def word_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """One token per whitespace-separated word `t2`..`t<vocab_size - 1>`, plus `<unk>` (0) and `</s>` (1)."""
    words = [f"t{index}" for index in range(len(SPECIAL_TOKENS), vocab_size)]
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>")


def folder_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file()) if path.is_dir() else 0


def peak_gpu_mb(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / MB, 1)


@dataclass(frozen=True)
class PoolSizes:
    seq_len: int
    calibration: int
    fitness: int
    heldout: int
    batch_size: int


class Pipeline:
    """The phases of one random model's run, under `work`: `model/` (the folder), `corpus.txt`, `cache/` (the
    calibration statistics, fitness reference and variants of the `variants` config), `gguf/` (blocks),
    `results/` (the study) and `export/`."""

    def __init__(
        self,
        work: Path,
        shapes: str,
        blocks: int | None,
        device: str,
        dtype: str,
        pools: PoolSizes,
        variant_blocks: int,
        gguf_blocks: int,
        gguf_types: list[str],
        generations: int,
        hessian_memory_mb: float = 4000.0,
        gguf_linears: int | None = None,
        variant_linears: int | None = None,
    ) -> None:
        self.work = work
        self.architecture = architecture(shapes, blocks)
        self.device = torch.device(device)
        self.dtype = dtype
        self.pools = pools
        self.variant_blocks = min(variant_blocks, self.architecture.num_hidden_layers)
        self.gguf_blocks = min(gguf_blocks, self.architecture.num_hidden_layers)
        self.gguf_types = gguf_types
        self.gguf_linears = gguf_linears  # of those blocks' Linears, the first ones only (None: all)
        self.variant_linears = variant_linears  # likewise
        self.generations = generations
        self.hessian_memory_mb = hessian_memory_mb
        self.model_dir = work / "model"
        self.location = StudyLocation.resolve("study", work / "results", None)
        self._session: CompressionSession | None = None

    # configs

    def data(self) -> dict:
        sizes = self.pools
        return {
            "source": "files",
            "files": [str(self.work / "corpus.txt")],
            "seq_len": sizes.seq_len,
            "calibration": sizes.calibration,
            "fitness": sizes.fitness,
            "heldout": sizes.heldout,
            "batch_size": sizes.batch_size,
            "seed": 0,
        }

    def model(self) -> dict:
        return {"name": str(self.model_dir), "dtype": self.dtype, "device": str(self.device)}

    def variants_config(self) -> Config:
        """SparseGPT + GPTQ in groups of 128, asymmetric, as `llama3-8b-overnight.yaml` compresses."""
        return Config.model_validate(
            {
                "model": self.model(),
                "data": self.data(),
                "compression": {
                    "pruning": "sparsegpt",
                    "pattern": "unstructured",
                    "quantization": "gptq",
                    "group_size": 128,
                    "symmetric": False,
                    "granularity": "block",
                },
                "search": VARIANT_LEVELS | {"database": "on", "hessian_memory_mb": self.hessian_memory_mb},
            }
        )

    def study_config(self) -> Config:
        """A generations study of every Linear at an average sparsity of 0.25: the uniform plan, then `generations`
        generations of 4 offspring selected on half, then all, of the fitness pool (one trial each). Per Linear, not
        per block: two blocks at three levels hold only three plans at the budget, which generations soon exhaust."""
        return Config.model_validate(
            {
                "model": self.model(),
                "data": self.data(),
                "compression": {"pruning": "wanda", "quantization": "rtn", "group_size": 128, "granularity": "linear"},
                "search": STUDY_LEVELS
                | {
                    "budget": {"sparsity": 0.25},
                    "generations": {"offspring": 4, "stages": [0.5, 1.0], "survivors": [2, 1]},
                    "baselines": ["uniform"],
                    "loss": "kl",
                    "seed": 0,
                    "n_trials": 1 + self.generations,
                },
            }
        )

    # phases

    def run(self, phase: str) -> dict:
        """One phase's figures; `seconds` is its wall time."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        began = time.perf_counter()
        figures = getattr(self, f"phase_{phase}")()
        figures = {"seconds": round(time.perf_counter() - began, 2)} | figures
        figures["load_average"] = round(os.getloadavg()[0], 1)  # the host's, at the end: a shared host is slower
        figures["threads"] = torch.get_num_threads()
        gpu = peak_gpu_mb(self.device)
        return figures if gpu is None else figures | {"gpu_peak_mb": gpu}

    def phase_model(self) -> dict:
        """The random model built on the device, saved with its tokenizer, and a corpus of random words."""
        torch.manual_seed(0)
        default = torch.get_default_dtype()
        torch.set_default_dtype(getattr(torch, self.dtype))  # built in its dtype: never a float32 copy of 8B
        try:
            with self.device:
                model = LlamaForCausalLM(self.architecture).eval()
        finally:
            torch.set_default_dtype(default)
        parameters = sum(parameter.numel() for parameter in model.parameters())
        staging = self.work / "model.partial"
        shutil.rmtree(staging, ignore_errors=True)
        model.save_pretrained(staging)
        del model
        word_tokenizer(self.architecture.vocab_size).save_pretrained(staging)
        shutil.rmtree(self.model_dir, ignore_errors=True)
        staging.rename(self.model_dir)
        sizes = self.pools
        words = 2 * sizes.seq_len * (sizes.calibration + sizes.fitness + sizes.heldout)
        generator = random.Random(0)
        vocabulary = range(len(SPECIAL_TOKENS), self.architecture.vocab_size)
        text = " ".join(f"t{generator.choice(vocabulary)}" for _ in range(words))
        (self.work / "corpus.txt").write_text(text)
        return {"parameters": parameters, "model_mb": round(folder_bytes(self.model_dir) / MB, 1)}

    def session(self) -> CompressionSession:
        """The `variants` config's session, loaded once for the phases before the study (which loads its own)."""
        if self._session is None:
            self._session = CompressionSession(self.variants_config(), cache_dir=self.work / "cache")
        return self._session

    def release(self) -> None:
        """Drop the session, and its model's memory on the device, before a phase that loads the model again."""
        self._session = None
        gc.collect()  # a session's closures hold it in reference cycles
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def phase_calibration(self) -> dict:
        began = time.perf_counter()
        session = self.session()
        loaded = time.perf_counter()
        session.statistics({"input_sq_norms"})
        calibrated = time.perf_counter()
        session.reference("fitness")
        cache = session.cache_dir
        return {
            "load_s": round(loaded - began, 2),
            "calibration_s": round(calibrated - loaded, 2),
            "reference_s": round(time.perf_counter() - calibrated, 2),
            "statistics_mb": round(folder_bytes(cache / "input_sq_norms.safetensors") / MB, 1),
            "reference_mb": round(folder_bytes(cache / "reference-fitness.safetensors") / MB, 1),
        }

    def variant_linears_of(self, linears: list[CompressibleLinear]) -> list[CompressibleLinear]:
        """The Linears the `variants` phase builds: of the first `variant_blocks` blocks, the first `variant_linears`
        of them."""
        blocks = list(dict.fromkeys(linear.block for linear in linears))[: self.variant_blocks]
        return [linear for linear in linears if linear.block in blocks][: self.variant_linears]

    def phase_variants(self) -> dict:
        """Hessians of the first blocks (held one group at a time), then their SparseGPT + GPTQ variants."""
        session = self.session()
        names = [linear.name for linear in self.variant_linears_of(session.linears)]
        search = session.config.search
        settings = variant_settings(search.sparsity_levels(), search.precision_levels())
        held, hessian_s, compress_s = 0, 0.0, 0.0
        database = session.database()
        try:
            for name in names:  # block order: each group's Hessians are collected once, then dropped
                began = time.perf_counter()
                if name not in session._held_hessians:  # the calibration pass of the next group of blocks
                    session.linear_statistics({"hessian"}, name)
                collected = time.perf_counter()
                database.build([name], settings)
                hessian_s += collected - began
                compress_s += time.perf_counter() - collected
                held = max(held, unique_bytes(session))
        finally:
            session._held_hessians = {}
        return {
            "variants": len(names) * len(settings),
            "linears": len(names),
            "hessian_passes": session.hessian_passes,
            "hessians_s": round(hessian_s, 2),
            "hessians_held_mb": round(held / MB, 1),
            "seconds_per_variant": round(compress_s / (len(names) * len(settings)), 3),
            "variants_mb": round(folder_bytes(session.cache_dir / "variants") / MB, 1),
        }

    def phase_gguf(self) -> dict:
        """llama.cpp blocks of the first blocks' Linears (the first `gguf_linears` of them) in each type, with the
        calibration pool's imatrix; Mweights per second over all of them."""
        from autocompress.files import write_atomically
        from autocompress.targets.gguf.weights import quantize

        session = self.session()
        statistics = session.statistics({"input_sq_norms"})
        blocks = list(dict.fromkeys(linear.block for linear in session.linears))[: self.gguf_blocks]
        linears = [linear for linear in session.linears if linear.block in blocks][: self.gguf_linears]
        figures: dict = {}
        folder = self.work / "gguf"
        for type_name in self.gguf_types:
            began = time.perf_counter()
            weights = 0
            for linear in linears:
                weight = session.dense_weights[linear.name].float()
                stored = quantize(weight, type_name, statistics[linear.name])
                path = folder / linear.name / f"{type_name}.npy"
                write_atomically(path, lambda temporary, data=stored.data: np.save(temporary, data))
                weights += weight.numel()
            figures[f"{type_name}_mweights_per_s"] = round(weights / MB / (time.perf_counter() - began), 3)
        figures["gguf_weights"] = sum(session.dense_weights[linear.name].numel() for linear in linears)
        figures["gguf_mb"] = round(folder_bytes(folder) / MB, 1)
        return figures

    def phase_study(self) -> dict:
        from autocompress.record import TrialRecord
        from autocompress.search import run_search

        self.release()
        config = self.study_config()
        study = run_search(config, self.location, progress=False, write_reports=False)
        records = [TrialRecord.of(trial) for trial in study.get_trials(deepcopy=False)]
        complete = [record for record in records if record.eval_s is not None and record.partial_windows is None]
        evaluations = sum(record.generation_evaluations or 0 for record in records)
        return {
            "trials": len(complete),
            "generation_evaluations": evaluations,
            "seconds_per_evaluation": round(sum(r.eval_s for r in complete) / len(complete), 3),
            "stitch_s_mean": round(sum(r.stitch_s or 0.0 for r in complete) / len(complete), 3),
            "best_kl": round(min(r.kl for r in complete if r.kl is not None), 6),
            "study_cache_mb": round(folder_bytes(self.location.cache_dir) / MB, 1),
        }

    def phase_export(self) -> dict:
        from autocompress.export import choose_trial, export_trial
        from autocompress.search.study import load_existing

        self.release()
        study, record = load_existing(self.location)
        chosen, chosen_by = choose_trial(study, record)
        result = export_trial(record, self.location, chosen, self.work / "export", overwrite=True, chosen_by=chosen_by)
        return {
            "export_mb": round(folder_bytes(result.path) / MB, 1),
            "export_weights_mb": round(result.weights_bytes / MB, 1),
            "export_fitness_kl": round(result.fitness_loss, 6),
            "trial_kl": None if result.trial_loss is None else round(result.trial_loss, 6),
        }


def unique_bytes(session: CompressionSession) -> int:
    """The Hessian bytes the session holds now (tensors shared by q/k/v and gate/up counted once)."""
    tensors = {
        id(stats.hessian): stats.hessian for stats in session._held_hessians.values() if stats.hessian is not None
    }
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors.values())


def agreement(work: Path, device: str, log: Callable[[str], None] = print) -> dict:
    """The KL of one mixed plan scored by stitching the same stored SparseGPT + GPTQ variants (built once, on the
    CPU) into the tiny model in float32 on the CPU and on `device`; each device computes its own dense reference.
    Recomputing GPTQ on the GPU may flip codes, so the variants are built once and copied to the second session's
    cache."""
    pipeline = Pipeline(
        work,
        "tiny",
        None,
        "cpu",
        "float32",
        PoolSizes(seq_len=64, calibration=8, fitness=4, heldout=2, batch_size=4),
        variant_blocks=2,
        gguf_blocks=0,
        gguf_types=[],
        generations=0,
    )
    pipeline.run("model")
    cpu = pipeline.session()
    blocks = list(dict.fromkeys(linear.block for linear in cpu.linears))
    # SparseGPT and GPTQ together in the first block, the second one dense
    plan = CompressionPlan(
        **cpu.config.compression.plan_options(), layers={blocks[0]: LayerCompression(sparsity=0.5, bits=4)}
    )
    began = time.perf_counter()
    for linear in cpu.linears:  # the plan's variants only
        cpu.database().build([linear.name], [plan.setting(linear.name, linear.block)])
    log(f"agreement: built the plan's variants of the tiny model on the CPU in {time.perf_counter() - began:.1f} s")
    cpu_kl = cpu.measure(plan).metrics.kl
    other = Pipeline(
        work,
        "tiny",
        None,
        device,
        "float32",
        pipeline.pools,
        variant_blocks=2,
        gguf_blocks=0,
        gguf_types=[],
        generations=0,
    ).session()
    theirs, ours = cpu.cache_dir / "variants", other.cache_dir / "variants"
    if theirs != ours:
        shutil.rmtree(ours, ignore_errors=True)
        shutil.copytree(theirs, ours)
    database = other.database()
    missing = [
        (linear.name, setting)
        for linear in other.linears
        for setting in {plan.setting(linear.name, linear.block)}
        if not setting.is_identity and not database.has(linear.name, setting)
    ]
    if missing:
        raise RuntimeError(f"the copied variants lack {missing[0]}: the second device would compute its own")
    other_kl = other.measure(plan).metrics.kl
    relative = abs(other_kl - cpu_kl) / abs(cpu_kl)
    return {"device": device, "cpu_kl": cpu_kl, "device_kl": other_kl, "relative_difference": relative}


def environment() -> dict:
    """What ran it: the versions that matter and, on a GPU, which one."""
    import transformers

    figures = {"python": ".".join(map(str, sys.version_info[:3])), "torch": torch.__version__}
    figures["transformers"] = transformers.__version__
    if torch.cuda.is_available():
        figures["gpu"] = torch.cuda.get_device_name()
    return figures
