"""Read and check a safetensors header before any tensor data is read.

A safetensors file is ``u64 little-endian header length`` + ``JSON header`` +
``data``. The header declares every tensor's dtype, shape and byte range, so
the registry can refuse a bad upload (pickle, truncated, wrong shapes) from
its first few kilobytes. Pickle is never unpickled: a file that starts like a
pickle or a ``torch.save`` zip is refused by its magic bytes.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import BinaryIO

import torch

from .errors import InvalidAdapterError, keys_phrase

# Bytes per element of each safetensors dtype.
DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U64": 8, "U32": 4, "U16": 2, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit

_PICKLE_MAGIC = tuple(bytes([0x80, proto]) for proto in range(2, 6))
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's zip container, which holds a pickle


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # byte offset into the data section
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class SafetensorsHeader:
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]
    data_offset: int  # where the data section starts in the file
    file_size: int


def read_header(source: bytes | BinaryIO, file_size: int) -> SafetensorsHeader:
    """Parse and check the header of a safetensors file of ``file_size`` bytes.

    ``source`` is the whole file as bytes or a binary file object positioned at
    its start (only the header is read from it). Raises ``InvalidAdapterError``
    with code ``pickle_refused``, ``not_safetensors``, ``invalid_header`` or
    ``truncated``.
    """
    head = _read(source, 0, min(8, file_size))
    if head.startswith(_PICKLE_MAGIC) or head.startswith(_ZIP_MAGIC):
        raise InvalidAdapterError(
            "this looks like a pickle / torch.save checkpoint; only safetensors files are accepted "
            "(pickle can run arbitrary code, so it is never loaded). Convert it with safetensors.torch.save_file.",
            code="pickle_refused",
        )
    if file_size < 8:
        raise InvalidAdapterError(
            f"file is {file_size} bytes; a safetensors file starts with an 8-byte header length",
            code="not_safetensors",
        )
    (header_len,) = struct.unpack("<Q", head)
    if header_len > MAX_HEADER_BYTES:
        raise InvalidAdapterError(
            f"header length field is {header_len} bytes (limit {MAX_HEADER_BYTES}); not a safetensors file",
            code="not_safetensors",
        )
    if 8 + header_len > file_size:
        raise InvalidAdapterError(
            f"header declares {header_len} header bytes but the file has only {file_size - 8} after the length "
            "field: the upload is truncated",
            code="truncated",
        )
    raw = _read(source, 8, header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidAdapterError(f"header is not valid JSON: {e}", code="not_safetensors") from e
    if not isinstance(header, dict):
        raise InvalidAdapterError("header is not a JSON object", code="not_safetensors")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise InvalidAdapterError("header '__metadata__' must map strings to strings", code="invalid_header")
    data_offset = 8 + header_len
    tensors = {name: _entry(name, info) for name, info in header.items()}
    _check_layout(tensors, file_size - data_offset)
    return SafetensorsHeader(tensors=tensors, metadata=metadata, data_offset=data_offset, file_size=file_size)


def _read(source: bytes | BinaryIO, offset: int, length: int) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source[offset : offset + length])
    source.seek(offset)
    return source.read(length)


def _entry(name: str, info) -> TensorEntry:
    def bad(why: str) -> InvalidAdapterError:
        return InvalidAdapterError(f"header entry {name!r}: {why}", code="invalid_header", keys=[name])

    if not isinstance(info, dict):
        raise bad("not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in DTYPE_SIZES:
        raise bad(f"unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise bad(f"shape {shape!r} is not a list of non-negative integers")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise bad(f"data_offsets {offsets!r} is not [begin, end] with 0 <= begin <= end")
    entry = TensorEntry(name=name, dtype=dtype, shape=tuple(shape), start=offsets[0], end=offsets[1])
    if entry.end - entry.start != entry.numel * DTYPE_SIZES[dtype]:
        raise bad(f"{entry.end - entry.start} data bytes do not hold {dtype} {list(shape)}")
    return entry


def _check_layout(tensors: dict[str, TensorEntry], data_bytes: int) -> None:
    """Byte ranges must tile the data section exactly, as the safetensors library requires."""
    declared = max((t.end for t in tensors.values()), default=0)
    if declared > data_bytes:
        beyond = sorted((t.name for t in tensors.values() if t.end > data_bytes), key=lambda n: tensors[n].start)
        raise InvalidAdapterError(
            f"header declares {declared} bytes of tensor data but the file holds {data_bytes}: the upload is "
            f"truncated (tensors past the end: {keys_phrase(beyond)})",
            code="truncated",
            keys=beyond,
        )
    position = 0
    for t in sorted(tensors.values(), key=lambda t: (t.start, t.end)):
        if t.start != position:
            raise InvalidAdapterError(
                f"tensor {t.name!r} starts at byte {t.start}, expected {position}: gaps or overlaps in the data",
                code="invalid_header",
                keys=[t.name],
            )
        position = t.end
    if position != data_bytes:
        raise InvalidAdapterError(
            f"{data_bytes - position} bytes after the last tensor: not a well-formed safetensors file",
            code="invalid_header",
        )


_TORCH_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}


def write_safetensors(tensors: dict, metadata: dict[str, str] | None = None) -> bytes:
    """Serialise float tensors deterministically: sorted names and metadata, so equal input -> equal bytes.

    (``safetensors.torch.save`` orders ``__metadata__`` by a hash map, so its
    bytes, and any sha256 of them, vary from run to run.)
    """
    header: dict = {}
    if metadata:
        header["__metadata__"] = dict(sorted(metadata.items()))
    chunks, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        dtype = _TORCH_DTYPES.get(str(t.dtype).removeprefix("torch."))
        if dtype is None:
            raise ValueError(f"tensor {name!r}: dtype {t.dtype} is not supported here")
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(raw)) + raw + b"".join(chunks)
