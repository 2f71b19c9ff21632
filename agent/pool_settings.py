"""A `[[work_pool]]` of the config: a Prefect work pool whose runs this host executes."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator

from agent.run_settings import ConfigModel, Name


class WorkPoolSettings(ConfigModel):
    name: Name
    # Empty: every queue of the pool, as Prefect's workers do without --work-queue.
    queues: tuple[Name, ...] = ()
    # Create the pool (type "runner-agent") when the server has none of this name.
    create: Annotated[bool, Field(strict=True)] = False

    @field_validator("queues")
    @classmethod
    def _unique_queues(cls, queues: tuple[str, ...]) -> tuple[str, ...]:
        duplicates = sorted({q for q in queues if queues.count(q) > 1})
        if duplicates:
            raise ValueError(f"queue {duplicates[0]!r} is listed twice")
        return queues
