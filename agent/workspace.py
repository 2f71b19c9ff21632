"""What a run needs on disk before it starts: its code, a private TMPDIR, a run directory.

- Code: the deployment's `path`, or an immutable per-commit git checkout leased from storage for
  the run's whole life (so no running flow sees its code change under it).
- TMPDIR: `<state_dir>/runs/<id>/tmp`, 0700, owned by the flow's user, removed when the run ends.
- Run directory: `<runtime_dir>/runs/<id>`, 0700, the agent's: the wrapper (which runs as the
  agent's user; only the engine becomes the flow's `user`) records the exit status there. It
  lives on /run so it survives an agent restart but not a reboot (a reboot ends the run anyway).

Every directory on the way is the agent's and 0700. A flow running as another `user` must reach
its TMPDIR and its git checkout by name, so for such a run the directories between the state
directory and those two get search permission for others (0711: pass through, never list or
write); see docs/storage.md, "File modes".
"""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from uuid import UUID

from agent.gitstorage import remove_tree
from agent.launch.base import LaunchError
from agent.settings import DeploymentSettings, FlowRunSettings, Settings
from agent.storage import Checkout, Storage
from agent.values import format_duration, format_size

log = logging.getLogger("agent.workspace")

ENGINE_API_RETRIES = 7
ENGINE_MIN_HEARTBEAT = 30  # Prefect's own lower bound (settings.flows.heartbeat_frequency)
PRIVATE = 0o700
# Search (x) for group and others: reach a known name below, never list it or write it.
PASS_THROUGH = 0o011


def engine_environment(
    settings: Settings,
    flow_run: FlowRunSettings,
    *,
    flow_run_id: UUID,
    deployment_name: str,
    tmpdir: Path,
    control: tuple[int, str] | None = None,
) -> dict[str, str]:
    """The engine's environment, as Prefect's Runner gives it (runner/_starter_engine.py), on
    top of the run's own `env`. Secrets go here, never into argv.

    `control` is the loopback control channel's port and this run's token (control.py).
    """
    env = dict(flow_run.env)
    env["PREFECT__FLOW_RUN_ID"] = str(flow_run_id)
    env["PREFECT__DEPLOYMENT_NAME"] = deployment_name
    # No PREFECT__STORAGE_BASE_PATH (the Runner's, for its remote-storage copies): the code is
    # already in the working directory, and with it set Prefect 3.8 turns a git deployment's
    # null `path` into the directory "None" and the run crashes before the flow is loaded.
    # The agent runs on_cancellation (and the on_crashed hooks of crashes the engine cannot
    # report) itself, as Prefect's Runner does; see docs/runs.md.
    env["PREFECT__ENABLE_CANCELLATION_AND_CRASHED_HOOKS"] = "false"
    if control is not None:
        env["PREFECT__CONTROL_PORT"] = str(control[0])
        env["PREFECT__CONTROL_TOKEN"] = control[1]
    # The engine sends its own heartbeats, so they go on while the agent is stopped. Prefect
    # refuses (and the engine crashes on) a frequency under 30 s.
    env.setdefault(
        "PREFECT_FLOWS_HEARTBEAT_FREQUENCY",
        str(max(ENGINE_MIN_HEARTBEAT, round(settings.agent.heartbeat_interval))),
    )
    env["PREFECT_API_URL"] = settings.api.url
    if settings.api.key is not None:
        env["PREFECT_API_KEY"] = settings.api.key.get_secret_value()
    if settings.api.auth_string is not None:
        env["PREFECT_API_AUTH_STRING"] = settings.api.auth_string.get_secret_value()
    env["TMPDIR"] = str(tmpdir)
    # Runs of one commit share a checkout; keep bytecode out of it. Not PYTHONPYCACHEPREFIX:
    # that also hides the venv's compiled bytecode and doubles the engine's import time.
    env.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    # The engine's own API retries (2**n s each) last ~1 min by default; a run that ends during a
    # longer outage would exit 1 and be CRASHED although its body completed. 7 rides out ~4 min.
    env.setdefault("PREFECT_CLIENT_MAX_RETRIES", str(ENGINE_API_RETRIES))
    return env


def limits_text(flow_run: FlowRunSettings) -> str:
    cpu = f"{flow_run.cpu_quota}%" if flow_run.cpu_quota is not None else "none"
    tasks = str(flow_run.tasks_max) if flow_run.tasks_max is not None else "infinity"
    runtime = format_duration(flow_run.runtime_max) if flow_run.runtime_max else "infinity"
    return (
        f"MemoryMax={format_size(flow_run.memory_max)} CPUQuota={cpu} "
        f"TasksMax={tasks} RuntimeMaxSec={runtime}"
    )


@dataclass
class Workspace:
    flow_run_id: UUID
    working_dir: Path
    tmpdir: Path
    run_dir: Path
    checkout: Checkout | None = None
    fresh_code: bool = False  # working_dir is the run's own, removed with it


class Workspaces:
    def __init__(self, settings: Callable[[], Settings], storage: Storage) -> None:
        self._settings = settings
        self._storage = storage

    def tmpdir(self, flow_run_id: UUID) -> Path:
        return self._settings().agent.state_dir / "runs" / str(flow_run_id) / "tmp"

    def run_dir(self, flow_run_id: UUID) -> Path:
        return self._settings().agent.runtime_dir / "runs" / str(flow_run_id)

    def code_dir(self, flow_run_id: UUID) -> Path:
        return self._settings().agent.state_dir / "runs" / str(flow_run_id) / "code"

    async def prepare(
        self,
        flow_run_id: UUID,
        deployment: DeploymentSettings,
        flow_run: FlowRunSettings,
        note: Callable[[str, int], None],
        *,
        fresh_code: bool = False,
    ) -> Workspace:
        """Raises LaunchError (or StorageError, whose message is the run's crash reason).

        `fresh_code`: the run starts in an empty directory of its own, `runs/<id>/code`, where
        the engine runs the deployment's pull steps; it is removed with the run.
        """
        checkout = None
        if fresh_code:
            working_dir = self.code_dir(flow_run_id)
        elif deployment.git is not None:
            checkout = await self._storage.prepare(deployment.key, deployment.git)
            note(checkout.describe(), logging.INFO)
            if checkout.warning:
                note(checkout.warning, logging.WARNING)
            working_dir = checkout.path
        elif deployment.path is not None:
            working_dir = deployment.path
        else:  # settings guarantee one of them
            raise LaunchError(f"deployment {deployment.name!r} has no code source")
        try:
            owner = _owner(flow_run.user)
            agent = self._settings().agent
            tmpdir, run_dir = self.tmpdir(flow_run_id), self.run_dir(flow_run_id)
            private_dirs(agent.state_dir, tmpdir)
            private_dirs(agent.runtime_dir, run_dir)
            if fresh_code:
                private_dirs(agent.state_dir, working_dir)
            if owner is not None and owner[0] != os.geteuid():
                os.chown(tmpdir, *owner)
                if fresh_code:
                    os.chown(working_dir, *owner)
                allow_pass_through(agent.state_dir, tmpdir)
                allow_pass_through(agent.state_dir, working_dir)
        except BaseException:
            if checkout is not None:
                checkout.release()
            raise
        return Workspace(flow_run_id, working_dir, tmpdir, run_dir, checkout, fresh_code)

    def adopt(self, flow_run_id: UUID, working_dir: Path | None) -> Workspace:
        """The workspace of a run started by a previous agent process."""
        checkout = self._storage.adopt(working_dir) if working_dir is not None else None
        tmpdir = self.tmpdir(flow_run_id)
        try:
            # systemd resets the state directory to StateDirectoryMode= at every start: give a
            # run of another user its way to its TMPDIR and code back.
            if tmpdir.stat().st_uid != os.geteuid():
                state_dir = self._settings().agent.state_dir
                allow_pass_through(state_dir, tmpdir)
                if working_dir is not None:
                    allow_pass_through(state_dir, working_dir)
        except OSError as exc:
            if not isinstance(exc, FileNotFoundError):
                log.warning("cannot restore access to %s: %s", tmpdir, exc)
        return Workspace(
            flow_run_id,
            working_dir or Path("/"),
            tmpdir,
            self.run_dir(flow_run_id),
            checkout,
            fresh_code=working_dir == self.code_dir(flow_run_id),
        )

    async def finish(self, workspace: Workspace) -> None:
        """The run has ended: give its code back, remove its scratch space, collect garbage."""
        # A flow may leave read-only directories in its TMPDIR; remove_tree copes with them.
        await remove_tree(workspace.tmpdir)
        if workspace.fresh_code:
            await remove_tree(workspace.working_dir)
        shutil.rmtree(workspace.run_dir, ignore_errors=True)
        if workspace.checkout is not None:
            workspace.checkout.release()
            names = [d.key for d in self._settings().deployments]
            try:
                await self._storage.gc(deployments=names)
            except Exception as exc:
                log.warning("storage clean-up failed: %s", exc)


def private_dirs(top: Path, path: Path) -> None:
    """`path` and every directory from `top` down to it: created 0700 when missing, and reset to
    0700 when group or others may read or write it (a umask's 0755; the agent's own pass-through
    grant, 0711, has neither and stays)."""
    for directory in (*reversed(_between(top, path)), path):
        directory.mkdir(exist_ok=True, mode=PRIVATE)
        if directory.stat().st_mode & 0o066:
            directory.chmod(PRIVATE)


def allow_pass_through(top: Path, path: Path) -> None:
    """Let every user pass through (x only) each directory from `top` down to `path`'s parent,
    so that a flow running as another user reaches `path` by its name. Nothing outside `top`
    is touched."""
    for directory in _between(top, path):
        mode = stat.S_IMODE(directory.stat().st_mode)
        if mode & PASS_THROUGH != PASS_THROUGH:
            directory.chmod(mode | PASS_THROUGH)


def _between(top: Path, path: Path) -> list[Path]:
    """`path`'s parents from its own parent up to and including `top`; [] if not below `top`."""
    if not path.is_relative_to(top) or path == top:
        return []
    parents = []
    for parent in path.parents:
        parents.append(parent)
        if parent == top:
            break
    return parents


def _owner(user: str) -> tuple[int, int] | None:
    if not user:
        return None
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise LaunchError(f"unknown user {user!r} (flow_run.user)") from None
    return entry.pw_uid, entry.pw_gid
