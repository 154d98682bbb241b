"""Host resource control: admission by CPU and memory budget, sandbox ids, lifetimes, reaping.

One ``Host`` owns every sandbox it creates on this machine under one state directory. Admission
reserves each sandbox's ``cpu`` and ``memory_mb`` against the host budget. When they do not
fit, it raises ``Busy`` with a retry delay instead of queueing. A reaper thread kills
sandboxes whose lifetime ended and removes host resources (cgroups, mounts, directories, processes) that carry
this host's tag but belong to no live sandbox. It runs at start-up, so a restarted host cleans
up after a crashed one, and then every ``reap_interval_s``.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import ClassVar

from dsv4.sandbox import naming
from dsv4.sandbox.backends.base import Backend, SandboxHandle
from dsv4.sandbox.errors import Busy, InvalidSpec, SandboxNotFound
from dsv4.sandbox.types import SandboxSpec, SnapshotRef

logger = logging.getLogger(__name__)

DEFAULT_STATE_DIR = "/var/lib/dsv4-sandbox"
# Module that implements each layer; the Backend subclass with a matching ``layer`` is used.
LAYER_MODULES = {
    "function": "dsv4.sandbox.backends.function",
    "container": "dsv4.sandbox.backends.container",
    "microvm": "dsv4.sandbox.backends.microvm",
    "vm": "dsv4.sandbox.backends.vm",
}
# Idle sandboxes use almost no CPU, so the CPU budget overcommits the cores by this factor.
CPU_OVERCOMMIT = 8.0
MEMORY_BUDGET_FRACTION = 0.8


def load_backend_class(layer: str, runtime: str | None = None) -> type[Backend]:
    """Import the module of ``layer`` and return its Backend subclass for ``runtime``."""
    if layer not in LAYER_MODULES:
        raise InvalidSpec(f"layer={layer!r} is unknown; use one of {sorted(LAYER_MODULES)}")
    module_name = LAYER_MODULES[layer] + (f"_{runtime}" if runtime else "")
    module = importlib.import_module(module_name)
    for value in vars(module).values():
        if (isinstance(value, type) and issubclass(value, Backend) and value is not Backend
                and getattr(value, "layer", None) == layer and value.__module__ == module_name):
            return value
    raise InvalidSpec(f"module {module_name} defines no Backend subclass for layer {layer!r}")


def _memory_total_mb() -> int:
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    raise OSError("MemTotal is missing from /proc/meminfo")


@dataclass
class Lease:
    handle: SandboxHandle
    spec: SandboxSpec
    expires_at: float                 # time.monotonic() value


class Host:
    """Creates, tracks and reaps the sandboxes of one state directory."""

    _default: ClassVar["Host | None"] = None
    _default_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, state_dir: str | None = None, *, cpu_budget: float | None = None,
                 memory_budget_mb: int | None = None, reap_interval_s: float = 60.0,
                 retry_after_s: float = 1.0) -> None:
        self.state_dir = os.path.realpath(
            state_dir or os.environ.get("DSV4_SANDBOX_STATE", DEFAULT_STATE_DIR))
        os.makedirs(self.state_dir, exist_ok=True)
        os.chmod(self.state_dir, 0o755)
        self.cpu_budget = cpu_budget or CPU_OVERCOMMIT * (os.cpu_count() or 1)
        self.memory_budget_mb = memory_budget_mb or int(_memory_total_mb()
                                                        * MEMORY_BUDGET_FRACTION)
        self.retry_after_s = retry_after_s
        self._backends: dict[tuple[str, str | None], Backend] = {}
        self._leases: dict[str, Lease] = {}
        self._pending_cpu = 0.0
        self._pending_memory_mb = 0
        self._starting: set[str] = set()
        self._lock = threading.RLock()
        self._closed = threading.Event()
        self.reap()
        self._reaper = threading.Thread(target=self._reap_loop, args=(reap_interval_s,),
                                        name=f"sandbox-reaper-{naming.host_tag(self.state_dir)}",
                                        daemon=True)
        self._reaper.start()

    @classmethod
    def default(cls) -> "Host":
        """Return the process-wide host used when no ``host=`` is passed (created on first use)."""
        with cls._default_lock:
            if cls._default is None or cls._default._closed.is_set():
                cls._default = cls()
            return cls._default

    # Backends --------------------------------------------------------------------------------
    def backend(self, layer: str, runtime: str | None = None) -> Backend:
        key = (layer, runtime)
        with self._lock:
            if key not in self._backends:
                self._backends[key] = load_backend_class(layer, runtime)(self.state_dir)
            return self._backends[key]

    # Admission -------------------------------------------------------------------------------
    def reserved(self) -> tuple[float, int]:
        """Return the (cpu, memory MiB) reserved by live and starting sandboxes."""
        with self._lock:
            cpu = sum(lease.spec.cpu for lease in self._leases.values()) + self._pending_cpu
            memory = sum(lease.spec.memory_mb for lease in self._leases.values())
            return cpu, memory + self._pending_memory_mb

    def _admit(self, spec: SandboxSpec) -> None:
        cpu, memory = self.reserved()
        if cpu + spec.cpu > self.cpu_budget:
            raise Busy(f"CPU budget exhausted: {cpu:g} of {self.cpu_budget:g} cores reserved, "
                       f"request {spec.cpu:g}", retry_after_s=self.retry_after_s)
        if memory + spec.memory_mb > self.memory_budget_mb:
            raise Busy(f"memory budget exhausted: {memory} of {self.memory_budget_mb} MiB "
                       f"reserved, request {spec.memory_mb} MiB", retry_after_s=self.retry_after_s)
        self._pending_cpu += spec.cpu
        self._pending_memory_mb += spec.memory_mb

    def _start(self, spec: SandboxSpec, start) -> SandboxHandle:
        with self._lock:
            if self._closed.is_set():
                raise InvalidSpec(f"host {self.state_dir} is closed; create a new Host")
            self._admit(spec)
            sandbox_id = naming.new_sandbox_id(self.state_dir)
            # A starting sandbox already has cgroups and directories; the reaper must not
            # take them for an orphan's.
            self._starting.add(sandbox_id)
        try:
            handle = start(sandbox_id)
            with self._lock:
                self._leases[sandbox_id] = Lease(handle, spec,
                                                 time.monotonic() + spec.lifetime_s)
        finally:
            with self._lock:
                self._pending_cpu -= spec.cpu
                self._pending_memory_mb -= spec.memory_mb
                self._starting.discard(sandbox_id)
        logger.debug("created %s sandbox %s", spec.layer, sandbox_id)
        return handle

    def create(self, spec: SandboxSpec) -> SandboxHandle:
        backend = self.backend(spec.layer, spec.options.get("runtime"))
        return self._start(spec, lambda sandbox_id: backend.create(sandbox_id, spec))

    def restore(self, ref: SnapshotRef) -> SandboxHandle:
        backend = self.backend(ref.layer, ref.spec.options.get("runtime"))
        return self._start(ref.spec, lambda sandbox_id: backend.restore(sandbox_id, ref))

    # Lookup and lifetime -----------------------------------------------------------------------
    def get(self, sandbox_id: str) -> SandboxHandle:
        with self._lock:
            lease = self._leases.get(sandbox_id)
        if lease is None:
            raise SandboxNotFound(f"no live sandbox {sandbox_id!r} on host {self.state_dir}")
        return lease.handle

    def list(self, labels: dict[str, str] | None = None) -> list[SandboxHandle]:
        with self._lock:
            leases = list(self._leases.values())
        required = (labels or {}).items()
        return [lease.handle for lease in leases if required <= dict(lease.spec.labels).items()]

    def set_lifetime(self, sandbox_id: str, lifetime_s: float) -> None:
        """Let the sandbox live ``lifetime_s`` seconds from now."""
        with self._lock:
            if sandbox_id not in self._leases:
                raise SandboxNotFound(f"no live sandbox {sandbox_id!r}")
            self._leases[sandbox_id].expires_at = time.monotonic() + lifetime_s

    def kill(self, sandbox_id: str) -> None:
        """Kill a sandbox and drop its lease. Idempotent."""
        with self._lock:
            lease = self._leases.get(sandbox_id)
        if lease is None:
            return
        try:
            lease.handle.kill()
        finally:
            with self._lock:
                self._leases.pop(sandbox_id, None)

    # Reaping ---------------------------------------------------------------------------------
    def reap(self) -> list[str]:
        """Kill expired sandboxes and remove leftovers of dead ones; return the ids handled."""
        now = time.monotonic()
        with self._lock:
            expired = [i for i, lease in self._leases.items() if lease.expires_at <= now]
        for sandbox_id in expired:
            logger.info("sandbox %s reached the end of its lifetime; killing it", sandbox_id)
            self.kill(sandbox_id)
        with self._lock:
            live = set(self._leases) | self._starting
        orphans: list[str] = []
        for layer in self._layers_on_disk():
            try:
                orphans += self.backend(layer).reap(live)
            except Exception as error:  # noqa: BLE001 - one broken layer must not stop reaping
                logger.error("reaping layer %s failed: %s", layer, error)
        return expired + orphans

    def _layers_on_disk(self) -> list[str]:
        """Return layers that have a state directory (so their backend may have leftovers)."""
        layers = [layer for layer in LAYER_MODULES
                  if os.path.isdir(os.path.join(self.state_dir, layer))]
        with self._lock:
            layers += [layer for layer, _ in self._backends if layer not in layers]
        return layers

    def _reap_loop(self, interval_s: float) -> None:
        while not self._closed.wait(interval_s):
            try:
                self.reap()
            except Exception as error:  # noqa: BLE001 - the reaper thread must keep running
                logger.error("periodic reap of %s failed: %s", self.state_dir, error)

    def close(self) -> None:
        """Kill every sandbox of this host and stop the reaper."""
        self._closed.set()
        with self._lock:
            ids = list(self._leases)
        for sandbox_id in ids:
            self.kill(sandbox_id)
        with self._lock:
            backends = list(self._backends.values())
        for backend in backends:
            backend.close()
