"""The command line: sub-commands, `--config` placement, exit statuses, redaction, --online."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import threading
import tomllib
import types
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

import agent
from agent import __version__
from agent.cli import EX_CONFIG, main

REPO = Path(__file__).resolve().parents[2]
SECRET = "pnu_cli-secret-0123456789"
AUTH_SECRET = "admin:auth-secret-42"
CONFIG = """\
[agent]
name = "web-01"
limit = 3
[flow_run]
memory_max = "512M"
[[deployment]]
name = "hello"
entrypoint = "hello.py:hello"
path = "/srv/flows"
schedule = { cron = "*/5 * * * *", timezone = "UTC" }
"""


def write(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return write(tmp_path / "agent.toml", CONFIG)


def clean_environ(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "RUNNER_AGENT_"))}
    env.pop("CREDENTIALS_DIRECTORY", None)
    env.update(extra)
    return env


def cli(*argv: str, **environ: str) -> tuple[int, str, str]:
    """Run main() in-process with explicit streams and environment."""
    out, err = io.StringIO(), io.StringIO()
    status = main(list(argv), clean_environ(**environ), stdout=out, stderr=err)
    return status, out.getvalue(), err.getvalue()


def cli_process(*argv: str, **environ: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", *argv],
        env=clean_environ(**environ),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


# -- check-config ------------------------------------------------------------------------------


def test_check_config_prints_the_effective_config_as_toml(config: Path) -> None:
    status, out, err = cli("--config", str(config), "check-config", RUNNER_AGENT_AGENT__LIMIT="2")
    assert (status, err) == (0, "")
    data = tomllib.loads(out)
    assert data["agent"]["name"] == "web-01"
    assert data["agent"]["limit"] == 2
    assert data["agent"]["poll_interval"] == "10s"
    assert data["flow_run"]["memory_max"] == "512M"
    assert data["flow_run"]["cpu_quota"] == "200%"
    assert data["deployment"] == [
        {
            "name": "hello",
            "flow_name": "hello",
            "entrypoint": "hello.py:hello",
            "path": "/srv/flows",
            "schedule": {"cron": "*/5 * * * *", "timezone": "UTC"},
        }
    ]
    assert f"# Files read: {config}" in out


def test_check_config_shows_the_work_pools(config: Path) -> None:
    with config.open("a") as handle:
        handle.write('\n[[work_pool]]\nname = "hosts"\nqueues = ["high"]\n')
    status, out, err = cli("--config", str(config), "check-config")
    assert (status, err) == (0, "")
    assert tomllib.loads(out)["work_pool"] == [
        {"name": "hosts", "queues": ["high"], "create": False}
    ]
    status, out, _ = cli("check-config", "--json", "--config", str(config))
    assert json.loads(out)["config"]["work_pool"][0]["name"] == "hosts"


def test_check_config_json(config: Path) -> None:
    status, out, _ = cli("check-config", "--json", "--config", str(config))
    assert status == 0
    document = json.loads(out)
    assert document["sources"] == [str(config)]
    assert document["config"]["agent"]["limit"] == 3
    assert document["config"]["deployment"][0]["name"] == "hello"


@pytest.mark.parametrize("output", [[], ["--json"]])
def test_secrets_never_appear_in_check_config_output(tmp_path: Path, output: list[str]) -> None:
    key_file = write(tmp_path / "api-key", SECRET + "\n")
    config = write(tmp_path / "agent.toml", f'[api]\nkey_file = "{key_file}"\n' + CONFIG)
    status, out, err = cli(
        "check-config",
        "--config",
        str(config),
        *output,
        RUNNER_AGENT_API__AUTH_STRING=AUTH_SECRET,
    )
    assert status == 0
    assert SECRET not in out + err
    assert AUTH_SECRET not in out + err
    assert "auth-secret" not in out + err
    assert out.count("**********") == 2
    if output:
        secrets = json.loads(out)["secret_sources"]
        assert secrets == {
            "api.key": f"{key_file} (api.key_file)",
            "api.auth_string": "environment (RUNNER_AGENT_API__AUTH_STRING)",
        }
    else:
        assert f'key = "**********"  # from {key_file} (api.key_file)' in out
        assert (
            'auth_string = "**********"  # from environment (RUNNER_AGENT_API__AUTH_STRING)' in out
        )


def test_secret_in_the_config_file_is_redacted_in_a_real_process(tmp_path: Path) -> None:
    config = write(tmp_path / "agent.toml", f'[api]\nkey = "{SECRET}"\n')
    for extra in ([], ["--json"]):
        result = cli_process("check-config", "--config", str(config), *extra)
        assert result.returncode == 0, result.stderr
        assert SECRET not in result.stdout + result.stderr
        assert "**********" in result.stdout


def test_config_option_works_before_and_after_the_sub_command(tmp_path: Path, config: Path) -> None:
    bad = write(tmp_path / "bad.toml", "[agent]\nlimit = 0\n")
    assert cli("--config", str(config), "check-config")[0] == 0
    assert cli("check-config", "--config", str(config))[0] == 0
    # Ansible: `validate: runner-agent check-config --config %s`; the later one wins.
    assert cli("--config", str(bad), "check-config", "--config", str(config))[0] == 0
    assert cli("--config", str(config), "check-config", "--config", str(bad))[0] == EX_CONFIG


def test_runner_agent_config_variable(config: Path) -> None:
    status, out, _ = cli("check-config", RUNNER_AGENT_CONFIG=str(config))
    assert status == 0
    assert 'name = "web-01"' in out


# -- exit status 78 and one line ---------------------------------------------------------------

BAD = [
    ("[agent]\nlimit = 0\n", 0o600, "{path}: agent.limit: must be >= 1, got 0"),
    ("[agent]\nlimits = 1\n", 0o600, "{path}: agent.limits: unknown key"),
    (
        "[agent\n",
        0o600,
        "{path}: invalid TOML at line 1, column 7: Expected ']' at the end of a table declaration",
    ),
    (
        "",
        0o666,
        "{path}: file is writable by everyone (mode 0666); only root and the agent's "
        "user may write it",
    ),
]


@pytest.mark.parametrize(("text", "mode", "message"), BAD)
@pytest.mark.parametrize("command", ["check-config", "run"])
def test_config_errors_exit_78_with_one_line(
    tmp_path: Path, text: str, mode: int, message: str, command: str
) -> None:
    path = write(tmp_path / "agent.toml", text, mode)
    result = cli_process("--config", str(path), command)
    assert result.returncode == EX_CONFIG
    assert result.stdout == ""
    assert result.stderr == f"runner-agent: {message.format(path=path)}\n"


def test_missing_explicit_config_and_bad_environment(tmp_path: Path, config: Path) -> None:
    missing = tmp_path / "missing.toml"
    result = cli_process("check-config", "--config", str(missing))
    assert (result.returncode, result.stderr) == (78, f"runner-agent: {missing}: file not found\n")
    result = cli_process(
        "check-config", "--config", str(config), RUNNER_AGENT_FLOW_RUN__CPU_QUOTA="0%"
    )
    assert (result.returncode, result.stderr) == (
        78,
        "runner-agent: environment (RUNNER_AGENT_FLOW_RUN__CPU_QUOTA): flow_run.cpu_quota: "
        "must be > 0%, got '0%'\n",
    )
    status, _, err = cli("check-config", "--config", str(config), RUNNER_AGENT_LOG_LEVEL="loud")
    assert (status, err) == (
        78,
        "runner-agent: environment (RUNNER_AGENT_LOG_LEVEL): must be one of debug, info, "
        "warning, error, got 'loud'\n",
    )


def test_usage_errors_are_argparse_errors(config: Path) -> None:
    result = cli_process("--log-level", "loud", "check-config")
    assert result.returncode == 2
    assert "invalid choice" in result.stderr
    assert cli_process().returncode == 2
    result = cli_process("--help")
    assert result.returncode == 0
    for command in ("run", "check-config", "version", "--config", "--log-level"):
        assert command in result.stdout


# -- run and version ---------------------------------------------------------------------------


def test_run_hands_settings_to_the_daemon(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, Any]] = []

    def fake_run(settings: Any, **kwargs: Any) -> int:
        calls.append({"settings": settings, **kwargs})
        return 3

    fake = types.ModuleType("agent.daemon")
    fake.run = fake_run  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "agent.daemon", fake)
    monkeypatch.setattr(agent, "daemon", fake, raising=False)
    status, _, _ = cli("--config", str(config), "run", RUNNER_AGENT_LOG_LEVEL="WARNING")
    assert status == 3
    [call] = calls
    assert call["settings"].agent.limit == 3
    assert call["config_path"] == config
    assert call["log_level"] == "warning"
    assert call["environ"]["RUNNER_AGENT_LOG_LEVEL"] == "WARNING"
    calls.clear()
    assert cli("run", "--log-level", "debug", "--config", str(config))[0] == 3
    assert calls[0]["log_level"] == "debug"


def test_version() -> None:
    result = cli_process("version")
    assert result.returncode == 0
    first, second = result.stdout.splitlines()
    assert first == f"runner-agent {__version__}"
    assert second.startswith(f"Python {sys.version.split()[0]} (")
    result = cli_process("--version")
    assert (result.returncode, result.stdout) == (0, f"runner-agent {__version__}\n")


# -- check-config --online ---------------------------------------------------------------------


class FakePrefect:
    """A tiny HTTP server: /api/health answers `true`; other calls 200 `[]` or 401."""

    def __init__(self, refuse: bool) -> None:
        self.refuse = refuse
        self.requests: list[tuple[str, str, str | None]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                fake.requests.append((self.command, self.path, self.headers.get("Authorization")))
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                if self.path == "/api/health":
                    status, body = 200, b"true"
                elif fake.refuse:
                    status, body = 401, b'{"exception_message": "Unauthorized"}'
                else:
                    status, body = 200, b"[]"
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _answer

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/api"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


@pytest.fixture
def prefect() -> Iterator[FakePrefect]:
    server = FakePrefect(refuse=False)
    yield server
    server.close()


@pytest.fixture
def refusing_prefect() -> Iterator[FakePrefect]:
    server = FakePrefect(refuse=True)
    yield server
    server.close()


def test_online_check_passes_and_sends_the_credentials(
    tmp_path: Path, prefect: FakePrefect
) -> None:
    key_file = write(tmp_path / "api-key", SECRET)
    config = write(tmp_path / "agent.toml", f'[api]\nkey_file = "{key_file}"\n')
    status, out, err = cli(
        "check-config", "--online", "--config", str(config), RUNNER_AGENT_API__URL=prefect.url
    )
    assert status == 0, err
    assert err == f"runner-agent: {prefect.url}: the API is healthy and accepted the credentials\n"
    assert ("GET", "/api/health", f"Bearer {SECRET}") in prefect.requests
    assert any(m == "POST" and a == f"Bearer {SECRET}" for m, _, a in prefect.requests)
    assert SECRET not in out + err


def test_online_check_refused_credentials_exit_78(
    tmp_path: Path, refusing_prefect: FakePrefect
) -> None:
    config = write(tmp_path / "agent.toml", f'[api]\nurl = "{refusing_prefect.url}"\n')
    result = cli_process(
        "check-config", "--online", "--config", str(config), PREFECT_API_KEY=SECRET
    )
    assert result.returncode == EX_CONFIG
    [line] = result.stderr.splitlines()
    assert line.startswith("runner-agent: credentials were refused: ")
    assert refusing_prefect.url in line
    assert SECRET not in result.stdout + result.stderr
    tomllib.loads(result.stdout)  # the config itself was still printed


def test_online_check_unreachable_api_exit_78(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/api"
    config = write(tmp_path / "agent.toml", f'[api]\nurl = "{url}"\ntimeout = "2s"\n')
    status, _, err = cli("check-config", "--online", "--config", str(config))
    assert status == EX_CONFIG
    [line] = err.splitlines()
    assert line.startswith("runner-agent: ")
    assert url in line
