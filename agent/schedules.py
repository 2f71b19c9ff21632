"""A deployment's schedules, as Prefect has them: cron, interval and rrule, each with its own
`active`, `parameters` and `slug`; and the body Prefect's API takes for them.

The body is the one `flow.serve` sends in POST /deployments/: a list of
`{schedule: {...}, active, parameters, slug}`. `schedule_matches` says whether the server's copy
of one schedule already says what the config says, so an unchanged deployment is not upserted
(an upsert re-creates its future runs).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, Discriminator, Field, Tag

from agent import values
from agent.run_settings import ConfigModel, NonEmpty, PositiveDuration, json_parameters

# Prefect's limit on an rrule string (prefect.client.schemas.schedules.MAX_RRULE_LENGTH).
MAX_RRULE_LENGTH = 6500
KINDS = ("cron", "interval", "rrule")


def validate_rrule(value: Any) -> str:
    """An RFC 5545 recurrence rule; the server parses it, this refuses what cannot be one."""
    hint = "e.g. 'FREQ=WEEKLY;BYDAY=MO,WE;BYHOUR=9'"
    if not isinstance(value, str) or "FREQ=" not in value.upper():
        raise ValueError(f"not a recurrence rule: {value!r} ({hint})")
    if len(value) > MAX_RRULE_LENGTH:
        raise ValueError(f"the rrule is longer than {MAX_RRULE_LENGTH} characters")
    return value.strip()


Timezone = Annotated[str, BeforeValidator(values.validate_timezone)]
Strict = Annotated[bool, Field(strict=True)]


class _ScheduleBase(ConfigModel):
    active: Strict = True
    parameters: Annotated[dict[str, Any], AfterValidator(json_parameters)] = Field(
        default_factory=dict
    )
    slug: NonEmpty | None = None

    def spec(self) -> dict[str, Any]:
        raise NotImplementedError

    def body(self) -> dict[str, Any]:
        return {
            "schedule": self.spec(),
            "active": self.active,
            "parameters": dict(self.parameters),
            "slug": self.slug,
        }


class CronSchedule(_ScheduleBase):
    cron: Annotated[str, BeforeValidator(values.validate_cron)]
    timezone: Timezone = "UTC"
    day_or: Strict = True

    def spec(self) -> dict[str, Any]:
        return {"cron": self.cron, "timezone": self.timezone, "day_or": self.day_or}


class IntervalSchedule(_ScheduleBase):
    interval: PositiveDuration
    # Unset: the server anchors the schedule at the time of the first registration.
    anchor_date: datetime | None = None
    timezone: Timezone | None = None

    def spec(self) -> dict[str, Any]:
        spec: dict[str, Any] = {"interval": float(self.interval)}
        if self.anchor_date is not None:
            # Prefect reads a naive anchor as UTC whatever the zone: send it aware, in the zone.
            spec["anchor_date"] = _aware(self.anchor_date, self.timezone).isoformat()
        if self.timezone is not None:
            spec["timezone"] = self.timezone
        return spec


class RRuleSchedule(_ScheduleBase):
    rrule: Annotated[str, BeforeValidator(validate_rrule)]
    timezone: Timezone = "UTC"

    def spec(self) -> dict[str, Any]:
        return {"rrule": self.rrule, "timezone": self.timezone}


AnySchedule = CronSchedule | IntervalSchedule | RRuleSchedule


def _kind(data: Any) -> str:
    if isinstance(data, Mapping):
        return next((kind for kind in KINDS if kind in data), "interval")
    if isinstance(data, CronSchedule):
        return "cron"
    return "rrule" if isinstance(data, RRuleSchedule) else "interval"


def check_shape(data: Any) -> Any:
    """Exactly one of cron, interval, rrule; named in the error when not."""
    if isinstance(data, Mapping):
        kinds = [kind for kind in KINDS if kind in data]
        if len(kinds) > 1:
            raise ValueError(f"set one of cron, interval or rrule, not {' and '.join(kinds)}")
        if not kinds:
            raise ValueError('needs cron = "...", interval = "..." or rrule = "..."')
    elif not isinstance(data, CronSchedule | IntervalSchedule | RRuleSchedule):
        raise ValueError(f'expected a table like {{ interval = "10m" }}, got {data!r}')
    return data


Schedule = Annotated[
    Annotated[CronSchedule, Tag("cron")]
    | Annotated[IntervalSchedule, Tag("interval")]
    | Annotated[RRuleSchedule, Tag("rrule")],
    Discriminator(_kind),
    BeforeValidator(check_shape),
]


def _aware(value: datetime, zone: str | None) -> datetime:
    """A naive anchor date is in the schedule's zone, or UTC."""
    if value.tzinfo is not None:
        return value
    from zoneinfo import ZoneInfo

    return value.replace(tzinfo=ZoneInfo(zone) if zone else UTC)


def _instant(value: Any, zone: str | None) -> datetime | None:
    """An anchor date (text from the server, or a datetime), aware; None if it is none."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
    return _aware(value, zone) if isinstance(value, datetime) else None


def _rrule_as_sent(stored: Any, sent: str) -> bool:
    """The server stores an rrule without a start with one it adds (Prefect 3.8.8:
    "DTSTART:20200101T000000" on a line of its own): that line is not a difference."""
    if not isinstance(stored, str):
        return False
    if "DTSTART" not in sent.upper():
        stored = "\n".join(
            line for line in stored.splitlines() if not line.upper().startswith("DTSTART")
        )
    return bool(stored.strip() == sent.strip())


def schedule_matches(existing: Any, wanted: Mapping[str, Any]) -> bool:
    """True when the server's schedule item says what `wanted` (a `body()`) says.

    The server fills in what the config leaves out (an interval's anchor date and time zone),
    so only what the config sets is compared.
    """
    if not isinstance(existing, Mapping) or not isinstance(existing.get("schedule"), Mapping):
        return False
    for key in ("parameters", "slug"):
        if (existing.get(key) or None) != (wanted[key] or None):
            return False
    if existing.get("active") is not wanted["active"]:
        return False
    have, want = existing["schedule"], wanted["schedule"]
    if "rrule" in want:
        return have.get("timezone") == want["timezone"] and _rrule_as_sent(
            have.get("rrule"), want["rrule"]
        )
    if "interval" not in want:
        return all(have.get(key) == value for key, value in want.items())
    interval = have.get("interval")
    if isinstance(interval, bool) or not isinstance(interval, int | float):
        return False
    if float(interval) != want["interval"]:
        return False
    if "timezone" in want and have.get("timezone") != want["timezone"]:
        return False
    if "anchor_date" in want:
        mine = _instant(want["anchor_date"], want.get("timezone"))
        theirs = _instant(have.get("anchor_date"), "UTC")
        return mine is not None and theirs is not None and mine == theirs
    return True
