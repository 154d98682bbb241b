"""Preemption-safe trajectory log: record tool calls, replay them after a resume.

Main entry points: `TrajectoryLog` (the log under one root directory), `TrajectorySession`
(record and replay one trajectory), `ReplayEnvironment` / `EnvironmentProvider` (how a
session reaches its sandbox) and `collect_garbage`.
"""

from .environment import EnvironmentProvider, ReplayEnvironment
from .errors import JournalUnavailable, StaleWriter, Unrecoverable
from .gc import GcReport, collect_garbage
from .hashing import ToolRequest, ToolResult, canonical_json, idem_key, request_hash, result_hash
from .session import FAULT_POINTS, DivergencePolicy, TrajectorySession
from .store import TrajectoryLog

__all__ = [
    "DivergencePolicy", "EnvironmentProvider", "FAULT_POINTS", "GcReport", "JournalUnavailable", "ReplayEnvironment", "StaleWriter",
    "ToolRequest", "ToolResult", "TrajectoryLog", "TrajectorySession", "Unrecoverable", "canonical_json", "collect_garbage",
    "idem_key", "request_hash", "result_hash",
]
