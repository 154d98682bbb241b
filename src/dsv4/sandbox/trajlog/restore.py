"""Lazy environment restore for a resumed trajectory.

Tried in order when the first live call (or an in-doubt call) needs the sandbox:

1. reattach the sandbox that ran the logged calls, if its journal contains every logged
   non-idempotent call and none that an ABORT dropped;
2. restore the newest snapshot taken before the restore limit, or create a fresh
   sandbox (the image is the implicit snapshot before step 0), and re-run the logged
   calls after it. Only idempotent calls are re-run: a non-idempotent call after the
   base rules that base out;
3. otherwise raise Unrecoverable.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from dsv4.sandbox.errors import SandboxError

from .errors import Unrecoverable
from .hashing import ToolRequest, result_hash

if TYPE_CHECKING:
    from .environment import ReplayEnvironment
    from .session import TrajectorySession

logger = logging.getLogger(__name__)


def try_reattach(session: TrajectorySession) -> ReplayEnvironment | None:
    """Return the trajectory's surviving sandbox when its journal matches the log, else None."""
    state = session.state
    if session._restore_limit is not None or not state.sandbox_id:
        return None
    env = session.provider.reattach(state.sandbox_id)
    if env is None:
        logger.info("trajectory %s/%s: sandbox %s is gone", state.run_id, state.traj_id, state.sandbox_id)
        return None
    try:
        journal = env.journal_keys()
    except (SandboxError, RuntimeError) as error:
        logger.warning("trajectory %s/%s: journal of sandbox %s could not be read (%s); not reattaching",
                       state.run_id, state.traj_id, state.sandbox_id, error)
        return None
    needed = {e.idem_key for e in state.completed() if not e.idempotent}
    missing = needed - journal
    dropped = journal & {e.idem_key for e in state.aborted.values()}
    if missing or dropped:
        logger.warning("trajectory %s/%s: sandbox %s does not match the log (%d logged calls missing from its "
                       "journal, %d aborted calls present); not reattaching", state.run_id, state.traj_id,
                       state.sandbox_id, len(missing), len(dropped))
        return None
    logger.info("trajectory %s/%s: reattached sandbox %s", state.run_id, state.traj_id, state.sandbox_id)
    return env


def restore_environment(session: TrajectorySession) -> ReplayEnvironment:
    """Return a sandbox whose state matches the log up to the restore limit."""
    state = session.state
    env = try_reattach(session)
    if env is not None:
        return env
    completed = state.completed()
    if not completed and not state.sandbox_id:
        return session.provider.create()

    limit = session._restore_limit
    bases: list[dict[str, Any] | None] = [s for s in reversed(state.snapshots) if limit is None or s["step"] < limit]
    bases.append(None)  # a fresh sandbox from the image
    for base in bases:
        base_step = base["step"] if base is not None else -1
        rerun = [e for e in completed if e.step > base_step]
        blocking = [e for e in rerun if not e.idempotent]
        if blocking:
            # An older base has at least the same calls after it, so no base can work.
            first = blocking[0]
            raise Unrecoverable(state.run_id, state.traj_id,
                                f"non-idempotent call {first.step}/{first.call} ran after the newest usable "
                                f"snapshot (step {base_step}) and its sandbox {state.sandbox_id} is gone or "
                                "does not match the log")
        env = session.provider.restore(base["ref"]) if base is not None else session.provider.create()
        if env is None:
            logger.warning("trajectory %s/%s: snapshot of step %d could not be restored", state.run_id,
                           state.traj_id, base_step)
            continue
        for entry in rerun:
            request = ToolRequest.from_record(entry.intent["request"])
            result = env.run(request, entry.idem_key, idempotent=True)
            if entry.result is not None and result_hash(result) != entry.result["result_hash"]:
                # NOTE: the log keeps the first result; a flaky idempotent tool leaves the sandbox state
                # slightly different from what the agent saw.
                logger.warning("idempotent call %d/%d gave a different result when re-run on restore",
                               entry.step, entry.call)
        logger.info("trajectory %s/%s: restored from %s and re-ran %d idempotent calls", state.run_id,
                    state.traj_id, f"snapshot of step {base_step}" if base else "a fresh sandbox", len(rerun))
        return env
    raise Unrecoverable(state.run_id, state.traj_id, "no snapshot could be restored and no sandbox can be created")
