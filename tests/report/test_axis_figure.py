"""A study whose rows are points of a swept quantity (manifest ``axis:``): the report draws
quality against it (means with 95% Student-t bars, seeds as dots, the reference marked), and
a bad ``axis`` is refused naming the file, the key, the value and what is allowed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from matplotlib.collections import PathCollection
from matplotlib.container import ErrorbarContainer
from scipy import stats

from conftest import ROOT
from v4lab.errors import ConfigError
from v4lab.report import figures
from v4lab.report.runs import load_runs
from v4lab.studies import load_study

ROWS = ("alloc_0", "alloc_50", "alloc_100")
AXIS = {"label": "Engram share (%)", "values": {"alloc_0": 0, "alloc_50": 50, "alloc_100": 100}}


def _bpb(row: str, seed: int, split: str) -> float:
    """A U over the axis, distinct per seed and split."""
    bottom = {"alloc_0": 3.0, "alloc_50": 2.7, "alloc_100": 2.9}[row]
    return bottom + 0.05 * seed ** 1.5 + (split == "test") * 0.1


def _study(root: Path, **changes) -> object:
    """A checkout with experiments/ax.yaml and three finished seeds per row (alloc_100 without
    test/bpb, as a row without a piece lacks its metric)."""
    (root / "run.py").write_text("")
    (root / "conf").symlink_to(ROOT / "conf")
    (root / "experiments").mkdir()
    data = {"name": "ax", "experiments": list(ROWS), "seeds": [0, 1, 2], "baseline": "alloc_0",
            "metrics": ["val/bpb", "test/bpb", "cost/params_total", "speed/train_tokens_per_s"],
            "axis": AXIS, **changes}
    manifest = {k: v for k, v in data.items() if v is not None}
    (root / "experiments" / "ax.yaml").write_text(yaml.safe_dump(manifest))
    for row in ROWS:
        for s in (0, 1, 2):
            d = root / "outputs" / "ax" / f"{row}-s{s}"
            d.mkdir(parents=True)
            m = {"experiment": row, "seed": s, "val/bpb": _bpb(row, s, "val"), "cost/params_total": 1e6,
                 "speed/train_tokens_per_s": 900.0 + s}
            if row != "alloc_100":
                m["test/bpb"] = _bpb(row, s, "test")
            (d / "metrics.json").write_text(json.dumps(m))
    return load_study("ax", root)


def _draw(root: Path, study, monkeypatch) -> tuple[list[tuple[str, str]], dict]:
    """figures.draw on the study's runs; also every saved figure object, by file name."""
    drawn, save = {}, figures.Canvas.save

    def keep(self, fig, name, caption):
        drawn[name] = fig
        return save(self, fig, name, caption)

    monkeypatch.setattr(figures.Canvas, "save", keep)
    (root / "fig").mkdir()
    return figures.draw(study, load_runs(study, root), root / "fig"), drawn


def _t_interval(v: list[float]) -> tuple[float, float]:
    mean, se = sum(v) / len(v), stats.sem(v)
    return stats.t.interval(0.95, len(v) - 1, loc=mean, scale=se)


def test_quality_is_drawn_against_the_axis_with_t_bars_and_seeds(tmp_path, monkeypatch):
    made, drawn = _draw(tmp_path, _study(tmp_path), monkeypatch)
    captions = dict(made)
    assert (tmp_path / "fig" / "quality_vs_axis.png").stat().st_size > 10_000
    caption = captions["quality_vs_axis.png"]
    assert "val/bpb and test/bpb against Engram share (%)" in caption
    assert "95% Student-t interval" in caption and "(alloc_0) is ringed" in caption
    panels = drawn["quality_vs_axis.png"].axes
    assert [ax.get_title() for ax in panels] == ["val/bpb", "test/bpb"]  # not cost/*, speed/*
    for ax, split in zip(panels, ("val", "test")):
        rows = [r for r in ROWS if split == "val" or r != "alloc_100"]  # no test/bpb: skipped
        bars = {b.get_label(): b for b in ax.containers if isinstance(b, ErrorbarContainer)}
        assert sorted(bars) == sorted(rows)
        dots = [tuple(p) for col in ax.collections if isinstance(col, PathCollection)
                for p in col.get_offsets()]
        for row in rows:
            v = [_bpb(row, s, split) for s in (0, 1, 2)]
            x = AXIS["values"][row]
            line, _, (segments,) = bars[row].lines
            assert list(line.get_xdata()) == [x] and line.get_ydata()[0] == pytest.approx(sum(v) / 3)
            (x0, lo), (x1, hi) = segments.get_segments()[0]
            assert (x0, x1) == (x, x) and (lo, hi) == pytest.approx(_t_interval(v), rel=1e-9)
            assert all(any(d == pytest.approx((x, y)) for d in dots) for y in v)  # each seed a dot
        assert ax.get_xscale() == "linear" and [t.get_text() for t in ax.get_xticklabels()] == [
            "0", "50", "100"]  # every axis value, a skipped row's too (panels share x)


def test_a_reference_off_the_axis_is_a_band_and_log_scale_is_kept(tmp_path, monkeypatch):
    axis = {"label": "share", "values": {"alloc_50": 50, "alloc_100": 100}, "log": True}
    made, drawn = _draw(tmp_path, _study(tmp_path, axis=axis), monkeypatch)
    assert "dashed line" in dict(made)["quality_vs_axis.png"]
    ax = drawn["quality_vs_axis.png"].axes[0]
    ref = [ln for ln in ax.lines if ln.get_label() == "reference (alloc_0)"]
    assert ax.get_xscale() == "log" and len(ref) == 1
    assert ref[0].get_ydata()[0] == pytest.approx(sum(_bpb("alloc_0", s, "val") for s in (0, 1, 2)) / 3)


def test_a_metric_equal_in_every_run_has_no_panel(tmp_path, monkeypatch):
    """A censored figure (steps_to_90 at the step budget when no row reaches 90%) is flat:
    the panel goes to the next quality metric instead."""
    study = _study(tmp_path, metrics=["probe/steps_to_90", "val/bpb", "test/bpb"])
    for f in (tmp_path / "outputs" / "ax").glob("*/metrics.json"):
        f.write_text(json.dumps({**json.loads(f.read_text()), "probe/steps_to_90": 300.0}))
    made, drawn = _draw(tmp_path, study, monkeypatch)
    assert [ax.get_title() for ax in drawn["quality_vs_axis.png"].axes] == ["val/bpb", "test/bpb"]
    assert "a metric equal in every run has no panel" in dict(made)["quality_vs_axis.png"]


def test_no_axis_no_figure(tmp_path, monkeypatch):
    made, _ = _draw(tmp_path, _study(tmp_path, axis=None), monkeypatch)
    assert "quality_vs_axis.png" not in dict(made) and not (tmp_path / "fig" / "quality_vs_axis.png").exists()


@pytest.mark.parametrize(("axis", "message"), [
    ({"label": "x", "values": {"alloc_0": 0, "alloc_25": 25}},
     r"ax.yaml: axis values key 'alloc_25' is not allowed: one of the study's rows \(alloc_0, alloc_50, "
     r"alloc_100\)"),
    ({"label": "x", "values": {"alloc_0": 0, "alloc_50": "half"}},
     r"ax.yaml: axis values alloc_50='half' is not allowed: a finite number$"),
    ({"label": "x", "values": {"alloc_0": 0, "alloc_50": float("nan")}},
     r"axis values alloc_50=nan is not allowed: a finite number$"),
    ({"label": "x", "values": {"alloc_0": 0, "alloc_50": 50}, "log": True},
     r"axis values alloc_0=0 is not allowed: a finite number > 0 \(log: true\)"),
    ({"label": "x", "values": {"alloc_0": 1, "alloc_50": 1}}, r"\[1.0\] given to more than one row"),
    ({"label": "x", "values": {"alloc_0": 1}},
     r"axis values=\{'alloc_0': 1\} is not allowed: .*at least two"),
    ({"label": "x", "values": {"alloc_0": 0, "alloc_50": 50}, "scale": "log"},
     r"axis=.* is not allowed: a mapping with keys label .*values .*log"),
    ({"label": "", "values": {"alloc_0": 0, "alloc_50": 50}}, r"axis label='' is not allowed"),
])
def test_a_bad_axis_is_refused(tmp_path, axis, message):
    with pytest.raises(ConfigError, match=message):
        _study(tmp_path, axis=axis)


def test_the_published_sweeps_have_their_axes():
    alloc, experts = load_study("allocation", ROOT), load_study("experts", ROOT)
    assert alloc.axis.values == {f"alloc_{p}": float(p) for p in (0, 25, 50, 75, 100)}
    assert experts.axis.values == {"dense_ffn": 0.0, "experts_8": 8.0, "experts_32": 32.0}
    assert not experts.axis.log  # dense_ffn at 0 on a linear axis
