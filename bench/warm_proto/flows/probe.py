"""A flow that writes what its process looks like to $PROBE_OUT (JSON), for cold/warm diffs."""

# ruff: noqa: PTH109, PTH115, PTH208, SIM115

import json
import logging
import os
import random
import signal
import sys
import tempfile
import threading
import time

from prefect import flow, get_run_logger

IMPORTED_BY = os.getpid()  # the user's module must be imported by the run's own process


def _handler_name(handler: object) -> str:
    if handler in (signal.SIG_DFL, signal.SIG_IGN) or handler is None:
        return str(handler)
    return getattr(handler, "__qualname__", repr(handler))


def _sockets() -> dict[str, str]:
    """socket inode -> kind and remote port (tcp) or path (unix)."""
    kinds: dict[str, str] = {}
    for name in ("tcp", "tcp6"):
        try:
            lines = open(f"/proc/net/{name}").read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            kinds[f[9]] = f"{name}->{int(f[2].split(':')[1], 16)} state {f[3]}"
    for line in open("/proc/net/unix").read().splitlines()[1:]:
        f = line.split()
        kinds[f[6]] = "unix " + (f[7] if len(f) > 7 else "")
    return kinds


def _fds() -> dict[str, str]:
    out = {}
    sockets = _sockets()
    for fd in sorted(os.listdir("/proc/self/fd"), key=int):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:"):
            inode = target[len("socket:[") : -1]
            kind = sockets.get(inode, "?")
            out[fd] = f"socket {kind.split('->')[0]} {kind.partition(' state ')[2]}"
        elif target.startswith(("pipe:", "anon_inode:")):
            out[fd] = target.split(":")[0]
        else:
            out[fd] = target
    return out


def _status(keys: tuple[str, ...]) -> dict[str, str]:
    found = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in keys:
                found[name] = value.strip()
    return found


def _loggers() -> dict[str, object]:
    names = [
        "",
        "prefect",
        "prefect.flow_runs",
        "prefect.task_runs",
        "prefect.engine",
        "prefect.extra",
        "prefect.client",
        "prefect.events",
        "uvicorn",
        "httpx",
    ]
    out: dict[str, object] = {}
    for name in names:
        lg = logging.getLogger(name)
        out[name or "root"] = {
            "level": lg.level,
            "effective": lg.getEffectiveLevel(),
            "propagate": lg.propagate,
            "disabled": lg.disabled,
            "handlers": sorted(
                f"{type(h).__name__}:{h.level}:{type(h.formatter).__name__}" for h in lg.handlers
            ),
        }
    return out


def _import_time_state() -> dict[str, object]:
    """What import_caches.py found the imports compute from the environment or per process."""
    import hashlib
    import multiprocessing.process
    import site
    import wsgiref.handlers

    import fsspec.config
    import prefect.settings.sources
    import rich

    return {
        "DEFAULT_PREFECT_HOME": str(prefect.settings.sources.DEFAULT_PREFECT_HOME),
        "rich_import_cwd": rich._IMPORT_CWD,
        "mp_original_dir": multiprocessing.process.ORIGINAL_DIR,
        "mp_authkey_sha": hashlib.sha256(
            bytes(multiprocessing.process.current_process().authkey)
        ).hexdigest()[:12],
        "logging_start_age_lt_60s": time.time() - logging._startTime < 60,
        "fsspec_conf_dir": fsspec.config.conf_dir,
        "fsspec_conf": fsspec.config.conf,
        "user_site": site.getusersitepackages(),
        "wsgiref_environ_is_run_env": wsgiref.handlers.BaseHandler.os_environ == dict(os.environ),
    }


@flow
def probe() -> None:
    import prefect
    from prefect.context import get_run_context, get_settings_context
    from prefect.settings import get_current_settings

    get_run_logger().info("probe says hello")
    settings = get_current_settings()
    umask = os.umask(0)
    os.umask(umask)
    parent = os.getppid()
    with open(f"/proc/{parent}/comm") as f:
        parent_comm = f.read().strip()
    client = prefect.get_client(sync_client=True)
    data = {
        "pid_is_importer": os.getpid() == IMPORTED_BY,
        "environ": dict(sorted(os.environ.items())),
        "cwd": os.getcwd(),
        "sys.path": sys.path,
        "sys.argv": sys.argv,
        "main_file": getattr(sys.modules["__main__"], "__file__", None),
        "dont_write_bytecode": sys.dont_write_bytecode,
        "pycache_prefix": sys.pycache_prefix,
        "executable": sys.executable,
        "flags": str(sys.flags),
        "resuid": os.getresuid(),
        "resgid": os.getresgid(),
        "groups": sorted(os.getgroups()),
        "umask": umask,
        "tempdir": tempfile.gettempdir(),
        "tzname": time.tzname,
        "timezone": time.timezone,
        "signals": {
            s.name: _handler_name(signal.getsignal(s))
            for s in signal.valid_signals()
            if isinstance(s, signal.Signals)
        },
        "sigmask": sorted(str(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, [])),
        "threads": sorted(t.name.split("-")[0] for t in threading.enumerate()),
        "fds": _fds(),
        "session_leader_is_parent": os.getsid(0) == parent,
        "pgrp_is_sid": os.getpgrp() == os.getsid(0),
        "parent_comm": parent_comm,
        "status": _status(("CapEff", "CapPrm", "NoNewPrivs", "Seccomp")),
        "cgroup": open("/proc/self/cgroup").read(),
        "nice": os.nice(0),
        "settings": {
            "api.url": settings.api.url,
            "home": str(settings.home),
            "logging.level": str(settings.logging.level),
            "client.max_retries": settings.client.max_retries,
            "profile": get_settings_context().profile.name,
            "tasks.default_retries": settings.tasks.default_retries,
        },
        "client_base_url": str(client._client.base_url),
        "flow_run_id": str(get_run_context().flow_run.id),
        "loggers": _loggers(),
        "stdout": [sys.stdout.isatty(), sys.stdout.line_buffering, sys.stdout.encoding],
        "stdin": sys.stdin.name,
        "fsencoding": sys.getfilesystemencoding(),
        "import_time_state": _import_time_state(),
        "random": random.random(),
        "hash": hash("runner-agent"),
    }
    with open(os.environ["PROBE_OUT"], "w") as f:
        json.dump(data, f, indent=1, sort_keys=True, default=str)
