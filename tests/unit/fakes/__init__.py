"""The unit tests' shared fakes; tests/unit/conftest.py offers them as fixtures."""

from tests.unit.fakes.engines import LEGACY, MODERN, FakeEngines, FakeHooks
from tests.unit.fakes.events import FakeEventsServer, Script
from tests.unit.fakes.launcher import FakeHandle, FakeLauncher
from tests.unit.fakes.prefect import FakePrefect

__all__ = [
    "LEGACY",
    "MODERN",
    "FakeEngines",
    "FakeEventsServer",
    "FakeHandle",
    "FakeHooks",
    "FakeLauncher",
    "FakePrefect",
    "Script",
]
