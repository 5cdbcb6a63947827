"""scripts/readme_walk.py: which commands it reads out of a README (nothing is run)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "readme_walk", Path(__file__).resolve().parents[1] / "scripts" / "readme_walk.py")
walk = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(walk)

README = """# title

```bash
pip install -e . && python run.py   # the main job
```

Text with `python not_a_command.py` inline.

```
python in_an_untagged_block.py
```

```python
print("not bash")
```

```bash
# a comment line

python a.py x=1 \\
    y=2 \\
    z=3      # continued
python b.py 'variant=-chip_${hydra:runtime.choices.chip}' "q=# not a comment" s=a#b
```

```bash
dvc repro
```
"""


def test_commands_in_order_comments_and_continuations():
    assert walk.commands(README) == [
        "pip install -e . && python run.py",
        "python a.py x=1 y=2 z=3",
        "python b.py 'variant=-chip_${hydra:runtime.choices.chip}' \"q=# not a comment\" s=a#b",
        "dvc repro",
    ]


def test_only_bash_blocks_are_read():
    assert len(walk.blocks(README)) == 3
    assert walk.blocks(README, lang="python") == [['print("not bash")']]


def test_strip_comment_keeps_quoted_and_mid_word_hashes():
    assert walk.strip_comment("a 'b # c' d  # e") == "a 'b # c' d"
    assert walk.strip_comment("a#b") == "a#b"
    assert walk.strip_comment("# all comment") == ""


def test_selection_and_skip(tmp_path):
    args = walk.argparse.Namespace(only="2,4", start=1)
    assert [n for n in range(1, 6) if walk.selected(n, args)] == [2, 4]
    args = walk.argparse.Namespace(only=None, start=3)
    assert [n for n in range(1, 6) if walk.selected(n, args)] == [3, 4, 5]
    skips = [["launcher slurm", "needs a cluster"], [r"^dvc push$", "needs a remote"]]
    assert walk.skip_reason("python -m v4lab.studies run x --launcher slurm", skips) == "needs a cluster"
    assert walk.skip_reason("dvc push", skips) == "needs a remote"
    assert walk.skip_reason("dvc push -r x", skips) is None


def test_walk_stops_at_first_failure(tmp_path):
    # three trivial shell commands: the second fails, the third must not run
    (tmp_path / "README.md").write_text("```bash\ntrue\nfalse\ntouch ran\n```\n")
    rc = walk.main(["--root", str(tmp_path), "--out", str(tmp_path / "logs")])
    assert rc == 1 and not (tmp_path / "ran").exists()
    summary = (tmp_path / "logs" / "summary.md").read_text()
    assert "| 1 | `true` | 0 |" in summary and "| 2 | `false` | 1 |" in summary
    rc = walk.main(["--root", str(tmp_path), "--out", str(tmp_path / "logs"), "--keep-going",
                    "--skip", "^false$", "fails on purpose"])
    assert rc == 0 and (tmp_path / "ran").exists()
    assert "`false`: fails on purpose" in (tmp_path / "logs" / "summary.md").read_text()
