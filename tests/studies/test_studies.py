"""The studies CLI (python -m v4lab.studies): failures end in one line naming the file."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import yaml

from v4lab.studies.__main__ import main

ROOT = Path(__file__).resolve().parents[2]


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _checkout(tmp_path: Path) -> Path:
    """A checkout as find_root sees it: run.py, conf/, experiments/mini.yaml, two finished runs."""
    (tmp_path / "run.py").write_text("")
    (tmp_path / "conf").symlink_to(ROOT / "conf")
    (tmp_path / "experiments").mkdir()
    (tmp_path / "experiments" / "mini.yaml").write_text(yaml.safe_dump({
        "name": "mini", "experiments": ["baseline", "mha"], "seeds": [0], "baseline": "baseline",
        "metrics": ["val/bpb"]}))
    for e in ("baseline", "mha"):
        d = tmp_path / "outputs" / "mini" / f"{e}-s0"
        d.mkdir(parents=True)
        (d / "metrics.json").write_text(json.dumps({"experiment": e, "seed": 0, "val/bpb": 3.0}))
    return tmp_path


def test_studies_status_counts_finished_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(_checkout(tmp_path))
    assert main(["status", "mini"]) == 0
    assert capsys.readouterr().out == "mini: 2/2 runs done\n"


def test_studies_status_on_a_corrupt_metrics_json_names_the_file(tmp_path, monkeypatch, capsys):
    """Issue 18: a raw JSONDecodeError traceback before; now one line naming the file and the
    fix, exit 2, and nothing written or changed."""
    root = _checkout(tmp_path)
    bad = root / "outputs" / "mini" / "mha-s0" / "metrics.json"
    bad.write_text('{"experiment": "mha", "seed": 0, "val/bpb": 2.')  # a run killed mid-write
    monkeypatch.chdir(root)
    before = _hashes(root)
    assert main(["status", "mini"]) == 2
    out, err = capsys.readouterr()
    assert out == "mini: 1/2 runs done\n"
    assert err.count("\n") == 1 and err.startswith(f"error: {bad}: corrupt metrics.json (")
    assert err.rstrip().endswith("delete it and rerun the run"), err
    assert _hashes(root) == before


def test_studies_status_on_a_misplaced_metrics_json_names_the_file(tmp_path, monkeypatch, capsys):
    root = _checkout(tmp_path)
    bad = root / "outputs" / "mini" / "mha-s0" / "metrics.json"
    bad.write_text(json.dumps({"experiment": "baseline", "seed": 0}))
    monkeypatch.chdir(root)
    assert main(["status", "mini"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {bad}: holds experiment='baseline' seed=0, expected 'mha' seed 0\n"


def test_studies_list_shows_sweep_axes(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "chips            1 experiments x 9 chip x 3 seeds: 9 runs  " in out  # 3 numerics classes
    assert "kv_cache         1 experiments x 5 seeds: 5 runs of recall, evaluated again  " in out
    assert "smoke            3 experiments x 1 seeds: 3 runs  " in out and "INVALID" not in out
