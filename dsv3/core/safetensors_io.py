"""The safetensors container, read and written without loading whole files.

Format: 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}
(+ optional __metadata__), then raw little-endian bytes. Nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CheckpointError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E4M3FNUZ": torch.float8_e4m3fnuz, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute file offsets of the data
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def read_header(path: str | Path) -> tuple[dict[str, TensorInfo], dict]:
    """Tensor infos and __metadata__; a truncated or corrupt file is a CheckpointError naming it."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes); re-download or re-convert it")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise CheckpointError(f"{path}: corrupt or truncated safetensors header; re-download or re-convert it")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: corrupt safetensors header (not JSON); re-download or re-convert it") from None
    meta = header.pop("__metadata__", {}) or {}
    base = 8 + n
    out: dict[str, TensorInfo] = {}
    end_max = base
    for name, d in header.items():
        try:
            dtype = DTYPES[d["dtype"]]
            b, e = d["data_offsets"]
            info = TensorInfo(dtype, tuple(int(s) for s in d["shape"]), base + b, base + e)
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {name!r} has an unreadable header entry {d!r}") from None
        out[name] = info
        end_max = max(end_max, info.end)
    if end_max > size:
        raise CheckpointError(
            f"{path}: truncated: header describes {end_max} bytes, file has {size}; re-download or re-convert it"
        )
    return out, meta


def read_tensor(path: str | Path, info: TensorInfo) -> torch.Tensor:
    """One tensor, read straight from its byte range (no mmap of the whole file)."""
    with open(path, "rb") as f:
        f.seek(info.begin)
        buf = bytearray(f.read(info.nbytes))
    if len(buf) != info.nbytes:
        raise CheckpointError(f"{path}: truncated while reading a tensor; re-download or re-convert it")
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=info.dtype)
    return torch.frombuffer(buf, dtype=info.dtype).view(info.shape)


def read_rows(path: str | Path, info: TensorInfo, lo: int, hi: int) -> torch.Tensor:
    """Rows lo..hi-1 of a tensor (its first dim), reading only their bytes: a rank's dim-0 slice."""
    row = info.nbytes // info.shape[0] if info.shape and info.shape[0] else 0
    part = TensorInfo(info.dtype, (hi - lo, *info.shape[1:]), info.begin + lo * row, info.begin + hi * row)
    return read_tensor(path, part)


class StreamingWriter:
    """Write one safetensors file tensor by tensor: the header is fixed up front from known
    shapes and dtypes, so memory holds one tensor at a time however large the file is."""

    def __init__(self, path: str | Path, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        self.path = Path(path)
        header: dict = {"__metadata__": metadata or {"format": "pt"}}
        offset = 0
        self.order = list(specs)
        self.specs = specs
        for name in self.order:
            dtype, shape = specs[name]
            n = _numel(shape) * _itemsize(dtype)
            header[name] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * ((8 - len(raw) % 8) % 8)  # data aligned to 8 bytes
        self.total = 8 + len(raw) + offset
        self._f = open(self.path, "wb")
        self._hash = hashlib.sha256()  # computed as bytes go out: no second read for the manifest
        self._emit(struct.pack("<Q", len(raw)) + raw)
        self._next = 0

    def _emit(self, data) -> None:
        self._f.write(data)
        self._hash.update(data)

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    def write(self, name: str, t: torch.Tensor) -> None:
        expected = self.order[self._next]
        dtype, shape = self.specs[expected]
        if name != expected or t.dtype != dtype or tuple(t.shape) != tuple(shape):
            raise ValueError(f"writer expected {expected} {dtype} {shape}, got {name} {t.dtype} {tuple(t.shape)}")
        if t.numel():
            self._emit(memoryview(t.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy()))
        self._next += 1

    def close(self) -> None:
        if self._next != len(self.order):
            self._f.close()
            raise ValueError(f"{self.path}: closed after {self._next} of {len(self.order)} tensors")
        # no fsync: --resume re-hashes every finished file, so a file lost to a crash is redone
        self._f.close()

    def abort(self) -> None:
        self._f.close()


def save_file(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    w = StreamingWriter(path, {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}, metadata)
    for k, v in tensors.items():
        w.write(k, v)
    w.close()


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
