"""safetensors files read and written one tensor at a time, with plain file reads (no mmap).

A safetensors file is an 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}},
then the tensor bytes. Reading a tensor with pread into a fresh numpy array keeps the process's resident memory
at what it holds (the touched pages of an mmap would count in its RSS until unmapped), and parsing the header
ourselves lets a cut file be said to be truncated before any tensor is read.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Callable, Iterable

import ml_dtypes
import numpy as np

from mimo_jax.errors import CheckpointError

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
          "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2, "F8_E8M0": ml_dtypes.float8_e8m0fnu,
          "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}
MAX_HEADER = 100_000_000  # safetensors' own limit


@dataclasses.dataclass(frozen=True)
class Entry:
    file: Path
    dtype: str  # safetensors name, e.g. "F8_E4M3"
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(f: Path) -> dict[str, Entry]:
    """{tensor name: Entry} of one file; CheckpointError if it is cut short or not safetensors."""
    size = f.stat().st_size
    with open(f, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = fh.read(n) if 0 < n <= MAX_HEADER else None
    try:
        meta = json.loads(header)
        base = 8 + n
        entries = {k: Entry(f, v["dtype"], tuple(v["shape"]), base + v["data_offsets"][0], base + v["data_offsets"][1])
                   for k, v in meta.items() if k != "__metadata__"}
    except Exception:  # noqa: BLE001 - a cut header fails to parse; anything else is not safetensors
        if size < 8 or header is not None and len(header) < n:
            raise CheckpointError(f"{f.name} is truncated ({size} bytes: its header is incomplete)") from None
        raise CheckpointError(f"{f.name} is not a safetensors file (no valid header)") from None
    end = max((e.end for e in entries.values()), default=8 + n)
    if size < end:
        raise CheckpointError(f"{f.name} is truncated ({size} bytes; its tensors need {end})")
    for k, e in entries.items():
        if e.dtype not in DTYPES:
            raise CheckpointError(f"{f.name}: tensor {k} has dtype {e.dtype}, which this loader does not read")
        if e.nbytes != int(np.prod(e.shape, dtype=np.int64)) * np.dtype(DTYPES[e.dtype]).itemsize:
            raise CheckpointError(f"{f.name}: tensor {k} has {e.nbytes} bytes, its shape {list(e.shape)} "
                                  f"{e.dtype} needs another size")
    return entries


def read_tensor(e: Entry) -> np.ndarray:
    out = np.empty(e.shape, DTYPES[e.dtype])
    view = memoryview(out.reshape(-1).view(np.uint8))
    fd = os.open(e.file, os.O_RDONLY)
    try:
        done = 0
        while done < e.nbytes:
            got = os.preadv(fd, [view[done:]], e.start + done)
            if got <= 0:
                raise CheckpointError(f"{e.file.name} is truncated (read stopped at byte {e.start + done})")
            done += got
    finally:
        os.close(fd)
    return out


def write(path: Path, tensors: Iterable[tuple[str, tuple[int, ...], np.dtype, Callable[[], np.ndarray]]],
          metadata: dict | None = None) -> None:
    """A safetensors file from (name, shape, dtype, make) items; make() is called once per tensor, in order, so
    only one tensor is in memory at a time. Written to `path`.tmp, renamed when complete."""
    items = list(tensors)
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name, shape, dtype, _ in items:
        n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": NAMES[np.dtype(dtype)], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # tensor data 8-byte aligned
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(len(raw).to_bytes(8, "little"))
        fh.write(raw)
        for name, shape, dtype, make in items:
            a = np.asarray(make())
            a = a if a.flags.c_contiguous else a.copy(order="C")  # (ascontiguousarray makes 0-d 1-d)
            if a.shape != tuple(shape) or a.dtype != np.dtype(dtype):
                raise ValueError(f"{name}: made {a.shape} {a.dtype}, declared {tuple(shape)} {np.dtype(dtype)}")
            fh.write(a.reshape(-1).view(np.uint8).data)
    os.replace(tmp, path)
