"""``AsyncSandbox``: the asyncio twin of ``Sandbox``.

Every call runs the synchronous implementation in a worker thread, so deadlines stay enforced by
the host-side kill (never by cancelling a coroutine) and a CPU-bound sandbox cannot stall the
event loop.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable, Literal, Mapping, Sequence

from dsv4.sandbox.api import DEFAULT_MAX_OUTPUT, Sandbox, Session
from dsv4.sandbox.backends.base import SessionKind
from dsv4.sandbox.host import Host
from dsv4.sandbox.types import ExecResult, FileInfo, SandboxStats, SnapshotRef


class AsyncFiles:
    def __init__(self, sandbox: Sandbox) -> None:
        self._files = sandbox.files

    async def read(self, path: str) -> bytes:
        return await asyncio.to_thread(self._files.read, path)

    async def read_text(self, path: str) -> str:
        return await asyncio.to_thread(self._files.read_text, path)

    async def write(self, path: str, data: bytes | str, mode: int = 0o644) -> None:
        await asyncio.to_thread(self._files.write, path, data, mode)

    async def list(self, path: str) -> list[FileInfo]:
        return await asyncio.to_thread(self._files.list, path)

    async def remove(self, path: str) -> None:
        await asyncio.to_thread(self._files.remove, path)

    async def upload(self, local_path: str, path: str) -> None:
        await asyncio.to_thread(self._files.upload, local_path, path)

    async def download(self, path: str, local_path: str) -> None:
        await asyncio.to_thread(self._files.download, path, local_path)


class AsyncSession:
    def __init__(self, session: Session) -> None:
        self._session = session
        self.kind = session.kind

    async def run(self, code: str, **kwargs: Any) -> ExecResult:
        return await asyncio.to_thread(self._session.run, code, **kwargs)

    async def close(self) -> None:
        await asyncio.to_thread(self._session.close)


class AsyncSandbox:
    """Asyncio client with the same methods as ``Sandbox``; ``async with`` kills on exit."""

    def __init__(self, sandbox: Sandbox) -> None:
        self.sync = sandbox
        self.files = AsyncFiles(sandbox)

    @classmethod
    async def create(cls, image: str = "host", **kwargs: Any) -> "AsyncSandbox":
        """Create a sandbox; takes the arguments of ``Sandbox.create``."""
        return cls(await asyncio.to_thread(Sandbox.create, image, **kwargs))

    @classmethod
    async def from_snapshot(cls, ref: SnapshotRef, *, host: Host | None = None) -> "AsyncSandbox":
        return cls(await asyncio.to_thread(Sandbox.from_snapshot, ref, host=host))

    @classmethod
    async def connect(cls, sandbox_id: str, *, host: Host | None = None) -> "AsyncSandbox":
        return cls(await asyncio.to_thread(Sandbox.connect, sandbox_id, host=host))

    @property
    def id(self) -> str:
        return self.sync.id

    @property
    def layer(self) -> str:
        return self.sync.layer

    async def exec(self, command: str | Sequence[str], *, stdin: bytes | str | None = None,
                   cwd: str | None = None, env: Mapping[str, str] | None = None,
                   timeout_s: float = 60.0, max_output: int = DEFAULT_MAX_OUTPUT,
                   idem_key: str | None = None, idle_timeout_s: float | None = None,
                   raise_on_timeout: bool = True) -> ExecResult:
        return await asyncio.to_thread(
            self.sync.exec, command, stdin=stdin, cwd=cwd, env=env, timeout_s=timeout_s,
            max_output=max_output, idem_key=idem_key, idle_timeout_s=idle_timeout_s,
            raise_on_timeout=raise_on_timeout)

    async def call(self, function: Callable[..., Any], *args: Any, timeout_s: float = 60.0,
                   **kwargs: Any) -> Any:
        return await asyncio.to_thread(self.sync.call, function, *args, timeout_s=timeout_s,
                                       **kwargs)

    async def session(self, kind: SessionKind = "bash") -> AsyncSession:
        return AsyncSession(await asyncio.to_thread(self.sync.session, kind))

    async def snapshot(self, kind: Literal["fs", "full"] = "fs") -> SnapshotRef:
        return await asyncio.to_thread(self.sync.snapshot, kind)

    async def fork(self, count: int = 1) -> list["AsyncSandbox"]:
        return [AsyncSandbox(s) for s in await asyncio.to_thread(self.sync.fork, count)]

    async def pause(self) -> None:
        await asyncio.to_thread(self.sync.pause)

    async def resume(self) -> None:
        await asyncio.to_thread(self.sync.resume)

    async def stats(self) -> SandboxStats:
        return await asyncio.to_thread(self.sync.stats)

    async def is_running(self) -> bool:
        return await asyncio.to_thread(self.sync.is_running)

    async def set_timeout(self, lifetime_s: float) -> None:
        await asyncio.to_thread(self.sync.set_timeout, lifetime_s)

    async def kill(self) -> None:
        await asyncio.to_thread(self.sync.kill)

    async def __aenter__(self) -> "AsyncSandbox":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.kill()
