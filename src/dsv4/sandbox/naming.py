"""Names of host resources: every one carries the id of the sandbox that owns it.

A sandbox id is ``<host tag>-<random hex>``. The host tag is derived from the state directory.
A restarted host with the same state directory therefore recognises and reaps what its previous
run left behind. Sandboxes of hosts with other state directories on the same machine are never
touched.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets

_ID_PATTERN = re.compile(r"^[0-9a-f]{6}-[0-9a-f]{12}$")


def host_tag(state_dir: str) -> str:
    """Return the 6-hex-digit tag of the host that owns ``state_dir``."""
    return hashlib.sha256(os.path.realpath(state_dir).encode()).hexdigest()[:6]


def new_sandbox_id(state_dir: str) -> str:
    return f"{host_tag(state_dir)}-{secrets.token_hex(6)}"


def is_owned(sandbox_id: str, state_dir: str) -> bool:
    """Return True when ``sandbox_id`` is a well-formed id of the host owning ``state_dir``."""
    return bool(_ID_PATTERN.match(sandbox_id)) and sandbox_id.startswith(host_tag(state_dir) + "-")


def short_name(sandbox_id: str) -> str:
    """Return a hostname-sized name for the sandbox (``sbx-`` plus the random part)."""
    return "sbx-" + sandbox_id.split("-")[-1]
