"""A minimal safetensors reader (memory-mapped, lazy) and a streaming writer.

File layout: an unsigned 64-bit little-endian header length N, N bytes of JSON mapping each
tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the
data section) plus an optional ``"__metadata__"`` object, then the data section.

The reader maps a file copy-on-write and returns tensors that view the mapping, so nothing is
read from disk until a tensor is used and writes to a tensor never reach the file. The writer
takes the full list of names, shapes and dtypes first, so it can write the header before any
data and then stream one tensor at a time.
"""

from __future__ import annotations

import json
import logging
import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable

import torch

logger = logging.getLogger(__name__)

# safetensors dtype string <-> torch dtype (the formats DeepSeek-V4 checkpoints use, and a
# few common others).
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E8M0": torch.float8_e8m0fnu,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}

_LENGTH_BYTES = 8  # the u64 header length
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # the limit the safetensors format sets
_ALIGNMENT = 8  # header padded so the data section starts 8-byte aligned


class SafetensorsError(ValueError):
    """A safetensors file whose header or size is invalid; the message names the file."""


@dataclass(frozen=True)
class Entry:
    """Location and type of one tensor inside a safetensors file."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # byte offset inside the data section
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def dtype_label(dtype: torch.dtype) -> str:
    """Return the safetensors name of ``dtype`` (``F8_E4M3`` ...), or the torch name."""
    return DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def _parse_entry(path: Path, name: str, raw: object, data_size: int) -> Entry:
    if not isinstance(raw, dict):
        raise SafetensorsError(f"{path}: header entry {name!r} must be an object, got {raw!r}")
    dtype_name, shape, offsets = raw.get("dtype"), raw.get("shape"), raw.get("data_offsets")
    if dtype_name not in DTYPES:
        raise SafetensorsError(
            f"{path}: tensor {name!r} has unsupported dtype {dtype_name!r} "
            f"(supported: {', '.join(DTYPES)})")
    if not isinstance(shape, list) or not all(isinstance(n, int) and n >= 0 for n in shape):
        raise SafetensorsError(f"{path}: tensor {name!r} has invalid shape {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(n, int) for n in offsets) or not 0 <= offsets[0] <= offsets[1]):
        raise SafetensorsError(f"{path}: tensor {name!r} has invalid data_offsets {offsets!r}")
    dtype = DTYPES[dtype_name]
    begin, end = offsets
    expected = math.prod(shape) * dtype.itemsize
    if end - begin != expected:
        raise SafetensorsError(
            f"{path}: tensor {name!r} ({dtype_name}{shape}) needs {expected} bytes but its "
            f"data_offsets {offsets} span {end - begin}; the file is corrupt")
    if end > data_size:
        raise SafetensorsError(
            f"{path}: tensor {name!r} ends at data byte {end} but the file has only "
            f"{data_size} data bytes; the file is truncated (re-download or rewrite it)")
    return Entry(dtype, tuple(shape), begin, end)


class SafetensorsFile:
    """One safetensors file, header parsed at once, data mapped copy-on-write on first use."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            file_size = self.path.stat().st_size
            with open(self.path, "rb") as handle:
                length_bytes = handle.read(_LENGTH_BYTES)
                if len(length_bytes) < _LENGTH_BYTES:
                    raise SafetensorsError(
                        f"{self.path}: file has {file_size} bytes, too short for a safetensors "
                        "header; the file is truncated")
                (header_size,) = struct.unpack("<Q", length_bytes)
                if header_size > min(_MAX_HEADER_BYTES, file_size - _LENGTH_BYTES):
                    raise SafetensorsError(
                        f"{self.path}: header length {header_size} exceeds the file size "
                        f"{file_size}; the file is truncated or not a safetensors file")
                header_bytes = handle.read(header_size)
        except FileNotFoundError:
            raise SafetensorsError(f"safetensors file not found: {self.path}") from None
        try:
            header = json.loads(header_bytes)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise SafetensorsError(f"{self.path}: header is not valid JSON ({error})") from None
        if not isinstance(header, dict):
            raise SafetensorsError(f"{self.path}: header must be a JSON object")
        self.data_start = _LENGTH_BYTES + header_size
        data_size = file_size - self.data_start
        self.metadata = header.pop("__metadata__", None) or {}
        self.entries: dict[str, Entry] = {
            name: _parse_entry(self.path, name, raw, data_size) for name, raw in header.items()}
        self._mapping: mmap.mmap | None = None

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def _map(self) -> mmap.mmap:
        if self._mapping is None:
            with open(self.path, "rb") as handle:
                # ACCESS_COPY gives a writable buffer (torch.frombuffer wants one) whose
                # writes stay private to this process.
                self._mapping = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
        return self._mapping

    def tensor(self, name: str) -> torch.Tensor:
        """Return tensor ``name`` as stored, viewing the mapped file (no copy when aligned)."""
        entry = self.entries.get(name)
        if entry is None:
            raise KeyError(f"tensor {name!r} not found in {self.path}")
        if entry.nbytes == 0:
            return torch.empty(entry.shape, dtype=entry.dtype)
        offset = self.data_start + entry.begin
        count = entry.nbytes // entry.dtype.itemsize
        tensor = torch.frombuffer(self._map(), dtype=entry.dtype, count=count, offset=offset)
        if offset % entry.dtype.itemsize:
            # Misaligned elements work on x86 but not in every kernel, so copy them once.
            logger.debug("copying misaligned tensor %s from %s", name, self.path)
            tensor = tensor.clone()
        return tensor.view(entry.shape)


def build_header(entries: Iterable[tuple[str, tuple[int, ...], torch.dtype]],
                 metadata: dict[str, str] | None = None) -> tuple[bytes, dict[str, Entry]]:
    """Lay out tensors back to back in the given order and encode the header.

    Returns the bytes to write before the data section (length prefix, JSON, space padding
    to an 8-byte boundary) and each tensor's ``Entry``.
    """
    header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    layout: dict[str, Entry] = {}
    offset = 0
    for name, shape, dtype in entries:
        if name in layout:
            raise ValueError(f"tensor {name!r} listed twice in one safetensors file")
        size = math.prod(shape) * dtype.itemsize
        layout[name] = Entry(dtype, tuple(shape), offset, offset + size)
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    padding = (-(len(text) + _LENGTH_BYTES)) % _ALIGNMENT
    text += b" " * padding
    return struct.pack("<Q", len(text)) + text, layout


class StreamingWriter:
    """Write one safetensors file tensor by tensor, in the order given up front.

    Data goes to ``path`` with a ``.partial`` suffix and the file is renamed into place by
    ``close()`` once every tensor has been written.
    """

    def __init__(self, path: str | Path,
                 entries: Iterable[tuple[str, tuple[int, ...], torch.dtype]],
                 metadata: dict[str, str] | None = None) -> None:
        self.path = Path(path)
        header, self.layout = build_header(entries, metadata)
        self._order = list(self.layout)
        self._next = 0
        self._partial = self.path.with_name(self.path.name + ".partial")
        self._handle: BinaryIO | None = open(self._partial, "wb")
        self._handle.write(header)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append tensor ``name``; it must be the next one in order, with the listed shape/dtype."""
        if self._handle is None:
            raise RuntimeError(f"{self.path}: writer is already closed")
        if self._next >= len(self._order) or self._order[self._next] != name:
            expected = self._order[self._next] if self._next < len(self._order) else "none"
            raise ValueError(f"{self.path}: tensor {name!r} written out of order "
                             f"(next expected: {expected!r})")
        entry = self.layout[name]
        if tuple(tensor.shape) != entry.shape or tensor.dtype != entry.dtype:
            raise ValueError(
                f"{self.path}: tensor {name!r} is {dtype_label(tensor.dtype)}"
                f"{list(tensor.shape)}, expected {dtype_label(entry.dtype)}{list(entry.shape)}")
        if entry.nbytes:
            raw = tensor.detach().contiguous().cpu().view(torch.uint8).reshape(-1)
            self._handle.write(raw.numpy().data)
        self._next += 1

    def close(self) -> Path:
        """Finish the file and move it into place; raises if a listed tensor was not written."""
        if self._handle is None:
            return self.path
        missing = self._order[self._next:]
        self._handle.close()
        self._handle = None
        if missing:
            self._partial.unlink(missing_ok=True)
            raise ValueError(f"{self.path}: {len(missing)} tensors never written, first "
                             f"{missing[0]!r}")
        os.replace(self._partial, self.path)
        return self.path

    def abort(self) -> None:
        """Close and delete the unfinished file."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        self._partial.unlink(missing_ok=True)



def _file_backed(begin: int, end: int) -> bool:
    """Check whether the addresses [begin, end) lie in one mapping of a file (Linux /proc/self/maps)."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return False
    for line in lines:
        fields = line.split()
        low, high = (int(x, 16) for x in fields[0].split("-"))
        if low <= begin and end <= high:
            return len(fields) >= 6 and fields[4] != "0"  # inode 0: anonymous memory
    return False


def release_pages(tensor: torch.Tensor) -> int:
    """Drop the whole memory pages of a tensor that views a mapped file from this process's
    resident set. Returns the bytes released (0 where nothing was released).

    Call it only on a tensor nothing reads any more, such as a weight replaced by a converted
    copy. Its pages stay counted in the process's RSS for as long as the file is mapped.
    Anything but a contiguous CPU tensor inside a file mapping is left alone. A released page
    refills from the file when read again, so writes made to it through any view are lost.
    """
    if tensor.device.type != "cpu" or not tensor.is_contiguous() or os.name != "posix":
        return 0
    import ctypes
    import ctypes.util

    page = os.sysconf("SC_PAGE_SIZE")
    begin = tensor.data_ptr()
    end = begin + tensor.numel() * tensor.element_size()
    first, last = -(-begin // page) * page, end // page * page  # whole pages inside the tensor
    if last <= first or not _file_backed(begin, end):
        return 0
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madv_dontneed = 4  # the same value on Linux and the BSDs
    if libc.madvise(first, last - first, madv_dontneed) != 0:
        logger.debug("madvise failed for a %s tensor (errno %d)", tuple(tensor.shape), ctypes.get_errno())
        return 0
    return last - first
