"""``python -m v4lab.report {build,check,index,dvc-yaml}``: see :mod:`v4lab.report`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import v4lab.report as report
from v4lab import metrics as registry
from v4lab.errors import ConfigError
from v4lab.io import atomic_write_text
from v4lab.report import swap
from v4lab.report.check import check
from v4lab.report.publish import REPORTS, build, write_index
from v4lab.studies.dvcyaml import dvc_yaml_text
from v4lab.studies.manifests import find_root, load_study


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m v4lab.report",
                                     description=report.__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_build = sub.add_parser("build", help="publish a study's table and figures into reports/")
    p_build.add_argument("study")
    p_check = sub.add_parser("check", help="compare reports/S.csv with the committed one")
    p_check.add_argument("study")
    p_check.add_argument("--reference", type=Path, help="a CSV to compare with (default: git HEAD's)")
    sub.add_parser("index", help="rewrite reports/README.md")
    p_dvc = sub.add_parser("dvc-yaml", help="write dvc.yaml from experiments/*.yaml")
    p_dvc.add_argument("--check", action="store_true", help="exit 1 if dvc.yaml is not up to date")
    return parser


def _check(args, root: Path) -> int:
    study = load_study(args.study, root)
    moved = check(study, root, args.reference)
    for line in moved:
        print(line)
    print(f"{study.name}: {len(moved)} cell(s) moved (relative tolerance per metric: "
          f"src/v4lab/metrics.py; deltas and CI half-widths absolute, p-values "
          f"{registry.P_TOLERANCE} absolute)")
    return 1 if moved else 0


def _dvc_yaml(args, root: Path) -> int:
    text, path = dvc_yaml_text(root), root / "dvc.yaml"
    if args.check:
        if not path.is_file() or path.read_text() != text:
            print(f"{path} is out of date: run python -m v4lab.report dvc-yaml", file=sys.stderr)
            return 1
        print(f"{path} is up to date")
    else:
        atomic_write_text(path, text)
        print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        root = find_root()
        if args.cmd == "build":
            path = build(load_study(args.study, root), root)
            print(f"published {path.relative_to(root)} (index: reports/README.md)")
        elif args.cmd == "check":
            return _check(args, root)
        elif args.cmd == "index":
            reports = root / REPORTS
            if reports.is_dir():  # what a killed build left: finish or remove it
                swap.recover(reports, lambda: write_index(root, reports))
            print(write_index(root, reports))
        else:
            return _dvc_yaml(args, root)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
