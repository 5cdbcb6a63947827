"""The metric registry (v4lab.metrics): every name the code writes is registered, once,
with a unit, a direction and a `report check` tolerance."""

from __future__ import annotations

import ast
import math
import re
from pathlib import Path

import pytest
import yaml

from v4lab import metrics
from v4lab.metrics import HIGHER, LOWER, NONE, P_TOLERANCE, metric

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "v4lab"
PREFIXES = ("val", "test", "cost", "speed", "task", "moe", "engram", "sparse", "chip", "train", "time",
            "host", "hc", "final")
NAME = re.compile(rf"(?:{'|'.join(PREFIXES)})/[^\s*]+")
# f-strings whose names are built from parts the tests below check at run time
BUILT = {
    "chip/<prefix>proj_<k>": "chips.chip_metrics: every key checked in test_chip_metrics_are_registered",
    "chip/<prefix><k>": "the same",
    "train/<name>": "ForwardContext.add_loss names (AUX_LOSSES), checked in the source scan",
    "final/<name>": "callbacks.PieceTail: add_stat names (registered) under final/, checked below",
    "task/all@": "a prefix (train.report's startswith), not a name",
    "task/<task>/<label>": "label in (acc_trained_lengths, acc_extrapolated): see the lookups below",
}


def _text(node: ast.AST) -> str | None:
    """A string constant's text, or an f-string's with each {field} rendered as <field>."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        parts = []
        for v in node.values:
            if isinstance(v, ast.Constant):
                parts.append(str(v.value))
            else:
                inner = v.value
                parts.append(f"<{ast.unparse(inner).split('.')[-1].strip(chr(39))}>")
        return "".join(parts)
    return None


def _names_in_source() -> dict[str, str]:
    """{metric-like string in src/: where}, and AUX loss names from add_loss calls."""
    found: dict[str, str] = {}
    for path in sorted(SRC.rglob("*.py")):
        if path.name == "metrics.py":
            continue
        tree = ast.parse(path.read_text())
        parts = {id(v) for n in ast.walk(tree) if isinstance(n, ast.JoinedStr) for v in n.values}
        for node in ast.walk(tree):
            if id(node) in parts:  # a piece of an f-string: the whole one is checked
                continue
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") in ("add_loss", "add_stat"):
                parts.add(id(node.args[0]))
                name = _text(node.args[0])
                if name is None:  # a name passed on (model.mtp_loss): checked where it was added
                    continue
                kind = node.func.attr
                found[f"train/{name}" if kind == "add_loss" else name] = f"{path.name} ({kind})"
                continue
            text = _text(node)
            if text and NAME.fullmatch(text):
                found.setdefault(text, path.relative_to(SRC).as_posix())
    return found


def test_every_metric_name_in_the_source_is_registered():
    names = _names_in_source()
    assert {"val/bpb", "cost/kv_bytes_per_token", "task/<task>@<context>/acc",
            "train/moe/aux_loss", "sparse/recall"} <= set(names)  # the scan sees them
    unknown = {n: where for n, where in names.items() if n not in BUILT and not metrics.known(n)}
    assert not unknown, f"register these in src/v4lab/metrics.py: {unknown}"


def test_every_piece_stat_has_its_final_figure():
    stats = {n for n, where in _names_in_source().items() if where.endswith("(add_stat)")}
    assert {"moe/load_cv", "engram/gate_mean", "sparse/recall", "hc/fwd_gain"} <= stats
    assert all(metrics.known(f"final/{n}") for n in stats)


def test_an_unregistered_name_is_caught():
    assert not metrics.known("val/nope") and not metrics.known("task/x/acc_typo")
    with pytest.raises(KeyError, match="'val/nope' is not a registered metric"):
        metric("val/nope")


def test_chip_metrics_are_registered():
    from v4lab import chips
    from v4lab.model import ModelConfig
    from v4lab.modules.args import AttentionConfig

    att = AttentionConfig(kind="mla", n_heads=4, q_lora_rank=24, kv_lora_rank=128,
                          qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, ffn_dim=48, attention=att).validate()
    m = chips.chip_metrics(chips.load_chip("ascend_910c"), cfg,
                           {"v3_671b": chips.load_model_preset("v3_671b")})
    assert len(m) > 50
    unknown = sorted(k for k in m if not metrics.known(k))
    assert not unknown, unknown
    strings = sorted(k for k, v in m.items() if isinstance(v, str) and metric(k).finite)
    assert not strings, f"labels must be registered with finite=False: {strings}"


@pytest.mark.parametrize("name", sorted({m for p in (ROOT / "experiments").glob("*.yaml")
                                         for m in yaml.safe_load(p.read_text())["metrics"]}))
def test_every_study_column_is_registered(name):
    assert metrics.known(name)


def test_each_name_is_registered_once_and_fields_are_valid():
    names = [m.name for m in metrics.METRICS]
    assert len(names) == len(set(names)), sorted({n for n in names if names.count(n) > 1})
    for m in metrics.METRICS:
        assert m.direction in (LOWER, HIGHER, NONE) and m.tolerance >= 0, m


@pytest.mark.parametrize(("name", "pattern", "unit", "direction", "tol"), [
    ("val/bpb", "val/bpb", "bits/byte", LOWER, 1e-3),
    ("task/niah_single@1024/acc", "task/<task>@<context>/acc", "accuracy", HIGHER, 1e-3),
    ("task/niah_single/acc_extrapolated", "task/<task>/acc_extrapolated", "accuracy", HIGHER, 1e-3),
    ("speed/decode_ms_per_token@2048", "speed/decode_ms_per_token@<context>", "ms/token", LOWER, 0.5),
    ("cost/kv_bytes@2048", "cost/kv_bytes@<context>", "bytes", LOWER, 1e-9),
    ("chip/v3_671b/proj_decode_tokens_per_s@32768", "chip/<preset>/proj_decode_tokens_per_s@<context>",
     "tokens/s", HIGHER, 1e-6),
    ("chip/v3_671b/devices_needed", "chip/<preset>/devices_needed", "devices", LOWER, 1e-6),
    ("chip/kv_dtype_effective", "chip/kv_dtype_effective", "", NONE, 1e-6),
    ("val/moe/load_cv", "val/moe/load_cv", "ratio", LOWER, 1e-3),
    ("time/train_s", "time/train_s", "s", LOWER, 1.0),
])
def test_lookup_of_names_and_families(name, pattern, unit, direction, tol):
    m = metric(name)
    assert (m.name, m.unit, m.direction, m.tolerance) == (pattern, unit, direction, tol)


def test_report_check_tolerances_are_todays():
    """The prefixes' tolerances report.py had before the registry (TOLERANCES)."""
    for prefix, tol in (("speed/", 0.5), ("time/", 1.0), ("cost/", 1e-9), ("chip/", 1e-6)):
        assert {m.tolerance for m in metrics.METRICS if m.name.startswith(prefix)} == {tol}, prefix
    # host/ (new: the machine at start) is wall-clock-like: compared like time/
    assert {m.tolerance for m in metrics.METRICS if m.name.startswith("host/")} == {1.0}
    others = {m.tolerance for m in metrics.METRICS
              if not m.name.startswith(("speed/", "time/", "cost/", "chip/", "host/"))}
    assert others == {1e-3}
    assert metrics.tolerance("val/nope") == 1e-3  # an unregistered column: the quality one


def test_cell_tolerance_is_absolute_for_differences_and_p_values():
    # a mean: relative to the value
    assert metrics.cell_tolerance("val/bpb mean", 2.0, 2.0, 2.0) == pytest.approx(2e-3)
    # a delta of 1e-6 vs 3e-6: absolute, twice the mean's tolerance (issue 18)
    tol = metrics.cell_tolerance("val/bpb delta", 1e-6, 3e-6, 2.5)
    assert tol == pytest.approx(2 * 1e-3 * 2.5) and abs(1e-6 - 3e-6) <= tol
    assert metrics.cell_tolerance("val/bpb ci95", 0.1, 0.1, 2.5) == pytest.approx(5e-3)
    assert metrics.cell_tolerance("val/bpb p", 0.3, 0.31, 2.5) == P_TOLERANCE
    # without a usable mean a delta falls back to relative
    assert metrics.cell_tolerance("val/bpb delta", 1.0, 1.0, math.nan) == pytest.approx(1e-3)


def test_labels_name_the_unit():
    assert metrics.label("val/bpb") == "val/bpb (bits/byte)"
    assert metrics.label("cost/params_active") == "cost/params_active (parameters)"
    assert metrics.label("val/nope") == "val/nope"


def test_key_fills_a_registered_pattern_and_refuses_typos():
    assert metrics.key("task/<task>@<context>/acc", task="niah_single", context=1024) == \
        "task/niah_single@1024/acc"
    assert metrics.key("val/bpb") == "val/bpb"
    with pytest.raises(KeyError, match="not a registered metric"):
        metrics.key("val/bpbb")
    with pytest.raises(KeyError, match="fill in <context>"):
        metrics.key("task/<task>@<context>/acc", task="x")
    with pytest.raises(KeyError, match="has no <ctx>"):
        metrics.key("task/<task>@<context>/acc", task="x", ctx=1)
