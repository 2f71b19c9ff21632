"""Flow code from git: one shared fetch per deployment, one immutable directory per commit.

Layout under `<state_dir>/storage/<deployment>/`:
- `.repo/`: a bare repository, fetched at most every `pull_interval` under a per-deployment lock,
  so concurrent runs share one fetch;
- `<sha>/` (or `<sha>+submodules/`): the files of one commit, built in a `.tmp-*` directory and
  renamed into place, so a crash never leaves a half checkout under a final name.

A run holds a lease on its commit directory (`Checkout.release()` or `with checkout:`) and
`gc()` removes only directories that no lease holds and that are not their deployment's newest,
so no running flow ever sees its code change or vanish under it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Collection, Mapping
from pathlib import Path

from agent.checkouts import Checkout, GitSource, StorageError, describe_source
from agent.gitstorage import (
    TMP_PREFIX,
    TRASH_PREFIX,
    Credentials,
    Git,
    GitFailed,
    Remote,
    base_environment,
    dir_name,
    install_askpass,
    list_dir,
    make_dirs,
    publish,
    ref_problem,
    remove_tree,
    subdirectory_parts,
)

__all__ = ["Checkout", "GitSource", "Storage", "StorageError", "describe_source"]

log = logging.getLogger("agent.storage")

DEFAULT_TIMEOUT = 300.0  # seconds for any one git process
REPO = ".repo"
ASKPASS = ".askpass.sh"

_COMMIT_DIR = re.compile(r"[0-9a-f]{40}([0-9a-f]{24})?(\+submodules)?")


class Storage:
    def __init__(
        self,
        state_dir: Path,
        *,
        git_binary: str = "git",
        clock: Callable[[], float] = time.monotonic,
        credentials_dir: Path | None = None,
        environ: Mapping[str, str] | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.state_dir = state_dir
        self.root = state_dir / "storage"
        self.credentials_dir = credentials_dir
        self._clock = clock
        self._git = Git(
            git_binary, base_environment(os.environ if environ is None else environ), timeout
        )
        self._locks: dict[str, asyncio.Lock] = {}
        self._fetched: dict[str, tuple[tuple[str, str], float, str]] = {}  # (url, ref), time, sha
        self._newest: dict[str, Path] = {}
        self._leases: Counter[Path] = Counter()
        self._askpass_installed = False

    # -- prepare -------------------------------------------------------------------------------

    async def prepare(self, deployment_name: str, git: GitSource) -> Checkout:
        """Fetch (if due) and check out the deployment's code; raise StorageError if impossible."""
        source = describe_source(git)
        name = dir_name(deployment_name)
        try:
            parts = subdirectory_parts(git.subdirectory)
        except ValueError as exc:
            raise StorageError(source, str(exc)) from None
        problem = ref_problem(git.branch, git.commit)
        if problem is not None:
            raise StorageError(source, problem)
        remote = Remote.parse(git.url)
        credentials = self._credentials(name, git, remote, source)
        if not self._askpass_installed:  # once per process, so an upgrade replaces it
            make_dirs(self.root)
            install_askpass(self.root / ASKPASS)
            self._askpass_installed = True
        async with self._lock(name):
            deploy_dir = self.root / name
            repo = await self._ensure_repo(deploy_dir, source)
            sha, warning = await self._resolve(name, repo, remote, credentials, git, source)
            try:
                root = await self._ensure_checkout(
                    deploy_dir, repo, sha, git.submodules, remote, credentials
                )
            except GitFailed as exc:
                raise StorageError(source, exc.reason) from None
            path = root.joinpath(*parts)
            if not path.is_dir():
                raise StorageError(
                    source, f"subdirectory {git.subdirectory!r} does not exist in commit {sha}"
                )
            self._newest[name] = root
            self._leases[root] += 1
        return Checkout(deployment_name, sha, root, path, source, warning, self._unlease)

    def adopt(self, path: Path) -> Checkout | None:
        """Lease the commit directory holding `path` again (a run resumed after a restart)."""
        try:
            relative = path.resolve().relative_to(self.root.resolve())
        except ValueError:
            return None
        if len(relative.parts) < 2 or not _COMMIT_DIR.fullmatch(relative.parts[1]):
            return None
        root = self.root / relative.parts[0] / relative.parts[1]
        if not root.is_dir():
            return None
        self._leases[root] += 1
        commit = relative.parts[1].split("+")[0]
        return Checkout(
            relative.parts[0], commit, root, self.root / relative, str(root), None, self._unlease
        )

    def leased(self) -> dict[Path, int]:
        return {path: count for path, count in self._leases.items() if count > 0}

    def _unlease(self, root: Path) -> None:
        self._leases[root] -= 1
        if self._leases[root] <= 0:
            del self._leases[root]

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    def _credentials(self, name: str, git: GitSource, remote: Remote, source: str) -> Credentials:
        """token_file, else the systemd credential `git-token-<name>`, else `git-token`."""
        token_file = git.token_file
        if token_file is None and self.credentials_dir is not None:
            for candidate in (f"git-token-{name}", "git-token"):
                if (self.credentials_dir / candidate).is_file():
                    token_file = self.credentials_dir / candidate
                    break
        if token_file is not None and not os.access(token_file, os.R_OK):
            raise StorageError(source, f"cannot read the token file {token_file}")
        if token_file is None and remote.password is None:
            return Credentials(username=remote.username)
        return Credentials(
            token_file, remote.username, None if token_file is not None else remote.password
        )

    async def _resolve(
        self,
        name: str,
        repo: Path,
        remote: Remote,
        credentials: Credentials,
        git: GitSource,
        source: str,
    ) -> tuple[str, str | None]:
        """The commit to run, and a warning when it is an older one because the fetch failed."""
        env = credentials.environment(self.root / ASKPASS)
        if git.commit:
            try:
                return await self._fetch_commit(repo, remote.url, git.commit.lower(), env), None
            except GitFailed as exc:
                raise StorageError(source, exc.reason) from None
        branch = git.branch or "main"
        key = (remote.url, branch)
        cached = self._fetched.get(name)
        if cached and cached[0] == key and self._clock() - cached[1] < git.pull_interval:
            return cached[2], None
        ref = f"refs/heads/{branch}"
        try:
            await self._git.run(
                [
                    "--git-dir",
                    str(repo),
                    "fetch",
                    "--quiet",
                    "--no-tags",
                    "--no-write-fetch-head",
                    "--update-head-ok",
                    "--end-of-options",
                    remote.url,
                    f"+{ref}:{ref}",
                ],
                extra_env=env,
            )
            sha = await self._rev_parse(repo, ref)
        except GitFailed as exc:
            error = StorageError(source, exc.reason)
            last = await self._rev_parse_or_none(repo, ref)
            if last is None:
                raise error from None
            warning = f"{error}; running the last good commit {last}"
            log.warning("%s", warning)
            return last, warning
        self._fetched[name] = (key, self._clock(), sha)
        log.info("fetched %s: commit %s", source, sha)
        return sha, None

    async def _fetch_commit(self, repo: Path, url: str, commit: str, env: dict[str, str]) -> str:
        """A pinned commit: no network if we have it; else fetch it by sha, else every ref."""
        sha = await self._rev_parse_or_none(repo, commit)
        if sha is not None:
            return sha
        fetch = [
            "--git-dir",
            str(repo),
            "fetch",
            "--quiet",
            "--no-tags",
            "--no-write-fetch-head",
            "--end-of-options",
            url,
        ]
        if len(commit) in (40, 64):  # servers allow wanting a reachable sha (protocol v2)
            try:
                await self._git.run(
                    [*fetch, f"{commit}:refs/pins/{commit}"], extra_env=env, ref_kind="commit"
                )
                return await self._rev_parse(repo, commit)
            except GitFailed as exc:
                if exc.reason != "unknown commit":
                    raise
        await self._git.run(
            [*fetch, "+refs/heads/*:refs/all/heads/*", "+refs/tags/*:refs/all/tags/*"],
            extra_env=env,
            ref_kind="commit",
        )
        sha = await self._rev_parse_or_none(repo, commit)
        if sha is None:
            raise GitFailed("unknown commit")
        return sha

    async def _rev_parse(self, repo: Path, rev: str) -> str:
        out = await self._git.run(
            [
                "--git-dir",
                str(repo),
                "rev-parse",
                "--verify",
                "--quiet",
                "--end-of-options",
                f"{rev}^{{commit}}",
            ],
            ref_kind="commit",
        )
        return out.strip()

    async def _rev_parse_or_none(self, repo: Path, rev: str) -> str | None:
        try:
            return await self._rev_parse(repo, rev)
        except GitFailed:
            return None

    # -- directories ---------------------------------------------------------------------------

    async def _ensure_repo(self, deploy_dir: Path, source: str) -> Path:
        repo = deploy_dir / REPO
        if (repo / "HEAD").is_file():
            return repo
        make_dirs(deploy_dir)
        tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=deploy_dir))
        try:
            await self._git.run(["init", "--quiet", "--bare", str(tmp)])
        except GitFailed as exc:
            await remove_tree(tmp)
            raise StorageError(source, exc.reason) from None
        await remove_tree(repo)  # an incomplete one from a crash: `HEAD` is written early by init
        publish(tmp, repo)
        return repo

    async def _ensure_checkout(
        self,
        deploy_dir: Path,
        repo: Path,
        sha: str,
        submodules: bool,
        remote: Remote,
        credentials: Credentials,
    ) -> Path:
        final = deploy_dir / (f"{sha}+submodules" if submodules else sha)
        if final.is_dir():
            os.utime(final)  # gc falls back to "newest by mtime" after a restart
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{sha[:12]}-", dir=deploy_dir))
        index = tmp.with_name(tmp.name + ".index")
        try:
            if submodules:
                await self._clone_with_submodules(repo, tmp, sha, remote, credentials)
            else:
                # A private index: no `.git` in the checkout, and builds never share state.
                env = {"GIT_INDEX_FILE": str(index)}
                await self._git.run(["--git-dir", str(repo), "read-tree", sha], extra_env=env)
                await self._git.run(
                    [
                        "--git-dir",
                        str(repo),
                        "--work-tree",
                        str(tmp),
                        "checkout-index",
                        "--all",
                        "--force",
                    ],
                    extra_env=env,
                )
            publish(tmp, final)
        except BaseException:
            await asyncio.shield(remove_tree(tmp))
            raise
        finally:
            index.unlink(missing_ok=True)
        log.info("checked out commit %s into %s", sha, final)
        return final

    async def _clone_with_submodules(
        self, repo: Path, target: Path, sha: str, remote: Remote, credentials: Credentials
    ) -> None:
        env = credentials.environment(self.root / ASKPASS)
        await self._git.run(
            ["clone", "--quiet", "--no-checkout", "--end-of-options", str(repo), str(target)]
        )
        # Relative submodule URLs resolve against origin; the URL holds no password.
        await self._git.run(["-C", str(target), "remote", "set-url", "origin", remote.url])
        await self._git.run(["-C", str(target), "checkout", "--quiet", "--detach", sha])
        await self._git.run(
            ["-C", str(target), "submodule", "update", "--quiet", "--init", "--recursive"],
            extra_env=env,
        )

    # -- garbage collection --------------------------------------------------------------------

    async def gc(self, deployments: Collection[str] | None = None) -> list[Path]:
        """Remove commit directories that no lease holds and that are not the newest.

        With `deployments` (the configured names), the storage of any other deployment is
        removed entirely once none of its directories is leased.
        """
        if not self.root.is_dir():
            return []
        keep = None if deployments is None else {dir_name(d) for d in deployments}
        removed: list[Path] = []
        for deploy_dir in sorted(self.root.iterdir()):
            if not deploy_dir.is_dir() or deploy_dir.name.startswith("."):
                if deploy_dir.name.startswith(TRASH_PREFIX):
                    await remove_tree(deploy_dir)
                continue
            async with self._lock(deploy_dir.name):
                removed += await self._gc_deployment(deploy_dir, keep)
        return removed

    async def _gc_deployment(self, deploy_dir: Path, keep: set[str] | None) -> list[Path]:
        name = deploy_dir.name
        children = list_dir(deploy_dir)
        commits = [c for c in children if _COMMIT_DIR.fullmatch(c.name) and c.is_dir()]
        if keep is not None and name not in keep and not any(self._leases[c] for c in commits):
            self._newest.pop(name, None)
            self._fetched.pop(name, None)
            await remove_tree(deploy_dir)
            return [deploy_dir]
        newest = self._newest.get(name)
        if newest is None and commits:
            newest = max(commits, key=lambda c: c.stat().st_mtime)
        removed = []
        for child in children:
            leftover = child.name.startswith((TMP_PREFIX, TRASH_PREFIX))  # builds hold the lock
            unused = child in commits and child != newest and not self._leases[child]
            if leftover or unused:
                await remove_tree(child)
                if unused:
                    removed.append(child)
        return removed
