"""Content-addressed blob store for large tool outputs.

A blob is written to a temporary name, fsync'd and renamed to its sha256, and the
directory is fsync'd, all before the log record that names it is appended. A reader
that finds the record therefore finds the blob.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from .segment import fsync_dir


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path_for(self, digest: str) -> Path:
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ValueError(f"blob digest {digest!r} is not a lowercase sha256 hex string")
        return self.root / digest[:2] / digest

    def put(self, data: bytes) -> str:
        """Store `data` durably and return its sha256 hex digest."""
        digest = hashlib.sha256(data).hexdigest()
        path = self.path_for(digest)
        if path.exists():
            return digest
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{digest}.{os.getpid()}.tmp")
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
        return digest

    def get(self, digest: str) -> bytes:
        path = self.path_for(digest)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(f"blob {digest} not found at {path}; the log references a blob "
                                    "that was deleted (garbage-collected too early?)") from None
        if hashlib.sha256(data).hexdigest() != digest:
            raise ValueError(f"blob {path} is corrupt: its sha256 does not match its name")
        return data

    def digests(self) -> set[str]:
        if not self.root.exists():
            return set()
        return {p.name for p in self.root.glob("??/*") if not p.name.startswith(".")}

    def delete(self, digest: str) -> None:
        self.path_for(digest).unlink(missing_ok=True)
