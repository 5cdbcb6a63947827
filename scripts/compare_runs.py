"""Do two sets of runs give the same numbers? (a refactor's "behaviour unchanged" check)

Pairs the ``metrics.json`` files under two folders by run (folder name, or a name map),
and compares every key the two share, except wall-clock and machine figures (``speed/``,
``time/``, ``host/``, the registry's SPEED/TIME tolerances), identity that is expected to
move (``git_rev``, ``config_hash``) and projections resting on this host's measured peaks
(``chip/`` of a ``cpu_host`` run). CPU runs at a fixed thread count are deterministic, so
the comparison is exact (``--rel`` loosens it).

    PYTHONPATH=src python scripts/compare_runs.py BEFORE AFTER [--map old=new ...] [--rel 0]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from v4lab import metrics

SKIP_KEYS = {"git_rev", "config_hash"}
SKIP_PREFIXES = ("speed/", "time/", "host/")


def runs(root: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(root.rglob("metrics.json"))}


def compared(key: str, run: dict) -> bool:
    if key in SKIP_KEYS or key.startswith(SKIP_PREFIXES):
        return False
    if key.startswith("chip/") and run.get("chip/name") == "cpu_host":
        return False  # rests on this machine's measured peaks
    return not metrics.known(key) or metrics.tolerance(key) < 0.5


def differences(a: dict, b: dict, rel: float) -> list[str]:
    out = []
    for key in sorted(set(a) & set(b)):
        if not compared(key, a):
            continue
        x, y = a[key], b[key]
        same = (x == y) or (isinstance(x, float) and isinstance(y, float)
                            and (math.isnan(x) and math.isnan(y) or math.isclose(x, y, rel_tol=rel)))
        if not same:
            out.append(f"{key}: {x!r} -> {y!r}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    ap.add_argument("--map", nargs="*", default=[], help="old_run_name=new_run_name pairs")
    ap.add_argument("--rel", type=float, default=0.0, help="relative tolerance (0: exact)")
    a = ap.parse_args(argv)
    rename = dict(m.split("=", 1) for m in a.map)
    before, after = runs(a.before), runs(a.after)
    bad, n_keys, missing = 0, 0, []
    for name, m in before.items():
        other = after.get(rename.get(name, name))
        if other is None:
            missing.append(name)
            continue
        diff = differences(m, other, a.rel)
        n_keys += sum(compared(k, m) for k in set(m) & set(other))
        for line in diff:
            print(f"{name}: {line}")
        bad += bool(diff)
    print(f"{len(before) - len(missing)} run pairs, {n_keys} values compared, {bad} run(s) differ"
          + (f"; no counterpart for {missing}" if missing else ""))
    return 1 if bad or missing else 0


if __name__ == "__main__":
    sys.exit(main())
