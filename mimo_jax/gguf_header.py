"""A GGUF file's header read with `struct`: its metadata (arrays reduced to their length) and tensor table.

    header = read_header(path)                  # EOFError: the file ends inside the header; ValueError: corrupt
    header.metadata["llama.block_count"]        # 30
    len(header.metadata["tokenizer.ggml.tokens"])   # 49152 (an ArrayInfo: the items are skipped)
    header.tensors[0].name, header.size_needed  # "token_embd.weight", bytes a complete file has

It takes milliseconds where gguf.GGUFReader takes seconds (one numpy view per string of a 49K-token
vocabulary), so a run can be checked -- config, unsupported features, truncation -- before any tensor is
read. Tensor data and array contents are read with gguf.GGUFReader (gguf_reader.py).

Layout (GGUF v2/v3, little- or big-endian): "GGUF", u32 version, u64 tensor count, u64 metadata count;
metadata = (string key, u32 value type, value)*; tensor table = (string name, u32 n_dims, u64 dims[n_dims]
in ggml order, u32 ggml type, u64 offset from the data start)*; data starts at the next multiple of
`general.alignment` (default 32). A string is a u64 length and UTF-8 bytes; an array is a u32 item type,
a u64 count and the items.
"""
from __future__ import annotations

import dataclasses
import struct
from pathlib import Path
from typing import Any, BinaryIO

import gguf

_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


@dataclasses.dataclass(frozen=True)
class ArrayInfo:
    """An array metadata value whose items were skipped."""

    item_type: int
    length: int

    def __len__(self) -> int:
        return self.length


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    dims: tuple[int, ...]  # ggml order (innermost first)
    ggml_type: int
    offset: int  # from the start of the data section
    n_bytes: int


@dataclasses.dataclass(frozen=True)
class Header:
    metadata: dict[str, Any]  # numbers, bools and strings as values; arrays as ArrayInfo
    tensors: list[TensorInfo]
    data_start: int

    @property
    def size_needed(self) -> int:
        """The bytes a complete file with this header holds."""
        return self.data_start + max((t.offset + t.n_bytes for t in self.tensors), default=0)


class _Fields:
    def __init__(self, f: BinaryIO, order: str):
        self.f, self.order = f, order

    def read(self, fmt: str) -> tuple:
        fmt = self.order + fmt
        data = self.f.read(struct.calcsize(fmt))
        if len(data) < struct.calcsize(fmt):
            raise EOFError
        return struct.unpack(fmt, data)

    def string(self) -> str:
        (n,) = self.read("Q")
        data = self.f.read(n)
        if len(data) < n:
            raise EOFError
        return data.decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            item, count = self.read("IQ")
            if item in _SCALARS:
                self.f.seek(count * struct.calcsize(_SCALARS[item]), 1)  # an EOF here shows at the next read
            else:
                for _ in range(count):
                    self.value(item)
            return ArrayInfo(item, count)
        if vtype not in _SCALARS:
            raise ValueError(f"unknown metadata value type {vtype}")
        return self.read(_SCALARS[vtype])[0]


def read_header(path: str | Path) -> Header:
    """The header of the GGUF file at `path` (its magic already checked). EOFError when the file ends
    inside the header; ValueError for an unknown value or tensor type."""
    with open(path, "rb") as f:
        f.seek(4)
        version = f.read(4)
        if len(version) < 4:
            raise EOFError
        fields = _Fields(f, ">" if struct.unpack("<I", version)[0] & 0xFFFF == 0 else "<")
        n_tensors, n_kv = fields.read("QQ")
        metadata = {}
        for _ in range(n_kv):
            key = fields.string()
            metadata[key] = fields.value(fields.read("I")[0])
        tensors = []
        for _ in range(n_tensors):
            name = fields.string()
            (n_dims,) = fields.read("I")
            dims = fields.read("Q" * n_dims)
            ggml_type, offset = fields.read("IQ")
            block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
            n_elements = 1
            for d in dims:
                n_elements *= d
            tensors.append(TensorInfo(name, dims, ggml_type, offset, n_elements // block * type_size))
        alignment = metadata.get("general.alignment", 32)
        end = f.tell()
    return Header(metadata, tensors, end + (-end) % alignment)
