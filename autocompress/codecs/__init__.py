"""One codec per stored form: what one compressed Linear stores, described once.

A precision level (`plan.Level`: `fp16`, an integer grid, a number format) resolves once, with the plan-wide
options it depends on, into a codec (`resolve`): a small frozen spec whose handler
- quantizes a (pruned) float32 weight with the registered method (`quantize`), giving what it stores;
- encodes that into named tensors and the fields of a manifest entry (`encode`), and decodes those back into the
  float32 weight the compressed model computes with (`decode`);
- counts the bytes of those tensors from the shape alone (`nbytes`), so the search never has to compress to know.

A pruned weight is stored alike by every codec: a 1-bit mask of the kept positions (`packing.pack_mask`), then only
the kept values in the codec's form (`encode_linear`, `decode_linear`, `stored_bytes`). The variant database, the size
accounting and the artifact write and read through these functions, so bytes accounted are bytes written.

Codecs are registered by kind (`CODECS`): "fp16", "int", "format". A manifest entry names its codec by its fields
(`codec_of_entry`), as artifacts have since format version 1. Another stored form (a GGUF block type, whose
`quantize` returns its block bytes with a `dequantize`) plugs in as one more kind with the same five methods.
"""

from autocompress.codecs import integer, number_formats  # noqa: F401  (importing a family registers it)
from autocompress.codecs.registry import (
    CODECS,
    Codec,
    CompressedLinear,
    Entry,
    codec_of_entry,
    decode_linear,
    encode_linear,
    level_kind,
    register,
    resolve,
    scatter_kept,
    stored_bytes,
)

__all__ = [
    "CODECS",
    "Codec",
    "CompressedLinear",
    "Entry",
    "codec_of_entry",
    "decode_linear",
    "encode_linear",
    "level_kind",
    "register",
    "resolve",
    "scatter_kept",
    "stored_bytes",
]
