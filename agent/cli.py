"""The `runner-agent` command line: global options, sub-commands, exit statuses.

Sub-commands are rows of a small table (`commands()`); a new one is a handler function plus a
row. Every config problem ends the same way: exit status 78 (EX_CONFIG, which the unit's
RestartPreventExitStatus= knows) and exactly one line on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO
from uuid import UUID

from agent import __version__, status
from agent.config_sources import one_line
from agent.settings import ConfigError, Settings, load_settings
from agent.warm.memory import collect_templates

EX_OK = 0
EX_USAGE = 2
EX_CONFIG = 78
LOG_LEVELS = ("debug", "info", "warning", "error")
PROG = "runner-agent"


@dataclass(frozen=True)
class Context:
    """What a sub-command handler gets: its arguments and the process's surroundings."""

    args: argparse.Namespace
    config_path: Path | None
    log_level: str
    environ: Mapping[str, str]
    stdout: TextIO
    stderr: TextIO

    def load_settings(self) -> Settings:
        return load_settings(self.config_path, self.environ)

    def error(self, message: str) -> None:
        print(f"{PROG}: {message}", file=self.stderr)


def _no_arguments(parser: argparse.ArgumentParser) -> None:
    del parser


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    handler: Callable[[Context], int]
    arguments: Callable[[argparse.ArgumentParser], None] = _no_arguments


# -- sub-commands ------------------------------------------------------------------------------


def run_command(ctx: Context) -> int:
    settings = ctx.load_settings()
    from agent import daemon  # lazily: the daemon pulls in everything else

    return daemon.run(
        settings, config_path=ctx.config_path, environ=ctx.environ, log_level=ctx.log_level
    )


def check_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--online",
        action="store_true",
        help="also check that the API answers GET /health and accepts the credentials",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of TOML")


def check_config_command(ctx: Context) -> int:
    settings = ctx.load_settings()
    ctx.stdout.write(render_json(settings) if ctx.args.json else render_toml(settings))
    ctx.stdout.flush()
    if ctx.args.online:
        problem = asyncio.run(check_online(settings))
        if problem is not None:
            ctx.error(problem)
            return EX_CONFIG
        ctx.error(f"{settings.api.url}: the API is healthy and accepted the credentials")
    return EX_OK


def version_command(ctx: Context) -> int:
    print(f"{PROG} {__version__}", file=ctx.stdout)
    print(f"Python {platform.python_version()} ({sys.executable})", file=ctx.stdout)
    return EX_OK


def status_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")


def status_command(ctx: Context) -> int:
    settings = ctx.load_settings()
    runs = status.collect(settings)
    templates = collect_templates(settings.agent.runtime_dir)
    if ctx.args.json:
        ctx.stdout.write(status.render_json(runs, templates))
    else:
        ctx.stdout.write(status.render_table(runs) + status.render_templates(templates))
    ctx.stdout.flush()
    return EX_OK


def logs_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("flow_run_id", help="the flow run's id")
    parser.add_argument("-f", "--follow", action="store_true", help="keep printing new output")


def logs_command(ctx: Context) -> int:
    try:
        flow_run_id = UUID(ctx.args.flow_run_id)
    except ValueError:
        ctx.error(f"not a flow run id: {ctx.args.flow_run_id!r}")
        return EX_USAGE
    journalctl = shutil.which("journalctl", path=ctx.environ.get("PATH"))
    if journalctl is not None:
        argv = status.journal_argv(journalctl, flow_run_id, follow=ctx.args.follow)
        return status.stream(argv, ctx.stdout)
    # Without systemd, the process launcher keeps the output in the run directory.
    path = status.output_log(ctx.load_settings(), flow_run_id)
    return status.print_file(path, ctx.stdout, ctx.error, follow=ctx.args.follow)


def commands() -> tuple[Command, ...]:
    """The sub-command table. `status` and `logs` are added here as rows, like the others."""
    return (
        Command("run", "run the agent (what the systemd unit starts)", run_command),
        Command(
            "check-config",
            "print the effective merged config, secrets redacted; exit 0 or 78",
            check_config_command,
            check_config_arguments,
        ),
        Command("version", "print the version", version_command),
        Command(
            "status",
            "show this host's flow runs: phase, age, memory, CPU, limits",
            status_command,
            status_arguments,
        ),
        Command(
            "logs",
            "show a flow run's output from the journal (also after it ended)",
            logs_command,
            logs_arguments,
        ),
    )


# -- the online check --------------------------------------------------------------------------


async def check_online(settings: Settings) -> str | None:
    """None when the API is healthy and takes our credentials, else the problem in one line."""
    from agent import api

    url = settings.api.url
    try:
        async with api.PrefectClient(settings.api, max_attempts=2) as client:
            await client.health()
            # GET /health needs no credentials, so read something that does.
            await client.filter_deployments({"limit": 1})
    except api.CredentialsRefused as exc:
        message = f"credentials were refused: {exc}"
    except api.PrefectApiError as exc:
        message = str(exc)
    else:
        return None
    return message if url in message else f"{url}: {message}"


# -- rendering the effective config ------------------------------------------------------------


def render_toml(settings: Settings) -> str:
    data = settings.redacted()
    sources = ", ".join(settings.sources) or "none (built-in defaults)"
    lines = [
        "# The effective runner-agent config; secrets are redacted.",
        f"# Files read: {one_line(sources)}",  # a path may hold a line break: keep it a comment
    ]
    for section in ("api", "agent", "flow_run"):
        lines += ["", f"[{section}]"]
        for key, value in data[section].items():
            line = f"{_toml_key(key)} = {_toml_value(value)}"
            origin = settings.secret_sources.get(f"{section}.{key}")
            lines.append(f"{line}  # from {one_line(origin)}" if origin else line)
    for table in ("deployment", "work_pool"):
        for item in data[table]:
            lines += ["", f"[[{table}]]"]
            lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in item.items()]
    return "\n".join(lines) + "\n"


def render_json(settings: Settings) -> str:
    document = {
        "config": settings.redacted(),
        "sources": list(settings.sources),
        "secret_sources": dict(settings.secret_sources),
    }
    return json.dumps(document, indent=2, default=str) + "\n"


def _toml_key(key: str) -> str:
    bare = key and all(c.isascii() and (c.isalnum() or c in "_-") for c in key)
    return key if bare else _toml_string(key)


def _toml_string(text: str) -> str:
    # JSON's escapes are TOML's, but TOML also wants DEL escaped, and takes no surrogate pairs
    # (so no ensure_ascii, which writes an emoji as two).
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        items = ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items())
        return "{ " + items + " }" if items else "{}"
    return _toml_string(str(value))


# -- argument parsing --------------------------------------------------------------------------


def _global_options(parser: argparse.ArgumentParser, default: Any) -> None:
    parser.add_argument(
        "--config",
        metavar="PATH",
        type=Path,
        default=default,
        help="the main config file (default: $RUNNER_AGENT_CONFIG or /etc/runner-agent/agent.toml)",
    )
    parser.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        type=str.lower,
        default=default,
        help="log level (default: $RUNNER_AGENT_LOG_LEVEL or info)",
    )


def build_parser(table: Sequence[Command]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Runs Prefect flow runs as transient systemd scopes."
    )
    _global_options(parser, None)
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in table:
        child = sub.add_parser(command.name, help=command.help, description=command.help)
        # Also after the sub-command (`check-config --config %s` for Ansible's validate:);
        # SUPPRESS keeps a value given before the sub-command when none is given after it.
        _global_options(child, argparse.SUPPRESS)
        command.arguments(child)
        child.set_defaults(handler=command.handler)
    return parser


def main(
    argv: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    environ = os.environ if environ is None else environ
    args = build_parser(commands()).parse_args(argv)
    ctx = Context(
        args=args,
        config_path=args.config,
        log_level=args.log_level or "",
        environ=environ,
        stdout=stdout or sys.stdout,
        stderr=stderr or sys.stderr,
    )
    if not args.log_level:
        level = environ.get("RUNNER_AGENT_LOG_LEVEL", "").strip().lower() or "info"
        if level not in LOG_LEVELS:
            ctx.error(
                f"environment (RUNNER_AGENT_LOG_LEVEL): must be one of {', '.join(LOG_LEVELS)}, "
                f"got {level!r}"
            )
            return EX_CONFIG
        ctx = Context(args, args.config, level, environ, ctx.stdout, ctx.stderr)
    handler: Callable[[Context], int] = args.handler
    try:
        return handler(ctx)
    except ConfigError as exc:
        ctx.error(str(exc))
        return EX_CONFIG
