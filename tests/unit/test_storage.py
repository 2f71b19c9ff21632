"""Unit tests for agent.storage / agent.gitstorage: classification, sanitising, names, helpers."""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path

import pytest

from agent.gitstorage import (
    ASKPASS_SCRIPT,
    Credentials,
    Git,
    GitFailed,
    Remote,
    base_environment,
    classify,
    dir_name,
    install_askpass,
    subdirectory_parts,
)
from agent.redaction import hide_url_credentials
from agent.storage import Storage, StorageError, describe_source
from tests.integration.gitserver import GitSpec

# Real stderr of git 2.39 for each failure (captured on this machine).
STDERR = {
    "no-user": "fatal: could not read Username for 'http://127.0.0.1:40149': "
    "terminal prompts disabled\n",
    "bad-token": "fatal: Authentication failed for 'http://127.0.0.1:40149/flows.git/'\n",
    "forbidden": "fatal: unable to access 'https://h/x.git/': "
    "The requested URL returned error: 403\n",
    "ssh-key": "git@github.com: Permission denied (publickey).\n"
    "fatal: Could not read from remote repository.\n",
    "http-404": "fatal: repository 'http://127.0.0.1:40149/nope.git/' not found\n",
    "path": "fatal: '/tmp/gx/nothere.git' does not appear to be a git repository\n"
    "fatal: Could not read from remote repository.\n\n"
    "Please make sure you have the correct access rights\nand the repository exists.\n",
    "branch": "fatal: couldn't find remote ref refs/heads/nope\n",
    "commit": "fatal: remote error: upload-pack: not our ref "
    "0123456789012345678901234567890123456789\n",
    "refused": "fatal: unable to access 'http://127.0.0.1:1/y.git/': Failed to connect to "
    "127.0.0.1 port 1 after 0 ms: Couldn't connect to server\n",
    "dns": "fatal: unable to access 'http://nosuchhost.invalid/y.git/': "
    "Could not resolve host: nosuchhost.invalid\n",
    "ssh-down": "ssh: connect to host h port 22: Connection refused\n"
    "fatal: Could not read from remote repository.\n",
    "scheme": "git: 'remote-htps' is not a git command. See 'git --help'.\n",
}


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        ("no-user", "authentication failed"),
        ("bad-token", "authentication failed"),
        ("forbidden", "authentication failed"),
        ("ssh-key", "authentication failed"),
        ("http-404", "repository not found"),
        ("path", "repository not found"),
        ("branch", "unknown branch"),
        ("commit", "unknown commit"),
        ("refused", "could not connect"),
        ("dns", "could not connect"),
        ("ssh-down", "could not connect"),
        ("scheme", "unsupported URL"),
    ],
)
def test_classify(key: str, reason: str) -> None:
    kind = "commit" if key == "commit" else "branch"
    assert classify(STDERR[key], ref_kind=kind) == reason


def test_classify_ref_kind_decides_branch_or_commit() -> None:
    assert classify(STDERR["branch"], ref_kind="commit") == "unknown commit"
    assert classify(STDERR["commit"], ref_kind="branch") == "unknown branch"


def test_classify_falls_back_to_last_line_sanitised() -> None:
    stderr = "warning: something\nfatal: odd failure at https://bob:hunter2@h/x.git\n\n"
    assert classify(stderr) == "odd failure at https://***@h/x.git"
    assert classify("") == "git failed without a message"
    assert len(classify("fatal: " + "x" * 1000)) == 300


@pytest.mark.parametrize(
    ("text", "clean"),
    [
        (
            "https://user:pa%40ss@git.example.com/org/flows.git",
            "https://***@git.example.com/org/flows.git",
        ),
        ("https://token@git.example.com/x.git", "https://***@git.example.com/x.git"),
        (
            "see 'http://a:b@h:8080/x' and ssh://git@h/y",
            "see 'http://***@h:8080/x' and ssh://***@h/y",
        ),
        ("git@github.com:org/flows.git", "git@github.com:org/flows.git"),
        ("/srv/git/flows.git", "/srv/git/flows.git"),
        # An `@` in the path is taken for credentials: hiding too much is the safe error.
        ("https://git.example.com/a@b", "https://***@b"),
    ],
)
def test_git_messages_hide_url_credentials(text: str, clean: str) -> None:
    assert hide_url_credentials(text) == clean


def test_remote_parse_moves_the_password_out_of_the_url() -> None:
    remote = Remote.parse("https://deploy:s%2Fcret@git.example.com:8443/org/flows.git")
    assert remote == Remote("https://deploy@git.example.com:8443/org/flows.git", "deploy", "s/cret")
    assert remote.display == "https://git.example.com:8443/org/flows.git"
    assert Remote.parse("https://oauth2@h/x.git") == Remote("https://oauth2@h/x.git", "oauth2")
    assert Remote.parse("https://:tok@[::1]/x.git") == Remote("https://[::1]/x.git", None, "tok")
    assert Remote.parse("git@h:x.git") == Remote("git@h:x.git")


def test_storage_error_message() -> None:
    source = describe_source(GitSpec("https://u:p@git.example.com/org/flows.git"))
    error = StorageError(source, "authentication failed")
    assert str(error) == (
        "Could not pull flow code from https://git.example.com/org/flows.git "
        "(branch main): authentication failed"
    )
    pinned = describe_source(GitSpec("/srv/flows.git", branch=None, commit="abc123"))
    assert pinned == "/srv/flows.git (commit abc123)"
    assert describe_source(GitSpec("/srv/flows.git", branch=None)) == "/srv/flows.git (branch main)"


def test_dir_name() -> None:
    assert dir_name("etl-daily_v2.1") == "etl-daily_v2.1"
    assert dir_name("team/etl flows") == "team%2Fetl%20flows"
    assert dir_name(".hidden") == "%2Ehidden"
    assert dir_name("..") == "%2E."
    assert dir_name("100%") == "100%25"
    assert dir_name("é") == "%C3%A9"
    long = dir_name("x" * 300)
    assert len(long) <= 100 and "~" in long
    assert dir_name("x" * 300) != dir_name("x" * 301)
    names = ["a/b", "a%2Fb", "a b", "a%20b", "a_b", ".a", "%2Ea"]
    assert len({dir_name(n) for n in names}) == len(names)
    with pytest.raises(ValueError):
        dir_name("")


def test_subdirectory_parts() -> None:
    assert subdirectory_parts("") == ()
    assert subdirectory_parts("flows/") == ("flows",)
    assert subdirectory_parts("./a/b") == ("a", "b")
    for bad in ("/etc", "../x", "a/../../b"):
        with pytest.raises(ValueError):
            subdirectory_parts(bad)


def test_base_environment_isolates_git() -> None:
    env = base_environment(
        {
            "PATH": "/bin",
            "GIT_DIR": "/x",
            "GIT_ASKPASS": "/evil",
            "SSH_ASKPASS": "/evil",
            "HTTPS_PROXY": "http://proxy:3128",
            "RUNNER_AGENT_GIT_PASSWORD": "leak",
        }
    )
    assert env == {
        "PATH": "/bin",
        "HTTPS_PROXY": "http://proxy:3128",
        "LC_ALL": "C",
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_SSH_COMMAND": "ssh -o BatchMode=yes",
    }


def test_credentials_environment(tmp_path: Path) -> None:
    askpass = tmp_path / "askpass"
    assert Credentials().environment(askpass) == {"GIT_ASKPASS": str(askpass)}
    token_file = tmp_path / "token"
    assert Credentials(token_file, "deploy", "ignored").environment(askpass) == {
        "GIT_ASKPASS": str(askpass),
        "RUNNER_AGENT_GIT_USERNAME": "deploy",
        "RUNNER_AGENT_GIT_TOKEN_FILE": str(token_file),
    }
    assert Credentials(None, None, "pw").environment(askpass) == {
        "GIT_ASKPASS": str(askpass),
        "RUNNER_AGENT_GIT_PASSWORD": "pw",
    }


def test_askpass_helper_answers_git_prompts(tmp_path: Path) -> None:
    helper = install_askpass(tmp_path / "askpass.sh")
    assert helper.stat().st_mode & 0o777 == 0o700
    assert helper.read_text() == ASKPASS_SCRIPT
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\r\nsecond line\n")

    def ask(prompt: str, env: dict[str, str]) -> str:
        out = subprocess.run(
            [str(helper), prompt], env=env, capture_output=True, text=True, check=True
        )
        return out.stdout

    assert ask("Username for 'https://h': ", {}) == "x-access-token\n"
    assert ask("Username for 'https://h': ", {"RUNNER_AGENT_GIT_USERNAME": "oauth2"}) == "oauth2\n"
    assert (
        ask("Password for 'https://x@h': ", {"RUNNER_AGENT_GIT_TOKEN_FILE": str(token_file)})
        == "s3cret\n"
    )
    assert ask("Password for 'https://x@h': ", {"RUNNER_AGENT_GIT_PASSWORD": "pw"}) == "pw\n"
    # Reinstalling an identical helper does not rewrite it.
    before = helper.stat().st_mtime_ns
    time.sleep(0.01)
    install_askpass(helper)
    assert helper.stat().st_mtime_ns == before


def alive(pid: int) -> bool:
    """Running, not a zombie waiting for its reaper."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def test_git_run_timeout_kills_the_process_group(tmp_path: Path) -> None:
    script = tmp_path / "slow-git"
    pidfile = tmp_path / "child.pid"
    script.write_text(f"#!/bin/sh\nsleep 30 &\necho $! > {pidfile}\nwait\n")
    script.chmod(0o755)
    # 3 s: time for a loaded machine to start the script and its child before the timeout.
    git = Git(str(script), {"PATH": "/usr/bin:/bin"}, timeout=3)
    started = time.monotonic()
    with pytest.raises(GitFailed) as failed:
        await git.run(["fetch"])
    # A hang guard, not a speed target: without the timeout the script runs for 30 s.
    assert time.monotonic() - started < 25
    assert failed.value.reason == "could not connect: timed out after 3s"
    child = int(pidfile.read_text())
    # SIGKILL lands when the child is next scheduled, which a busy machine may delay.
    for _ in range(200):
        if not alive(child):
            break
        await asyncio.sleep(0.05)
    assert not alive(child)


async def test_git_run_passes_safe_config_and_classifies(tmp_path: Path) -> None:
    script = tmp_path / "fake-git"
    argv_log = tmp_path / "argv"
    script.write_text(
        f"#!/bin/sh\nprintf '%s\\n' \"$@\" > {argv_log}\n"
        'echo "fatal: couldn\'t find remote ref refs/heads/x" >&2\nexit 128\n'
    )
    script.chmod(0o755)
    git = Git(str(script), {"PATH": "/usr/bin:/bin"}, timeout=10)
    with pytest.raises(GitFailed) as failed:
        await git.run(["fetch", "url"])
    assert failed.value.reason == "unknown branch"
    assert argv_log.read_text().splitlines() == [
        "-c",
        "credential.helper=",
        "-c",
        "gc.auto=0",
        "-c",
        "advice.detachedHead=false",
        "fetch",
        "url",
    ]
    with pytest.raises(GitFailed, match="cannot run"):
        await Git(str(tmp_path / "missing"), {}, timeout=1).run(["version"])


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        (GitSpec("/r.git", branch="-upload-pack=evil"), "invalid branch name '-upload-pack=evil'"),
        (GitSpec("/r.git", branch="a:b"), "invalid branch name 'a:b'"),
        (GitSpec("/r.git", branch="a..b"), "invalid branch name 'a..b'"),
        (
            GitSpec("/r.git", branch=None, commit="HEAD~1"),
            "a commit must be a hexadecimal sha (4 to 64 digits)",
        ),
        (
            GitSpec("/r.git", subdirectory="../x"),
            "subdirectory '../x' must be relative, without '..'",
        ),
    ],
)
async def test_bad_refs_are_refused_before_git_runs(
    tmp_path: Path, spec: GitSpec, reason: str
) -> None:
    storage = Storage(tmp_path, git_binary=str(tmp_path / "no-git-here"))
    with pytest.raises(StorageError) as refused:
        await storage.prepare("etl", spec)
    assert refused.value.reason == reason
    assert not (tmp_path / "storage").exists()


async def test_credential_lookup_order(tmp_path: Path) -> None:
    credentials = tmp_path / "creds"
    credentials.mkdir()
    (credentials / "git-token").write_text("shared")
    storage = Storage(tmp_path, credentials_dir=credentials)
    remote = Remote.parse("https://h/x.git")
    shared = storage._credentials("etl", GitSpec("https://h/x.git"), remote, "src")
    assert shared.token_file == credentials / "git-token"
    (credentials / "git-token-etl").write_text("specific")
    specific = storage._credentials("etl", GitSpec("https://h/x.git"), remote, "src")
    assert specific.token_file == credentials / "git-token-etl"
    explicit = tmp_path / "explicit"
    explicit.write_text("x")
    chosen = storage._credentials(
        "etl", GitSpec("https://h/x.git", token_file=explicit), remote, "src"
    )
    assert chosen.token_file == explicit
    none = Storage(tmp_path)._credentials("etl", GitSpec("https://h/x.git"), remote, "src")
    assert none == Credentials()
