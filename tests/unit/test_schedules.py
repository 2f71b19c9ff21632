"""A deployment's schedules: each kind's config spelling, the body it sends, whether the server's
copy (as Prefect 3.8.8 echoes it) already says it, and the errors for what cannot be one."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from agent.schedules import schedule_matches
from agent.settings import DeploymentSettings, load_settings
from tests.unit.test_settings import LOCAL, error_of, write


def deployment(tmp_path: Path, text: str) -> DeploymentSettings:
    [loaded] = load_settings(write(tmp_path / "agent.toml", LOCAL + text), {}).deployments
    return loaded


def bodies(tmp_path: Path, text: str) -> list[dict[str, Any]]:
    return [schedule.body() for schedule in deployment(tmp_path, text).all_schedules()]


# -- config spelling -> body -------------------------------------------------------------------


def test_every_kind_with_every_key_gives_the_body_flow_serve_sends(tmp_path: Path) -> None:
    text = """
[[deployment.schedules]]
cron = "0 9 * * 1-5"
timezone = "Europe/Berlin"
day_or = false
active = false
parameters = { n = 3, day = 2026-01-01, nested = { on = true } }
slug = "weekday-mornings"

[[deployment.schedules]]
interval = "1h30m"
anchor_date = 2026-01-01T06:00:00Z
timezone = "America/New_York"
slug = "every-90-minutes"

[[deployment.schedules]]
rrule = "FREQ=WEEKLY;BYDAY=MO,WE;BYHOUR=9"
timezone = "Asia/Tokyo"
parameters = { n = 1 }
"""
    assert bodies(tmp_path, text) == [
        {
            "schedule": {"cron": "0 9 * * 1-5", "timezone": "Europe/Berlin", "day_or": False},
            "active": False,
            "parameters": {"n": 3, "day": "2026-01-01", "nested": {"on": True}},
            "slug": "weekday-mornings",
        },
        {
            "schedule": {
                "interval": 5400.0,
                "anchor_date": "2026-01-01T06:00:00+00:00",
                "timezone": "America/New_York",
            },
            "active": True,
            "parameters": {},
            "slug": "every-90-minutes",
        },
        {
            "schedule": {"rrule": "FREQ=WEEKLY;BYDAY=MO,WE;BYHOUR=9", "timezone": "Asia/Tokyo"},
            "active": True,
            "parameters": {"n": 1},
            "slug": None,
        },
    ]


def test_defaults_of_each_kind(tmp_path: Path) -> None:
    text = 'schedules = [{ cron = "*/5 * * * *" }, { interval = 90 }, { rrule = "FREQ=DAILY" }]\n'
    defaults = {"active": True, "parameters": {}, "slug": None}
    assert bodies(tmp_path, text) == [
        {"schedule": {"cron": "*/5 * * * *", "timezone": "UTC", "day_or": True}, **defaults},
        # Neither anchor nor zone: the server picks both (the time of the first registration).
        {"schedule": {"interval": 90.0}, **defaults},
        {"schedule": {"rrule": "FREQ=DAILY", "timezone": "UTC"}, **defaults},
    ]


def test_a_naive_anchor_date_is_sent_in_the_schedules_zone(tmp_path: Path) -> None:
    # Prefect would read a naive anchor as UTC whatever the zone; the agent sends it aware.
    text = (
        "schedules = [{ interval = 3600, anchor_date = 2026-01-01T09:00:00, "
        'timezone = "Europe/Berlin" }, { interval = 3600, anchor_date = 2026-07-01T09:00:00 }]\n'
    )
    berlin, utc = (body["schedule"]["anchor_date"] for body in bodies(tmp_path, text))
    assert (berlin, utc) == ("2026-01-01T09:00:00+01:00", "2026-07-01T09:00:00+00:00")


def test_the_single_schedule_spelling_of_earlier_versions_still_works(tmp_path: Path) -> None:
    old = deployment(tmp_path, 'schedule = { cron = "0 3 * * *", timezone = "UTC" }\n')
    new = deployment(tmp_path, 'schedules = [{ cron = "0 3 * * *", timezone = "UTC" }]\n')
    assert [s.body() for s in old.all_schedules()] == [s.body() for s in new.all_schedules()]
    assert len(old.all_schedules()) == 1
    assert deployment(tmp_path, 'schedule = { interval = "10m" }\n').all_schedules()[0].body() == (
        {"schedule": {"interval": 600.0}, "active": True, "parameters": {}, "slug": None}
    )
    assert deployment(tmp_path, "").all_schedules() == ()


# -- what the server echoes --------------------------------------------------------------------


def echoed(body: dict[str, Any], **schedule: Any) -> dict[str, Any]:
    """A DeploymentSchedule as GET /deployments/name/... returns it (Prefect 3.8.8)."""
    sent = body["schedule"]
    if "rrule" in sent and "DTSTART" not in sent["rrule"]:  # the server adds a start
        schedule = {"rrule": f"DTSTART:20200101T000000\n{sent['rrule']}", **schedule}
    return {
        "id": "0b9d6a8e-4c33-4d8f-9a43-2f2d7c0f8a11",
        "created": "2026-12-04T16:00:00.000000Z",
        "updated": "2026-12-04T16:00:00.000000Z",
        "deployment_id": "6f0c7f3e-3f0b-4b8e-8a59-5b2c1c8f0d22",
        "schedule": {**body["schedule"], **schedule},
        "active": body["active"],
        "max_scheduled_runs": None,
        "parameters": copy.deepcopy(body["parameters"]),
        "slug": body["slug"],
    }


def stored(anchor: str) -> str:
    """The anchor date as the server stores it: UTC, a naive one read as UTC (Prefect 3.8.8)."""
    instant = datetime.fromisoformat(anchor)
    if instant.tzinfo is None:
        instant = instant.replace(tzinfo=UTC)
    return instant.astimezone(UTC).isoformat().replace("+00:00", "Z")


CRON = {
    "schedule": {"cron": "0 9 * * 1-5", "timezone": "Europe/Berlin", "day_or": False},
    "active": True,
    "parameters": {"n": 3},
    "slug": "mornings",
}
INTERVAL = {
    "schedule": {"interval": 600.0, "anchor_date": "2026-01-01T09:00:00+01:00"},
    "active": True,
    "parameters": {},
    "slug": None,
}
BARE_INTERVAL = {"schedule": {"interval": 600.0}, "active": True, "parameters": {}, "slug": None}
RRULE = {
    "schedule": {"rrule": "FREQ=DAILY;BYHOUR=9", "timezone": "UTC"},
    "active": False,
    "parameters": {},
    "slug": None,
}


@pytest.mark.parametrize(
    ("wanted", "server"),
    [
        (CRON, {}),
        # The server stores anchors as UTC offsets and names the zone it inferred.
        (INTERVAL, {"anchor_date": "2026-01-01T08:00:00Z", "timezone": "UTC"}),
        (INTERVAL, {"anchor_date": "2026-01-01T09:00:00+01:00", "timezone": "UTC"}),
        (INTERVAL, {"interval": 600}),  # a whole number of seconds
        (BARE_INTERVAL, {"anchor_date": "2026-12-04T16:02:43.053071Z", "timezone": "UTC"}),
        (RRULE, {}),
    ],
)
def test_the_servers_echo_matches(wanted: dict[str, Any], server: dict[str, Any]) -> None:
    assert schedule_matches(echoed(wanted, **server), wanted)


def test_the_echo_of_each_config_spelling_matches(tmp_path: Path) -> None:
    text = (
        'schedules = [{ cron = "0 9 * * *", day_or = false }, { interval = "10m", '
        'anchor_date = 2026-01-01T09:00:00, timezone = "Europe/Berlin" }, '
        '{ rrule = "FREQ=DAILY", timezone = "Asia/Tokyo", slug = "s", parameters = { a = [1] } }]\n'
    )
    cron, interval, rrule = bodies(tmp_path, text)
    assert schedule_matches(echoed(cron), cron)
    anchor = stored(interval["schedule"]["anchor_date"])
    assert anchor == "2026-01-01T08:00:00Z"  # 09:00 in Berlin
    assert schedule_matches(echoed(interval, anchor_date=anchor), interval)
    assert schedule_matches(echoed(rrule), rrule)


@pytest.mark.parametrize(
    ("wanted", "field", "value"),
    [
        (CRON, "active", False),
        (CRON, "parameters", {"n": 4}),
        (CRON, "parameters", {}),
        (CRON, "slug", "evenings"),
        (CRON, "slug", None),
        (CRON, "cron", "0 10 * * 1-5"),
        (CRON, "timezone", "UTC"),
        (CRON, "day_or", True),
        (INTERVAL, "interval", 900.0),
        (INTERVAL, "interval", True),
        (INTERVAL, "interval", "PT600S"),
        (INTERVAL, "anchor_date", "2026-01-01T09:00:00Z"),
        (INTERVAL, "anchor_date", "not a date"),
        (INTERVAL, "anchor_date", None),
        (RRULE, "rrule", "FREQ=DAILY;BYHOUR=10"),
        (RRULE, "rrule", "DTSTART:20200101T000000\nFREQ=DAILY;BYHOUR=10"),
        (RRULE, "rrule", None),
        (RRULE, "timezone", "Europe/Berlin"),
        (RRULE, "active", True),
    ],
)
def test_each_single_difference_does_not_match(
    wanted: dict[str, Any], field: str, value: Any
) -> None:
    server = echoed(wanted)
    if field in ("active", "parameters", "slug"):
        server[field] = value
    else:
        server["schedule"][field] = value
    assert not schedule_matches(server, wanted)


def test_an_rrule_with_its_own_start_must_come_back_as_it_was_sent() -> None:
    rule = "DTSTART:20260101T090000\nRRULE:FREQ=DAILY"
    wanted = {**RRULE, "schedule": {"rrule": rule, "timezone": "UTC"}}
    assert schedule_matches(echoed(wanted), wanted)
    later = "DTSTART:20260102T090000\nRRULE:FREQ=DAILY"
    assert not schedule_matches(echoed(wanted, rrule=later), wanted)


def test_an_interval_zone_set_in_the_config_must_match() -> None:
    wanted = {**BARE_INTERVAL, "schedule": {"interval": 600.0, "timezone": "Europe/Berlin"}}
    assert schedule_matches(echoed(wanted, anchor_date="2026-12-04T16:00:00Z"), wanted)
    assert not schedule_matches(echoed(wanted, timezone="UTC"), wanted)


@pytest.mark.parametrize(
    "server",
    [
        None,
        [],
        "cron",
        {"active": True, "parameters": {}, "slug": None},
        {"schedule": "0 9 * * *", "active": True, "parameters": {}, "slug": None},
        echoed(CRON, cron=None),
        # Another kind with the same extras.
        {**echoed(CRON), "schedule": {"interval": 600.0, "timezone": "Europe/Berlin"}},
    ],
)
def test_odd_server_copies_do_not_match(server: Any) -> None:
    assert not schedule_matches(server, CRON)


# -- errors name the file, the key and the value -----------------------------------------------

CRON_HINT = "(5 fields: minute hour day-of-month month day-of-week, e.g. '*/5 * * * *')"
BAD = [
    (
        'schedules = [{ cron = "* * *" }]',
        f"schedules[0].cron: not a cron expression: '* * *' {CRON_HINT}",
    ),
    (
        'schedules = [{ cron = "61 * * * *" }]',
        f"schedules[0].cron: not a cron expression: '61 * * * *' {CRON_HINT}",
    ),
    (
        'schedules = [{ interval = "10m" }, { rrule = "DAILY" }]',
        "schedules[1].rrule: not a recurrence rule: 'DAILY' "
        "(e.g. 'FREQ=WEEKLY;BYDAY=MO,WE;BYHOUR=9')",
    ),
    (
        f'schedules = [{{ rrule = "FREQ=DAILY;{"X" * 6500}" }}]',
        "schedules[0].rrule: the rrule is longer than 6500 characters",
    ),
    (
        'schedules = [{ interval = "-5m" }]',
        "schedules[0].interval: not a duration: '-5m' (use e.g. 30s, 5m, 1h30m)",
    ),
    ("schedules = [{ interval = 0 }]", "schedules[0].interval: must be longer than 0s, got 0"),
    ('schedules = [{ interval = "10m", every = 3 }]', "schedules[0].every: unknown key"),
    (  # a key of another kind
        'schedules = [{ cron = "0 9 * * *", anchor_date = 2026-01-01 }]',
        "schedules[0].anchor_date: unknown key",
    ),
    (
        'schedule = { interval = "10m" }\nschedules = [{ interval = "1h" }]',
        "set either schedule or schedules, not both",
    ),
    (
        'schedules = [{ cron = "0 9 * * *", rrule = "FREQ=DAILY" }]',
        "schedules[0]: set one of cron, interval or rrule, not cron and rrule",
    ),
    (
        "schedules = [{ active = false }]",
        'schedules[0]: needs cron = "...", interval = "..." or rrule = "..."',
    ),
    (
        'schedules = ["hourly"]',
        "schedules[0]: expected a table like { interval = \"10m\" }, got 'hourly'",
    ),
    ("schedules = {}", "schedules: expected an array, got {}"),
    (
        'schedules = [{ interval = "10m", active = "yes" }]',
        "schedules[0].active: expected true or false, got 'yes'",
    ),
    (
        'schedules = [{ cron = "0 9 * * *", day_or = 1 }]',
        "schedules[0].day_or: expected true or false, got 1",
    ),
    ('schedules = [{ interval = "10m", slug = "" }]', "schedules[0].slug: must not be empty"),
    (
        'schedules = [{ rrule = "FREQ=DAILY", timezone = "Mars/Base" }]',
        "schedules[0].timezone: unknown time zone: 'Mars/Base' "
        "(use an IANA name such as UTC or Europe/Berlin)",
    ),
    (
        'schedules = [{ interval = "10m", parameters = { x = nan } }]',
        "schedules[0].parameters: x: nan is not a JSON number",
    ),
]


@pytest.mark.parametrize(("text", "message"), BAD)
def test_bad_schedules_are_config_errors_naming_file_key_and_value(
    tmp_path: Path, text: str, message: str
) -> None:
    path = write(tmp_path / "agent.toml", LOCAL + text + "\n")
    where = "deployment[hello]." if message.startswith("schedules") else "deployment[hello]: "
    assert error_of(path) == f"{path}: {where}{message}"
