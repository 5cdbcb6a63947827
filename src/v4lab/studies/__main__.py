"""``python -m v4lab.studies {list,run,status}``: see :mod:`v4lab.studies`."""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys

import v4lab.studies as studies
from v4lab.errors import ConfigError
from v4lab.studies.finder import scan
from v4lab.studies.launch import LAUNCHERS, multirun_command
from v4lab.studies.manifests import Study, available_studies, find_root, load_study


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m v4lab.studies",
                                     description=studies.__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="the study manifests in experiments/")
    p_run = sub.add_parser("run", help="run a study as one Hydra multirun")
    p_run.add_argument("study")
    p_run.add_argument("--launcher", default="basic", help=f"one of {', '.join(LAUNCHERS)} "
                       "(basic: one run after another; local: parallel on this machine; slurm: a job array)")
    p_run.add_argument("--dry-run", action="store_true", help="print the command, run nothing")
    p_run.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    p_status = sub.add_parser("status", help="which runs of a study have a metrics.json")
    p_status.add_argument("study")
    return parser


def list_studies(root) -> int:
    for name in available_studies(root):
        try:
            s = load_study(name, root)
            sweep = "".join(f" x {len(v)} {k}" for k, v in s.sweep.items())
            runs = f"{len(s.runs())} runs" + (f" of {s.evaluates}, evaluated again" if s.evaluates else "")
            print(f"{name:16s} {len(s.experiments)} experiments{sweep} x {len(s.seeds)} seeds: {runs}  "
                  f"{s.description}")
        except ConfigError as e:
            print(f"{name:16s} INVALID: {e}")
    return 0


def status(study: Study, root) -> int:
    """One line: runs done and missing; each unusable metrics.json as one ``error:`` line
    (naming the file) on stderr. Exit 0 when every run is done, 1 when some are missing,
    2 when a metrics.json is unusable."""
    found = scan(study, root)
    print(f"{study.name}: {len(found.runs)}/{len(study.runs())} runs done"
          + (f"; missing: {', '.join(found.missing)}" if found.missing else ""))
    for line in found.bad:
        print(f"error: {line}", file=sys.stderr)
    return 2 if found.bad else 1 if found.missing else 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, unknown = parser.parse_known_args(argv)
    if args.cmd != "run" and unknown or any(u.startswith("-") for u in unknown):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.cmd == "run":
        args.overrides = [*args.overrides, *unknown]
    try:
        root = find_root()
        if args.cmd == "list":
            return list_studies(root)
        study = load_study(args.study, root)
        if args.cmd == "status":
            return status(study, root)
        cmd = multirun_command(study, args.launcher, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(shlex.join(["python", *cmd[1:]]), flush=True)
    if args.dry_run:
        return 0
    return subprocess.call(cmd, cwd=root)


if __name__ == "__main__":
    sys.exit(main())
