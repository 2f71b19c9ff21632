"""Process lifecycle of `runner-agent run`: event loop, signals, reload, the service stack.

The services are entered in an AsyncExitStack and torn down in exactly the reverse order:
API client (first in, last out), event emitter, flow-run log shipper, the engines' control
channel, then the runner and the watchdog in one TaskGroup. So the runner stops first, its last
messages are flushed while the client still lives, and the client closes last.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections.abc import Mapping
from contextlib import AsyncExitStack
from pathlib import Path

import uvloop

from agent import __version__
from agent.api import PrefectClient
from agent.cancellation import CANCELLING_EVENT, CancellationWatcher
from agent.control import ControlChannel
from agent.deployments import DeploymentRegistry
from agent.emitter import EventEmitter, with_backlog
from agent.failpoints import FailpointError, Failpoints
from agent.flowinfo import FlowInspector
from agent.flowlogs import FlowRunLogs
from agent.heartbeats import Heartbeats
from agent.launch.auto import select_launcher
from agent.launch.base import Launcher
from agent.launch.systemd import SystemdLauncher
from agent.logs import LogSetup, configure_logging
from agent.notify import Liveness, Notifier, run_watchdog
from agent.reporting import Reporter
from agent.runner import Runner
from agent.settings import ConfigError, FlowRunSettings, Settings, load_settings
from agent.storage import Storage
from agent.subscription import EventSubscription
from agent.warm.launcher import WarmLauncher
from agent.warm.memory import WARM_DIRECTORY
from agent.warm.pool import UNIT_PREFIX as WARM_UNIT_PREFIX
from agent.warm.pool import WarmPool

log = logging.getLogger("agent.daemon")

EX_OK = 0
EX_SOFTWARE = 70
EX_CONFIG = 78

SCHEDULED_EVENT = "prefect.flow-run.Scheduled"


class StartupError(Exception):
    """A host problem found before start (exit 78: restarting would not help)."""


def warm_pool(launcher: Launcher, settings: Settings) -> WarmPool:
    directory = settings.agent.runtime_dir / WARM_DIRECTORY
    if isinstance(launcher, SystemdLauncher):
        systemd = launcher
        return WarmPool(
            directory,
            prefix=systemd.template_prefix,
            extra_env=systemd.manager_env,
            # Templates die with the agent; a leftover scope (a crash of systemd-run) does not.
            before_first_start=lambda: systemd.stop_units(f"{WARM_UNIT_PREFIX}*.scope"),
        )
    return WarmPool(directory)


def warm_candidates(settings: Settings) -> list[FlowRunSettings]:
    return [d.flow_run_settings(settings.flow_run) for d in settings.deployments]


def secrets_of(settings: Settings) -> list[str]:
    values = []
    for secret in (settings.api.key, settings.api.auth_string):
        if secret is not None:
            values.append(secret.get_secret_value())
    return values


# One file system block of real bytes, fsynced: a disk with less room than a run record
# needs, a read-only mount or a quota fails here, at start, not at the first claim.
PROBE_SIZE = 4096


def prepare_directories(settings: Settings) -> None:
    """Create the state and runtime directories (0700) and prove they are writable."""
    for directory in (settings.agent.state_dir, settings.agent.runtime_dir):
        probe = directory / f".write-test-{os.getpid()}"
        try:
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, b"\0" * PROBE_SIZE)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise StartupError(
                f"{directory}: not a writable directory ({exc.strerror or exc})"
            ) from exc
        finally:
            with contextlib.suppress(OSError):
                probe.unlink()


def _credentials_dir(environ: Mapping[str, str]) -> Path | None:
    value = environ.get("CREDENTIALS_DIRECTORY")
    return Path(value) if value else None


def run(
    settings: Settings,
    *,
    config_path: Path | None,
    environ: Mapping[str, str],
    log_level: str = "info",
) -> int:
    log_setup = configure_logging(log_level, environ=environ)
    log_setup.set_secrets(secrets_of(settings))
    try:
        failpoints = Failpoints.from_environ(environ)
        prepare_directories(settings)
    except (FailpointError, StartupError) as exc:
        log.error("cannot start: %s", exc)
        return EX_CONFIG
    if failpoints:
        log.warning("failpoints armed (a test-only mechanism): %s", ", ".join(failpoints.actions))
    daemon = Daemon(
        settings,
        config_path=config_path,
        environ=environ,
        log_setup=log_setup,
        failpoints=failpoints,
    )
    return uvloop.run(daemon.main())


class Daemon:
    def __init__(
        self,
        settings: Settings,
        *,
        config_path: Path | None,
        environ: Mapping[str, str],
        log_setup: LogSetup,
        failpoints: Failpoints | None = None,
    ) -> None:
        self.settings = settings
        self.failpoints = failpoints if failpoints is not None else Failpoints()
        self.config_path = config_path
        self.environ = environ
        self.log_setup = log_setup
        self.notifier = Notifier(environ)
        self.liveness = Liveness()
        self._runner: Runner | None = None
        self._warm: WarmLauncher | None = None

    async def main(self) -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload)
        try:
            return await self._serve(stop)
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(signum)

    async def _serve(self, stop: asyncio.Event) -> int:
        settings = self.settings
        configured = select_launcher(
            settings.agent.launcher, slice=settings.agent.slice, is_root=os.geteuid() == 0
        )
        token = settings.api.key.get_secret_value() if settings.api.key else None
        async with AsyncExitStack() as stack:
            # Entered in this order, torn down in reverse: client last out.
            client = await stack.enter_async_context(PrefectClient(settings.api))
            emitter = await stack.enter_async_context(
                EventEmitter(
                    client.emit_events,
                    api_url=settings.api.url,
                    token=token,
                    headers=client.auth_headers(),
                )
            )
            flow_logs = await stack.enter_async_context(FlowRunLogs(client.create_logs))
            # Entered after the client, before the runs: it lives longer than they do.
            control = await stack.enter_async_context(ControlChannel())
            # Templates outlive the runner (they stop after it), and die with this process.
            pool = await stack.enter_async_context(warm_pool(configured, settings))
            launcher = self._warm = WarmLauncher(configured, pool)
            launcher.keep_warm(warm_candidates(settings))
            reporter = Reporter(client)
            # One Storage: the schema helper's lease on a checkout must be seen by the runs' gc.
            storage = Storage(
                settings.agent.state_dir,
                credentials_dir=_credentials_dir(self.environ),
                environ=self.environ,
            )
            flow_info = FlowInspector(
                # `runner` is bound below, before any sync can ask (reload swaps its settings).
                settings.agent.state_dir,
                storage,
                lambda: runner.settings.flow_run,
            )
            runner = Runner(
                settings,
                client=client,
                launcher=launcher,
                flow_logs=flow_logs,
                liveness=self.liveness,
                registry=DeploymentRegistry(client, settings.agent.state_dir, flow_info=flow_info),
                storage=storage,
                failpoints=self.failpoints,
                reporter=reporter,
                control=control,
            )
            self._runner = runner
            heartbeats = Heartbeats(
                emitter=emitter,
                settings=lambda: runner.settings,
                supervisors=lambda: runner.supervisors,
                flow_names=runner.flow_names,
                launcher_name=launcher.name,
                liveness=self.liveness,
                reporter=reporter,
            )
            runner.on_cancelled = heartbeats.emit_cancelled
            subscription = EventSubscription(
                settings.api.url,
                token=token,
                headers=client.auth_headers(),
                on_connection_change=lambda _up: watcher.connection_changed(),
            )
            watcher = CancellationWatcher(
                client=client,
                supervisors=lambda: runner.supervisors,
                poll_interval=lambda: runner.settings.agent.poll_interval,
                websocket_connected=lambda: subscription.connected,
                liveness=self.liveness,
            )
            subscription.subscribe(CANCELLING_EVENT, watcher.on_event)

            def api_back() -> None:
                emitter.retry_now()
                flow_logs.retry_now()

            runner.on_api_back = api_back
            runner.on_watched_changed = lambda ids: subscription.set_related(SCHEDULED_EVENT, ids)
            subscription.subscribe(SCHEDULED_EVENT, lambda _event: runner.wake())
            interval = self.notifier.watchdog_interval or min(
                settings.agent.heartbeat_interval, 30.0
            )
            async with asyncio.TaskGroup() as group:
                runner_task = group.create_task(runner.run(), name="runner")
                services = [
                    group.create_task(
                        run_watchdog(
                            self.notifier,
                            self.liveness,
                            interval=interval,
                            on_tick=heartbeats.agent_tick,
                            # What is queued for an unreachable API shows, and drops too.
                            status=lambda: with_backlog(runner.status_text(), emitter, flow_logs),
                        ),
                        name="watchdog",
                    ),
                    group.create_task(heartbeats.run(), name="heartbeats"),
                    group.create_task(watcher.run(), name="cancellation"),
                ]
                if settings.agent.events_websocket:
                    services.append(group.create_task(subscription.run(), name="subscription"))
                log.info(
                    "runner-agent %s started as %r on %s (launcher %s, limit %d, %d deployments)",
                    __version__,
                    settings.agent.name,
                    socket.gethostname(),
                    launcher.name,
                    settings.agent.limit,
                    len(settings.deployments),
                )
                self.notifier.status(runner.status_text())
                self.notifier.ready()
                await stop.wait()
                self.notifier.stopping()
                log.info("stopping; flow runs keep running in their own units")
                runner.stop()
                await runner_task
                for task in services:
                    task.cancel()
        return EX_OK

    def _reload(self) -> None:
        """SIGHUP: re-read the config; keep the old one when the new one is invalid."""
        self.notifier.reloading()
        try:
            new = load_settings(self.config_path, self.environ)
        except ConfigError as exc:
            log.error("reload failed, keeping the running config: %s", exc)
            self.notifier.ready()
            return
        restart_needed = [
            name
            for name, old_value, new_value in (
                ("api", self.settings.api, new.api),
                ("agent.state_dir", self.settings.agent.state_dir, new.agent.state_dir),
                ("agent.runtime_dir", self.settings.agent.runtime_dir, new.agent.runtime_dir),
                ("agent.launcher", self.settings.agent.launcher, new.agent.launcher),
                ("agent.slice", self.settings.agent.slice, new.agent.slice),
            )
            if old_value != new_value
        ]
        if restart_needed:
            log.warning(
                "reload: changes to %s take effect at the next restart", ", ".join(restart_needed)
            )
            # Keep what the running services were built from; apply everything else.
            old = self.settings.agent
            new = new.model_copy(
                update={
                    "api": self.settings.api,
                    "agent": new.agent.model_copy(
                        update={
                            "state_dir": old.state_dir,
                            "runtime_dir": old.runtime_dir,
                            "launcher": old.launcher,
                            "slice": old.slice,
                        }
                    ),
                }
            )
        self.log_setup.set_secrets(secrets_of(self.settings) + secrets_of(new))
        self.settings = new
        if self._runner is not None:
            self._runner.apply(new)
        if self._warm is not None:
            self._warm.keep_warm(warm_candidates(new))
        log.info("reloaded the config (%d deployments)", len(new.deployments))
        with contextlib.suppress(Exception):
            self.notifier.ready()
