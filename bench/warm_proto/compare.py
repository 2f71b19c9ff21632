"""Is a warm run's process indistinguishable from a cold one? Issue 17, question 2.

    RUNNER_AGENT_TEST_PREFECT_VENV=$P $A/bin/python -m bench.warm_proto.compare [--user nobody]

Runs flows/probe.py twice cold, twice forked from a template and twice handed over to a waiting
process, with a run environment that differs from the template's (TZ, PREFECT_LOGGING_LEVEL,
HOME, an extra variable, another umask, optionally another user), and prints every field of
the probe's dump that differs between cold and warm, next to whether it also differs between
the two cold runs (then it is per-run anyway: ids, random values).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from agent.launch.base import find_user
from bench.api import BenchApi
from bench.warm_proto.measure import Harness, server
from tests.integration.prefect_server import prefect_venv

RUN_ENV = {
    "TZ": "Asia/Tokyo",
    "PREFECT_LOGGING_LEVEL": "DEBUG",
    "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "WARNING",
    "RUNNER_AGENT_PROBE": "run-only",
}


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def normalized(path: Path, run_id: str) -> dict[str, Any]:
    text = path.read_text().replace(run_id, "<RUN>")
    return flatten(json.loads(text))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.warm_proto.compare")
    parser.add_argument("--user", default="", help="run the flows as this user")
    parser.add_argument("--api-url", default=None)
    args = parser.parse_args(argv)
    venv = prefect_venv(os.environ)
    with tempfile.TemporaryDirectory(prefix="warm-compare-") as tmp:
        work = Path(tmp)
        work.chmod(0o755)
        home, out = work / "home", work / "out"
        home.mkdir()
        out.mkdir()
        # The run's own Prefect profile and fsspec config, which the template must not mask.
        (home / ".prefect").mkdir()
        (home / ".prefect" / "profiles.toml").write_text(
            'active = "probe"\n[profiles.probe]\nPREFECT_TASKS_DEFAULT_RETRIES = "3"\n'
        )
        (home / ".config" / "fsspec").mkdir(parents=True)
        (home / ".config" / "fsspec" / "conf.json").write_text('{"file": {"auto_mkdir": true}}')
        if args.user:
            entry = find_user(args.user)
            for path in (
                home,
                home / ".prefect",
                home / ".config",
                home / ".config" / "fsspec",
                out,
            ):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        with server(venv, work / "server", args.api_url) as api_url:
            api = BenchApi(api_url)
            h = Harness(api, str(venv / "bin" / "python"), work, api_url, {"HOME": str(home)})
            dumps: dict[str, dict[str, Any]] = {}
            try:
                h.deploy("probe", "probe.py:probe")
                h.start_pools(2)
                os.umask(0o027)  # after the templates started: the run must get this one
                for label in ("cold-1", "cold-2", "fork-1", "fork-2", "handover-1", "handover-2"):
                    mode = label.split("-")[0]
                    run_id = h.create_and_claim("probe")
                    target = out / f"{label}.json"
                    result = h.finish(
                        h.launch_and_wait(
                            mode,
                            run_id,
                            user=args.user,
                            extra_env={**RUN_ENV, "PROBE_OUT": str(target)},
                        )
                    )
                    print(
                        f"{label}: status {result.status} {result.final} "
                        f"fallback={result.fallback}",
                        file=sys.stderr,
                    )
                    if result.status != 0:
                        log = work / "runs" / run_id / "output.log"
                        print(log.read_text()[-3000:], file=sys.stderr)
                    dumps[label] = normalized(target, run_id)
            finally:
                os.umask(0o022)
                h.stop_pools()
                api.close()
    cold, cold2 = dumps["cold-1"], dumps["cold-2"]
    report: dict[str, Any] = {}
    for mode in ("fork", "handover"):
        warm, warm2 = dumps[f"{mode}-1"], dumps[f"{mode}-2"]
        diffs = {}
        for key in sorted(set(cold) | set(warm)):
            if cold.get(key) != warm.get(key):
                diffs[key] = {
                    "cold": cold.get(key),
                    "warm": warm.get(key),
                    "per_run_anyway": cold.get(key) != cold2.get(key),
                    "warm_runs_differ": warm.get(key) != warm2.get(key),
                }
        report[mode] = diffs
    report["checked_fields"] = len(cold)
    facts = (
        "pid_is_importer",
        "resuid",
        "resgid",
        "groups",
        "umask",
        "cwd",
        "tempdir",
        "tzname",
        "settings.profile",
        "settings.tasks.default_retries",
        "settings.logging.level",
        "settings.api.url",
        "threads",
        "sys.path",
        "main_file",
        "environ.TZ",
        "environ.RUNNER_AGENT_PROBE",
        "import_time_state.DEFAULT_PREFECT_HOME",
        "import_time_state.fsspec_conf_dir",
        "loggers.prefect.effective",
    )
    report["warm facts (fork-1)"] = {k: dumps["fork-1"].get(k) for k in facts}
    for label in ("cold-1", "fork-1", "handover-1"):
        report[f"fds {label}"] = sorted(v for k, v in dumps[label].items() if k.startswith("fds."))
    print(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
