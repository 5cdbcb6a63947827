"""Reports: statistics against naive formulas, refusal of partial or corrupt studies,
figures, the check command, the generated dvc.yaml, and `dvc repro smoke` end to end."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import yaml

from v4lab.errors import ConfigError
from v4lab.report import publish
from v4lab.report.check import compare
from v4lab.report.publish import build
from v4lab.report.runs import ReportError, load_runs
from v4lab.report.table import summarize
from v4lab.stats import mean_ci, welch_p
from v4lab.studies import dvcyaml, load_study

ROOT = Path(__file__).resolve().parents[2]


# --- statistics against naive computations ----------------------------------------------------


def _t_cdf(t: float, df: float, steps: int = 20000) -> float:
    """Student-t CDF by Simpson integration of the density from 0 (independent of scipy)."""
    c = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2))
    f = lambda x: c * (1 + x * x / df) ** (-(df + 1) / 2)  # noqa: E731
    a, b, h = 0.0, abs(t), abs(t) / steps
    s = f(a) + f(b) + sum((4 if i % 2 else 2) * f(a + i * h) for i in range(1, steps))
    half = s * h / 3
    return 0.5 + half if t >= 0 else 0.5 - half


def test_mean_ci_matches_the_t_table():
    values = [1.0, 2.0, 4.0]
    m = mean_ci(values)
    mean, half = m.mean, m.half_width
    sd = math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2)
    assert mean == pytest.approx(7 / 3)
    assert half == pytest.approx(4.302652729749464 * sd / math.sqrt(3), rel=1e-12)  # t(0.975, df=2)
    assert math.isnan(mean_ci([3.0]).half_width)


def test_welch_p_matches_a_naive_welch_test():
    a, b = [3.1, 3.3, 3.2, 3.6], [2.9, 3.0, 2.7]
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    va = sum((x - ma) ** 2 for x in a) / (len(a) - 1) / len(a)
    vb = sum((x - mb) ** 2 for x in b) / (len(b) - 1) / len(b)
    t = (ma - mb) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    naive = 2 * (1 - _t_cdf(abs(t), df))
    assert welch_p(a, b) == pytest.approx(naive, rel=1e-6)
    assert math.isnan(welch_p([1.0], b))
    assert welch_p([5.0, 5.0], [5.0, 5.0]) == 1.0 and welch_p([5.0, 5.0], [6.0, 6.0]) == 0.0
    # spread at round-off level is no spread: deterministic figures are compared exactly
    assert welch_p([204.553, 204.553 * (1 + 1e-15)], [949.5, 949.5]) == 0.0
    assert mean_ci([204.553, 204.553 * (1 + 1e-15), 204.553]).half_width == 0.0


# --- a synthetic study --------------------------------------------------------------------------

VALS = {"baseline": [3.0, 3.1, 3.2], "mha": [2.5, 2.6, 2.55]}


def _fake_root(tmp_path: Path, metrics: list[str] | None = None, skip: str = "") -> tuple[Path, object]:
    """A folder with experiments/mini.yaml and outputs/mini/<run>/{metrics.json,curves.csv}."""
    (tmp_path / "experiments").mkdir()
    manifest = tmp_path / "experiments" / "mini.yaml"
    manifest.write_text(yaml.safe_dump({
        "name": "mini", "experiments": ["baseline", "mha"], "seeds": [0, 1, 2], "baseline": "baseline",
        "metrics": metrics or ["val/bpb", "cost/params_total", "chip/kv_dtype_effective"]}))
    study = load_study(str(manifest), ROOT)
    for e, vals in VALS.items():
        for s, v in enumerate(vals):
            if f"{e}-s{s}" == skip:
                continue
            d = tmp_path / "outputs" / "mini" / f"{e}-s{s}"
            d.mkdir(parents=True)
            m = {"experiment": e, "seed": s, "val/bpb": v, "cost/params_total": 1000.0 + 500 * (e == "mha"),
                 "cost/params_active": 800.0, "cost/kv_bytes_per_token": 512.0 - 100 * (e == "mha"),
                 "chip/kv_dtype_effective": "bf16", "chip/name": f"chip{e}", "time/train_s": 1.5,
                 "task/copy@64/acc": 0.9 - 0.1 * s, "task/copy@256/acc": 0.5,
                 "chip/v3_671b/proj_train_tokens_per_s": 10.0 + s,
                 "chip/v3_671b/proj_decode_tokens_per_s@32768": 100.0}
            (d / "metrics.json").write_text(json.dumps(m))
            (d / "curves.csv").write_text("step,train/loss,val/loss,val/bpb\n5,6.0,,\n10,5.0,5.1,"
                                          f"{v + 0.5}\n20,4.0,4.1,{v}\n")
    return tmp_path, study


def test_table_means_ci_delta_and_significance(tmp_path):
    root, study = _fake_root(tmp_path)
    runs = load_runs(study, root)
    table = {r["experiment"]: r for r in summarize(study, runs).iter_rows(named=True)}
    mha, base = table["mha"], table["baseline"]
    assert mha["val/bpb mean"] == pytest.approx(2.55) and base["val/bpb mean"] == pytest.approx(3.1)
    assert mha["val/bpb ci95"] == pytest.approx(4.302652729749464 * 0.05 / math.sqrt(3))
    assert mha["val/bpb delta"] == pytest.approx(-0.55)
    assert mha["val/bpb significant"] is True and base["val/bpb delta"] == 0.0
    assert mha["cost/params_total delta"] == 500.0 and mha["cost/params_total p"] == 0.0
    assert mha["chip/kv_dtype_effective"] == "bf16"


def test_build_publishes_table_figures_and_index(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    root, study = _fake_root(tmp_path)
    build(study, root)
    reports = root / "reports"
    md = (reports / "mini.md").read_text()
    assert "| mha | 3 | 2.5500 ± 0.1242 | -0.5500 (p=" in md and " * |" in md
    figs = sorted(p.name for p in (reports / "figures" / "mini").glob("*.png"))
    assert figs == ["accuracy_vs_context.png", "chip_projections.png", "cost_vs_quality.png",
                    "learning_curves.png"]
    assert all((reports / "figures" / "mini" / f).stat().st_size > 10_000 for f in figs)
    assert pl.read_csv(reports / "figures" / "mini" / "context_length.csv").columns == [
        "experiment", "seed", "task", "context", "accuracy"]
    index = (reports / "README.md").read_text()
    assert "## [mini](mini.md)" in index and "figures/mini/learning_curves.png" in index
    csv = pl.read_csv(reports / "mini.csv")
    assert csv["experiment"].to_list() == ["baseline", "mha"]
    assert compare(csv, csv) == []


@pytest.mark.parametrize(("breakage", "message"), [
    ("missing", r"refusing to publish a partial table\n.*1 of 6 runs missing or failed: mha-s1"),
    ("corrupt", r"outputs/mini/mha-s2/metrics.json: corrupt metrics.json"),
    ("misplaced", r"outputs/mini/mha-s2/metrics.json: holds experiment='baseline'"),
    ("unknown_metric", r"experiments/mini.yaml: metrics contains 'val/nope', which no run produces"),
    ("partial_metric", r"metric 'val/bpb' is missing from .*mha-s2/metrics.json"),
])
def test_bad_study_is_refused_and_nothing_is_written(tmp_path, monkeypatch, breakage, message):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    root, study = _fake_root(tmp_path, ["val/nope"] if breakage == "unknown_metric" else None,
                             skip="mha-s1" if breakage == "missing" else "")
    path = root / "outputs" / "mini" / "mha-s2" / "metrics.json"
    if breakage == "corrupt":
        path.write_text('{"experiment": "mha", "seed": 2, "val/bpb": 2.')
    elif breakage == "misplaced":
        path.write_text(json.dumps({"experiment": "baseline", "seed": 2}))
    elif breakage == "partial_metric":
        m = json.loads(path.read_text())
        del m["val/bpb"]
        path.write_text(json.dumps(m))
    with pytest.raises(ReportError, match=message):
        build(study, root)
    assert not (root / "reports").exists() or not any((root / "reports").iterdir())


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("key", ["train/loss", "speed/train_tokens_per_s", "val/bpb"])
def test_report_refuses_a_metrics_json_with_nan_quality_or_speed(tmp_path, monkeypatch, key):
    """Issue 18: a finished run rerun into an empty resume writes train/loss and
    speed/train_tokens_per_s = NaN; the report showed "n/a". Now it refuses, naming the file
    and the key, and the published study stays as it was."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setattr(publish, "draw", fake_draw)
    root, study = _fake_root(tmp_path, ["val/bpb", "speed/train_tokens_per_s"])
    for d in (root / "outputs" / "mini").iterdir():  # a good study first
        m = json.loads((d / "metrics.json").read_text())
        m |= {"train/loss": 4.0, "speed/train_tokens_per_s": 900.0}
        (d / "metrics.json").write_text(json.dumps(m))
    build(study, root)
    before = _hashes(root / "reports")
    path = root / "outputs" / "mini" / "mha-s2" / "metrics.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {key: math.nan}))
    with pytest.raises(ReportError, match=rf"refusing non-finite metrics.*\n  {path}: {key}=nan$"):
        build(study, root)
    assert _hashes(root / "reports") == before


def fake_draw(study, runs, out: Path) -> list[tuple[str, str]]:
    """Stands in for figures.draw in the publishing tests (figures are tested above): one
    figure per experiment, and a task figure when the runs hold task accuracies."""
    made = []
    for e in study.experiments:
        (out / f"{e}.png").write_bytes(f"{e} {sorted(runs)}".encode())
        made.append((f"{e}.png", f"figure of {e}"))
    if any("task/copy@64/acc" in m for _, m in runs.values()):
        (out / "tasks.png").write_bytes(b"tasks")
        made.append(("tasks.png", "tasks"))
    return made


def _links_resolve(reports: Path) -> None:
    """Every figure the published tables and the index link exists."""
    for md in [*reports.glob("*.md")]:
        for link in re.findall(r"!\[[^]]*\]\(([^)]+)\)", md.read_text()):
            assert (reports / link).is_file(), f"{md.name} links {link}, which is missing"


KILL = """
import os, sys
sys.path[:0] = [{tests!r}, {tests_root!r}]  # test_report, and conftest beside it
import test_report
from v4lab.report import publish, swap
from v4lab.studies import load_study
publish.draw = test_report.fake_draw
point = {point!r}
def die(*a, **k):
    os._exit(137)  # like SIGKILL: no finally, no cleanup
def after(f):
    def g(*a, **k):
        f(*a, **k)
        die()
    return g
if point == "drawing":
    publish.draw = lambda study, runs, out: (test_report.fake_draw(study, runs, out), die())
elif point == "figures_swapped":
    swap.swap_figures = after(swap.swap_figures)
elif point == "before_index":  # table, csv and json replaced; the index not yet
    orig = swap.apply
    swap.apply = lambda stage, reports, reindex: orig(stage, reports, die)
from pathlib import Path
publish.build(load_study({manifest!r}, Path({repo!r})), Path({root!r}))
"""


@pytest.mark.parametrize("point", ["drawing", "figures_swapped", "before_index"])
@pytest.mark.process
def test_killed_report_build_leaves_a_consistent_study_and_the_next_build_cleans_up(
        tmp_path, monkeypatch, point):
    """Issue 18: a killed build left reports/.tmp-* folders, a stale index, or a figure
    folder missing while the table links it. A build killed (SIGKILL-like) while drawing
    changes nothing published; killed while committing, every link still resolves; the
    next build removes or finishes what was left and publishes the new table."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setattr(publish, "draw", fake_draw)
    root, study = _fake_root(tmp_path)
    build(study, root)  # published: with the task figure
    reports = root / "reports"
    before = _hashes(reports)
    for d in (root / "outputs" / "mini").iterdir():  # new results: no task figure any more
        m = json.loads((d / "metrics.json").read_text())
        m = {k: v for k, v in m.items() if not k.startswith("task/")}
        (d / "metrics.json").write_text(json.dumps(m | {"val/bpb": m["val/bpb"] + 1}))
    here = Path(__file__).resolve()
    script = KILL.format(tests=str(here.parent), tests_root=str(here.parents[1]), point=point,
                         repo=str(ROOT), root=str(root), manifest=str(root / "experiments" / "mini.yaml"))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "WANDB_MODE": "disabled"}
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 137, r.stderr[-2000:]
    left = sorted(p.name for p in reports.glob(".tmp-*"))
    assert len(left) == 1  # what SIGKILL leaves: one stage
    _links_resolve(reports)
    if point == "drawing":  # nothing was committed: the published study is untouched
        assert {k: v for k, v in _hashes(reports).items() if not k.startswith(".tmp-")} == before
    build(study, root)
    assert not list(reports.glob(".tmp-*"))
    _links_resolve(reports)
    assert sorted(p.name for p in (reports / "figures" / "mini").iterdir()) == ["baseline.png", "mha.png"]
    assert "| **baseline** (reference) | 3 | 4.1000 ± " in (reports / "mini.md").read_text()
    index = (reports / "README.md").read_text()
    assert json.loads((reports / "mini.json").read_text())["table_md"] in index  # not stale
    assert pl.read_csv(reports / "mini.csv")["val/bpb mean"].to_list() == pytest.approx([4.1, 3.55])


def test_stale_stage_of_an_older_build_is_removed_by_the_next_build(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setattr(publish, "draw", fake_draw)
    root, study = _fake_root(tmp_path)
    stale = root / "reports" / ".tmp-mini-abc123"  # the name an older build gave its temp folder
    (stale / "figures").mkdir(parents=True)
    (stale / "table.md").write_text("half a table")
    build(study, root)
    assert not stale.exists() and (root / "reports" / "mini.md").is_file()


def test_check_prints_every_moved_cell(tmp_path):
    root, study = _fake_root(tmp_path)
    table = summarize(study, load_runs(study, root))
    moved = table.with_columns(pl.when(pl.col("experiment") == "mha").then(pl.col("val/bpb mean") * 1.01)
                               .otherwise(pl.col("val/bpb mean")).alias("val/bpb mean"))
    lines = compare(moved, table)
    assert len(lines) == 1 and lines[0].startswith("mha / val/bpb mean: 2.55")
    assert compare(table.filter(pl.col("experiment") == "mha"), table) == [
        "row 'baseline' only in the reference table"]


def test_check_tolerates_round_off_in_a_tiny_delta_across_cpus(tmp_path):
    """Issue 18: after a clean `dvc repro smoke` on another CPU, `check` failed on
    `full / val/loss delta` because a relative tolerance was applied to a difference of
    1e-6. A delta may move by twice its mean's tolerance; a real move is still caught."""
    root, study = _fake_root(tmp_path)
    table = summarize(study, load_runs(study, root))
    mean = table.filter(pl.col("experiment") == "mha")["val/bpb mean"].item()

    def with_delta(delta: float) -> pl.DataFrame:
        return table.with_columns(pl.when(pl.col("experiment") == "mha").then(pl.lit(delta))
                                  .otherwise(pl.col("val/bpb delta")).alias("val/bpb delta"))

    assert compare(with_delta(1e-6), with_delta(3e-6)) == []  # round-off on another CPU
    moved = compare(with_delta(0.0), with_delta(3e-3 * mean))  # beyond 2 x 1e-3 x mean
    assert len(moved) == 1 and moved[0].startswith("mha / val/bpb delta")


# --- DVC ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stages() -> dict:
    return dvcyaml.dvc_stages(ROOT)


def test_committed_dvc_yaml_is_generated_from_the_studies(stages):
    assert (ROOT / "dvc.yaml").read_text() == dvcyaml.DVC_HEADER + yaml.safe_dump(
        stages, sort_keys=False, width=1000), "dvc.yaml is stale: run python -m v4lab.report dvc-yaml"
    cfg = (ROOT / ".dvc" / "config").read_text()
    assert "analytics = false" in cfg and "check_update = false" in cfg


def test_smoke_data_override_reaches_prepare_and_runs(stages):
    stages = stages["stages"]
    runs = {k: v for k, v in stages["train"]["foreach"].items() if v["study"] == "smoke"}
    (folder,) = {v["data"] for v in runs.values()}
    args = stages["prepare"]["foreach"][Path(folder).name]["args"]
    assert "-v512-" in folder and "data.vocab_size=512" in args


def _copy_repo(dest: Path) -> None:
    """The working tree's files into a new git repository at ``dest``, without dvc.lock.

    The committed dvc.lock (1.4 MB: every run's dependency hashes) changes nothing here,
    since no output is in the copy and every smoke stage runs either way; but DVC parses
    and rewrites it with a pure-Python YAML parser on every command and after every stage,
    about 12 s each time on a 2-core AMD EPYC: most of this test's minutes."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for f in filter(lambda f: f and f != "dvc.lock", files):
        if (ROOT / f).is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dest / f)
    git = ["git", "-c", "user.email=ci@v4lab", "-c", "user.name=ci"]
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "copy"]):
        subprocess.run(git + cmd, cwd=dest, check=True)


def _repro(repo: Path, target: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(repo / "src"), "WANDB_MODE": "disabled"}
    r = subprocess.run([sys.executable, "-m", "dvc", "repro", target], cwd=repo, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def _written(repo: Path) -> dict[Path, tuple[int, bytes]]:
    """Every file under outputs/ and reports/ with its modification time and bytes."""
    files = [p for d in ("outputs", "reports") for p in (repo / d).rglob("*") if p.is_file()]
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in files}


@pytest.mark.process
def test_dvc_repro_smoke_end_to_end(tmp_path):
    """Acceptance: the smoke chain in a fresh copy; a second repro does nothing; editing one
    experiment file re-runs only its run and the report."""
    repo = tmp_path / "repo"
    _copy_repo(repo)
    out = _repro(repo, "smoke")
    ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
    assert ran == {"prepare@stdlib-v512-2aa8624c5b", "train@smoke-baseline-s0", "train@smoke-mha-s0",
                   "train@smoke-full-s0", "smoke"}, out
    for f in ("smoke.md", "smoke.csv", "README.md", "figures/smoke/learning_curves.png"):
        assert (repo / "reports" / f).is_file(), f
    assert not any("components" in p.name for p in (repo / "outputs").iterdir())
    curve = (repo / "outputs/smoke/full-s0/curves.csv").read_text()
    assert curve.startswith("step,train/loss,train/answer_loss,val/loss,val/bpb")

    # A second repro does nothing: no stage runs and no file is rewritten (a check that
    # holds on any machine, unlike a bound on its seconds, which failed on a slower CPU)
    before = _written(repo)
    out = _repro(repo, "smoke")
    assert "Running stage" not in out and "up to date" in out, out
    assert _written(repo) == before

    exp = repo / "conf" / "experiment" / "mha.yaml"
    exp.write_text(exp.read_text() + "\n# edited\n")
    out = _repro(repo, "smoke")
    ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
    assert ran == {"train@smoke-mha-s0", "smoke"}, out


@pytest.mark.parametrize(("change", "message"), [
    ({"experiments": ["baseline", "nope"]}, r"bad.yaml: experiments contains 'nope', which does not exist"),
    ({"seeds": [0, 0]}, r"bad.yaml: seeds lists \[0\] more than once"),
    ({"overrides": ["hydra.run.dir=elsewhere"]}, r"bad.yaml: overrides contains 'hydra.run.dir=elsewhere'"),
])
def test_dvc_yaml_refuses_a_bad_study(tmp_path, change, message):
    (tmp_path / "run.py").write_text("")
    (tmp_path / "conf").symlink_to(ROOT / "conf")
    (tmp_path / "src" / "v4lab").mkdir(parents=True)
    (tmp_path / "experiments").mkdir()
    (tmp_path / "experiments" / "bad.yaml").write_text(yaml.safe_dump({
        "name": "bad", "experiments": ["baseline"], "seeds": [0], "baseline": "baseline",
        "metrics": ["val/bpb"], **change}))
    with pytest.raises(ConfigError, match=message):
        dvcyaml.dvc_stages(tmp_path)


def test_publish_without_an_atomic_exchange_still_replaces_the_figure_folder(tmp_path, monkeypatch):
    """Where renameat2(RENAME_EXCHANGE) is missing the figure folder is swapped by renames."""
    from v4lab.report import swap

    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setattr(publish, "draw", fake_draw)
    monkeypatch.setattr(swap, "_exchange", lambda a, b: False)
    root, study = _fake_root(tmp_path)
    build(study, root)
    for d in (root / "outputs" / "mini").iterdir():
        m = json.loads((d / "metrics.json").read_text())
        (d / "metrics.json").write_text(json.dumps({k: v for k, v in m.items() if not k.startswith("task/")}))
    build(study, root)
    reports = root / "reports"
    assert sorted(p.name for p in (reports / "figures" / "mini").iterdir()) == ["baseline.png", "mha.png"]
    assert not list(reports.glob(".tmp-*"))
    _links_resolve(reports)
