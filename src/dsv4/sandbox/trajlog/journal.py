"""The exec journal inside the sandbox, kept by a small shell wrapper.

Every live call of a trajectory runs as

    sh -c WRAPPER dsv4-journal <journal dir> <idem_key> <argv...>

inside the sandbox. The wrapper claims `<journal dir>/<idem_key>` with `mkdir`, which is
atomic, before it starts the command. It writes the command's stdout and stderr to files
there and publishes the exit status with a rename, then copies the output to its own
stdout and stderr. So the sandbox itself reports, with no help from the worker:

* no entry: the call never started, and running it is safe;
* an entry with `rc`: the call finished, and its full result can be read back;
* an entry without `rc`: the call started but its end is unknown (in doubt).

A second wrapper run with the same key does not start the command. It prints
DUPLICATE_MARKER and the key and exits with DUPLICATE_EXIT, which makes a retried or
resumed call fetch the journaled result instead of running twice.

The wrapper needs a POSIX `sh`, `mkdir`, `mv` and `cat` in the sandbox and a journal
directory on a file system that lives as long as the sandbox. When it cannot create
the journal directory it runs nothing, prints UNAVAILABLE_MARKER and the directory and
exits with UNAVAILABLE_EXIT.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .hashing import ToolResult

DUPLICATE_MARKER = "dsv4-journal: duplicate"
DUPLICATE_EXIT = 97
UNAVAILABLE_MARKER = "dsv4-journal: cannot create"
UNAVAILABLE_EXIT = 98

WRAPPER = r"""
j=$1; k=$2; shift 2
d="$j/$k"
if ! mkdir -p "$j" 2>/dev/null; then
    printf '%s %s\n' "dsv4-journal: cannot create" "$j"
    exit 98
fi
if ! mkdir "$d" 2>/dev/null; then
    printf '%s %s\n' "dsv4-journal: duplicate" "$k"
    exit 97
fi
"$@" >"$d/out" 2>"$d/err"
rc=$?
printf '%s' "$rc" >"$d/rc.tmp" && mv "$d/rc.tmp" "$d/rc"
cat "$d/out"
cat "$d/err" >&2
exit "$rc"
"""

LOOKUP = r"""
d="$1/$2"
if [ ! -d "$d" ]; then echo absent
elif [ -f "$d/rc" ]; then echo done; cat "$d/rc"
else echo started
fi
"""

FETCH = r"""
d="$1/$2"
cat "$d/out" 2>/dev/null
cat "$d/err" >&2 2>/dev/null
exit 0
"""

CLEAR = r"""
rm -rf "$1/$2"
"""

LIST = r"""
[ -d "$1" ] && ls -1 "$1"
exit 0
"""


class JournalState(enum.Enum):
    ABSENT = "absent"  # never started: safe to run
    STARTED = "started"  # claimed, no exit status: in doubt
    DONE = "done"  # finished: the result is in the journal


@dataclass(frozen=True)
class JournalEntry:
    state: JournalState
    result: ToolResult | None = None


def wrap_argv(journal_dir: str, key: str, argv: list[str]) -> list[str]:
    return ["sh", "-c", WRAPPER, "dsv4-journal", journal_dir, key, *argv]


def lookup_argv(journal_dir: str, key: str) -> list[str]:
    return ["sh", "-c", LOOKUP, "dsv4-journal", journal_dir, key]


def fetch_argv(journal_dir: str, key: str) -> list[str]:
    return ["sh", "-c", FETCH, "dsv4-journal", journal_dir, key]


def clear_argv(journal_dir: str, key: str) -> list[str]:
    return ["sh", "-c", CLEAR, "dsv4-journal", journal_dir, key]


def list_argv(journal_dir: str) -> list[str]:
    return ["sh", "-c", LIST, "dsv4-journal", journal_dir]


def is_duplicate(result: ToolResult, key: str) -> bool:
    return (result.exit_code == DUPLICATE_EXIT and not result.stderr
            and result.stdout == f"{DUPLICATE_MARKER} {key}\n".encode())


def is_unavailable(result: ToolResult, journal_dir: str) -> bool:
    return (result.exit_code == UNAVAILABLE_EXIT and not result.stderr
            and result.stdout == f"{UNAVAILABLE_MARKER} {journal_dir}\n".encode())


def parse_lookup(stdout: bytes) -> tuple[JournalState, int | None]:
    lines = stdout.decode(errors="replace").split()
    if not lines or lines[0] not in {s.value for s in JournalState}:
        raise ValueError(f"journal lookup printed {stdout!r}; expected absent, started or done")
    state = JournalState(lines[0])
    if state is JournalState.DONE:
        if len(lines) < 2 or not lines[1].lstrip("-").isdigit():
            raise ValueError(f"journal lookup printed {stdout!r}; 'done' must be followed by the exit code")
        return state, int(lines[1])
    return state, None
