"""Which values do the template's imports compute from the environment? Issue 17, question 2.

    $A/bin/python -m bench.warm_proto.import_caches $P/bin/python

Imports the template's PRELOAD list in two fresh interpreters of the flow's python whose
environments differ in everything a run could set (HOME, USER, TMPDIR, TZ, PREFECT_* settings,
the working directory), then lists every module-level global (and class attribute of
module-level classes) whose value differs between the two. Each is a cache that a forked run
would inherit from its template and that `turn_into_run` must reset (or prove harmless).
Values whose repr holds an address or an id (`at 0x`) are skipped; so are values that differ
between two interpreters with the SAME environment (random seeds, timestamps), which the
scan runs first to learn, and lists apart: those are per-process values that every fork of
one template would SHARE (keys, start times), so they need a reset too.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.warm_proto.template import PRELOAD

DUMP = r"""
import json, os, sys, types
preload = sys.argv[1].split(",")
for name in preload:
    __import__(name)
out = {}
def simple(v, depth=0):
    if isinstance(v, (str, int, float, bool, type(None), bytes)):
        return True
    if isinstance(v, os.PathLike):
        return True
    if depth < 2 and isinstance(v, (tuple, list, frozenset, set)):
        return all(simple(x, depth + 1) for x in v)
    if depth < 2 and isinstance(v, dict):
        return all(simple(k, depth + 1) and simple(x, depth + 1) for k, x in v.items())
    return False
for mname, mod in list(sys.modules.items()):
    if mname == "__main__" or not isinstance(mod, types.ModuleType):
        continue
    for k, v in list(vars(mod).items()):
        if k.startswith("__") or isinstance(v, types.ModuleType):
            continue
        if isinstance(v, type) and getattr(v, "__module__", None) == mname:
            for ck, cv in list(vars(v).items()):
                if not ck.startswith("__") and simple(cv):
                    r = repr(cv)
                    if " at 0x" not in r:
                        out[f"{mname}.{k}.{ck}"] = r[:300]
            continue
        if simple(v):
            r = repr(v)
            if " at 0x" not in r:
                out[f"{mname}.{k}"] = r[:300]
        elif not isinstance(v, (type, types.FunctionType, types.BuiltinFunctionType)):
            try:
                attrs = vars(v)
            except TypeError:
                continue
            if not isinstance(attrs, dict):
                continue
            for ak, av in list(attrs.items()):
                if simple(av):
                    r = repr(av)
                    if " at 0x" not in r:
                        out[f"{mname}.{k}.{ak}"] = r[:300]
json.dump(out, sys.stdout)
"""

A_ENV = {
    "HOME": "/tmp/scan-home-a",
    "USER": "alice",
    "LOGNAME": "alice",
    "TMPDIR": "/tmp/scan-tmp-a",
    "TZ": "UTC",
    "PREFECT_API_URL": "http://127.0.0.1:1/api",
    "PREFECT_LOGGING_LEVEL": "INFO",
    "PREFECT_HOME": "/tmp/scan-prefect-a",
    "PREFECT_CLIENT_MAX_RETRIES": "5",
    "PREFECT_API_KEY": "key-a",
    "COLUMNS": "80",
    "TERM": "dumb",
}
B_ENV = {
    "HOME": "/tmp/scan-home-b",
    "USER": "bob",
    "LOGNAME": "bob",
    "TMPDIR": "/tmp/scan-tmp-b",
    "TZ": "Asia/Tokyo",
    "PREFECT_API_URL": "http://127.0.0.2:2/api",
    "PREFECT_LOGGING_LEVEL": "DEBUG",
    "PREFECT_HOME": "/tmp/scan-prefect-b",
    "PREFECT_CLIENT_MAX_RETRIES": "7",
    "PREFECT_API_KEY": "key-b",
    "COLUMNS": "200",
    "TERM": "xterm",
}
# A fixed hash seed: set orderings would otherwise differ between any two interpreters.
BASE = {
    "PATH": "/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "PYTHONDONTWRITEBYTECODE": "1",
    "PYTHONHASHSEED": "0",
}


def dump(python: str, env: dict[str, str], cwd: str) -> dict[str, str]:
    for key in ("HOME", "TMPDIR"):
        Path(env.get(key, "/tmp")).mkdir(parents=True, exist_ok=True)
    out = subprocess.run(
        [python, "-c", DUMP, ",".join(PRELOAD)],
        env={**BASE, **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    result: dict[str, str] = json.loads(out.stdout)
    return result


def main() -> int:
    python = sys.argv[1]
    with tempfile.TemporaryDirectory() as a_dir, tempfile.TemporaryDirectory() as b_dir:
        a1 = dump(python, A_ENV, a_dir)
        a2 = dump(python, A_ENV, a_dir)
        b = dump(python, B_ENV, b_dir)
    noisy = {k for k in a1 if a1.get(k) != a2.get(k)}
    differs = {
        k: (a1.get(k), b.get(k))
        for k in sorted(set(a1) | set(b))
        if k not in noisy and a1.get(k) != b.get(k)
    }
    per_process = {k: a1.get(k) for k in sorted(noisy)}
    print(
        json.dumps(
            {
                "globals_compared": len(a1),
                "per_process_values": per_process,
                "differ_with_environment": differs,
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
