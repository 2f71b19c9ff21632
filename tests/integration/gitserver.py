"""A loopback git HTTP server for tests: `git http-backend` behind a small http.server CGI wrapper.

It runs as its own process (`GitHttpServer` starts and stops it) so that the tests' event loop
stays free. Every request is appended to a log as `METHOD PATH?QUERY STATUS`, so tests can count
fetches. With a token (passed through the environment, never argv) every request needs
`Authorization: Basic base64(<any user>:<token>)` or `Bearer <token>`, else it gets a 401.
"""

from __future__ import annotations

import argparse
import base64
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType

TOKEN_ENV = "GITSERVER_TOKEN"
HTTP_BACKEND = "/usr/lib/git-core/git-http-backend"


@dataclass(frozen=True)
class GitSpec:
    """A stand-in for settings.GitSettings (same fields) for tests of agent.storage."""

    url: str
    branch: str | None = "main"
    commit: str | None = None
    token_file: Path | None = None
    submodules: bool = False
    subdirectory: str = ""
    pull_interval: float = 60.0


class GitHttpServer:
    """`with GitHttpServer(root) as server:` serves the bare repositories under `root`."""

    def __init__(self, root: Path, *, token: str | None = None, delay: float = 0.0) -> None:
        self.root = root
        self.token = token
        self.delay = delay
        self.log = root.parent / f"{root.name}-requests.log"
        self.port = 0
        self._proc: subprocess.Popen[str] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, repo: str) -> str:
        return f"{self.base_url}/{repo}"

    def requests(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []

    def fetches(self, repo: str) -> int:
        """How many fetch negotiations (ref advertisements for upload-pack) the repo served."""
        return sum(
            1
            for line in self.requests()
            if line.startswith(f"GET /{repo}/info/refs?service=git-upload-pack ")
            and not line.endswith(" 401")
        )

    def __enter__(self) -> GitHttpServer:
        env = dict(os.environ)
        env.pop(TOKEN_ENV, None)
        if self.token is not None:
            env[TOKEN_ENV] = self.token
        self._proc = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--root",
                str(self.root),
                "--log",
                str(self.log),
                "--delay",
                str(self.delay),
            ],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if not line.startswith("PORT "):
            self.__exit__(None, None, None)
            raise RuntimeError(f"git server did not start: {line!r}")
        self.port = int(line.split()[1])
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            if self._proc.stdout is not None:
                self._proc.stdout.close()
            self._proc = None


def make_bare_repo(root: Path, name: str, files: dict[str, str], *, branch: str = "main") -> Path:
    """A bare repository `root/name` with one commit holding `files`."""
    bare = root / name
    subprocess.run(["git", "init", "--quiet", "--bare", "-b", branch, str(bare)], check=True)
    push_commit(bare, files, branch=branch, message="initial")
    return bare


def push_commit(
    bare: Path,
    files: dict[str, str],
    *,
    branch: str = "main",
    message: str = "change",
    submodules: dict[str, tuple[str, str]] | None = None,
) -> str:
    """Commit `files` (path -> text) on top of `branch` and push it; returns the new sha.

    `submodules` maps a path to (url, sha): a gitlink plus its `.gitmodules` entry.
    """
    work = bare.parent / f".work-{bare.name}-{time.monotonic_ns()}"
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.com",
    }
    try:
        subprocess.run(
            ["git", "clone", "--quiet", str(bare), str(work)],
            check=True,
            env=env,
            capture_output=True,
        )
        subprocess.run(["git", "-C", str(work), "checkout", "--quiet", "-B", branch], check=True)
        for path, text in files.items():
            target = work / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
        subprocess.run(["git", "-C", str(work), "add", "--all"], check=True)
        for path, (url, sha) in (submodules or {}).items():
            for key, value in (("path", path), ("url", url)):
                subprocess.run(
                    [
                        "git",
                        "-C",
                        str(work),
                        "config",
                        "-f",
                        ".gitmodules",
                        f"submodule.{path}.{key}",
                        value,
                    ],
                    check=True,
                )
            subprocess.run(
                [
                    "git",
                    "-C",
                    str(work),
                    "update-index",
                    "--add",
                    "--cacheinfo",
                    f"160000,{sha},{path}",
                ],
                check=True,
            )
            subprocess.run(["git", "-C", str(work), "add", ".gitmodules"], check=True)
        subprocess.run(
            ["git", "-C", str(work), "commit", "--quiet", "-m", message], check=True, env=env
        )
        subprocess.run(
            ["git", "-C", str(work), "push", "--quiet", "origin", branch],
            check=True,
            env=env,
            capture_output=True,
        )
        out = subprocess.run(
            ["git", "-C", str(work), "rev-parse", "HEAD"],
            check=True,
            capture_output=True,
            text=True,
        )
        return out.stdout.strip()
    finally:
        shutil.rmtree(work, ignore_errors=True)


# -- the server process ---------------------------------------------------------------------------


def _authorized(header: str | None, token: str) -> bool:
    if not header:
        return False
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer":
        return value.strip() == token
    if scheme.lower() == "basic":
        try:
            _user, _, password = base64.b64decode(value.strip()).decode().partition(":")
        except ValueError:
            return False
        return password == token
    return False


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.0"

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _record(self, status: int) -> None:
        with self.server.log_path.open("a") as handle:
            handle.write(f"{self.command} {self.path} {status}\n")

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _serve(self) -> None:
        time.sleep(self.server.delay)
        token = self.server.token
        if token is not None and not _authorized(self.headers.get("Authorization"), token):
            self._record(401)
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="git"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = self._read_body()
        path, _, query = self.path.partition("?")
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "GIT_PROJECT_ROOT": str(self.server.root),
            "GIT_HTTP_EXPORT_ALL": "1",
            "REQUEST_METHOD": self.command,
            "PATH_INFO": path,
            "QUERY_STRING": query,
            "CONTENT_TYPE": self.headers.get("Content-Type", ""),
            "CONTENT_LENGTH": str(len(body)),
            "REMOTE_ADDR": self.client_address[0],
            "GIT_PROTOCOL": self.headers.get("Git-Protocol", ""),
            "HTTP_CONTENT_ENCODING": self.headers.get("Content-Encoding", ""),
        }
        result = subprocess.run(
            [HTTP_BACKEND], input=body, env=env, capture_output=True, check=False
        )
        head, _, payload = result.stdout.partition(b"\r\n\r\n")
        status, headers = 200, []
        for raw in head.decode("latin-1").split("\r\n"):
            key, _, value = raw.partition(":")
            if key.lower() == "status":
                status = int(value.split()[0])
            elif key:
                headers.append((key, value.strip()))
        self._record(status)
        self.send_response(status)
        for key, value in headers:
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: Path, log_path: Path, delay: float, token: str | None) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root = root
        self.log_path = log_path
        self.delay = delay
        self.token = token


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--log", type=Path, required=True)
    parser.add_argument("--delay", type=float, default=0.0)
    args = parser.parse_args()
    server = _Server(args.root, args.log, args.delay, os.environ.get(TOKEN_ENV))
    print(f"PORT {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
