"""The exit-status wrapper around the engine, its records, and the one privilege-drop argv.

Both launchers run the engine under the same tiny POSIX sh wrapper (WRAPPER), which records the
engine's pid in `<run_dir>/pid` as its first act and its exit status in `<run_dir>/exit-status`
before it exits with that same status, so a run's end can be told also by an agent process that
did not start it. See docs/launcher.md.

With a `user`, only the engine becomes that user (`privilege_drop`): the wrapper stays the
agent's, so the run directory and the records it writes there stay out of the flow's reach.
"""

from __future__ import annotations

import os
import pwd
from collections.abc import Sequence
from pathlib import Path

EXIT_RECORD = "exit-status"
PID_RECORD = "pid"
OUTPUT_LOG = "output.log"
SETPRIV = "/usr/bin/setpriv"
WRAPPER_NAME = "runner-agent-run"  # the wrapper's $0; recovery recognises a run's wrapper by it

# $1 is the run directory, the rest the engine's argv. The engine runs in the foreground: a
# trapped TERM/INT (a *handled* disposition, reset to default in the exec'd engine; an ignored one
# would be inherited) is deferred until the foreground child ends, so a SIGTERM aimed at the whole
# run still lets the wrapper record the child's status. Both records are atomic (temp + mv) and
# 0600; the umask is set in a subshell so that the engine keeps the one it was given.
WRAPPER = """\
dir=$1; shift
(umask 077; printf '%s\\n' "$$" >"$dir/.pid.$$") && mv -f "$dir/.pid.$$" "$dir/pid"
trap 'true' TERM INT
"$@"
status=$?
(umask 077; printf '%s\\n' "$status" >"$dir/.exit-status.$$") &&
    mv -f "$dir/.exit-status.$$" "$dir/exit-status"
exit "$status"
"""


def wrapped_command(
    run_dir: Path, engine: Sequence[str], *, privilege_drop: Sequence[str] = ()
) -> list[str]:
    """`sh -c WRAPPER runner-agent-run <run_dir> [setpriv ...] <engine argv>`."""
    return ["/bin/sh", "-c", WRAPPER, WRAPPER_NAME, str(run_dir), *privilege_drop, *engine]


def privilege_drop(entry: pwd.struct_passwd) -> list[str]:
    """setpriv's argv prefix that becomes `entry`'s user: uid, gid and exactly its groups (real,
    effective and saved alike). Numeric ids: nothing is looked up again at exec time."""
    uid, gid, groups = user_ids(entry)
    supplementary = f"--groups={','.join(str(g) for g in groups)}" if groups else "--clear-groups"
    return [SETPRIV, f"--reuid={uid}", f"--regid={gid}", supplementary, "--"]


def user_ids(entry: pwd.struct_passwd) -> tuple[int, int, list[int]]:
    """uid, gid and exactly the user's groups: what a run's engine becomes (cold or warm)."""
    return entry.pw_uid, entry.pw_gid, sorted(set(os.getgrouplist(entry.pw_name, entry.pw_gid)))


def read_exit_record(run_dir: Path) -> int | None:
    """The status the wrapper recorded, or None (still running, killed, or never started)."""
    return _read_int(run_dir / EXIT_RECORD)


def read_pid_record(run_dir: Path) -> int | None:
    return _read_int(run_dir / PID_RECORD)


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
