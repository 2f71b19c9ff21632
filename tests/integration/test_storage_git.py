"""agent.storage against real git: local bare repositories and a loopback HTTP git server."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.storage import Storage, StorageError
from tests.integration.gitserver import GitHttpServer, GitSpec, make_bare_repo, push_commit

TOKEN = "tok-3f9c2b1a7e5d4c60"  # distinctive, so a leak anywhere is found by a plain search
FLOW = "def main():\n    return 1\n"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def repos(tmp_path: Path) -> Path:
    root = tmp_path / "repos"
    root.mkdir()
    make_bare_repo(root, "flows.git", {"flows/flow.py": FLOW, "README": "hello\n"})
    return root


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def server(repos: Path) -> Iterator[GitHttpServer]:
    with GitHttpServer(repos) as running:
        yield running


@pytest.fixture
def token_server(repos: Path) -> Iterator[GitHttpServer]:
    with GitHttpServer(repos, token=TOKEN, delay=0.3) as running:
        yield running


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "git-token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    return path


def head(bare: Path, branch: str = "main") -> str:
    out = subprocess.run(
        ["git", "--git-dir", str(bare), "rev-parse", branch],
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip()


def recording_git(tmp_path: Path) -> tuple[str, Path]:
    """A `git` that appends its argv (one argument a line, then `--`) to a log, then execs git."""
    log = tmp_path / "git-argv.log"
    script = tmp_path / "git-wrapper"
    script.write_text(
        "#!/bin/sh\n"
        f'for a in "$@"; do printf \'%s\\n\' "$a"; done >> {log}\n'
        f"printf -- '--\\n' >> {log}\n"
        'exec /usr/bin/git "$@"\n'
    )
    script.chmod(0o755)
    return str(script), log


def all_cmdlines() -> list[bytes]:
    lines = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                lines.append((entry / "cmdline").read_bytes())
            except OSError:
                continue
    return lines


async def scan_cmdlines(seen: list[bytes], stop: asyncio.Event) -> None:
    while not stop.is_set():
        seen.extend(line for line in all_cmdlines() if b"git" in line)
        await asyncio.sleep(0.005)


def files_containing(root: Path, needle: bytes) -> list[Path]:
    hits = []
    for directory, _dirs, names in os.walk(root):
        for name in names:
            path = Path(directory) / name
            if not path.is_symlink() and needle in path.read_bytes():
                hits.append(path)
    return hits


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- local repositories ------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["file-url", "path"])
async def test_local_bare_repository(repos: Path, state: Path, form: str) -> None:
    bare = repos / "flows.git"
    url = f"file://{bare}" if form == "file-url" else str(bare)
    storage = Storage(state)
    with await storage.prepare("etl", GitSpec(url)) as checkout:
        assert checkout.commit == head(bare)
        assert checkout.root == state / "storage" / "etl" / checkout.commit
        assert checkout.path == checkout.root
        assert (checkout.path / "flows" / "flow.py").read_text() == FLOW
        assert not (checkout.root / ".git").exists()  # plain files, nothing to mutate
        assert stat.S_IMODE(checkout.root.stat().st_mode) == 0o755
        assert checkout.warning is None
        assert checkout.commit in checkout.describe()
        assert not [p for p in checkout.root.parent.iterdir() if p.name.startswith(".tmp-")]


async def test_push_gives_new_dir_while_lease_keeps_old(repos: Path, state: Path) -> None:
    bare = repos / "flows.git"
    storage = Storage(state)
    spec = GitSpec(str(bare), pull_interval=0)
    first = await storage.prepare("etl", spec)
    new_sha = push_commit(bare, {"flows/flow.py": "def main():\n    return 2\n"})
    second = await storage.prepare("etl", spec)

    assert second.commit == new_sha != first.commit
    assert second.root != first.root
    assert (first.path / "flows" / "flow.py").read_text() == FLOW  # unchanged under the old run
    assert "return 2" in (second.path / "flows" / "flow.py").read_text()

    second.release()
    assert await storage.gc() == []  # old one is leased, new one is newest
    assert first.root.is_dir() and second.root.is_dir()
    first.release()
    first.release()  # idempotent
    assert await storage.gc() == [first.root]
    assert not first.root.exists()
    assert second.root.is_dir()
    assert [
        p.name for p in (state / "storage" / "etl").iterdir() if not p.name.startswith(".")
    ] == [new_sha]


async def test_gc_removes_crash_leftovers_and_unconfigured_deployments(
    repos: Path, state: Path
) -> None:
    storage = Storage(state)
    spec = GitSpec(str(repos / "flows.git"))
    (await storage.prepare("old", spec)).release()
    kept = await storage.prepare("kept", spec)
    leftover = state / "storage" / "kept" / ".tmp-deadbeef-x"
    leftover.mkdir()
    (leftover / "half").write_text("x")

    removed = await storage.gc(deployments=["kept", "gone-but-leased"])
    assert removed == [state / "storage" / "old"]
    assert not (state / "storage" / "old").exists()
    assert not leftover.exists()
    assert kept.root.is_dir()
    # After a restart, nothing is in memory: newest by mtime survives, a leased one by adopt().
    kept.release()
    restarted = Storage(state)
    adopted = restarted.adopt(kept.path)
    assert adopted is not None and adopted.root == kept.root
    assert await restarted.gc(deployments=[]) == []
    adopted.release()
    assert await restarted.gc(deployments=[]) == [state / "storage" / "kept"]
    assert [p.name for p in (state / "storage").iterdir()] == [".askpass.sh"]


async def test_subdirectory(repos: Path, state: Path) -> None:
    storage = Storage(state)
    url = str(repos / "flows.git")
    with await storage.prepare("etl", GitSpec(url, subdirectory="flows/")) as checkout:
        assert checkout.path == checkout.root / "flows"
        assert (checkout.path / "flow.py").read_text() == FLOW
    with pytest.raises(StorageError) as missing:
        await storage.prepare("etl", GitSpec(url, subdirectory="nope"))
    assert str(missing.value) == (
        f"Could not pull flow code from {url} (branch main): "
        f"subdirectory 'nope' does not exist in commit {head(repos / 'flows.git')}"
    )
    with pytest.raises(StorageError, match="must be relative"):
        await storage.prepare("etl", GitSpec(url, subdirectory="../etc"))
    with pytest.raises(StorageError, match="must be relative"):
        await storage.prepare("etl", GitSpec(url, subdirectory="/etc"))


async def test_commit_pin_full_and_short(repos: Path, state: Path, tmp_path: Path) -> None:
    bare = repos / "flows.git"
    old = head(bare)
    push_commit(bare, {"new.txt": "new\n"})
    git, argv_log = recording_git(tmp_path)
    storage = Storage(state, git_binary=git)
    with await storage.prepare("etl", GitSpec(str(bare), branch=None, commit=old)) as pinned:
        assert pinned.commit == old
        assert not (pinned.path / "new.txt").exists()
    with await storage.prepare("short", GitSpec(str(bare), branch=None, commit=old[:10])) as short:
        assert short.commit == old
    fetches = argv_log.read_text().count("fetch\n")
    # A pinned commit that is already there needs no network at all, even after a restart.
    with await Storage(state, git_binary=git).prepare(
        "etl", GitSpec(str(bare), branch=None, commit=old)
    ) as again:
        assert again.commit == old
    assert argv_log.read_text().count("fetch\n") == fetches > 0


async def test_deployment_name_is_escaped(repos: Path, state: Path) -> None:
    storage = Storage(state)
    with await storage.prepare("../team/etl flows", GitSpec(str(repos / "flows.git"))) as checkout:
        assert checkout.root.parent.parent == state / "storage"
        assert checkout.root.parent.name == "%2E.%2Fteam%2Fetl%20flows"


# -- over the network ------------------------------------------------------------------------


async def test_http_clone_and_pull_interval(
    repos: Path, state: Path, server: GitHttpServer
) -> None:
    clock = FakeClock()
    storage = Storage(state, clock=clock)
    spec = GitSpec(server.url("flows.git"), pull_interval=60)
    first = await storage.prepare("etl", spec)
    assert first.commit == head(repos / "flows.git")
    assert server.fetches("flows.git") == 1

    new_sha = push_commit(repos / "flows.git", {"new.txt": "new\n"})
    clock.now += 59
    second = await storage.prepare("etl", spec)
    assert second.commit == first.commit  # within pull_interval: no fetch
    assert server.fetches("flows.git") == 1

    clock.now += 2
    third = await storage.prepare("etl", spec)
    assert third.commit == new_sha
    assert server.fetches("flows.git") == 2
    for checkout in (first, second, third):
        checkout.release()


async def test_concurrent_prepares_share_one_fetch(repos: Path, state: Path) -> None:
    with GitHttpServer(repos, delay=0.2) as server:
        storage = Storage(state)
        spec = GitSpec(server.url("flows.git"))
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(storage.prepare("etl", spec)) for _ in range(5)]
        checkouts = [task.result() for task in tasks]
        assert {c.commit for c in checkouts} == {head(repos / "flows.git")}
        assert server.fetches("flows.git") == 1
        assert storage.leased() == {checkouts[0].root: 5}
        for checkout in checkouts:
            checkout.release()
        assert storage.leased() == {}


async def test_token_never_leaks(
    repos: Path,
    state: Path,
    tmp_path: Path,
    token_server: GitHttpServer,
    token_file: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    git, argv_log = recording_git(tmp_path)
    storage = Storage(state, git_binary=git)
    seen: list[bytes] = []
    stop = asyncio.Event()
    scanner = asyncio.create_task(scan_cmdlines(seen, stop))
    try:
        checkout = await storage.prepare(
            "etl", GitSpec(token_server.url("flows.git"), token_file=token_file)
        )
    finally:
        stop.set()
        await scanner
    with checkout:
        assert (checkout.path / "flows" / "flow.py").read_text() == FLOW
    # The scan really watched git talk to the server (so it could have seen a leak) ...
    assert any(b"remote-http" in line and str(token_server.port).encode() in line for line in seen)
    # ... and the token was in no argv, no file under the state dir, no log record.
    assert not [line for line in seen if TOKEN.encode() in line]
    assert "fetch" in argv_log.read_text()
    assert TOKEN not in argv_log.read_text()
    assert files_containing(state, TOKEN.encode()) == []
    assert TOKEN not in (state / "storage" / "etl" / ".repo" / "config").read_text()
    assert TOKEN not in caplog.text
    assert any(line.endswith(" 401") for line in token_server.requests())  # auth was required


async def test_token_from_systemd_credential(
    repos: Path, state: Path, tmp_path: Path, token_server: GitHttpServer
) -> None:
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "git-token-etl").write_text(TOKEN)  # no trailing newline
    storage = Storage(state, credentials_dir=credentials)
    with await storage.prepare("etl", GitSpec(token_server.url("flows.git"))) as checkout:
        assert checkout.commit == head(repos / "flows.git")
    # Without a matching credential the same server refuses.
    with pytest.raises(StorageError, match="authentication failed"):
        await storage.prepare("other", GitSpec(token_server.url("flows.git")))


async def test_password_in_url_is_kept_out_of_argv(
    repos: Path,
    state: Path,
    tmp_path: Path,
    token_server: GitHttpServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    git, argv_log = recording_git(tmp_path)
    storage = Storage(state, git_binary=git)
    url = token_server.url("flows.git").replace("http://", f"http://deploy:{TOKEN}@")
    with await storage.prepare("etl", GitSpec(url)) as checkout:
        assert checkout.commit == head(repos / "flows.git")
        assert checkout.source == f"{token_server.url('flows.git')} (branch main)"
    assert TOKEN not in argv_log.read_text()
    assert "deploy@127.0.0.1" in argv_log.read_text()
    assert files_containing(state, TOKEN.encode()) == []
    assert TOKEN not in caplog.text


# -- errors ------------------------------------------------------------------------------------


async def test_wrong_token_is_authentication_failed(
    state: Path, tmp_path: Path, token_server: GitHttpServer, caplog: pytest.LogCaptureFixture
) -> None:
    wrong = tmp_path / "wrong-token"
    wrong.write_text("not-the-token\n")
    url = token_server.url("flows.git")
    with pytest.raises(StorageError) as refused:
        await Storage(state).prepare("etl", GitSpec(url, token_file=wrong))
    assert (
        str(refused.value)
        == f"Could not pull flow code from {url} (branch main): authentication failed"
    )
    # No token at all: git must not wait for a prompt.
    with pytest.raises(StorageError, match=r"\(branch main\): authentication failed$"):
        await asyncio.wait_for(Storage(state).prepare("etl2", GitSpec(url)), 30)
    # A password in the URL is stripped from the message.
    with pytest.raises(StorageError) as stripped:
        await Storage(state).prepare(
            "etl3", GitSpec(url.replace("http://", "http://u:wrong-secret@"))
        )
    assert "wrong-secret" not in str(stripped.value)
    assert str(stripped.value).startswith(f"Could not pull flow code from {url} ")
    assert "not-the-token" not in caplog.text and "wrong-secret" not in caplog.text


async def test_unreadable_token_file(state: Path, tmp_path: Path, server: GitHttpServer) -> None:
    with pytest.raises(StorageError, match="cannot read the token file"):
        await Storage(state).prepare(
            "etl", GitSpec(server.url("flows.git"), token_file=tmp_path / "missing")
        )


@pytest.mark.parametrize(
    ("make_url", "reason"),
    [
        (lambda repos, server: str(repos / "missing.git"), "repository not found"),
        (lambda repos, server: f"file://{repos}/missing.git", "repository not found"),
        (lambda repos, server: server.url("missing.git"), "repository not found"),
        (lambda repos, server: "htps://example.invalid/x.git", "unsupported URL"),
        (lambda repos, server: f"http://127.0.0.1:{free_port()}/x.git", "could not connect"),
    ],
)
async def test_bad_urls(
    repos: Path, state: Path, server: GitHttpServer, make_url: object, reason: str
) -> None:
    url = make_url(repos, server)  # type: ignore[operator]
    with pytest.raises(StorageError) as failed:
        await Storage(state).prepare("etl", GitSpec(url))
    assert str(failed.value) == f"Could not pull flow code from {url} (branch main): {reason}"
    assert not [p for p in (state / "storage" / "etl").iterdir() if p.name != ".repo"]


async def test_unknown_branch_and_commit(state: Path, server: GitHttpServer) -> None:
    url = server.url("flows.git")
    with pytest.raises(StorageError) as branch:
        await Storage(state).prepare("etl", GitSpec(url, branch="nope"))
    assert str(branch.value) == f"Could not pull flow code from {url} (branch nope): unknown branch"
    sha = "0123456789abcdef0123456789abcdef01234567"
    with pytest.raises(StorageError) as commit:
        await Storage(state).prepare("etl", GitSpec(url, branch=None, commit=sha))
    assert (
        str(commit.value) == f"Could not pull flow code from {url} (commit {sha}): unknown commit"
    )
    with pytest.raises(StorageError, match=r"unknown commit$"):
        await Storage(state).prepare("etl", GitSpec(url, branch=None, commit="abcdef12"))


async def test_hanging_server_times_out_and_kills_git(state: Path) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)  # accepts TCP connections in the kernel, never answers
        port = listener.getsockname()[1]
        url = f"http://127.0.0.1:{port}/x.git"
        storage = Storage(state, timeout=1.5)
        with pytest.raises(StorageError) as failed:
            await storage.prepare("etl", GitSpec(url))
        assert str(failed.value) == (
            f"Could not pull flow code from {url} (branch main): could not connect: "
            "timed out after 1.5s"
        )
        await asyncio.sleep(0.2)
        assert not [line for line in all_cmdlines() if f":{port}/".encode() in line]


async def test_fetch_failure_falls_back_to_last_good_commit(
    repos: Path, state: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with GitHttpServer(repos) as server:
        url = server.url("flows.git")
        storage = Storage(state)
        spec = GitSpec(url, pull_interval=0)
        good = await storage.prepare("etl", spec)
        good.release()
    # The server is gone now.
    fallback = await storage.prepare("etl", spec)
    assert fallback.commit == good.commit and fallback.root == good.root
    assert fallback.warning is not None
    assert fallback.warning.startswith(
        f"Could not pull flow code from {url} (branch main): could not connect"
    )
    assert good.commit in fallback.warning
    assert any(
        r.levelno == logging.WARNING and good.commit in r.getMessage() for r in caplog.records
    )
    fallback.release()
    # Also after a restart: the last good commit is read back from the cache repository.
    with await Storage(state).prepare("etl", spec) as restarted:
        assert restarted.commit == good.commit and restarted.warning is not None


async def test_submodules_over_http_with_token(repos: Path, state: Path, token_file: Path) -> None:
    lib = make_bare_repo(repos, "lib.git", {"helpers.py": "VALUE = 42\n"})
    push_commit(
        repos / "flows.git",
        {"uses_lib.py": "import lib\n"},
        submodules={"lib": ("../lib.git", head(lib))},
    )
    with GitHttpServer(repos, token=TOKEN) as server:
        storage = Storage(state)
        spec = GitSpec(server.url("flows.git"), token_file=token_file, submodules=True)
        with await storage.prepare("etl", spec) as checkout:
            assert checkout.root.name == f"{checkout.commit}+submodules"
            assert (checkout.path / "lib" / "helpers.py").read_text() == "VALUE = 42\n"
            assert (checkout.path / "uses_lib.py").exists()
        assert any(line.startswith("POST /lib.git/git-upload-pack") for line in server.requests())
        assert files_containing(state, TOKEN.encode()) == []
        # Without submodules the gitlink stays an empty directory.
        with await storage.prepare(
            "etl", GitSpec(server.url("flows.git"), token_file=token_file)
        ) as plain:
            assert plain.root.name == plain.commit
            assert not (plain.path / "lib" / "helpers.py").exists()


async def test_with_the_real_settings_model(repos: Path, state: Path, token_file: Path) -> None:
    from agent.settings import GitSettings

    with GitHttpServer(repos, token=TOKEN) as server:
        git = GitSettings.model_validate(
            {
                "url": server.url("flows.git"),
                "token_file": str(token_file),
                "subdirectory": "flows",
                "pull_interval": "5m",
            }
        )
        with await Storage(state).prepare("etl", git) as checkout:
            assert checkout.source == f"{server.url('flows.git')} (branch main)"
            assert (checkout.path / "flow.py").read_text() == FLOW


async def test_failed_build_leaves_no_checkout(repos: Path, state: Path, tmp_path: Path) -> None:
    """A checkout that fails half way never appears under its final name."""
    script = tmp_path / "git-failing-checkout"
    script.write_text(
        "#!/bin/sh\n"
        'for a in "$@"; do [ "$a" = checkout-index ] && { echo "fatal: disk full" >&2; '
        "exit 128; }; done\n"
        'exec /usr/bin/git "$@"\n'
    )
    script.chmod(0o755)
    url = str(repos / "flows.git")
    with pytest.raises(StorageError) as failed:
        await Storage(state, git_binary=str(script)).prepare("etl", GitSpec(url))
    assert failed.value.reason == "disk full"
    assert [p.name for p in (state / "storage" / "etl").iterdir()] == [".repo"]
    with await Storage(state).prepare("etl", GitSpec(url)) as checkout:  # and it recovers
        assert (checkout.path / "README").read_text() == "hello\n"


async def test_cancelled_prepare_kills_git_and_frees_the_lock(repos: Path, state: Path) -> None:
    with GitHttpServer(repos, delay=1.0) as server:
        storage = Storage(state)
        spec = GitSpec(server.url("flows.git"))
        task = asyncio.create_task(storage.prepare("etl", spec))
        await asyncio.sleep(0.5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.1)
        assert not [line for line in all_cmdlines() if f":{server.port}/".encode() in line]
        assert storage.leased() == {}
        with await asyncio.wait_for(storage.prepare("etl", spec), 30) as checkout:
            assert checkout.commit == head(repos / "flows.git")
        assert not [p for p in (state / "storage" / "etl").iterdir() if p.name.startswith(".tmp-")]
