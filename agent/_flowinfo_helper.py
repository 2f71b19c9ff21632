"""Prints a flow's parameter schema, description and name as one JSON document on stdout.

Run by the flow's own python, in the flow's code directory, as a file: `python HELPER ENTRYPOINT`.
It uses Prefect's own functions from that python's environment, the ones `flow.serve` uses, so
the schema is the one Prefect would register. It must import nothing from the agent (the agent's
package is not importable there) and must run on any python Prefect supports.

Output: `{"flow_name": ..., "description": ..., "parameter_openapi_schema": {...}}` with exit
status 0, or `{"error": "..."}` with exit status 1.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Not this file's directory, the agent's package (its `logs.py`, `events.py` ... would shadow
# the flow's imports), but the code directory, which `python -m prefect.engine` puts first.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(Path.cwd())] + [p for p in sys.path if p and Path(p).resolve() != _HERE]

import importlib  # noqa: E402
import json  # noqa: E402
from typing import Any  # noqa: E402

ERROR_LIMIT = 1000


def describe(exc: BaseException) -> str:
    # Prefect wraps what the flow's module raised in ScriptError; the cause is what helps.
    cause = getattr(exc, "user_exc", None)
    if isinstance(cause, BaseException):
        exc = cause
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text[:ERROR_LIMIT]


def inspect_flow(entrypoint: str) -> dict[str, Any]:
    try:
        flows = importlib.import_module("prefect.flows")
        callables = importlib.import_module("prefect.utilities.callables")
        pydantic_core = importlib.import_module("pydantic_core")
    except ImportError as exc:
        return {"error": f"cannot import prefect with {sys.executable}: {describe(exc)}"}
    try:
        flow = flows.load_flow_from_entrypoint(entrypoint, use_placeholder_flow=False)
        # What RunnerDeployment.from_flow and _create (flow.serve) register.
        schema = callables.parameter_schema(flow).model_dump(exclude_unset=True)
        description = flow.description
        name = flow.name
        schema = pydantic_core.to_jsonable_python(schema)
    except Exception as exc:
        return {"error": describe(exc)}
    return {
        "flow_name": name,
        "description": description,
        "parameter_openapi_schema": schema,
    }


def main(argv: list[str]) -> int:
    # The flow's module may print while it is imported: that goes to stderr, and only this
    # helper's answer reaches the real stdout.
    answer_fd = os.dup(1)
    os.dup2(2, 1)
    if len(argv) != 2:
        result: dict[str, Any] = {"error": "usage: _flowinfo_helper.py FILE.py:FUNCTION"}
    else:
        result = inspect_flow(argv[1])
    try:
        data = json.dumps(result, allow_nan=False)
    except ValueError as exc:
        result = {"error": f"the parameter schema is not JSON: {describe(exc)}"}
        data = json.dumps(result)
    payload = data.encode("utf-8", errors="replace")
    while payload:
        payload = payload[os.write(answer_fd, payload) :]
    os.close(answer_fd)
    return 1 if "error" in result else 0


if __name__ == "__main__":
    sys.stdout.flush()
    code = main(sys.argv)
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter shutdown: threads a flow's module started must not keep us alive.
    os._exit(code)
