"""The config contract: sources and precedence, validation messages, secrets, file safety."""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from agent import config_sources
from agent.redaction import REDACTED
from agent.settings import (
    ConfigError,
    CronSchedule,
    FlowRunSettings,
    IntervalSchedule,
    Settings,
    load_settings,
)

DEPLOYMENT = '[[deployment]]\nname = "hello"\nentrypoint = "hello.py:hello"\n'
LOCAL = DEPLOYMENT + 'path = "/srv/flows"\n'
SECRET = "pnu_s3cr3t-value-that-must-not-leak"


def write(path: Path, text: str, mode: int = 0o644) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)
    return path


def load(path: Path, **environ: str) -> Settings:
    return load_settings(path, environ)


def error_of(path: Path, **environ: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(path, environ)
    text = str(info.value)
    assert "\n" not in text
    return text


# -- defaults and the main file ----------------------------------------------------------------


def test_defaults_when_the_default_file_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(config_sources, "DEFAULT_CONFIG", tmp_path / "agent.toml")
    settings = load_settings(None, {})
    assert settings.sources == ()
    assert settings.api.url == "http://127.0.0.1:4200/api"
    assert settings.api.key is None
    assert settings.api.timeout == 30.0
    agent = settings.agent
    assert (agent.limit, agent.poll_interval, agent.prefetch) == (4, 10.0, 10.0)
    assert (agent.heartbeat_interval, agent.cancel_grace, agent.launcher) == (30.0, 30.0, "auto")
    assert agent.slice == "runner-agent-flows.slice"
    assert agent.state_dir == Path("/var/lib/runner-agent")
    assert agent.runtime_dir == Path("/run/runner-agent")
    assert agent.name == os.uname().nodename
    flow_run = settings.flow_run
    assert flow_run.python == "/usr/bin/python3"
    assert (flow_run.memory_max, flow_run.cpu_quota, flow_run.tasks_max) == (2 * 1024**3, 200, 512)
    assert (flow_run.runtime_max, flow_run.user, flow_run.env) == (6 * 3600.0, "", {})
    assert settings.deployments == ()


def test_explicit_missing_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    assert error_of(path) == f"{path}: file not found"
    with pytest.raises(ConfigError, match="file not found"):
        load_settings(None, {"RUNNER_AGENT_CONFIG": str(path)})


def test_runner_agent_config_variable_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path / "other.toml", "[agent]\nlimit = 9\n")
    settings = load_settings(None, {"RUNNER_AGENT_CONFIG": str(path)})
    assert settings.agent.limit == 9
    assert settings.sources == (str(path),)


def test_parsed_types(tmp_path: Path) -> None:
    path = write(
        tmp_path / "agent.toml",
        '[api]\nurl = "https://prefect.example.com/api/"\ntimeout = 5\n'
        '[agent]\npoll_interval = "1m30s"\nprefetch = "0s"\n'
        '[flow_run]\nmemory_max = "1.5G"\ncpu_quota = "150%"\ntasks_max = "infinity"\n'
        'runtime_max = "infinity"\n'
        + LOCAL
        + 'schedule = { interval = "10m" }\n'
        + DEPLOYMENT.replace("hello", "nightly")
        + 'git = { url = "https://git.example.com/org/flows.git", subdirectory = "flows/" }\n'
        'schedule = { cron = "0 3 * * *", timezone = "Europe/Berlin" }\n',
    )
    settings = load(path)
    assert settings.api.url == "https://prefect.example.com/api"
    assert settings.api.timeout == 5.0
    assert (settings.agent.poll_interval, settings.agent.prefetch) == (90.0, 0.0)
    assert settings.flow_run.memory_max == 1536 * 1024**2
    assert settings.flow_run.cpu_quota == 150
    assert settings.flow_run.tasks_max is None
    assert settings.flow_run.runtime_max is None
    hello, nightly = settings.deployments
    assert hello.flow_name == "hello"
    assert hello.path == Path("/srv/flows")
    assert hello.schedule == IntervalSchedule(interval=600.0)
    assert nightly.schedule == CronSchedule(cron="0 3 * * *", timezone="Europe/Berlin")
    assert nightly.git is not None
    assert (nightly.git.branch, nightly.git.commit, nightly.git.pull_interval) == ("main", None, 60)
    assert (nightly.git.submodules, nightly.git.subdirectory) == (False, "flows/")
    assert settings.deployment("nightly") is nightly


def test_git_commit_instead_of_branch(tmp_path: Path) -> None:
    path = write(
        tmp_path / "agent.toml",
        DEPLOYMENT + 'git = { url = "/srv/git/flows.git", commit = "ABCDEF1234567", '
        'token_file = "/etc/runner-agent/git-token", submodules = true, pull_interval = "5m" }\n',
    )
    git = load(path).deployments[0].git
    assert git is not None
    assert (git.branch, git.commit) == (None, "abcdef1234567")
    assert git.token_file == Path("/etc/runner-agent/git-token")
    assert (git.submodules, git.pull_interval) == (True, 300.0)


def test_deployment_overrides_merge_with_flow_run_defaults(tmp_path: Path) -> None:
    path = write(
        tmp_path / "agent.toml",
        '[flow_run]\nenv = { A = "1", B = "2" }\nmemory_max = "1G"\n'
        + LOCAL
        + 'memory_max = "infinity"\npython = "/opt/etl/bin/python"\nenv = { B = "3", C = "4" }\n'
        + LOCAL.replace("hello", "plain"),
    )
    settings = load(path)
    hello = settings.deployments[0].flow_run_settings(settings.flow_run)
    assert hello.memory_max is None  # "infinity" overrides, it is not "unset"
    assert hello.python == "/opt/etl/bin/python"
    assert hello.env == {"A": "1", "B": "3", "C": "4"}
    assert hello.cpu_quota == 200
    plain = settings.deployments[1].flow_run_settings(settings.flow_run)
    assert plain == settings.flow_run
    assert isinstance(plain, FlowRunSettings)


# -- precedence ----------------------------------------------------------------------------------


def test_precedence_file_then_dropins_then_environment(tmp_path: Path) -> None:
    main = write(
        tmp_path / "agent.toml",
        '[agent]\nlimit = 2\nname = "from-file"\n[flow_run]\nenv = { A = "file", B = "file" }\n',
    )
    write(tmp_path / "agent.d" / "20-b.toml", '[agent]\nlimit = 5\n[flow_run]\nenv = { B = "b" }\n')
    write(tmp_path / "agent.d" / "10-a.toml", '[agent]\nlimit = 3\nname = "from-a"\n')
    write(tmp_path / "agent.d" / "README", "not toml")
    write(tmp_path / "agent.d" / ".30-editor.toml", "[agent]\nlimit = 99\n")
    settings = load(main)
    assert settings.agent.limit == 5  # 20-b is read after 10-a
    assert settings.agent.name == "from-a"
    assert settings.flow_run.env == {"A": "file", "B": "b"}  # tables merge key by key
    assert settings.sources == (
        str(main),
        str(tmp_path / "agent.d" / "10-a.toml"),
        str(tmp_path / "agent.d" / "20-b.toml"),
    )
    settings = load(
        main,
        RUNNER_AGENT_AGENT__LIMIT="7",
        RUNNER_AGENT_FLOW_RUN__ENV__C="env",
        RUNNER_AGENT_AGENT__POLL_INTERVAL="2s",
        RUNNER_AGENT_TEST_CACHE="/not/config",
    )
    assert settings.agent.limit == 7
    assert settings.agent.poll_interval == 2.0
    assert settings.flow_run.env == {"A": "file", "B": "b", "C": "env"}


def test_environment_env_table_as_json(tmp_path: Path) -> None:
    main = write(tmp_path / "agent.toml", '[flow_run]\nenv = { A = "file" }\n')
    settings = load(main, RUNNER_AGENT_FLOW_RUN__ENV='{"B": "json"}')
    assert settings.flow_run.env == {"A": "file", "B": "json"}
    assert error_of(main, RUNNER_AGENT_FLOW_RUN__ENV="B=1") == (
        "environment (RUNNER_AGENT_FLOW_RUN__ENV): flow_run.env: expected a JSON object like "
        '{"NAME": "value"}'
    )


def test_dropin_deployments_append_or_replace_by_name(tmp_path: Path) -> None:
    main = write(tmp_path / "agent.toml", LOCAL + LOCAL.replace("hello", "other"))
    write(
        tmp_path / "agent.d" / "50-flows.toml",
        LOCAL.replace("/srv/flows", "/srv/new") + LOCAL.replace("hello", "third"),
    )
    settings = load(main)
    assert [d.name for d in settings.deployments] == ["hello", "other", "third"]
    assert settings.deployments[0].path == Path("/srv/new")


def test_duplicate_deployment_names_in_one_file(tmp_path: Path) -> None:
    main = write(tmp_path / "agent.toml", LOCAL + LOCAL)
    assert error_of(main) == (
        f"{main}: deployment[hello]: duplicate deployment name 'hello'; "
        "names must be unique per flow (both [[deployment]]s have flow_name 'hello')"
    )
    main.write_text(LOCAL)
    dropin = write(tmp_path / "agent.d" / "a.toml", LOCAL.replace("hello", "x") * 2)
    assert error_of(main).startswith(f"{dropin}: deployment[x]: duplicate deployment name 'x'")


def test_prefect_variables_are_only_fallbacks(tmp_path: Path) -> None:
    empty = write(tmp_path / "agent.toml", "")
    prefect = {"PREFECT_API_URL": "http://prefect:4200/api", "PREFECT_API_KEY": "pk"}
    settings = load(empty, **prefect)
    assert settings.api.url == "http://prefect:4200/api"
    assert settings.api.key is not None and settings.api.key.get_secret_value() == "pk"
    assert settings.secret_sources == {"api.key": "environment (PREFECT_API_KEY)"}
    settings = load(empty, **prefect, RUNNER_AGENT_API__URL="http://agent:1/api")
    assert settings.api.url == "http://agent:1/api"
    in_file = write(tmp_path / "b.toml", '[api]\nurl = "http://file:2/api"\nkey = "fk"\n')
    settings = load(in_file, **prefect, PREFECT_API_AUTH_STRING="user:pass")
    assert settings.api.url == "http://file:2/api"
    assert settings.api.key is not None and settings.api.key.get_secret_value() == "fk"
    assert settings.api.auth_string is not None
    assert settings.api.auth_string.get_secret_value() == "user:pass"
    assert error_of(empty, PREFECT_API_URL="not a url").startswith(
        "environment (PREFECT_API_URL): api.url: not an http(s) URL"
    )


# -- validation messages -------------------------------------------------------------------------

INVALID = [
    ("[agent]\nlimit = 0\n", "agent.limit: must be >= 1, got 0"),
    ('[agent]\nlimit = "abc"\n', "agent.limit: expected an integer, got 'abc'"),
    ("[agent]\nlimit = true\n", "agent.limit: expected an integer, got True"),
    ("[agent]\nlimit = 2.5\n", "agent.limit: expected an integer, got 2.5"),
    (
        '[agent]\npoll_interval = "abc"\n',
        "agent.poll_interval: not a duration: 'abc' (use e.g. 30s, 5m, 1h30m)",
    ),
    ('[agent]\npoll_interval = "0s"\n', "agent.poll_interval: must be longer than 0s, got '0s'"),
    (
        '[agent]\ncancel_grace = "-1s"\n',
        "agent.cancel_grace: not a duration: '-1s' (use e.g. 30s, 5m, 1h30m)",
    ),
    (
        '[agent]\nlauncher = "docker"\n',
        "agent.launcher: must be one of 'auto', 'systemd' or 'process', got 'docker'",
    ),
    ('[agent]\nstate_dir = "state"\n', "agent.state_dir: must be an absolute path, got 'state'"),
    (
        '[agent]\nslice = "flows"\n',
        "agent.slice: not a slice unit name: 'flows' (use e.g. runner-agent-flows.slice)",
    ),
    ('[agent]\nname = ""\n', "agent.name: must not be empty"),
    ("[agent]\nlimt = 4\n", "agent.limt: unknown key"),
    (
        "[agnt]\nlimit = 4\n",
        "agnt: unknown key (sections: api, agent, flow_run, deployment, work_pool)",
    ),
    ("api = 3\n", "api: expected a table [api], got 3"),
    (
        '[api]\nurl = "localhost:4200"\n',
        "api.url: not an http(s) URL: 'localhost:4200' (use e.g. http://127.0.0.1:4200/api)",
    ),
    ("[api]\ntimeout = -1\n", "api.timeout: must not be negative, got -1"),
    ('[api]\nkey = ""\n', "api.key: must not be empty"),
    ('[api]\nkey_file = "api-key"\n', "api.key_file: must be an absolute path, got 'api-key'"),
    (
        '[flow_run]\nmemory_max = "2GB"\n',
        "flow_run.memory_max: not a size: '2GB' (use e.g. 512M, 2G, infinity)",
    ),
    (
        '[flow_run]\nmemory_max = "0"\n',
        "flow_run.memory_max: must be larger than 0 (use infinity for no limit), got '0'",
    ),
    (
        '[flow_run]\ncpu_quota = "2"\n',
        "flow_run.cpu_quota: not a CPU quota: '2' (use a whole percentage, e.g. 150%)",
    ),
    ("[flow_run]\ntasks_max = 0\n", "flow_run.tasks_max: must be >= 1, got 0"),
    (
        '[flow_run]\nruntime_max = "forever"\n',
        "flow_run.runtime_max: not a duration: 'forever' (use e.g. 30s, 5m, 1h30m)",
    ),
    ('[flow_run]\npython = ""\n', "flow_run.python: must not be empty"),
    ("[flow_run]\nenv = { A = 1 }\n", "flow_run.env.A: expected a string, got 1"),
    (
        '[flow_run]\nenv = { "BAD NAME" = "x" }\n',
        "flow_run.env.\"BAD NAME\": not an environment variable name: 'BAD NAME'",
    ),
    ('[flow_run]\nuser = "bad user"\n', "flow_run.user: not a user name: 'bad user'"),
    ("deployment = 3\n", "deployment: expected [[deployment]] tables"),
    (
        DEPLOYMENT,
        "deployment[hello]: needs a code source: set path (a directory) or git (a repository)",
    ),
    (
        '[[deployment]]\nentrypoint = "a.py:f"\npath = "/srv"\n',
        "deployment[#1].name: required key is missing (and 1 more)",
    ),
    (
        '[[deployment]]\nname = "hello"\npath = "/srv"\n',
        "deployment[hello].entrypoint: required key is missing",
    ),
    (
        LOCAL.replace('"hello.py:hello"', '"hello"'),
        "deployment[hello].entrypoint: not an entrypoint: 'hello' (use file.py:function)",
    ),
    (
        LOCAL.replace('name = "hello"', 'name = "a/b"'),
        "deployment[a/b].name: must not contain / % & > < or control characters, got 'a/b' "
        "(and 1 more)",
    ),
    (
        DEPLOYMENT + 'path = "flows"\n',
        "deployment[hello].path: must be an absolute path, got 'flows'",
    ),
    (
        LOCAL + 'git = { url = "/srv/git/flows.git" }\n',
        "deployment[hello]: set either path or git, not both",
    ),
    (LOCAL + "colour = 3\n", "deployment[hello].colour: unknown key"),
    (LOCAL + 'tags = "a"\n', "deployment[hello].tags: expected an array, got 'a'"),
    (LOCAL + "tags = [1]\n", "deployment[hello].tags[0]: expected a string, got 1"),
    (
        LOCAL + 'memory_max = "lots"\n',
        "deployment[hello].memory_max: not a size: 'lots' (use e.g. 512M, 2G, infinity)",
    ),
    (
        LOCAL + 'schedule = { cron = "* * *" }\n',
        "deployment[hello].schedule.cron: not a cron expression: '* * *' (5 fields: minute hour "
        "day-of-month month day-of-week, e.g. '*/5 * * * *')",
    ),
    (
        LOCAL + 'schedule = { cron = "* * * * *", timezone = "Mars/Base" }\n',
        "deployment[hello].schedule.timezone: unknown time zone: 'Mars/Base' (use an IANA name "
        "such as UTC or Europe/Berlin)",
    ),
    (
        LOCAL + 'schedule = { cron = "* * * * *", interval = "5m" }\n',
        "deployment[hello].schedule: set one of cron, interval or rrule, not cron and interval",
    ),
    (
        LOCAL + "schedule = {}\n",
        'deployment[hello].schedule: needs cron = "...", interval = "..." or rrule = "..."',
    ),
    (
        LOCAL + 'schedule = "hourly"\n',
        "deployment[hello].schedule: expected a table like { interval = \"10m\" }, got 'hourly'",
    ),
    (
        LOCAL + 'schedule = { interval = "soon" }\n',
        "deployment[hello].schedule.interval: not a duration: 'soon' (use e.g. 30s, 5m, 1h30m)",
    ),
    (
        LOCAL + 'schedule = { cron = "* * * * *", anchor = 1 }\n',
        "deployment[hello].schedule.anchor: unknown key",
    ),
    (
        DEPLOYMENT + 'git = { url = "/r.git", branch = "main", commit = "abcdef1" }\n',
        "deployment[hello].git: set either branch or commit, not both",
    ),
    (
        DEPLOYMENT + 'git = { url = "/r.git", commit = "main" }\n',
        "deployment[hello].git.commit: not a commit sha: 'main' (7 to 64 hex digits)",
    ),
    (
        DEPLOYMENT + 'git = { url = "/r.git", submodules = "yes" }\n',
        "deployment[hello].git.submodules: expected true or false, got 'yes'",
    ),
    (
        DEPLOYMENT + 'git = { url = "/r.git", subdirectory = "../x" }\n',
        "deployment[hello].git.subdirectory: must be a relative path inside the repository, "
        "got '../x'",
    ),
    (
        DEPLOYMENT + 'git = { url = "https://u:tok@h/r.git" }\n',
        "deployment[hello].git.url: must not contain a password or token; use token_file",
    ),
    (
        DEPLOYMENT + 'git = { branch = "main" }\n',
        "deployment[hello].git.url: required key is missing",
    ),
    (
        DEPLOYMENT + 'git = { url = "/r.git", token = "x" }\n',
        "deployment[hello].git.token: unknown key",
    ),
]


@pytest.mark.parametrize(("text", "message"), INVALID)
def test_validation_messages(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path / "agent.toml", text)
    assert error_of(path) == f"{path}: {message}"


def test_error_names_the_dropin_or_variable_that_set_the_value(tmp_path: Path) -> None:
    main = write(tmp_path / "agent.toml", "[agent]\nlimit = 2\n")
    dropin = write(tmp_path / "agent.d" / "10-bad.toml", "[agent]\nlimit = 0\n")
    assert error_of(main) == f"{dropin}: agent.limit: must be >= 1, got 0"
    dropin.write_text("")
    assert error_of(main, RUNNER_AGENT_AGENT__LIMIT="0") == (
        "environment (RUNNER_AGENT_AGENT__LIMIT): agent.limit: must be >= 1, got 0"
    )
    assert error_of(main, RUNNER_AGENT_AGENT__LIMT="3") == (
        "environment (RUNNER_AGENT_AGENT__LIMT): agent.limt: unknown key"
    )
    assert error_of(main, RUNNER_AGENT_AGENTS__LIMIT="3").startswith(
        "environment (RUNNER_AGENT_AGENTS__LIMIT): unknown section 'agents'"
    )
    bad_deployment = write(tmp_path / "agent.d" / "20-flows.toml", LOCAL + 'memory_max = "x"\n')
    assert error_of(main).startswith(f"{bad_deployment}: deployment[hello].memory_max: not a size")


def test_toml_syntax_error_names_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path / "agent.toml", '[agent]\nlimit = 4\nname = "web\n')
    assert error_of(path) == (f"{path}: invalid TOML at line 3, column 12: Illegal character '\\n'")
    write(tmp_path / "agent.toml", "[agent]\nlimit 4\n")
    assert error_of(path).startswith(f"{path}: invalid TOML at line 2, column 7: ")
    path.write_bytes(b"[agent]\nname = '\xff'\n")
    assert error_of(path) == f"{path}: not UTF-8 text"


# -- file safety ---------------------------------------------------------------------------------


def test_world_writable_config_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "agent.toml", "", mode=0o666)
    assert error_of(path) == (
        f"{path}: file is writable by everyone (mode 0666); only root and the agent's user may "
        "write it"
    )


def test_group_writable_config_is_refused_unless_the_group_is_root(tmp_path: Path) -> None:
    path = write(tmp_path / "agent.toml", "", mode=0o664)
    load(path)  # root's own group
    os.chown(path, -1, 50)  # staff
    assert error_of(path) == (
        f"{path}: file is writable by group 'staff' (mode 0664); only root and the agent's user "
        "may write it"
    )
    path.chmod(0o644)
    load(path)


def test_config_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "agent.toml", "", mode=0o644)
    os.chown(path, 65534, -1)
    assert error_of(path) == (
        f"{path}: file is owned by user 'nobody' (mode 0644); only root and the agent's user "
        "may write it"
    )


def test_unsafe_dropin_and_dropin_directory_are_refused(tmp_path: Path) -> None:
    main = write(tmp_path / "agent.toml", "")
    dropin = write(tmp_path / "agent.d" / "10.toml", "", mode=0o646)
    assert error_of(main).startswith(f"{dropin}: file is writable by everyone (mode 0646)")
    dropin.chmod(0o644)
    (tmp_path / "agent.d").chmod(0o777)
    assert error_of(main).startswith(
        f"{tmp_path / 'agent.d'}: directory is writable by everyone (mode 0777)"
    )


# -- secrets -------------------------------------------------------------------------------------


def test_key_file_and_auth_string_file(tmp_path: Path) -> None:
    key = write(tmp_path / "api-key", SECRET + "\n", mode=0o600)
    auth = write(tmp_path / "auth", "admin:pw\r\n", mode=0o600)
    path = write(
        tmp_path / "agent.toml", f'[api]\nkey_file = "{key}"\nauth_string_file = "{auth}"\n'
    )
    settings = load(path, PREFECT_API_KEY="ignored")
    assert settings.api.key is not None and settings.api.key.get_secret_value() == SECRET
    assert settings.api.auth_string is not None
    assert settings.api.auth_string.get_secret_value() == "admin:pw"
    assert settings.secret_sources == {
        "api.key": f"{key} (api.key_file)",
        "api.auth_string": f"{auth} (api.auth_string_file)",
    }
    assert SECRET not in repr(settings)
    assert SECRET not in json.dumps(settings.redacted())
    assert settings.redacted()["api"]["key"] == REDACTED


def test_secret_value_beats_file_beats_credential_beats_prefect_variable(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    write(creds / "api-key", "from-credential\n", mode=0o600)
    write(creds / "auth-string", "cred:auth\n", mode=0o600)
    key = write(tmp_path / "api-key", "from-file", mode=0o600)
    env = {"CREDENTIALS_DIRECTORY": str(creds), "PREFECT_API_KEY": "from-prefect"}

    def key_of(text: str, **extra: str) -> str | None:
        path = write(tmp_path / "agent.toml", text)
        api = load_settings(path, {**env, **extra}).api
        return api.key.get_secret_value() if api.key else None

    assert key_of(f'[api]\nkey = "from-config"\nkey_file = "{key}"\n') == "from-config"
    assert key_of(f'[api]\nkey_file = "{key}"\n') == "from-file"
    assert key_of(f'[api]\nkey_file = "{key}"\n', RUNNER_AGENT_API__KEY="from-env") == "from-env"
    assert key_of("") == "from-credential"
    (creds / "api-key").unlink()
    assert key_of("") == "from-prefect"
    settings = load_settings(tmp_path / "agent.toml", env)
    assert settings.api.auth_string is not None
    assert settings.api.auth_string.get_secret_value() == "cred:auth"
    assert settings.secret_sources["api.auth_string"] == "systemd credential 'auth-string'"


def test_unreadable_or_empty_secret_files_are_config_errors(tmp_path: Path) -> None:
    missing = tmp_path / "missing-key"
    path = write(tmp_path / "agent.toml", f'[api]\nkey_file = "{missing}"\n')
    assert error_of(path) == (
        f"{path}: api.key_file: {missing}: cannot read: No such file or directory"
    )
    empty = write(tmp_path / "empty-key", "\n", mode=0o600)
    path.write_text(f'[api]\nauth_string_file = "{empty}"\n')
    assert error_of(path) == f"{path}: api.auth_string_file: {empty}: file is empty"
    two_lines = write(tmp_path / "two", "a\nb\n", mode=0o600)
    assert error_of(path, RUNNER_AGENT_API__AUTH_STRING_FILE=str(two_lines)) == (
        f"environment (RUNNER_AGENT_API__AUTH_STRING_FILE): api.auth_string_file: {two_lines}: "
        "must hold one line"
    )
    creds = tmp_path / "creds"
    write(creds / "api-key", "", mode=0o600)
    path.write_text("")
    assert error_of(path, CREDENTIALS_DIRECTORY=str(creds)) == (
        f"{creds / 'api-key'}: file is empty"
    )


def test_redacted_config_round_trips_through_the_loader(tmp_path: Path) -> None:
    path = write(
        tmp_path / "agent.toml",
        '[agent]\nname = "w"\n[flow_run]\nmemory_max = "1536M"\ntasks_max = "infinity"\n'
        + LOCAL
        + 'tags = ["a"]\nparameters = { n = 1, nested = { x = [1, 2] } }\n'
        'schedule = { interval = "90s" }\ncpu_quota = "50%"\n',
    )
    settings = load(path)
    data = settings.redacted()
    assert data["flow_run"]["memory_max"] == "1536M"
    assert data["flow_run"]["tasks_max"] == "infinity"
    assert data["deployment"][0]["schedule"] == {"interval": "1m30s"}
    assert "python" not in data["deployment"][0]  # only what the deployment overrides
    again = tmp_path / "again.json"
    again.write_text(json.dumps(data))
    reloaded = Settings(**json.loads(again.read_text()))
    assert reloaded.flow_run == settings.flow_run
    assert reloaded.deployments == settings.deployments


# -- fuzz ----------------------------------------------------------------------------------------

KEYS = {
    "api": ["url", "key", "key_file", "auth_string", "auth_string_file", "timeout", "bogus"],
    "agent": [
        "name",
        "limit",
        "poll_interval",
        "prefetch",
        "heartbeat_interval",
        "cancel_grace",
        "launcher",
        "slice",
        "state_dir",
        "runtime_dir",
    ],
    "flow_run": ["python", "memory_max", "cpu_quota", "tasks_max", "runtime_max", "user", "env"],
}
DEPLOYMENT_KEYS = [
    "name",
    "flow_name",
    "entrypoint",
    "path",
    "git",
    "parameters",
    "tags",
    "description",
    "schedule",
    "memory_max",
    "cpu_quota",
    "env",
]
TEXT = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=12)
SCALARS = (
    st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.booleans()
    | TEXT
    | st.sampled_from(["30s", "1h30m", "2G", "150%", "infinity", "/srv", "a.py:f", "* * * * *"])
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.sampled_from(["cron", "interval", "url", "branch", "A", "x"]), inner, max_size=3
        )
    ),
    max_leaves=6,
)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)


@hypothesis_settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sections=st.dictionaries(
        st.sampled_from(sorted(KEYS)),
        st.dictionaries(
            st.sampled_from(sorted({k for v in KEYS.values() for k in v})), VALUES, max_size=4
        ),
        max_size=3,
    ),
    deployments=st.lists(
        st.dictionaries(st.sampled_from(DEPLOYMENT_KEYS), VALUES, max_size=6), max_size=2
    ),
    environ=st.dictionaries(
        st.sampled_from(
            [
                "RUNNER_AGENT_AGENT__LIMIT",
                "RUNNER_AGENT_API__TIMEOUT",
                "RUNNER_AGENT_FLOW_RUN__ENV",
                "RUNNER_AGENT_X__Y",
                "PREFECT_API_URL",
                "RUNNER_AGENT_FLOW_RUN__ENV__A__B",
            ]
        ),
        TEXT.filter(lambda s: "\0" not in s),
        max_size=2,
    ),
)
def test_fuzzed_configs_load_or_raise_config_error(
    sections: dict[str, dict[str, Any]],
    deployments: list[dict[str, Any]],
    environ: dict[str, str],
) -> None:
    lines = []
    for section, items in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {toml_value(value)}" for key, value in items.items()]
    for deployment in deployments:
        lines.append("[[deployment]]")
        lines += [f"{key} = {toml_value(value)}" for key, value in deployment.items()]
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "agent.toml"
        path.write_text("\n".join(lines) + "\n")
        try:
            settings = load_settings(path, environ)
        except ConfigError as exc:
            text = str(exc)
            assert text and "\n" not in text
            assert len(text) < 400
        else:
            json.dumps(settings.redacted())


def test_the_shipped_example_config_documents_the_real_defaults(tmp_path: Path) -> None:
    example = (Path(__file__).resolve().parents[2] / "packaging" / "agent.toml").read_text()
    defaults = load(write(tmp_path / "empty.toml", ""))
    as_shipped = load(write(tmp_path / "shipped.toml", example))
    assert as_shipped.model_dump(exclude={"sources"}) == defaults.model_dump(exclude={"sources"})
    # Uncomment every "#key = value" line of the sections: each shows the built-in default.
    examples_only = ("name", "key", "key_file", "auth_string", "auth_string_file", "env")
    sections, _, deployments = example.partition("# Deployments")
    lines = []
    for line in sections.splitlines():
        match = re.match(r"#(\w+) = (.*?)(\s+# .*)?$", line)
        lines.append(
            f"{match[1]} = {match[2]}" if match and match[1] not in examples_only else line
        )
    uncommented = load(write(tmp_path / "uncommented.toml", "\n".join(lines)))
    assert uncommented.model_dump(exclude={"sources"}) == defaults.model_dump(exclude={"sources"})
    # The example deployment, with its local path, loads too.
    block = [
        line[1:]
        for line in deployments.splitlines()
        if re.match(r"#(\[\[deployment\]\]|\w+ = )", line)
        and not line.startswith(("#git", "#schedule = { interval"))
    ]
    deployment = load(write(tmp_path / "deployment.toml", "\n".join(block))).deployments[0]
    assert (deployment.name, deployment.path, deployment.memory_max) == (
        "hello",
        Path("/srv/flows"),
        512 * 1024**2,
    )


def test_settings_built_in_code_read_nothing_implicitly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNNER_AGENT_AGENT__LIMIT", "9")
    monkeypatch.setenv("PREFECT_API_URL", "http://elsewhere/api")
    settings = Settings.model_validate(
        {"deployments": [{"name": "a", "entrypoint": "a.py:f", "path": "/srv/a"}]},
    )
    assert settings.agent.limit == 4
    assert settings.api.url == "http://127.0.0.1:4200/api"
    assert [d.name for d in settings.deployments] == ["a"]
    with pytest.raises(ValueError, match="duplicate deployment name 'a'"):
        Settings.model_validate(
            {"deployment": [{"name": "a", "entrypoint": "a.py:f", "path": "/srv/a"}] * 2}
        )


def test_a_flow_name_that_is_no_string_is_a_config_error(tmp_path: Path) -> None:
    # Found by the fuzzer: the FLOW/NAME identity of the merge must not crash on it.
    config = write(tmp_path / "agent.toml", '[[deployment]]\nname = "a"\nflow_name = []\n')
    assert "deployment[a].flow_name" in error_of(config)
