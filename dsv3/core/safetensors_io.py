"""The safetensors container, read and written without loading whole files.

Format: 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}
(+ optional __metadata__), then raw little-endian bytes. Nothing is ever unpickled.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CheckpointError
from .fp8 import NAN_BYTES, is_fp8

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
    name: str = ""

    @property
    def nbytes(self) -> int:
        """shape x dtype (read_header checks the offsets span exactly that)."""
        return _numel(self.shape) * _itemsize(self.dtype)


def read_header(path: str | Path) -> tuple[dict[str, TensorInfo], dict]:
    """Tensor infos and __metadata__, the whole header validated once: a JSON object of entries with
    a known dtype, a shape of non-negative ints and offsets that tile the data section exactly (in
    order, no overlap, no gap, sizes = shape x dtype), as the safetensors format requires. Anything
    else is a CheckpointError naming the file and the first problem."""
    path = Path(path)

    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{path}: {why}; re-download or re-convert it")

    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise bad(f"truncated safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise bad(f"corrupt or truncated safetensors header (declares {n} header bytes, file has {size})")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise bad("corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise bad(f"corrupt safetensors header (a JSON {type(header).__name__}, expected an object)")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise bad("corrupt safetensors header (__metadata__ is not a map of strings)")
    base, data_size = 8 + n, size - 8 - n
    out: dict[str, TensorInfo] = {}
    for name, d in header.items():
        out[name] = _entry(name, d, base, bad)
    pos = 0
    for info in sorted(out.values(), key=lambda i: (i.begin, i.end)):
        if info.begin - base != pos:
            what = "overlaps the previous tensor" if info.begin - base < pos else f"leaves a gap after byte {pos}"
            raise bad(f"tensor {info.name!r}: data_offsets {[info.begin - base, info.end - base]} {what}")
        pos = info.end - base
    if pos != data_size:
        if pos > data_size:
            raise bad(f"truncated: the header describes {pos} data bytes, the file has {data_size}")
        raise bad(f"{data_size - pos} bytes after the last tensor that no header entry describes")
    return out, meta


def _entry(name: str, d, base: int, bad) -> TensorInfo:
    if not isinstance(d, dict):
        raise bad(f"tensor {name!r}: header entry {d!r} is not an object")
    dtype = DTYPES.get(d.get("dtype")) if isinstance(d.get("dtype"), str) else None
    if dtype is None:
        raise bad(f"tensor {name!r}: unknown dtype {d.get('dtype')!r}")
    shape, offsets = d.get("shape"), d.get("data_offsets")
    if not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape):
        raise bad(f"tensor {name!r}: shape {shape!r} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) and o >= 0 for o in offsets)):
        raise bad(f"tensor {name!r}: data_offsets {offsets!r} is not two non-negative integers")
    b, e = offsets
    expected = _numel(shape) * _itemsize(dtype)
    if e - b != expected:
        raise bad(f"tensor {name!r}: data_offsets {offsets} span {e - b} bytes, shape {shape} x {d['dtype']} "
                  f"needs {expected}")
    return TensorInfo(dtype, tuple(shape), base + b, base + e, name)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def value_problem(t: torch.Tensor, name: str = "", buf=None, thorough: bool = False) -> str | None:
    """Why a stored tensor's values cannot be real weights, or None: FP8 NaN bytes (a memchr over
    the raw bytes, ~free), non-finite values, block scales that are negative or absurdly large.
    Unless `thorough` (verify), floats wider than FP8 are checked only when small (norms, biases,
    scales): a pass over a 1.3 TB BF16 checkpoint at load would cost minutes, and corrupt large
    weights still end as non-finite logits, which generation refuses."""
    if is_fp8(t.dtype):
        raw = buf if buf is not None else t.contiguous().view(torch.uint8).numpy().tobytes()
        nan = NAN_BYTES[t.dtype]
        if any(raw.find(b) >= 0 for b in nan):
            n = sum(raw.count(b) for b in nan)
            return f"{n} NaN bytes ({'/'.join(f'0x{b[0]:02X}' for b in nan)}) in a {t.dtype} tensor"
        return None
    if not t.is_floating_point() or (t.numel() > SMALL_FLOAT_CHECK and not thorough):
        return None
    if not torch.isfinite(t).all():
        return f"{int((~torch.isfinite(t)).sum())} NaN/Inf values"
    if name.endswith(SCALE_SUFFIXES) and t.numel() and not (0 <= t.min() and t.max() <= SCALE_MAX):
        return (f"block scales in [{t.min().item():.3g}, {t.max().item():.3g}]; real ones are amax/fp8_max, "
                f"in [0, {SCALE_MAX:g}]")
    return None


SMALL_FLOAT_CHECK = 1 << 20  # elements
SCALE_SUFFIXES = ("_scale_inv", ".scale")  # HF and demo names of FP8 block scales
SCALE_MAX = 64.0  # a block scale is amax/448: 64 already means weights of ~3e4, far beyond any trained model


def read_tensor(path: str | Path, info: TensorInfo, check: bool = True, f=None) -> torch.Tensor:
    """One tensor, read straight from its byte range (no mmap of the whole file), through `f` (an
    open handle on path, saving an open per tensor) if given. With `check`, values no real weight
    has (see value_problem) are a CheckpointError naming tensor and file."""
    buf = bytearray(info.nbytes)
    try:
        if f is None:
            with open(path, "rb") as fh:
                fh.seek(info.begin)
                got = fh.readinto(buf)
        else:
            f.seek(info.begin)
            got = f.readinto(buf)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    if got != info.nbytes:
        raise CheckpointError(f"{path}: truncated while reading a tensor; re-download or re-convert it")
    t = torch.empty(info.shape, dtype=info.dtype) if info.nbytes == 0 else \
        torch.frombuffer(buf, dtype=info.dtype).view(info.shape)
    return _checked(path, info, t, buf) if check else t


def _checked(path, info: TensorInfo, t: torch.Tensor, raw) -> torch.Tensor:
    why = value_problem(t, info.name, raw)
    if why:
        raise CheckpointError(f"{path}: tensor {info.name or '?'}: {why}; the file is corrupt, re-download or "
                              "re-convert it")
    return t


class _Span:
    """bytes-like find/count over one range of a memory map (what value_problem asks of a buffer)."""

    def __init__(self, mm, begin: int, end: int):
        self.mm, self.begin, self.end = mm, begin, end

    def find(self, sub: bytes) -> int:
        return self.mm.find(sub, self.begin, self.end)

    def count(self, sub: bytes) -> int:
        n, pos = 0, self.mm.find(sub, self.begin, self.end)
        while pos >= 0:
            n, pos = n + 1, self.mm.find(sub, pos + 1, self.end)
        return n


def read_mapped(path: str | Path, info: TensorInfo, mm) -> torch.Tensor:
    """read_tensor's result as a view of a private (copy-on-write) memory map of the file: no copy.
    read_header has checked the range lies inside the file."""
    if info.end > len(mm):
        raise CheckpointError(f"{path}: truncated while reading a tensor; re-download or re-convert it")
    if info.nbytes == 0:
        t = torch.empty(info.shape, dtype=info.dtype)
    else:
        t = torch.frombuffer(mm, dtype=torch.uint8, count=info.nbytes, offset=info.begin).view(info.dtype)
        t = t.view(info.shape)
    return _checked(path, info, t, _Span(mm, info.begin, info.end))


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
        try:  # reserve the whole file: a full disk shows now, not halfway, and ext4 allocates once
            os.posix_fallocate(self._f.fileno(), 0, self.total)
        except AttributeError:  # no posix_fallocate on this OS
            pass
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                self._f.close()
                raise
        self._hash = hashlib.sha256()  # computed as bytes go out: no second read for the manifest
        self._hasher = ThreadPoolExecutor(max_workers=1)  # hashing and writing one buffer run side by side
        self._emit(struct.pack("<Q", len(raw)) + raw)
        self._next = 0

    def _emit(self, data) -> None:
        hashed = self._hasher.submit(self._hash.update, data)  # both release the GIL
        try:
            self._f.write(data)
        finally:
            hashed.result()  # the buffer is free once both are done: memory stays one tensor

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
            self.abort()
            raise ValueError(f"{self.path}: closed after {self._next} of {len(self.order)} tensors")
        # no fsync: --resume re-hashes every finished file, so a file lost to a crash is redone
        self._f.close()
        self._hasher.shutdown()

    def abort(self) -> None:
        self._f.close()
        self._hasher.shutdown()


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
    return dtype.itemsize
