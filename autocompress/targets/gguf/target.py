"""The gguf deployment target (`compression.target: gguf`): llama.cpp's file, judged by llama.cpp.

Each unit (decoder-block Linears, the embedding, the output matrix) takes one of GGUF's own tensor types
(`weights`), quantized as llama.cpp quantizes; a plan's size is the file's (`file.GgufLayout`); `export` writes
that file, and `autocompress evaluate` runs it in llama.cpp (`evaluation`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autocompress.errors import UserError
from autocompress.files import staged_write
from autocompress.models import CompressibleLinear, meta_model, module_name
from autocompress.provenance import with_versions
from autocompress.structure import check_levels, ffn_width, teacher_shape
from autocompress.targets.base import ExportInput, PresetSeed, Target, Written
from autocompress.targets.gguf.evaluation import evaluate_gguf, gguf_evaluation_lines, gguf_file
from autocompress.targets.gguf.file import GGUF_FILE, gguf_layout, tokenizer_gguf, write_gguf, write_gguf_tensors
from autocompress.targets.gguf.preset_sizes import check_size_budget, preset_ceiling, preset_names
from autocompress.targets.gguf.speed import PlanSpeed
from autocompress.targets.gguf.weights import GgufWeights, check_config, preset_seeds, space_levels

if TYPE_CHECKING:
    import optuna

    from autocompress.config import CompressionConfig, Config, DataConfig
    from autocompress.record import StudyLocation
    from autocompress.session import CompressionSession


class GgufTarget(Target):
    """llama.cpp: each unit (decoder-block Linears, the embedding, the output matrix) in one of GGUF's own tensor
    types (`targets.gguf.weights`), the size the file's, and `export` writing that file natively."""

    name = "gguf"
    export_format = "gguf"
    runtime = "llama.cpp"
    runs_structure = True  # llama.cpp's deci architecture: per-block FFN widths, KV groups, dropped blocks
    predicts_speed = True  # llama.cpp's speed table (`targets.gguf.speed`), measured once per machine
    dense_form = "as an F16 GGUF file"

    def size_presets(self) -> tuple[str, ...]:
        return preset_names()

    def preset_ceiling(self, config: Config, preset: str) -> int:
        return preset_ceiling(config, preset)

    def check_config(self, config: Config) -> None:
        check_config(config)

    def check_model(self, config: Config) -> None:
        space_levels(config)
        if config.search.structure is not None:
            check_structure_levels(config)

    def check_search(self, config: Config) -> None:
        self.check_model(config)
        check_size_budget(config)

    def weights(self, session: CompressionSession) -> GgufWeights:
        """The GGUF units of the session's resident model; their importance needs lm_head's inputs too."""
        model = session.model
        output = model.get_output_embeddings()
        session.calibrated.append(CompressibleLinear(module_name(model, output), "", output))
        layout = gguf_layout(model, session.tokenizer, tokenizer_gguf(session.config.model))
        cache = None if session.cache_dir is None else session.cache_dir / "gguf"
        granularity = session.config.compression.granularity
        statistics = lambda: session.statistics({"input_sq_norms"})  # noqa: E731
        structure = session.config.search.structure
        if structure is None:
            return GgufWeights(model, granularity, statistics, cache, layout)
        from autocompress.targets.gguf.structured import StructuredGgufWeights

        tokenizer_source = tokenizer_gguf(session.config.model)
        return StructuredGgufWeights(
            model,
            granularity,
            statistics,
            cache,
            layout,
            structure,
            session.pools.calibration,
            session.batch_size,
            lambda skeleton: gguf_layout(skeleton, session.tokenizer, tokenizer_source),
        )

    def seeds(self, session: CompressionSession, unit_levels: Mapping[str, Sequence[str]]) -> list[PresetSeed]:
        """llama.cpp's k-quant presets, as llama.cpp assigns their types per tensor role (with its fallbacks)."""
        return preset_seeds(session.weights.tensors, session.model.config, unit_levels)

    def speed_model(self, session: CompressionSession, presets: Sequence[str] = ()) -> PlanSpeed:
        """llama.cpp's speed table for the session's model on `search.speed_threads` threads, holding every level
        the study's units may take, the `presets`' types and the block alternatives `search.structure` offers;
        what the cache lacks is measured now (minutes for a small model), once per machine."""
        levels = session.config.search.precision_levels()
        structure = session.config.search.structure
        config = session.model.config
        teacher = teacher_shape(config)
        sub_blocks = []
        if structure is not None:
            widths = {ffn_width(fraction, config) for fraction in structure.ffn}
            sub_blocks += [("ffn", width) for width in sorted(widths) if width < teacher.intermediate_size]
            groups = set(structure.kv_groups or ())
            sub_blocks += [("attention", count) for count in sorted(groups) if count < teacher.num_key_value_heads]
        return PlanSpeed(
            session.weights,
            config,
            levels,
            session.config.search.speed_threads,
            presets,
            progress=lambda text: print(f"autocompress: {text}", flush=True),
            sub_blocks=sub_blocks,
        )

    def export_refusal(self, format: str) -> str | None:
        if format == self.export_format:
            return None
        return f"a gguf study's levels are llama.cpp tensor types, which only gguf stores, not {format}"

    def export(self, given: ExportInput, out_dir: Path) -> Written:
        """model.gguf: the blocks the search evaluated (a gguf study's), or our artifact's integer grids mapped onto
        GGUF's 32-blocks where they can be (another target's study)."""
        provenance = with_versions(given.provenance)
        tokenizer_source = tokenizer_gguf(given.config.model)
        reports = []

        def write(folder: Path) -> None:
            path = folder / GGUF_FILE
            if given.stored is not None:
                report = write_gguf_tensors(
                    given.model,
                    given.tokenizer,
                    given.stored,
                    path,
                    provenance,
                    tokenizer_source=tokenizer_source,
                    plan=given.plan,
                )
            else:
                report = write_gguf(
                    given.model,
                    given.tokenizer,
                    given.plan,
                    given.compressed,
                    path,
                    metadata=provenance,
                    tokenizer_source=tokenizer_source,
                )
            reports.append(report)

        path = staged_write(out_dir, write)
        report = reports[0]
        limits = "; ".join(report.notes)
        warning = f"GGUF cannot store this plan as searched: {limits}" if limits else None
        notes = [f"GGUF tensor types: {report.summary()}", *report.notes]
        return Written(path, (path / GGUF_FILE).stat().st_size, notes, warning)

    def describe(self, compression: CompressionConfig, code) -> str:
        return (
            f"target {code(self.name)}: llama.cpp's tensor types, quantized as llama.cpp does with the calibration's "
            f"importance matrix, per {compression.granularity} (the embedding and output matrix are units too)"
        )

    def judges(self, path: Path) -> bool:
        return gguf_file(path) is not None

    def evaluate(
        self,
        path: Path,
        data: DataConfig | None,
        device: str | None,
        new_tokens: int,
        dense: bool,
        against: Path | None = None,
        threads: int | None = None,
    ) -> dict[str, Any]:
        return evaluate_gguf(path, data, device, new_tokens, dense, n_threads=threads, against=against)

    def evaluation_lines(self, result: dict[str, Any]) -> list[str]:
        return gguf_evaluation_lines(result)

    def conclude(self, study: optuna.Study, location: StudyLocation) -> list[str]:
        """Under a budget named by preset: the searched file against the preset's, judged by llama.cpp."""
        from autocompress.targets.gguf.verdict import write_verdict

        return write_verdict(study, location)


def check_structure_levels(config: Config) -> None:
    """A UserError (one line) for structural levels the config's model cannot take or llama.cpp's deci cannot run,
    from its config alone (on the meta device, before any weight is loaded). A type whose blocks do not split the
    rows a shape gives a tensor is not refused: the tensor stores llama.cpp's fallback (`structured.storable_level`)."""
    model = meta_model(config.model)
    structure = config.search.structure
    try:
        check_levels(model.config, type(model).__name__, structure.ffn, structure.kv_groups, structure.drop_blocks)
    except ValueError as error:
        raise UserError(f"search.structure: {error}") from error


TARGET = GgufTarget()
