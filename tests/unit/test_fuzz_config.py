"""Fuzzing the config loader through `runner-agent check-config` (issue 9, item 4: bad input).

Each example starts from a valid config and changes some keys, each with a value known to be
valid or known to be invalid by construction (the oracle below is written from the config
reference, not from the loader), in the main file, a drop-in or a `RUNNER_AGENT_*` variable; or
it breaks a file as a whole (invalid TOML, not UTF-8, a directory, a FIFO, a symlink loop...).
`agent.cli.main` then runs in-process, and a few cases run as real processes too.

Every invalid config must exit exactly 78 with exactly one line on stderr that names the source
(the file or the variable) and the key, and shows no secret; every valid one exits 0 with a
TOML rendering that loads again to the same settings.
"""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import agent
from agent.cli import EX_CONFIG, main
from agent.deployments import deployment_body
from agent.settings import ConfigError, Settings, load_settings

REPO = Path(__file__).resolve().parents[2]
SECRET = "pnu_config-fuzz-secret-9d8e7f"
LEAKY = "pnu_leaked-through-an-error"
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

BASE: dict[str, Any] = {
    "agent": {"name": "fuzz-host", "limit": 2},
    "flow_run": {"memory_max": "1G"},
    "deployment": [{"name": "hello", "entrypoint": "flow.py:hello", "path": "/srv/flows"}],
}


# -- TOML and environment rendering ----------------------------------------------------------------


def toml_string(text: str) -> str:
    """A TOML basic string: every control character escaped, everything else literal."""
    out = []
    for char in text:
        if char in '"\\':
            out.append("\\" + char)
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04X}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        items = ", ".join(f"{toml_string(k)} = {toml_value(v)}" for k, v in value.items())
        return "{" + items + "}"
    return toml_string(value)


def toml_document(config: dict[str, Any]) -> str:
    lines = []
    for section, items in config.items():
        if section == "deployment":
            continue
        lines.append(f"[{toml_string(section)}]")
        lines += [f"{toml_string(k)} = {toml_value(v)}" for k, v in items.items()]
    for deployment in config.get("deployment", []):
        lines.append("[[deployment]]")
        lines += [f"{toml_string(k)} = {toml_value(v)}" for k, v in deployment.items()]
    return "\n".join(lines) + "\n"


# -- the oracle: per key, values that are valid and values that are not ----------------------------

NAMES = st.text(st.characters(categories=["L", "N"]), min_size=1, max_size=20)
# Any text but NUL, which no path, argv, environment or Postgres text column takes.
TEXT = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=20)
HUGE_NAME = st.integers(1, 3).map(lambda n: "\u00e9" * (n * 100_000))
DURATIONS = st.sampled_from(["30s", "1h30m", "5m", "1d", "250ms", "90", 45, 0.5, "2w"])
BAD_DURATIONS = st.sampled_from(
    [
        -1,
        "-5s",
        "abc",
        "",
        "5 minutes",
        "1e3s",
        True,
        [],
        {},
        math.nan,
        math.inf,
        "9" * 400 + "s",
        "9" * 400,
        "30 s s",
        "s",
    ]
)
SIZES = st.sampled_from(["512M", "2G", "1.5G", 1_048_576, "infinity", "64K", "1T"])
BAD_SIZES = st.sampled_from(["0", 0, -5, "2X", "1.5", True, "", "lots", [], 1.5, "-1G"])
PATHS = st.sampled_from(["/srv/flows", "/", "/var/lib/x y", "/\u00e9t\u00e9/\u2603"])
INT64 = st.integers(-(2**63), 2**63 - 1)  # TOML's integers
BAD_PATHS = st.sampled_from(["relative/dir", "", 5, "~/x", "/a\x00b", [], "./x"])


@dataclass(frozen=True)
class Key:
    """A config key: where it lives (`section.key` or `deployment.key`) and its value sets."""

    name: str
    valid: st.SearchStrategy[Any]
    invalid: st.SearchStrategy[Any]
    env: bool = True  # also settable as RUNNER_AGENT_<SECTION>__<KEY> (as text)

    @property
    def section(self) -> str:
        return self.name.split(".")[0]

    @property
    def key(self) -> str:
        return self.name.split(".", 1)[1]


def keys() -> list[Key]:
    deployment_limits = [
        Key("deployment.memory_max", SIZES, BAD_SIZES),
        Key(
            "deployment.cpu_quota",
            st.sampled_from(["50%", "infinity", "400%"]),
            st.sampled_from(["0%", 50, "50", "x%", "-5%"]),
        ),
        Key(
            "deployment.runtime_max",
            st.sampled_from(["6h", "infinity", 3600]),
            st.sampled_from(["0s", "-1h", "forever", 0]),
        ),
    ]
    return [
        Key(
            "api.url",
            st.sampled_from(["http://127.0.0.1:4200/api", "https://p.example/api/"]),
            st.sampled_from(
                [
                    "ftp://x/api",
                    "prefect.local",
                    "",
                    5,
                    f"http://user:{LEAKY}@h/api",
                    f"ftp://u:{LEAKY}@h:99999/api",
                    "http://h:99999/api",
                ]
            ),
        ),
        Key("api.timeout", DURATIONS, BAD_DURATIONS | st.sampled_from([0, "0s"])),
        Key(
            "api.key",
            st.sampled_from([SECRET]),
            st.sampled_from(["", "   ", 5, [LEAKY], {"k": LEAKY}, LEAKY + "\x00"]),
        ),
        Key(
            "agent.name",
            NAMES | HUGE_NAME,
            st.sampled_from(["", " ", "a/b", "x\ty", ".", "..", 5, "<b>", "a\x00b", "a\x85b"]),
        ),
        Key(
            "agent.limit",
            st.integers(1, 10**6) | st.sampled_from(["5", " 7 "]),
            st.sampled_from([0, -1, "0", "x", 1.5, True, [], "5.0", "9" * 5000]),
        ),
        Key("agent.poll_interval", DURATIONS, BAD_DURATIONS | st.sampled_from([0, "0s"])),
        Key("agent.prefetch", DURATIONS | st.sampled_from([0, "0s"]), BAD_DURATIONS),
        Key("agent.cancel_grace", DURATIONS, BAD_DURATIONS),
        Key(
            "agent.launcher",
            st.sampled_from(["auto", "systemd", "process"]),
            st.sampled_from(["docker", "", 1, "AUTO"]),
        ),
        Key(
            "agent.slice",
            st.sampled_from(["x.slice", "runner-agent-flows.slice", "a\\x2db.slice"]),
            st.sampled_from(["x", "a b.slice", "", ".slice", 5]),
        ),
        Key("agent.state_dir", PATHS, BAD_PATHS),
        Key(
            "agent.events_websocket",
            st.sampled_from([True, False]),
            st.sampled_from([2, "maybe", [], 1.5]),
        ),
        Key(
            "flow_run.python",
            st.sampled_from(["/usr/bin/python3", "python3"]),
            st.sampled_from(["", 5, "/usr/bin/py\x00thon"]),
        ),
        Key("flow_run.memory_max", SIZES, BAD_SIZES),
        Key(
            "flow_run.cpu_quota",
            st.sampled_from(["50%", "200%", "infinity"]),
            st.sampled_from(["0%", 50, "50", "x%", "-5%", ""]),
        ),
        Key(
            "flow_run.tasks_max",
            st.sampled_from([1, 512, "infinity", "64"]),
            st.sampled_from([0, "many", -1, 1.5, True]),
        ),
        Key(
            "flow_run.runtime_max",
            st.sampled_from(["6h", "infinity", 3600, "1d12h"]),
            st.sampled_from(["0s", "-1h", "forever", 0, math.inf]),
        ),
        Key(
            "flow_run.user",
            st.sampled_from(["", "nobody", "svc-1", "a$"]),
            st.sampled_from(["a b", "root:x", "-x", 5]),
        ),
        Key(
            "flow_run.env",
            st.dictionaries(
                st.from_regex(r"[A-Z_][A-Z0-9_]{0,8}", fullmatch=True), TEXT, max_size=3
            ),
            st.sampled_from([{"1A": "x"}, {"A": 1}, "A=x", {"A-B": "x"}, {"A": "x\x00"}]),
        ),
        Key("deployment.name", NAMES, st.sampled_from(["a/b", "", "..", 5, "x%y"]), env=False),
        Key(
            "deployment.entrypoint",
            st.sampled_from(["flow.py:hello", "a/b.py:f_1"]),
            st.sampled_from(["flow.py", "flow:main", 5, "x.py:1f", ""]),
            env=False,
        ),
        Key("deployment.path", PATHS, BAD_PATHS, env=False),
        Key(
            "deployment.description", TEXT | HUGE_NAME, st.sampled_from([5, [], "a\x00"]), env=False
        ),
        Key(
            "deployment.tags",
            st.lists(NAMES, max_size=3),
            st.sampled_from(["a", [1], [["x"]]]),
            env=False,
        ),
        Key(
            "deployment.parameters",
            st.dictionaries(
                NAMES,
                INT64
                | TEXT
                | st.booleans()
                | st.just(date(1979, 5, 27))
                | st.lists(INT64, max_size=2),
                max_size=3,
            ),
            st.sampled_from(
                ["x", 5, {"x": math.nan}, {"y": [math.inf]}, {"z": 2**64}, {"n\x00": 1}]
            ),
            env=False,
        ),
        Key(
            "deployment.schedule",
            st.sampled_from(
                [
                    {"cron": "*/5 * * * *", "timezone": "Europe/Berlin"},
                    {"interval": "10m"},
                    {"cron": "0 1 * * *"},
                    {"interval": 30},
                ]
            ),
            st.sampled_from(
                [
                    {"cron": "61 * * * *"},
                    {"cron": "* * *"},
                    {"interval": "0s"},
                    {},
                    {"cron": "* * * * *", "timezone": "Mars/Olympus"},
                    {"cron": "* * * * *", "interval": "1m"},
                    "hourly",
                    {"interval": "x"},
                    {"cron": "* * * * *", "extra": 1},
                    {"interval": "9" * 400 + "s"},
                ]
            ),
            env=False,
        ),
        *[dataclass_replace(k, env=False) for k in deployment_limits],
    ]


def dataclass_replace(key: Key, **changes: Any) -> Key:
    import dataclasses

    return dataclasses.replace(key, **changes)


KEYS = keys()
UNKNOWN = [("api", "bogus"), ("agent", "limits"), ("flow_run", "memory"), ("deployment", "pth")]


def env_text(value: Any) -> str | None:
    """The variable's text for a value, or None when the environment cannot say it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        try:
            return json.dumps(value, allow_nan=False)
        except (TypeError, ValueError):
            return None
    if isinstance(value, int | float) and math.isfinite(value):
        return str(value)
    if isinstance(value, str) and "\x00" not in value:
        return value
    return None


# -- one example -----------------------------------------------------------------------------------


@dataclass
class Case:
    """The files and variables of one example, and what must come of them."""

    main: dict[str, Any] = field(default_factory=lambda: json.loads(json.dumps(BASE)))
    dropin: dict[str, Any] | None = None
    environ: dict[str, str] = field(default_factory=dict)
    breakage: str = ""  # a whole-file fault of the main file
    problem: tuple[str, str] | None = None  # (source: "main" | "dropin" | VAR, key)
    dirname: str = "conf"

    def set(self, where: str, key: Key | tuple[str, str], value: Any) -> None:
        section, name = (key.section, key.key) if isinstance(key, Key) else key
        if where in ("main", "dropin"):
            document = self.main if where == "main" else self.dropin
            assert document is not None
            if section == "deployment":
                deployments = document.setdefault("deployment", [])
                if not deployments:
                    deployments.append(
                        {"name": "hello", "entrypoint": "flow.py:hello", "path": "/srv/flows"}
                    )
                deployments[0][name] = value
            else:
                document.setdefault(section, {})[name] = value
        else:
            self.environ[where] = value


@st.composite
def cases(draw: st.DrawFn) -> Case:
    case = Case(
        dirname=draw(
            st.sampled_from(
                ["conf", "c\u00f6nf", "a b", "line\rbreak", "nel\x85x", "sep\u2028x", "tab\tx"]
            )
        )
    )
    if draw(st.booleans()):
        case.dropin = {}
    chosen = draw(st.lists(st.sampled_from(KEYS), unique_by=lambda k: k.name, max_size=5))
    invalid_at = draw(st.sampled_from([None, *range(len(chosen))])) if chosen else None
    for index, key in enumerate(chosen):
        bad = index == invalid_at
        value = draw(key.invalid if bad else key.valid)
        # A [[deployment]] of the same name in a drop-in replaces the main file's whole.
        wheres = ["main"] + (
            ["dropin"] if case.dropin is not None and key.section != "deployment" else []
        )
        text = env_text(value)
        # The environment only says text: a wrong type there is just other text.
        if key.env and text is not None and (isinstance(value, str) or not bad):
            wheres.append(f"RUNNER_AGENT_{key.section.upper()}__{key.key.upper()}")
        where = draw(st.sampled_from(wheres))
        case.set(where, key, text if where.startswith("RUNNER_AGENT_") else value)
        if bad:
            case.problem = (where, key.name)
    if case.problem is None:
        faults = [None, None, "unknown key", "unknown variable", "breakage", "log level"]
        if all(key.name != "api.key" for key in chosen):  # a key beats its key_file
            faults.append("secret file")
        fault = draw(st.sampled_from(faults))
        if fault == "unknown key":
            section, name = draw(st.sampled_from(UNKNOWN))
            where = draw(
                st.sampled_from(
                    ["main"]
                    + (["dropin"] if case.dropin is not None and section != "deployment" else [])
                )
            )
            case.set(where, (section, name), 1)
            case.problem = (where, f"{section}.{name}")
        elif fault == "unknown variable":
            name = draw(
                st.sampled_from(
                    [
                        "RUNNER_AGENT_NOPE__X",
                        "RUNNER_AGENT_AGENT__NOPE",
                        "RUNNER_AGENT_AGENT__LIMIT__X",
                        "RUNNER_AGENT_FLOW_RUN__ENV__1A",
                    ]
                )
            )
            case.environ[name] = "1"
            case.problem = (name, "")
        elif fault == "breakage":
            case.breakage = draw(st.sampled_from(sorted(BREAKAGES)))
            case.problem = ("main", "")
        elif fault == "log level":
            case.environ["RUNNER_AGENT_LOG_LEVEL"] = draw(st.sampled_from(["loud", "0", "trace"]))
            case.problem = ("RUNNER_AGENT_LOG_LEVEL", "")
        elif fault == "secret file":
            case.breakage = draw(st.sampled_from(sorted(SECRET_FILES)))
            case.problem = ("main", "api.key_file")
    elif draw(st.booleans()):
        level = draw(st.sampled_from(["debug", "INFO", " warning"]))
        case.environ["RUNNER_AGENT_LOG_LEVEL"] = level
    return case


def _break_directory(path: Path) -> None:
    path.mkdir()


def _break_fifo(path: Path) -> None:
    os.mkfifo(path, 0o600)


def _break_loop(path: Path) -> None:
    path.symlink_to(path)


BREAKAGES: dict[str, Callable[[Path], None] | bytes] = {
    "invalid TOML": b"[agent\nlimit = 1\n",
    "not UTF-8": b'[agent]\nname = "\xff\xfe"\n',
    "a NUL byte": b'[agent]\nname = "a\x00"\n',
    "nested too deeply": b"x = " + b"[" * 5000 + b"]" * 5000 + b"\n",
    "inline tables nested too deeply": b"x = " + b"{a = " * 3000 + b"1" + b"}" * 3000 + b"\n",
    "dotted key too long": b"a." * 5000 + b"b = 1\n",
    "a 5000-digit number": b"[agent]\nlimit = " + b"9" * 5000 + b"\n",
    "a 5000-digit hex number": b"[agent]\nlimit = 0x" + b"f" * 5000 + b"\n",
    "a 65-bit number": b"[agent]\nlimit = 18446744073709551616\n",
    "duplicate table": b"[agent]\n[agent]\n",
    "a directory": _break_directory,
    "a FIFO": _break_fifo,
    "a symlink loop": _break_loop,
}
# What `api.key_file` points at: each must be refused, none may hang.
SECRET_FILES: dict[str, Callable[[Path], None] | bytes] = {
    "empty key file": b"",
    "two-line key file": b"pnu_a\npnu_b\n",
    "non-UTF-8 key file": b"\xff\xfe",
    "key file is a directory": _break_directory,
    "key file is a FIFO": _break_fifo,
    "key file is a symlink loop": _break_loop,
}
BREAKAGE_WORDS = {
    "invalid TOML": "invalid TOML",
    "not UTF-8": "not UTF-8",
    "a NUL byte": "invalid TOML",
    "nested too deeply": "nested",
    "inline tables nested too deeply": "nested",
    "dotted key too long": "nested",
    "a 5000-digit number": "TOML",
    "a 5000-digit hex number": "agent.limit",
    "a 65-bit number": "agent.limit",
    "duplicate table": "invalid TOML",
    "a directory": "directory",
    "a FIFO": "not a regular file",
    "a symlink loop": "cannot read",
}


def make(target: Path, what: Callable[[Path], None] | bytes) -> None:
    if isinstance(what, bytes):
        target.write_bytes(what)
        target.chmod(0o600)
    else:
        what(target)


@contextmanager
def laid_out(case: Case) -> Iterator[tuple[Path, dict[str, str], dict[str, str]]]:
    """Write the files; yields the main file, the environment and each source's name."""
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / case.dirname
        (directory / "agent.d").mkdir(parents=True)
        main_file = directory / "agent.toml"
        names = {"main": str(main_file), "dropin": str(directory / "agent.d" / "10-fuzz.toml")}
        environ = dict(case.environ)
        if case.breakage in BREAKAGES:
            make(main_file, BREAKAGES[case.breakage])
        else:
            if case.breakage in SECRET_FILES:
                key_file = directory / "api-key"
                make(key_file, SECRET_FILES[case.breakage])
                case.main.setdefault("api", {})["key_file"] = str(key_file)
            main_file.write_text(toml_document(case.main))
            main_file.chmod(0o600)
        if case.dropin is not None:
            Path(names["dropin"]).write_text(toml_document(case.dropin))
            Path(names["dropin"]).chmod(0o600)
        yield main_file, environ, names


def source_text(where: str, names: dict[str, str]) -> str:
    return names.get(where) or f"environment ({where})"


def run_cli(argv: list[str], environ: dict[str, str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = main(argv, environ, stdout=out, stderr=err)
    return status, out.getvalue(), err.getvalue()


def check_one_line(err: str, *must_contain: str) -> None:
    assert err.startswith("runner-agent: ") and err.endswith("\n"), repr(err[:300])
    assert len(err.splitlines()) == 1, f"not one line: {err[:300]!r}"
    assert all(c.isprintable() for c in err[:-1]), f"control characters: {err[:300]!r}"
    for part in must_contain:
        assert part in err, f"{part!r} not in {err[:300]!r}"
    for secret in (SECRET, LEAKY):
        assert secret not in err


def printable(text: str) -> str:
    """How the one-line error shows a name with control characters in it."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


# -- the properties --------------------------------------------------------------------------------


@FUZZ
@given(case=cases(), via_variable=st.booleans(), command=st.sampled_from(["check-config", "run"]))
def test_every_config_exits_0_or_78_with_one_named_line(
    case: Case, via_variable: bool, command: str
) -> None:
    with laid_out(case) as (main_file, environ, names):
        argv = [command] if via_variable else ["--config", str(main_file), command]
        if via_variable:
            environ["RUNNER_AGENT_CONFIG"] = str(main_file)
        ran: list[Settings] = []
        with pytest.MonkeyPatch.context() as patch:
            fake = type(sys)("agent.daemon")

            def run(settings: Settings, **_: object) -> int:
                ran.append(settings)
                return 0

            fake.run = run  # type: ignore[attr-defined]
            patch.setitem(sys.modules, "agent.daemon", fake)
            # `from agent import daemon` finds the attribute first once the real module was imported
            patch.setattr(agent, "daemon", fake, raising=False)
            status, out, err = run_cli(argv, environ)
        if case.problem is None:
            event("valid")
            assert (status, err) == (0, ""), err
            assert SECRET not in out
            settings_ = load_settings(main_file, environ)
            for deployment in settings_.deployments:  # what the API gets must be JSON
                json.dumps(deployment_body(deployment, uuid4()), allow_nan=False)
            if command == "check-config":
                check_rendering(out, settings_)
            else:
                assert ran == [settings_]
            return
        where, key = case.problem
        event(f"invalid: {case.breakage or key or where}")
        assert status == EX_CONFIG, (status, err)
        assert out == "" and ran == []
        check_one_line(err, printable(source_text(where, names)), key.split(".")[-1])
        if case.breakage in BREAKAGE_WORDS:
            assert BREAKAGE_WORDS[case.breakage] in err


def check_rendering(out: str, settings_: Settings) -> None:
    """The rendered config is TOML and loads back to the same settings (secrets aside)."""
    document = tomllib.loads(out)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rendered.toml"
        path.write_text(out)
        path.chmod(0o600)
        reloaded = load_settings(path, {})
    assert document["agent"]["name"] == settings_.agent.name
    assert reloaded.agent == settings_.agent and reloaded.flow_run == settings_.flow_run
    assert reloaded.deployments == settings_.deployments
    assert reloaded.api.url == settings_.api.url and reloaded.api.timeout == settings_.api.timeout


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.binary(max_size=300) | st.text(max_size=200).map(str.encode))
def test_arbitrary_bytes_as_the_config_file(text: bytes) -> None:
    """Random bytes: 0 when they happen to be a valid config, else 78 and one line."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "agent.toml"
        path.write_bytes(text)
        path.chmod(0o600)
        status, out, err = run_cli(["check-config", "--config", str(path)], {})
    assert status in (0, EX_CONFIG)
    if status == EX_CONFIG:
        check_one_line(err, str(path))
        try:
            tomllib.loads(text.decode())
        except (UnicodeDecodeError, tomllib.TOMLDecodeError):
            assert "TOML" in err or "UTF-8" in err
    else:
        assert err == "" and tomllib.loads(out)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(
        [
            "RUNNER_AGENT_AGENT__LIMIT",
            "RUNNER_AGENT_API__TIMEOUT",
            "RUNNER_AGENT_FLOW_RUN__ENV",
            "RUNNER_AGENT_FLOW_RUN__ENV__A",
            "RUNNER_AGENT_AGENT__NAME",
            "RUNNER_AGENT_API__URL",
            "PREFECT_API_URL",
            "RUNNER_AGENT_FLOW_RUN__MEMORY_MAX",
            "RUNNER_AGENT_API__KEY",
            "RUNNER_AGENT_AGENT__EVENTS_WEBSOCKET",
            "RUNNER_AGENT_LOG_LEVEL",
        ]
    ),
    value=st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=40)
    | st.sampled_from(["\udcff\udcfe", "x\udc80", "9" * 5000, "\u2028", "a\rb"]),
)
def test_arbitrary_environment_values(name: str, value: str) -> None:
    """Any text in a variable (also undecodable bytes, as os.environ carries them)."""
    with tempfile.TemporaryDirectory() as tmp:
        empty = Path(tmp) / "agent.toml"
        empty.write_text("")
        empty.chmod(0o600)
        status, out, err = run_cli(["check-config", "--config", str(empty)], {name: value})
    assert status in (0, EX_CONFIG)
    if status == EX_CONFIG:
        check_one_line(err, name)
    else:
        assert err == ""
        out.encode("utf-8")  # what a real stdout must be able to write


# -- a few real processes --------------------------------------------------------------------------


def cli_process(
    *argv: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    environ = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PREFECT_", "RUNNER_AGENT_", "CREDENTIALS_DIRECTORY"))
    }
    environ.update(env or {})
    # The installed console script when there is one (the venv's), else the module.
    script = Path(sys.executable).parent / "runner-agent"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "agent"]
    return subprocess.run(
        [*command, *argv], env=environ, cwd=REPO, capture_output=True, timeout=60, check=False
    )


@pytest.mark.parametrize(
    ("content", "environ", "expected"),
    [
        (BREAKAGES["nested too deeply"], {}, "TOML"),
        (BREAKAGES["a 5000-digit number"], {}, "TOML"),
        (b'[agent]\nname = "a\\u0000b"\n', {}, "agent.name"),
        (b'[agent]\npoll_interval = "' + b"9" * 400 + b's"\n', {}, "agent.poll_interval"),
        (
            b'[[deployment]]\nname = "d"\nentrypoint = "f.py:f"\npath = "/srv"\n'
            b"parameters = { x = nan }\n",
            {},
            "deployment[d].parameters",
        ),
        (b"", {"RUNNER_AGENT_FLOW_RUN__ENV__A": "\udcff"}, "RUNNER_AGENT_FLOW_RUN__ENV__A"),
        (b"", {"RUNNER_AGENT_AGENT__NAME": "web\r01"}, "RUNNER_AGENT_AGENT__NAME"),
        (b'[api]\nkey = ["' + LEAKY.encode() + b'"]\n', {}, "api.key"),
    ],
)
def test_check_config_process_exits_78_with_one_line(
    tmp_path: Path, content: bytes, environ: dict[str, str], expected: str
) -> None:
    path = tmp_path / "agent.toml"
    path.write_bytes(content)
    path.chmod(0o600)
    result = cli_process("check-config", "--config", str(path), env=environ)
    stderr = result.stderr.decode("utf-8", "backslashreplace")
    assert (result.returncode, result.stdout) == (EX_CONFIG, b""), stderr
    assert stderr.startswith("runner-agent: ") and stderr.count("\n") == 1, stderr
    assert len(stderr.splitlines()) == 1 and expected in stderr and LEAKY not in stderr
    assert "Traceback" not in stderr


def test_check_config_process_with_a_valid_hostile_config(tmp_path: Path) -> None:
    """Valid, but odd: huge unicode strings, TOML dates in parameters, a DEL character."""
    path = tmp_path / "agent.toml"
    path.write_text(
        '[agent]\nname = "' + "\u00e9" * 200_000 + '"\n'
        '[[deployment]]\nname = "d"\nentrypoint = "f.py:f"\npath = "/srv"\n'
        'description = "tab\\there, DEL \\u007f, emoji \U0001f600"\n'
        'parameters = { when = 1979-05-27, "\U0001f600" = 1, at = 07:32:00 }\n'
    )
    path.chmod(0o600)
    result = cli_process("check-config", "--config", str(path))
    assert (result.returncode, result.stderr) == (0, b"")
    rendered = tomllib.loads(result.stdout.decode())
    deployment = rendered["deployment"][0]
    assert deployment["parameters"] == {"when": "1979-05-27", "\U0001f600": 1, "at": "07:32:00"}
    assert deployment["description"] == "tab\there, DEL \x7f, emoji \U0001f600"


@pytest.mark.parametrize("breakage", sorted(BREAKAGES) + sorted(SECRET_FILES))
def test_every_broken_file_exits_78_naming_it(breakage: str) -> None:
    """Each whole-file fault once for sure (the property above draws them at random)."""
    case = Case(breakage=breakage, problem=("main", "" if breakage in BREAKAGES else "key_file"))
    with laid_out(case) as (main_file, environ, names):
        status, out, err = run_cli(["check-config", "--config", str(main_file)], environ)
    assert (status, out) == (EX_CONFIG, ""), err
    check_one_line(err, names["main"], case.problem[1] if case.problem else "")
    assert BREAKAGE_WORDS.get(breakage, "api.key_file") in err


@pytest.mark.parametrize(
    ("environ", "key_file", "expected"),
    [
        ({"RUNNER_AGENT_AGENT__LIMIT": "9" * 4000}, None, "agent.limit: out of range"),
        (
            {"RUNNER_AGENT_FLOW_RUN__MEMORY_MAX": "9" * 30 + "E"},
            None,
            "flow_run.memory_max: out of range",
        ),
        ({"RUNNER_AGENT_FLOW_RUN__ENV": "[" * 100_000}, None, "flow_run.env: expected a JSON"),
        ({"PREFECT_API_URL": "http://h/\udcff"}, None, "api.url: not UTF-8 text"),
        ({}, "/dev/zero", "api.key_file: /dev/zero: not a regular file"),
    ],
)
def test_values_past_what_the_agent_can_use(
    tmp_path: Path, environ: dict[str, str], key_file: str | None, expected: str
) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(f"[api]\nkey_file = {toml_string(key_file)}\n" if key_file else "")
    path.chmod(0o600)
    status, out, err = run_cli(["check-config", "--config", str(path)], environ)
    assert (status, out) == (EX_CONFIG, "")
    check_one_line(err, expected)


def test_config_error_is_one_line_whatever_the_text() -> None:
    for text in ("a\nb", "a\rb", "a\x85b", "a\u2028b", "a\x0bb", "a\x1eb", "a\x00b"):
        line = str(ConfigError(f"/etc/{text}.toml", f"agent.{text}", f"got {text}"))
        assert len(line.splitlines()) == 1 and line.isprintable(), repr(line)
