"""Parsing and formatting of durations, sizes, CPU quotas, cron expressions and time zones."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent import values


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30.0),
        ("5m", 300.0),
        ("1h30m", 5400.0),
        ("1h 30m", 5400.0),
        ("1d", 86400.0),
        ("1w", 604800.0),
        ("250ms", 0.25),
        ("1.5s", 1.5),
        ("90", 90.0),
        (" 2.5 ", 2.5),
        ("0s", 0.0),
        (45, 45.0),
        (0.5, 0.5),
    ],
)
def test_parse_duration(text: object, seconds: float) -> None:
    assert values.parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("abc", "not a duration: 'abc' (use e.g. 30s, 5m, 1h30m)"),
        ("", "not a duration: '' (use e.g. 30s, 5m, 1h30m)"),
        ("5 minutes", "not a duration: '5 minutes' (use e.g. 30s, 5m, 1h30m)"),
        ("-5s", "not a duration: '-5s' (use e.g. 30s, 5m, 1h30m)"),
        (-5, "must not be negative, got -5"),
        (True, "not a duration: True (use e.g. 30s, 5m, 1h30m)"),
        (float("nan"), "not a duration: nan (use e.g. 30s, 5m, 1h30m)"),
        ([1], "not a duration: [1] (use e.g. 30s, 5m, 1h30m)"),
    ],
)
def test_parse_duration_errors(text: object, message: str) -> None:
    with pytest.raises(ValueError) as info:
        values.parse_duration(text)
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("512M", 512 * 1024**2),
        ("2G", 2 * 1024**3),
        ("1.5G", 1536 * 1024**2),
        ("1024K", 1024**2),
        ("2g", 2 * 1024**3),
        ("1T", 1024**4),
        ("4096", 4096),
        (4096, 4096),
        ("infinity", None),
        ("Infinity", None),
    ],
)
def test_parse_size(text: object, size: int | None) -> None:
    assert values.parse_size(text) == size


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("512MB", "not a size: '512MB' (use e.g. 512M, 2G, infinity)"),
        ("lots", "not a size: 'lots' (use e.g. 512M, 2G, infinity)"),
        ("1.5", "not a size: '1.5' (a number of bytes must be whole)"),
        (1.5, "not a size: 1.5 (a number of bytes must be whole)"),
        (-1, "must not be negative, got -1"),
        (False, "not a size: False (use e.g. 512M, 2G, infinity)"),
    ],
)
def test_parse_size_errors(text: object, message: str) -> None:
    with pytest.raises(ValueError) as info:
        values.parse_size(text)
    assert str(info.value) == message


def test_parse_cpu_quota() -> None:
    assert values.parse_cpu_quota("150%") == 150
    assert values.parse_cpu_quota(" 50 % ") == 50
    for bad, message in [
        ("0%", "must be > 0%, got '0%'"),
        ("150", "not a CPU quota: '150' (use a whole percentage, e.g. 150%)"),
        ("12.5%", "not a CPU quota: '12.5%' (use a whole percentage, e.g. 150%)"),
        (150, 'not a CPU quota: 150 (use a percentage, e.g. "150%")'),
    ]:
        with pytest.raises(ValueError) as info:
            values.parse_cpu_quota(bad)
        assert str(info.value) == message


def test_limits_accept_infinity_and_refuse_zero() -> None:
    assert values.limit_cpu_quota("infinity") is None
    assert values.limit_count("infinity") is None
    assert values.limit_count("512") == 512
    assert values.limit_duration("infinity") is None
    assert values.limit_size("infinity") is None
    with pytest.raises(ValueError, match=r"must be larger than 0 \(use infinity"):
        values.limit_size("0")
    with pytest.raises(ValueError, match=r"must be longer than 0s \(use infinity"):
        values.limit_duration("0s")
    with pytest.raises(ValueError, match="must be >= 1, got 0"):
        values.limit_count(0)


def test_parse_count_refuses_booleans_and_fractions() -> None:
    assert values.parse_count("3", minimum=1) == 3
    for bad in (True, 2.0, "2.5", "three"):
        with pytest.raises(ValueError, match="expected an integer, got"):
            values.parse_count(bad)


def test_cron() -> None:
    assert values.validate_cron("*/5 * * * *") == "*/5 * * * *"
    assert values.validate_cron("0 3 * * mon-fri") == "0 3 * * mon-fri"
    for bad in ("*/5 * * *", "0 0 * * * *", "61 * * * *", "x y z a b", 5):
        with pytest.raises(ValueError, match="not a cron expression"):
            values.validate_cron(bad)


def test_timezone() -> None:
    assert values.validate_timezone("Europe/Berlin") == "Europe/Berlin"
    assert values.validate_timezone("UTC") == "UTC"
    for bad in ("Mars/Olympus", "../etc/passwd", ""):
        with pytest.raises(ValueError, match="time zone"):
            values.validate_timezone(bad)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (6 * 3600, "6h"),
        (5400, "1h30m"),
        (90, "1m30s"),
        (30, "30s"),
        (1.5, "1.5s"),
        (0, "0s"),
        (86400 + 60, "1d1m"),
        (None, "infinity"),
    ],
)
def test_format_duration(seconds: float | None, text: str) -> None:
    assert values.format_duration(seconds) == text


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (512 * 1024**2, "512M"),
        (2 * 1024**3, "2G"),
        (1536 * 1024**2, "1536M"),
        (1000, "1000"),
        (None, "infinity"),
    ],
)
def test_format_size(size: int | None, text: str) -> None:
    assert values.format_size(size) == text


@given(st.integers(min_value=0, max_value=10**9) | st.integers(0, 10**6).map(lambda n: n / 1000))
def test_format_duration_round_trips(seconds: float) -> None:
    assert values.parse_duration(values.format_duration(seconds)) == pytest.approx(seconds)


@given(st.integers(min_value=0, max_value=2**62))
def test_format_size_round_trips(size: int) -> None:
    assert values.parse_size(values.format_size(size)) == size


def test_urls_and_names() -> None:
    assert values.validate_http_url("http://h:4200/api/") == "http://h:4200/api"
    with pytest.raises(ValueError, match="must not contain credentials"):
        values.validate_http_url("https://u:p@h/api")
    with pytest.raises(ValueError, match="not an http"):
        values.validate_http_url("ftp://h/api")
    assert values.validate_git_url("git@example.com:org/flows.git")
    assert values.validate_git_url("/srv/git/flows.git")
    with pytest.raises(ValueError, match="use token_file"):
        values.validate_git_url("https://user:tok@example.com/flows.git")
    with pytest.raises(ValueError, match="relative path inside the repository"):
        values.validate_relative_subdirectory("flows/../../etc")
    with pytest.raises(ValueError, match="must not contain / % & > <"):
        values.validate_name("a/b")
    with pytest.raises(ValueError, match="not an entrypoint"):
        values.validate_entrypoint("hello")
