"""Run the README's shell commands one after another, as a reader would (issue 18).

Every ```bash fenced block of README.md is read in order and split into commands: one per
line, a trailing ``# comment`` removed, blank and comment-only lines skipped, a line ending
in ``\\`` joined to the next. Each command runs with ``bash -c`` in the repository root,
in order, its output in ``<out>/NN.log``; the walk stops at the first failure (exit code
not 0) unless ``--keep-going``. ``<out>/summary.md`` is rewritten after every command, so
an interrupted walk still leaves its table.

    python scripts/readme_walk.py --list
    python scripts/readme_walk.py --root /tmp/walk/repo --out /tmp/walk/logs \\
        --skip 'launcher slurm' 'submits to a SLURM cluster' [--from N | --only N,M]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```(\S*)\s*$")


def strip_comment(line: str) -> str:
    """``line`` without a trailing ``# comment``: a ``#`` that starts a word, outside quotes."""
    quote = ""
    for i, ch in enumerate(line):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def blocks(text: str, lang: str = "bash") -> list[list[str]]:
    """The lines of every fenced block tagged ``lang``, in the order written."""
    found, current, inside = [], None, False
    for line in text.splitlines():
        fence = FENCE.match(line.strip())
        if fence and not inside:
            inside, current = True, ([] if fence.group(1) == lang else None)
        elif fence and inside:
            if current is not None:
                found.append(current)
            inside, current = False, None
        elif current is not None:
            current.append(line)
    return found


def commands(text: str) -> list[str]:
    """The README's commands in order (continuation lines joined, comments removed)."""
    out = []
    for block in blocks(text):
        pending = ""
        for raw in block:
            line = raw.strip()
            if line.endswith("\\") and not line.startswith("#"):
                pending += line[:-1].strip() + " "
                continue
            command = strip_comment(pending + line).strip()
            pending = ""
            if command:
                out.append(command)
        if pending.strip():
            out.append(strip_comment(pending).strip())
    return out


def selected(n: int, args: argparse.Namespace) -> bool:
    if args.only:
        return n in {int(x) for x in args.only.split(",")}
    return n >= args.start


def skip_reason(command: str, skips: list[list[str]]) -> str | None:
    for pattern, reason in skips:
        if re.search(pattern, command):
            return reason
    return None


def write_summary(out: Path, rows: list[dict], root: Path, started: float, done: bool) -> None:
    total = sum(r["seconds"] for r in rows if r["seconds"] is not None)
    lines = [
        f"Walk of {root / 'README.md'}: {time.strftime('%Y-%m-%d %H:%M', time.localtime(started))}, "
        f"{'finished' if done else 'in progress'}; {total:.0f} s in commands, "
        f"{time.time() - started:.0f} s wall.",
        "",
        "| n | command | rc | seconds |",
        "|---:|---|---:|---:|",
    ]
    for r in rows:
        command = r["command"].replace("|", "\\|")
        seconds = "" if r["seconds"] is None else f"{r['seconds']:.1f}"
        lines.append(f"| {r['n']} | `{command}` | {r['rc']} | {seconds} |")
    skipped = [r for r in rows if r["seconds"] is None]
    if skipped:
        lines += ["", "Skipped (reason given on the command line):", ""]
        lines += [f"- {r['n']} `{r['command']}`: {r['reason']}" for r in skipped]
    (out / "summary.md").write_text("\n".join(lines) + "\n")


def run_one(n: int, command: str, root: Path, out: Path) -> tuple[int, float]:
    log = out / f"{n:02d}.log"
    t0 = time.monotonic()
    with log.open("w") as f:
        f.write(f"$ {command}\n")
        f.flush()
        rc = subprocess.run(["bash", "-c", command], cwd=root, stdout=f, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL).returncode
        seconds = time.monotonic() - t0
        f.write(f"\n[rc={rc} seconds={seconds:.1f}]\n")
    return rc, seconds


def walk(cmds: list[str], args: argparse.Namespace) -> int:
    root, out = Path(args.root).resolve(), Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started, rows, failed = time.time(), [], False
    for n, command in enumerate(cmds, 1):
        if not selected(n, args):
            continue
        reason = skip_reason(command, args.skip)
        if reason is not None:
            rows.append({"n": n, "command": command, "rc": "skipped", "seconds": None, "reason": reason})
            print(f"[{n}] skipped ({reason}): {command}", flush=True)
            continue
        print(f"[{n}] {command}", flush=True)
        rc, seconds = run_one(n, command, root, out)
        rows.append({"n": n, "command": command, "rc": rc, "seconds": seconds})
        print(f"[{n}] rc={rc} {seconds:.1f} s", flush=True)
        write_summary(out, rows, root, started, done=False)
        if rc != 0:
            failed = True
            if not args.keep_going:
                break
    write_summary(out, rows, root, started, done=True)
    print(f"summary: {out / 'summary.md'}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default=str(ROOT), help="repository root to run in (default: this one)")
    p.add_argument("--readme", help="README to read (default: <root>/README.md)")
    p.add_argument("--out", default="readme_walk", help="folder for the logs and summary.md")
    p.add_argument("--list", action="store_true", help="print the numbered commands and exit")
    p.add_argument("--from", dest="start", type=int, default=1, help="start at command N")
    p.add_argument("--only", help="run only these commands: N,M,...")
    p.add_argument("--skip", nargs=2, action="append", default=[], metavar=("REGEX", "REASON"),
                   help="do not run commands matching REGEX; REASON goes into the summary")
    p.add_argument("--keep-going", action="store_true", help="run on after a failed command")
    args = p.parse_args(argv)
    readme = Path(args.readme) if args.readme else Path(args.root) / "README.md"
    cmds = commands(readme.read_text())
    if args.list:
        for n, command in enumerate(cmds, 1):
            print(f"{n:3d}  {command}")
        return 0
    return walk(cmds, args)


if __name__ == "__main__":
    sys.exit(main())
