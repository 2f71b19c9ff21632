"""E's half of a warm start: turn a process forked from the template into what `python -m
prefect.engine` started cold would be, then run the engine. Loaded by template.py (by path,
stdlib only, Python 3.9+); docs/warm-engine.md says why each reset is there and how the list
was found.
"""

# ruff: noqa: PTH100, PTH109, PTH111, PTH116, PTH118

from __future__ import annotations

import importlib
import os
import signal
import sys
import time
from collections.abc import Iterable, Mapping
from typing import Any

_PR_SET_DUMPABLE = 4


def turn_into_run(
    spec: dict[str, Any], handlers: Mapping[signal.Signals, Any], mask: Iterable[int]
) -> None:
    """Make this forked process what `python -m prefect.engine` started cold would be;
    `handlers` and `mask`: the signal dispositions and mask of the fresh interpreter."""
    for signum, handler in handlers.items():
        if handler is not None:
            signal.signal(signum, handler)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    user = spec.get("user")
    if user:
        os.setgroups(user["groups"])
        os.setresgid(user["gid"], user["gid"], user["gid"])
        os.setresuid(user["uid"], user["uid"], user["uid"])
        # A uid change without an exec leaves the process undumpable: /proc/<pid> owned by root,
        # no ptrace (py-spy, gdb), no core dumps. A cold engine, exec'd by setpriv, has all that.
        _prctl(_PR_SET_DUMPABLE, 1)
    os.umask(spec["umask"])
    os.chdir(spec["cwd"])
    os.environ.clear()
    os.environ.update(spec["env"])
    # The cold path's sh wrapper exports PWD (kept if it names the working directory).
    if not _same_dir(os.environ.get("PWD"), "."):
        os.environ["PWD"] = os.getcwd()
    # `python -m` puts the working directory first on sys.path (unless PYTHONSAFEPATH).
    if not getattr(sys.flags, "safe_path", False):
        sys.path.insert(0, os.getcwd())
    sys.argv[:] = [""]
    sys.dont_write_bytecode = bool(os.environ.get("PYTHONDONTWRITEBYTECODE"))
    sys.pycache_prefix = os.environ.get("PYTHONPYCACHEPREFIX") or None
    reset_import_time_state()
    # Prefect read its settings and configured logging at import, from the template's
    # environment. Profiles are located through the current global settings context, so it is
    # deleted first, then built again from the run's environment, as at import.
    context = importlib.import_module("prefect.context")
    configuration = importlib.import_module("prefect.logging.configuration")
    delattr(context, "GLOBAL_SETTINGS_CONTEXT")
    context.refresh_global_settings_context()
    configuration.PROCESS_LOGGING_CONFIG.clear()
    configuration.setup_logging()


def _prctl(option: int, value: int) -> None:
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0)


def reset_import_time_state() -> None:
    """What the template's imports computed from its environment, working directory or process,
    recomputed as the run's cold engine would have it (docs/warm-engine.md lists each)."""
    import logging
    import site
    import tempfile

    cwd = os.path.abspath(os.getcwd())
    time.tzset()
    tempfile.tempdir = None
    importlib.invalidate_caches()
    site.USER_BASE = None
    site.USER_SITE = None
    site.getusersitepackages()
    logging._startTime = time.time()  # type: ignore[attr-defined]
    home = os.path.join(os.path.expanduser("~"), ".prefect")
    for name in ("prefect.settings.constants", "prefect.settings.sources"):
        module: Any = sys.modules.get(name)
        if module is not None and hasattr(module, "DEFAULT_PREFECT_HOME"):
            module.DEFAULT_PREFECT_HOME = type(module.DEFAULT_PREFECT_HOME)(home)
    rich: Any = sys.modules.get("rich")
    if rich is not None and hasattr(rich, "_IMPORT_CWD"):
        rich._IMPORT_CWD = cwd
    process: Any = sys.modules.get("multiprocessing.process")
    if process is not None:
        process.ORIGINAL_DIR = cwd
        # Forks would share the template's key: one run could authenticate to another's manager.
        process.current_process().authkey = os.urandom(32)
    handlers: Any = sys.modules.get("wsgiref.handlers")
    if handlers is not None:
        handlers.BaseHandler.os_environ = handlers.read_environ()
    config: Any = sys.modules.get("fsspec.config")
    if config is not None:
        default = os.path.join(os.path.expanduser("~"), ".config/fsspec")
        config.default_conf_dir = default
        config.conf_dir = os.environ.get("FSSPEC_CONFIG_DIR", default)
        config.conf.clear()
        config.set_conf_files(config.conf_dir, config.conf)
        config.set_conf_env(config.conf)


def _same_dir(a: str | None, b: str) -> bool:
    if not a or not a.startswith("/"):
        return False
    try:
        return os.path.samestat(os.stat(a), os.stat(b))
    except OSError:
        return False


def run_engine() -> None:
    """`python -m prefect.engine`. A cold interpreter has no `prefect.engine` module while the
    engine runs as __main__ (a later import makes a second one); so neither has E."""
    import runpy

    sys.modules.pop("prefect.engine", None)
    package = sys.modules["prefect"]
    if "engine" in vars(package):
        delattr(package, "engine")
    runpy.run_module("prefect.engine", run_name="__main__", alter_sys=True)
