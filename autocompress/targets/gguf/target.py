"""The gguf deployment target (`compression.target: gguf`): llama.cpp's file, judged by llama.cpp."""

from __future__ import annotations

from typing import TYPE_CHECKING

from autocompress.errors import UserError
from autocompress.models import meta_model
from autocompress.structure import check_levels, structural_inputs
from autocompress.targets import Target
from autocompress.targets.gguf.blocks import fits
from autocompress.targets.gguf.weights import check_config, space_levels

if TYPE_CHECKING:
    from autocompress.config import Config


class GgufTarget(Target):
    """llama.cpp: each unit (decoder-block Linears, the embedding, the output matrix) in one of GGUF's own tensor
    types (`targets.gguf.weights`), the size the file's, and `export` writing that file natively."""

    name = "gguf"
    export_format = "gguf"

    def check_config(self, config: Config) -> None:
        check_config(config)

    def check_model(self, config: Config) -> None:
        space_levels(config)
        if config.search.structure is not None:
            check_structure_levels(config)


def check_structure_levels(config: Config) -> None:
    """A UserError (one line) for structural levels the config's model cannot take or llama.cpp's deci cannot run,
    from its config alone (on the meta device, before any weight is loaded)."""
    model = meta_model(config.model)
    structure = config.search.structure
    try:
        check_levels(model.config, type(model).__name__, structure.ffn, structure.kv_groups, structure.drop_blocks)
    except ValueError as error:
        raise UserError(f"search.structure: {error}") from error
    formats = config.search.precision_levels()
    for matrix, level, inputs in structural_inputs(model.config, structure.ffn, structure.kv_groups):
        if not any(fits(kind, inputs) for kind in formats):
            raise UserError(
                f"search.structure: {level} gives {matrix} rows of {inputs} weights, which no type of search.formats "
                f"splits into whole blocks (K-types need a multiple of 256); add a 32-block type such as q8_0"
            )


TARGET = GgufTarget()
