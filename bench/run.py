"""Issue 8's benchmark: runner-agent and Prefect's Runner, side by side, written to BENCHMARKS.md.

From the repository root, in the agent's venv (which has runner-agent installed):

    RUNNER_AGENT_TEST_PREFECT_VENV=/path/to/prefect-venv \\
        /path/to/agent-venv/bin/python -m bench.run [--smoke] [--out BENCHMARKS.md]

`--only cancel` (repeatable) measures only the named scenarios; the others read n/a, so such a
partial report needs an explicit `--out` and never replaces BENCHMARKS.md by default.

It starts its own Prefect server, runs every scenario against runner-agent, then against the
Runner (`footprint` and `pool`, a work pool's pickup, are runner-agent's only; `engines`
compares runner-agent's cold and warm engines with the Runner at its default and at a 1 s
poll, bench/engines.py), and stops everything it started, also on failure and on Ctrl-C or
SIGTERM. Exit status 0 when every scenario was measured, 1 when one failed (the report then
says which), 2 on bad usage. Not for CI: the test suite runs `--smoke` (tests/bench).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import NoReturn

import httpx

from bench import engines, pools, procs, scenarios, subjects
from bench.api import BenchApi, BenchError
from bench.imports import ImportStep
from bench.imports import measure as measure_imports
from bench.machine import agent_revision, command_line, machine_info
from bench.plan import FULL, LIMIT, SMOKE
from bench.report import ContenderResult, Report, render
from tests.integration.prefect_server import VENV_ENV, PrefectServer, PrefectServerError

REPO = Path(__file__).resolve().parent.parent


SCENARIOS = (
    "idle",
    "sequential",
    "bursts",
    "cancel",
    "footprint",
    "pool",
    "engines",
    "imports",
)
# What `Bench.contender` measures: neither contender is started when none of these is asked for.
SIDE_BY_SIDE = frozenset({"idle", "sequential", "bursts", "cancel"})


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="1 run per scenario, a 3 s idle window (what the test suite runs)",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="where to write the report (default: BENCHMARKS.md)"
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=SCENARIOS,
        default=[],
        metavar="SCENARIO",
        help=f"measure only this scenario, repeatable: {', '.join(SCENARIOS)}",
    )
    parser.add_argument(
        "--prefect-venv",
        type=Path,
        default=os.environ.get(VENV_ENV) or None,
        help=f"venv with prefect 3.x (default: ${VENV_ENV})",
    )
    parser.add_argument(
        "--agent-log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    parser.add_argument(
        "--agent-flow-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra flow_run.env for runner-agent's runs (for experiments)",
    )
    parser.add_argument(
        "--tag",
        default=None,
        help=f"value of ${procs.MARKER} in every process started (default: random)",
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the work directory (logs, configs) instead of removing it",
    )
    args = parser.parse_args(argv)
    if args.prefect_venv is None:
        parser.error(f"no Prefect venv: pass --prefect-venv or set ${VENV_ENV}")
    if any("=" not in item for item in args.agent_flow_env):
        parser.error("--agent-flow-env takes KEY=VALUE")
    if args.only and args.out is None:
        parser.error("--only writes a partial report: name it with --out")
    if args.out is None:
        args.out = REPO / "BENCHMARKS.md"
    args.scenarios = frozenset(args.only or SCENARIOS)
    return args


def _raise_interrupt(signum: int, frame: FrameType | None) -> NoReturn:
    raise KeyboardInterrupt(f"signal {signum}")


def _attempt(errors: list[str], what: str, step: Callable[[], None]) -> None:
    """Run one scenario; a failure is recorded and the next scenario still runs."""
    try:
        step()
    except (BenchError, httpx.HTTPError, OSError, ValueError) as exc:
        errors.append(f"{what}: {exc}")
        print(f"bench: {what} failed: {exc}", file=sys.stderr)


class Bench:
    def __init__(
        self, args: argparse.Namespace, workdir: Path, tag: str, server: PrefectServer
    ) -> None:
        self.args = args
        self.server = server
        self.plan = SMOKE if args.smoke else FULL
        self.workdir = workdir
        self.tag = tag
        self.prefect_python = str(Path(args.prefect_venv) / "bin" / "python")
        self.agent_bin = Path(sys.executable).parent / "runner-agent"
        self.flow_env = dict(item.split("=", 1) for item in args.agent_flow_env)
        # The agent's own default, so both contenders poll as often as a stock agent does.
        from agent.settings import AgentSettings

        self.poll_interval = float(AgentSettings.model_fields["poll_interval"].default)
        self.spare_sessions: set[int] = set()

    def log(self, message: str) -> None:
        print(f"bench {time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)

    def contender(
        self, api: BenchApi, start: Callable[[], subjects.Contender], result: ContenderResult
    ) -> None:
        plan, errors = self.plan, result.errors
        if not self.args.scenarios & SIDE_BY_SIDE:
            return
        contender = start()
        try:
            ids = {
                role: api.wait_deployment(flow, name, timeout=120)
                for role, (flow, name) in contender.deployments.items()
            }
            self.log(f"{result.label}: deployments registered; settling {plan.settle:g} s")
            time.sleep(plan.settle)

            def idle() -> None:
                result.idle = scenarios.idle(contender, plan.idle)

            def sequential() -> None:
                result.sequential = scenarios.sequential(
                    api, contender, ids["noop"], plan.sequential
                )

            def bursts() -> None:
                for _ in range(plan.bursts):
                    result.bursts.append(
                        scenarios.burst(api, contender, ids["noop"], plan.burst_size)
                    )

            def cancellations() -> None:
                for _ in range(plan.cancellations):
                    result.cancellations.append(
                        scenarios.cancellation(api, contender, ids["sleeper"], self.tag)
                    )

            for scenario, what, step in (
                ("idle", "idle", idle),
                ("sequential", "sequential runs", sequential),
                ("bursts", "bursts", bursts),
                ("cancel", "cancellations", cancellations),
            ):
                if scenario in self.args.scenarios:
                    self.log(f"{result.label}: {what}")
                    _attempt(errors, what, step)
        except (BenchError, httpx.HTTPError) as exc:
            errors.append(f"start-up: {exc}; log tail:\n{contender.log_tail()}")
        finally:
            self.stop(contender)

    def start_agent(
        self, name: str, flows_dir: Path, pools: tuple[str, ...] = ()
    ) -> subjects.Contender:
        return subjects.start_agent(
            agent_bin=self.agent_bin,
            api_url=self.server.api_url,
            workdir=self.workdir / name,
            flows_dir=flows_dir,
            flow_python=self.prefect_python,
            tag=self.tag,
            limit=LIMIT,
            log_level=self.args.agent_log_level,
            flow_env=self.flow_env,
            work_pools=pools,
        )

    def pool(self, api: BenchApi, flows_dir: Path, result: pools.PoolPickup) -> None:
        """A work pool's runs and a config deployment's, served by one agent (bench/pools.py)."""
        contender = self.start_agent("pool", flows_dir, (pools.POOL,))
        try:
            pools.measure(api, contender, flows_dir, self.plan.sequential, result, self.plan.settle)
        finally:
            self.stop(contender)

    def footprint(self, api: BenchApi, flows_dir: Path) -> scenarios.FootprintSeries | None:
        plan = self.plan
        contender = subjects.start_agent(
            agent_bin=self.agent_bin,
            api_url=self.server.api_url,
            workdir=self.workdir / "footprint",
            flows_dir=flows_dir,
            flow_python=self.prefect_python,
            tag=self.tag,
            limit=max(plan.footprint),
            log_level=self.args.agent_log_level,
            fake_python=subjects.write_fake_python(self.workdir / "fake-python"),
        )
        try:
            flow, name = contender.deployments["fake"]
            deployment_id = api.wait_deployment(flow, name, timeout=120)
            time.sleep(plan.settle)
            return scenarios.footprint_series(
                api, contender, deployment_id, self.tag, list(plan.footprint), settle=2.0
            )
        finally:
            self.stop(contender)

    def stop(self, contender: subjects.Contender) -> None:
        status = procs.stop(contender.proc)
        self.log(f"{contender.label} stopped (exit status {status})")
        # Flow runs of a stopped contender keep running by design; the benchmark's must not.
        leftover = [p for p in procs.marked(self.tag) if _session(p.pid) not in self.spare_sessions]
        if contender.config is not None and contender.workdir is not None:
            # Warm runs carry no marker in /proc (bench/procs.py); nor do templates, which die
            # with their agent and run in its runtime directory.
            runtime = contender.workdir / "run"
            leftover += procs.run_processes(runtime) + procs.with_cwd_under(runtime)
        procs.kill(leftover)

    def engines(self, api: BenchApi, flows_dir: Path) -> engines.EnginesResult:
        default_poll = subjects.runner_default_poll(
            self.prefect_python, self.tag, self.workdir / "prefect-home"
        )
        setup = engines.Setup(
            api=api,
            plan=self.plan,
            workdir=self.workdir,
            flows_dir=flows_dir,
            agent_bin=self.agent_bin,
            api_url=self.server.api_url,
            server_env=self.server.env(),
            prefect_python=self.prefect_python,
            tag=self.tag,
            log_level=self.args.agent_log_level,
            log=self.log,
            stop=self.stop,
        )
        return engines.measure(setup, default_poll)


def _session(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    tag = args.tag or f"bench-{uuid.uuid4().hex[:12]}"
    workdir = Path(tempfile.mkdtemp(prefix="runner-agent-bench-"))
    server = PrefectServer(
        Path(args.prefect_venv), workdir / "server", extra_env={procs.MARKER: tag}
    )
    bench = Bench(args, workdir, tag, server)
    started = time.monotonic()
    date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    agent = ContenderResult("runner-agent")
    runner = ContenderResult("Prefect Runner")
    errors: list[str] = []
    api: BenchApi | None = None
    failed = True
    try:
        machine = machine_info(sys.executable, bench.prefect_python)
        machine["runner-agent"] = agent_revision(REPO)
        bench.log(f"starting the Prefect server (work dir {workdir}, tag {tag})")
        server.start()
        bench.spare_sessions = {s for p in procs.marked(tag) if (s := _session(p.pid))}
        api = BenchApi(server.api_url)
        flows_dir = subjects.write_flows(workdir / "flows")
        bench.contender(api, lambda: bench.start_agent("agent", flows_dir), agent)
        footprint: scenarios.FootprintSeries | None = None

        def run_footprint() -> None:
            nonlocal footprint
            footprint = bench.footprint(api, flows_dir) if api else None

        if "footprint" in args.scenarios:
            bench.log("runner-agent: footprint with running runs")
            _attempt(errors, "runner-agent footprint", run_footprint)
        pool = pools.PoolPickup() if "pool" in args.scenarios else None
        if pool is not None and api is not None:
            bench.log("runner-agent: work-pool pickup, beside a config deployment")
            _attempt(errors, "work-pool pickup", lambda: bench.pool(api, flows_dir, pool))
        bench.contender(
            api,
            lambda: subjects.start_runner(
                python=bench.prefect_python,
                server_env=server.env(),
                workdir=workdir / "runner",
                flows_dir=flows_dir,
                tag=tag,
                limit=LIMIT,
                poll_interval=round(bench.poll_interval),
            ),
            runner,
        )
        engine_result: engines.EnginesResult | None = None
        if "engines" in args.scenarios:
            bench.log("engines: runner-agent cold and warm, the Runner at two poll intervals")

            def run_engines() -> None:
                nonlocal engine_result
                engine_result = bench.engines(api, flows_dir) if api else None

            _attempt(errors, "engines", run_engines)
        imports: list[ImportStep] = []
        if "imports" in args.scenarios:
            bench.log("import footprint")
            imports = measure_imports(Path(sys.executable), REPO)
        machine["load average at the end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
        report = Report(
            mode=("smoke" if args.smoke else "full")
            + (f", {' and '.join(sorted(args.scenarios))} only" if args.only else ""),
            date=date,
            duration=time.monotonic() - started,
            command=command_line(args),
            plan=bench.plan.describe()
            + (f" (measured: {', '.join(sorted(args.scenarios))})" if args.only else ""),
            poll_interval=bench.poll_interval,
            machine=machine,
            agent=agent,
            runner=runner,
            footprint=footprint,
            pool=pool,
            engines=engine_result,
            imports=imports,
            errors=errors,
        )
        args.out.write_text(render(report))
        failed = bool(errors or agent.errors or runner.errors)
        failed = failed or bool(engine_result and engine_result.failed)
        bench.log(
            f"wrote {args.out} in {report.duration / 60:.1f} min"
            + ("; some scenarios FAILED (see its Errors section)" if failed else "")
        )
    except PrefectServerError as exc:
        print(f"bench: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        print("bench: interrupted; cleaning up", file=sys.stderr)
    finally:
        if api is not None:
            api.close()
        server.stop()
        left = procs.kill_marked(tag) + procs.kill(procs.with_cwd_under(workdir))
        if left:
            print(f"bench: killed {left} leftover process(es)", file=sys.stderr)
        if failed or args.keep:
            print(f"bench: logs kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
