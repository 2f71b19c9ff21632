"""What `runner-agent status` shows of the warm templates: the pool's state file, the memory
figures read from /proc, the table and the JSON."""

from __future__ import annotations

import json
from pathlib import Path

import psutil

from agent.status import render_json, render_templates
from agent.warm.memory import (
    STATE_FILE,
    WARM_DIRECTORY,
    TemplateStatus,
    collect_templates,
    read_state,
    write_state,
)
from tests.unit.fakes.warm import exit_with, key_for, launch_warm, ready, warm_pool, warm_setup

LIVE = TemplateStatus(
    key="0123456789ab",
    python="/opt/etl/bin/python",
    pid=4242,
    unit="runner-agent-warm-0123456789ab-1.scope",
    forks=38,
    alive=True,
    rss_bytes=93_716_480,
    pss_bytes=77_594_624,
    uss_bytes=76_231_475,
)
GONE = TemplateStatus(
    key="ba9876543210",
    python="/usr/bin/python3",
    pid=4321,
    unit="runner-agent-warm-ba9876543210-2.scope",
    forks=0,
    alive=False,
    rss_bytes=None,
    pss_bytes=None,
    uss_bytes=None,
)


def test_the_templates_table() -> None:
    assert render_templates([]) == ""  # a host without warm deployments shows nothing more
    assert render_templates([LIVE, GONE]).splitlines() == [
        "",
        "WARM TEMPLATE  PID          PYTHON               FORKS  RSS    PSS    USS    UNIT",
        "0123456789ab   4242         /opt/etl/bin/python  38     89.4M  74.0M  72.7M  "
        "runner-agent-warm-0123456789ab-1.scope",
        "ba9876543210   4321 (gone)  /usr/bin/python3     0      -      -      -      "
        "runner-agent-warm-ba9876543210-2.scope",
    ]
    no_pid = TemplateStatus(**{**GONE.__dict__, "pid": None})
    assert render_templates([no_pid]).splitlines()[2].split()[1] == "-"


def test_the_templates_in_json() -> None:
    document = json.loads(render_json([], [LIVE, GONE]))
    assert document["runs"] == []
    assert document["warm_templates"] == [
        {
            "key": "0123456789ab",
            "python": "/opt/etl/bin/python",
            "pid": 4242,
            "unit": "runner-agent-warm-0123456789ab-1.scope",
            "forks": 38,
            "alive": True,
            "rss_bytes": 93_716_480,
            "pss_bytes": 77_594_624,
            "uss_bytes": 76_231_475,
        },
        {**GONE.__dict__},
    ]
    assert json.loads(render_json([]))["warm_templates"] == []


async def test_status_reads_the_templates_from_the_state_file(
    tmp_path: Path,
    flow_python: Path,
) -> None:
    runtime = tmp_path / "runtime"
    async with warm_pool(runtime / WARM_DIRECTORY) as pool:
        key = key_for(flow_python)
        template = await ready(pool, key)
        assert template.pid is not None
        assert read_state(pool.directory) == [
            {
                "key": key.id,
                "python": str(flow_python),
                "pid": template.pid,
                "create_time": psutil.Process(template.pid).create_time(),
                "unit": f"runner-agent-warm-{key.id}-1.scope",
                "ready": True,
                "forks": 0,
            }
        ]
        assert (pool.directory / STATE_FILE).stat().st_mode & 0o777 == 0o600
        [status] = collect_templates(runtime)
        assert (status.key, status.python, status.pid, status.alive) == (
            key.id,
            str(flow_python),
            template.pid,
            True,
        )
        assert status.rss_bytes and status.uss_bytes and status.pss_bytes
        assert status.uss_bytes <= status.rss_bytes
    assert read_state(runtime / WARM_DIRECTORY) == []
    assert collect_templates(runtime) == []


def test_status_of_a_template_that_is_gone(tmp_path: Path) -> None:
    directory = tmp_path / WARM_DIRECTORY
    dead = psutil.Popen(["true"])
    dead.wait()
    me = psutil.Process()
    write_state(
        directory,
        [
            {"key": "k", "python": "/p", "pid": dead.pid, "unit": "u", "forks": 2},
            # After an agent crash: the pid names another process now (its start differs).
            {"key": "r", "pid": me.pid, "create_time": me.create_time() - 60.0},
        ],
    )
    gone, recycled = collect_templates(tmp_path)
    assert (gone.key, gone.pid, gone.alive, gone.forks) == ("k", dead.pid, False, 2)
    assert (gone.rss_bytes, gone.pss_bytes, gone.uss_bytes) == (None, None, None)
    assert (recycled.key, recycled.python, recycled.unit) == ("r", "?", "-")
    assert (recycled.alive, recycled.rss_bytes) == (False, None)
    (directory / STATE_FILE).write_text('[7, "x"]')
    assert collect_templates(tmp_path) == []
    (directory / STATE_FILE).write_text("not json")
    assert collect_templates(tmp_path) == []


async def test_status_counts_the_runs_a_template_forked(
    tmp_path: Path,
    flow_python: Path,
) -> None:
    runtime = tmp_path / "runtime"
    async with warm_setup(runtime, flow_python) as harness:  # its pool: runtime/warm
        req = harness.request(exit_with(0))
        await harness.ready(req)
        assert await launch_warm(harness, req) == 0
        [status] = collect_templates(runtime)
        assert status.forks == 1
