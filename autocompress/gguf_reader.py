"""One validating reader of GGUF files: every size and count in a header is checked against the file's length
before anything is allocated for it, and every way a file can be malformed is one `UserError`.

The `gguf` package's reader trusts the header: a 49-byte file declaring an array of 2^62 elements makes it allocate
until the machine runs out of memory, and a truncated or mistyped file ends in a struct or numpy traceback. Every
GGUF file autocompress opens (a model to load, a file to evaluate, an export folder to overwrite) is read here
first; `open_gguf` hands the `gguf` package's reader only a file that passed.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autocompress.errors import UserError

MAGIC = b"GGUF"
VERSIONS = (2, 3)
MAX_DIMS = 4  # GGML_MAX_DIMS
DEFAULT_ALIGNMENT = 32
STRING, ARRAY = 8, 9
SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}  # struct codes
MIN_KV_BYTES = 8 + 4 + 1  # an empty key, a type, the smallest value
MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # an empty name, no dimensions, a type, an offset


class MalformedGGUF(ValueError):
    """What is wrong with a GGUF file, in a few words."""


@dataclass(frozen=True)
class GGUFArray:
    """An array value, checked but not read: its element type and count."""

    element_type: int
    count: int


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]
    type: int
    offset: int  # from the start of the data section
    nbytes: int


@dataclass(frozen=True)
class GGUFHeader:
    version: int
    fields: dict[str, Any]  # scalars and strings as values, arrays as GGUFArray
    tensors: list[GGUFTensorInfo]
    data_offset: int
    file_bytes: int


class _Cursor:
    def __init__(self, buffer: mmap.mmap | bytes, order: str) -> None:
        self.buffer = buffer
        self.order = order
        self.position = 0

    @property
    def left(self) -> int:
        return len(self.buffer) - self.position

    def take(self, code: str, what: str) -> Any:
        size = struct.calcsize(code)
        if size > self.left:
            raise MalformedGGUF(f"cut short in {what} at byte {self.position}")
        value = struct.unpack_from(self.order + code, self.buffer, self.position)[0]
        self.position += size
        return value

    def count(self, what: str, each_bytes: int) -> int:
        """A uint64 count of items at least `each_bytes` long each, which the rest of the file must hold."""
        value = self.take("Q", what)
        if value * each_bytes > self.left:
            raise MalformedGGUF(f"{what} is {value:,}, more than the {self.left:,} bytes left in the file can hold")
        return value

    def string(self, what: str) -> str:
        length = self.count(f"the length of {what}", 1)
        raw = bytes(self.buffer[self.position : self.position + length])
        self.position += length
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise MalformedGGUF(f"{what} is not UTF-8") from error

    def value(self, value_type: int, what: str) -> Any:
        if value_type in SCALARS:
            return self.take(SCALARS[value_type], what)
        if value_type == STRING:
            return self.string(what)
        if value_type != ARRAY:
            raise MalformedGGUF(f"{what} has an unknown value type {value_type}")
        element_type = self.take("I", f"the element type of {what}")
        if element_type == ARRAY:
            raise MalformedGGUF(f"{what} is an array of arrays, which GGUF readers do not take")
        if element_type not in SCALARS and element_type != STRING:
            raise MalformedGGUF(f"{what} has an unknown element type {element_type}")
        each = struct.calcsize(SCALARS[element_type]) if element_type in SCALARS else 8  # a string: its length
        count = self.count(f"the length of {what}", each)
        if element_type == STRING:
            for index in range(count):
                self.string(f"element {index} of {what}")
        else:
            self.position += count * each
        return GGUFArray(element_type, count)


def _tensor_bytes(shape: tuple[int, ...], type_code: int, name: str) -> int:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        block, type_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(type_code)]
    except (ValueError, KeyError) as error:
        raise MalformedGGUF(f"tensor {name!r} has an unknown type {type_code}") from error
    elements = 1
    for size in shape:
        elements *= size
    if shape and shape[0] % block:
        raise MalformedGGUF(f"tensor {name!r}'s rows of {shape[0]} do not fill its type's blocks of {block}")
    return elements // block * type_bytes


def parse_gguf(buffer: mmap.mmap | bytes) -> GGUFHeader:
    """The header of the GGUF file in `buffer`, every count and size checked; a MalformedGGUF saying what is wrong."""
    if len(buffer) < 4 or bytes(buffer[:4]) != MAGIC:
        raise MalformedGGUF("it does not start with the GGUF magic")
    order = "<"
    if len(buffer) >= 8 and struct.unpack_from("<I", buffer, 4)[0] & 0xFFFF == 0:
        order = ">"  # a big-endian file: its version reads byte-swapped
    cursor = _Cursor(buffer, order)
    cursor.position = 4
    version = cursor.take("I", "the version")
    if version not in VERSIONS:
        raise MalformedGGUF(f"version {version} is not one of {VERSIONS}")
    tensor_count = cursor.take("Q", "the tensor count")
    kv_count = cursor.count("the key-value count", MIN_KV_BYTES)
    if tensor_count * MIN_TENSOR_INFO_BYTES > cursor.left:
        raise MalformedGGUF(f"the tensor count is {tensor_count:,}, more than the file can describe")
    fields: dict[str, Any] = {}
    for index in range(kv_count):
        key = cursor.string(f"key {index}")
        fields[key] = cursor.value(cursor.take("I", f"the type of {key!r}"), repr(key))
    infos = []
    for index in range(tensor_count):
        name = cursor.string(f"the name of tensor {index}")
        n_dims = cursor.take("I", f"the dimensions of {name!r}")
        if n_dims > MAX_DIMS:
            raise MalformedGGUF(f"tensor {name!r} has {n_dims} dimensions, more than {MAX_DIMS}")
        shape = tuple(cursor.take("Q", f"a dimension of {name!r}") for _ in range(n_dims))
        type_code = cursor.take("I", f"the type of {name!r}")
        offset = cursor.take("Q", f"the offset of {name!r}")
        infos.append((name, shape, type_code, offset))
    alignment = fields.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0 or alignment & (alignment - 1):
        raise MalformedGGUF(f"general.alignment {alignment!r} is not a power of two")
    data_offset = -(-cursor.position // alignment) * alignment
    tensors = []
    for name, shape, type_code, offset in infos:
        if any(size == 0 or size >= 2**40 for size in shape):
            raise MalformedGGUF(f"tensor {name!r} has a dimension out of range: {list(shape)}")
        nbytes = _tensor_bytes(shape, type_code, name)
        if data_offset + offset + nbytes > len(buffer):
            raise MalformedGGUF(f"tensor {name!r} ends past the end of the file")
        tensors.append(GGUFTensorInfo(name, shape, type_code, offset, nbytes))
    return GGUFHeader(version, fields, tensors, data_offset, len(buffer))


def read_gguf(path: Path | str) -> GGUFHeader:
    """The validated header of the GGUF file at `path`; a one-line UserError for any file that is not one."""
    path = Path(path)
    try:
        with path.open("rb") as file:
            if path.stat().st_size == 0:
                raise MalformedGGUF("the file is empty")
            with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
                return parse_gguf(buffer)
    except MalformedGGUF as error:
        raise UserError(f"{path}: not a valid GGUF file: {error}") from error
    except OSError as error:
        raise UserError(f"{path}: cannot be read ({error.strerror or error})") from error


def check_model_gguf(path: Path | str, header: GGUFHeader) -> None:
    """Refuse, before a model is built from it, a GGUF file whose hyperparameters its tensors do not bear out:
    transformers sizes the model from the metadata (defaulting what is missing to a 7B Llama's), so a file without
    them, or with a width or depth its tensors do not have, would allocate a model of another size."""
    fields = header.fields
    arch = fields.get("general.architecture")
    width, depth = fields.get(f"{arch}.embedding_length"), fields.get(f"{arch}.block_count")
    if not isinstance(arch, str) or not isinstance(width, int) or not isinstance(depth, int):
        raise UserError(f"{path}: not a GGUF model: it lacks general.architecture or its width and depth")
    shapes = {tensor.name: tensor.shape for tensor in header.tensors}
    embedding = shapes.get("token_embd.weight")
    blocks = {int(name.split(".")[1]) for name in shapes if name.startswith("blk.") and name.split(".")[1].isdigit()}
    if embedding is None or embedding[0] != width or blocks != set(range(depth)):
        raise UserError(
            f"{path}: not a GGUF model its metadata describes ({arch}.embedding_length {width}, "
            f"{arch}.block_count {depth}; its tensors differ)"
        )


def open_gguf(path: Path | str):
    """The `gguf` package's reader of a file that `read_gguf` validated (so it allocates only what the file holds)."""
    import gguf

    read_gguf(path)
    try:
        return gguf.GGUFReader(path)
    except Exception as error:  # what the validation does not foresee is still one line
        raise UserError(f"{path}: not a valid GGUF file: {type(error).__name__}: {error}") from error
