"""The gguf deployment target (`compression.target: gguf`): llama.cpp's file, judged by llama.cpp."""

from __future__ import annotations

from typing import TYPE_CHECKING

from autocompress.targets import Target
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


TARGET = GgufTarget()
