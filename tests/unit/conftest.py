"""Fixtures over the shared fakes in tests/unit/fakes/."""

from __future__ import annotations

import pytest

from tests.unit.fakes import FakeEngines, FakeHooks, FakeLauncher, FakePrefect


@pytest.fixture
def fake_prefect() -> FakePrefect:
    """An in-memory Prefect server; `.client()` talks to it through httpx.MockTransport."""
    return FakePrefect()


@pytest.fixture
def fake_launcher() -> FakeLauncher:
    """A launcher whose runs exit 0 at once; set its attributes to change that."""
    return FakeLauncher()


@pytest.fixture
def fake_engines() -> FakeEngines:
    return FakeEngines()


@pytest.fixture
def fake_hooks() -> FakeHooks:
    return FakeHooks()
