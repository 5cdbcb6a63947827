"""Studies -> published tables and figures in ``reports/`` (polars + seaborn), and the DVC
pipeline that produces them.

For a study ``S`` (``experiments/S.yaml``, see :mod:`v4lab.studies`)::

    python -m v4lab.report build S        # reports/S.md, S.csv, S.json, figures/S/*.png, README.md
    python -m v4lab.report check S        # rebuilt reports/S.csv vs the committed one (git HEAD)
    python -m v4lab.report index          # reports/README.md from every published study
    python -m v4lab.report dvc-yaml       # (re)write dvc.yaml from experiments/*.yaml
    python -m v4lab.report dvc-yaml --check   # exit 1 if the committed dvc.yaml is stale

Each table row is one experiment: per metric the mean over seeds +- the half-width of a
95% Student-t confidence interval, the difference to the baseline row and the p-value of
Welch's t-test (significant: p < 0.05). A study with a missing run, a corrupt
``metrics.json`` or a metric column no run produces is refused before anything is
written; outputs are built in a temporary folder and moved into place at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import polars as pl

from v4lab import metrics as registry
from v4lab.errors import ConfigError
from v4lab.io import atomic_write_text, git_rev
from v4lab.studies import RUN_BASES, Study, available_studies, find_root, load_study

ALPHA = 0.05  # two-sided: 95% confidence intervals, "significant" means p < ALPHA
REPORTS = "reports"


class ReportError(ConfigError):
    """A study cannot be published as asked; the message names the file and the fix."""


# --- statistics -------------------------------------------------------------------------


def mean_ci(values: list[float], alpha: float = ALPHA) -> tuple[float, float]:
    """(mean, half-width of the two-sided 1-alpha Student-t interval); nan width for n < 2."""
    from scipy import stats

    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan
    if _constant(values):  # a deterministic figure; round-off is not an interval
        return mean, 0.0
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, float(stats.t.ppf(1 - alpha / 2, n - 1)) * sd / math.sqrt(n)


def welch_p(a: list[float], b: list[float]) -> float:
    """Two-sided p-value of Welch's t-test of mean(a) = mean(b); nan if either n < 2.

    Two groups without variance (deterministic figures such as parameter counts; spread
    below 1e-9 of the values counts as round-off) are either equal (p = 1) or differ
    exactly (p = 0).
    """
    from scipy import stats

    if len(a) < 2 or len(b) < 2:
        return math.nan
    if _constant(a) and _constant(b):
        return 1.0 if math.isclose(sum(a) / len(a), sum(b) / len(b), rel_tol=1e-9) else 0.0
    return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def _constant(values: list[float]) -> bool:
    """No spread beyond round-off (relative 1e-9)."""
    return max(values) - min(values) <= 1e-9 * max(abs(v) for v in values)


# --- collecting runs ----------------------------------------------------------------------


def run_dir(study: Study, run_name: str, root: Path) -> Path | None:
    """The folder holding the run's metrics.json (a sweep's first, as studies.collect)."""
    for base in RUN_BASES:
        folder = root / base / study.name / run_name
        if (folder / "metrics.json").is_file():
            return folder
    return None


def load_runs(study: Study, root: Path) -> dict[str, tuple[Path, dict[str, Any]]]:
    """{run name: (run folder, metrics)} for every run of ``study``; refuses missing,
    corrupt or misplaced runs with one message that names every file."""
    found: dict[str, tuple[Path, dict[str, Any]]] = {}
    missing, bad = [], []
    for run in study.runs():
        folder = run_dir(study, run.name, root)
        if folder is None:
            missing.append(f"{run.name} (no {study.name}/{run.name}/metrics.json under "
                           f"{' or '.join(RUN_BASES)}/)")
            continue
        path = folder / "metrics.json"
        try:
            metrics = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            bad.append(f"{path}: corrupt metrics.json ({e}); delete it and rerun the run")
            continue
        if not isinstance(metrics, dict):
            bad.append(f"{path}: corrupt metrics.json (not a JSON object)")
            continue
        if metrics.get("experiment") != run.experiment or metrics.get("seed") != run.seed:
            bad.append(f"{path}: holds experiment={metrics.get('experiment')!r} "
                       f"seed={metrics.get('seed')!r}, expected {run.experiment!r} seed {run.seed}")
            continue
        found[run.name] = (folder, metrics)
    if missing or bad:
        lines = [f"study {study.name!r}: refusing to publish a partial table"]
        if missing:
            lines.append(f"{len(missing)} of {len(study.runs())} runs missing or failed: "
                         + "; ".join(missing) + f" (run them: dvc repro {study.name}, or "
                         f"python -m v4lab.studies run {study.name})")
        lines += bad
        raise ReportError("\n  ".join(lines))
    return found


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_metrics(study: Study, runs: dict[str, tuple[Path, dict[str, Any]]]) -> None:
    """Every metric column is produced by every run (numbers, or one string per experiment)."""
    for metric in study.metrics:
        lacking = [str(folder / "metrics.json") for folder, m in runs.values() if metric not in m]
        if len(lacking) == len(runs):
            sample = next(iter(runs.values()))[1]
            raise ReportError(f"experiments/{study.name}.yaml: metrics contains {metric!r}, which no "
                              f"run produces; available: {', '.join(sorted(sample))}")
        if lacking:
            raise ReportError(f"experiments/{study.name}.yaml: metric {metric!r} is missing from "
                              f"{', '.join(lacking)}")
        for folder, m in runs.values():
            v = m[metric]
            if not (_is_number(v) or isinstance(v, str)):
                raise ReportError(f"{folder / 'metrics.json'}: {metric}={v!r} is neither a number "
                                  "nor a string")
            if _is_number(v) and not math.isfinite(v) and not metric.startswith("speed/"):
                raise ReportError(f"{folder / 'metrics.json'}: {metric}={v!r} is not finite (a "
                                  "failed run?); rerun it")


# --- the table ------------------------------------------------------------------------------


def summarize(study: Study, runs: dict[str, tuple[Path, dict[str, Any]]]) -> pl.DataFrame:
    """One row per experiment (manifest order): n, and per metric ``<m> mean``, ``<m> ci95``,
    ``<m> delta``, ``<m> p``, ``<m> significant``, ``<m> exact`` (no spread in this row nor
    the baseline's: a deterministic figure, compared without a test; string metrics:
    ``<m>`` only)."""
    check_metrics(study, runs)
    by_exp = {e: [runs[f"{e}-s{s}"][1] for s in study.seeds] for e in study.experiments}
    base = by_exp[study.baseline]
    rows = []
    for e, ms in by_exp.items():
        row: dict[str, Any] = {"experiment": e, "n": len(ms)}
        for metric in study.metrics:
            values = [m[metric] for m in ms]
            if not all(_is_number(v) for v in values):
                distinct = sorted({str(v) for v in values})
                row[metric] = " / ".join(distinct)
                continue
            values = [float(v) for v in values]
            ref = [float(m[metric]) for m in base]
            mean, ci = mean_ci(values)
            row[f"{metric} mean"], row[f"{metric} ci95"] = mean, ci
            if e == study.baseline:
                row[f"{metric} delta"], row[f"{metric} p"] = 0.0, math.nan
            else:
                row[f"{metric} delta"] = mean - sum(ref) / len(ref)
                row[f"{metric} p"] = welch_p(values, ref)
            p = row[f"{metric} p"]
            row[f"{metric} significant"] = bool(p < ALPHA) if not math.isnan(p) else None
            row[f"{metric} exact"] = len(values) > 1 and _constant(values) and _constant(ref)
        rows.append(row)
    return pl.DataFrame(rows, infer_schema_length=None)


def fmt(v: float) -> str:
    """Four decimals (scientific below 1e-3), thousands separators for counts."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if abs(v) >= 1e4 or (abs(v) >= 100 and float(v).is_integer()):
        return f"{v:,.0f}"
    if abs(v) >= 1e-3 or v == 0:
        return f"{v:.4f}"
    return f"{v:.3e}"


def markdown_table(study: Study, table: pl.DataFrame) -> str:
    """The published table: ``mean ± CI`` and ``Δ vs baseline (p)`` per metric."""
    header = ["experiment", "n"]
    for metric in study.metrics:
        header += [metric] if metric in table.columns else [metric, f"Δ {metric}"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for row in table.iter_rows(named=True):
        name = row["experiment"]
        name = f"**{name}** (baseline)" if name == study.baseline else name
        cells = [name, str(row["n"])]
        for metric in study.metrics:
            if metric in table.columns:
                cells.append(str(row[metric]))
                continue
            ci = row[f"{metric} ci95"]
            cells.append(fmt(row[f"{metric} mean"]) + f" ± {fmt(ci)}")
            if row["experiment"] == study.baseline:
                cells.append("—")
            else:
                p, sig = row[f"{metric} p"], row[f"{metric} significant"]
                sign = "+" if row[f"{metric} delta"] > 0 else ""
                if row[f"{metric} exact"]:  # deterministic figure: no test to make
                    cells.append(f"{sign}{fmt(row[f'{metric} delta'])} (exact)" if p == 0 else "0 (exact)")
                    continue
                p_text = "n/a" if math.isnan(p) else f"{p:.3g}"
                cells.append(f"{sign}{fmt(row[f'{metric} delta'])} (p={p_text})" + (" *" if sig else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --- figures ----------------------------------------------------------------------------------


def _curves(study: Study, runs: dict[str, tuple[Path, dict[str, Any]]]) -> pl.DataFrame | None:
    frames = []
    for folder, m in runs.values():
        path = folder / "curves.csv"
        if path.is_file():
            try:
                df = pl.read_csv(path, infer_schema_length=None)
            except Exception as e:
                raise ReportError(f"{path}: corrupt curves.csv ({e}); rerun the run") from e
            frames.append(df.with_columns(pl.lit(m["experiment"]).alias("experiment"),
                                          pl.lit(int(m["seed"])).alias("seed")))
    if not frames:
        return None
    return pl.concat(frames, how="diagonal_relaxed")


def figures(study: Study, runs: dict[str, tuple[Path, dict[str, Any]]], out: Path) -> list[tuple[str, str]]:
    """Write the study's PNG figures into ``out``; returns [(file name, caption)]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns
    from matplotlib.ticker import EngFormatter, MaxNLocator

    sns.set_theme(style="whitegrid", context="paper")
    order = study.experiments
    palette = dict(zip(order, sns.color_palette("tab10" if len(order) <= 10 else "husl", len(order))))
    made: list[tuple[str, str]] = []

    def save(fig, name: str, caption: str) -> None:
        fig.savefig(out / name, dpi=130, bbox_inches="tight")
        plt.close(fig)
        made.append((name, caption))

    curves = _curves(study, runs)
    if curves is not None:
        cols = [c for c in ("train/loss", "train/answer_loss", "val/bpb")
                if c in curves.columns and curves[c].is_not_null().any()]
        fig, axes = plt.subplots(1, len(cols), figsize=(5.2 * len(cols), 3.8), squeeze=False)
        for ax, col in zip(axes[0], cols):
            d = curves.filter(pl.col(col).is_not_null()).select("step", col, "experiment", "seed")
            d = d.to_dict(as_series=False)
            sns.lineplot(d, x="step", y=col, hue="experiment", hue_order=order, palette=palette,
                         errorbar=("ci", 95) if len(study.seeds) > 1 else None, seed=0, marker="o",
                         markersize=3, ax=ax, legend=ax is axes[0][-1])
            ax.set(xlabel="training step", ylabel=registry.label(col), title=col)
            if col == "train/answer_loss":  # a uniform guess over the 10 digits
                ax.axhline(math.log(10), color="grey", ls="--", lw=1, label="chance (ln 10)")
        leg = axes[0][-1].get_legend()
        if leg is not None:
            sns.move_legend(axes[0][-1], "upper left", bbox_to_anchor=(1.02, 1), title="experiment")
        fig.suptitle(f"{study.name}: learning curves (mean over {len(study.seeds)} seed(s)"
                     + (", 95% CI band)" if len(study.seeds) > 1 else ")"))
        save(fig, "learning_curves.png", "Learning curves: training loss"
             + (", loss on task answer tokens (dashed: chance, ln 10 per digit)"
                if "train/answer_loss" in cols else "")
             + " and validation bits per byte against the training step, one line per experiment")

    records = [m for _, m in runs.values()]
    quality = next((q for q in ("val/bpb", "test/bpb") if all(q in m for m in records)), None)
    costs = [c for c in ("cost/params_active", "cost/kv_bytes_per_token", "cost/train_flops_per_token")
             if all(_is_number(m.get(c)) for m in records)]
    if quality and costs:
        d = pl.DataFrame([{"experiment": m["experiment"], "seed": m["seed"], quality: m[quality],
                           **{c: float(m[c]) for c in costs}} for m in records])
        agg = d.group_by("experiment", maintain_order=True).agg(
            pl.col(quality).mean().alias("q"), pl.col(quality).std().alias("sd"), pl.len().alias("n"),
            *[pl.col(c).mean() for c in costs])
        fig, axes = plt.subplots(1, len(costs), figsize=(4.6 * len(costs), 3.8), squeeze=False)
        for ax, c in zip(axes[0], costs):
            for r in agg.iter_rows(named=True):
                err = mean_ci(d.filter(pl.col("experiment") == r["experiment"])[quality].to_list())[1]
                ax.errorbar(r[c], r["q"], yerr=None if math.isnan(err) else err, fmt="o", capsize=3,
                            color=palette[r["experiment"]], label=r["experiment"])
            lo, hi = agg[c].min(), agg[c].max()
            if lo > 0 and hi / lo > 20:
                ax.set_xscale("log")
            ax.xaxis.set_major_formatter(EngFormatter(sep=""))
            ax.xaxis.set_major_locator(MaxNLocator(5))
            ax.set(xlabel=registry.label(c), ylabel=registry.label(quality),
                   title=f"{quality} vs {c.split('/', 1)[1]}")
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, title="experiment", loc="upper left", bbox_to_anchor=(1.0, 0.95))
        fig.suptitle(f"{study.name}: cost vs quality (lower is better on both axes; bars: 95% CI)")
        fig.tight_layout()
        save(fig, "cost_vs_quality.png", f"Cost vs quality: {quality} against each cost figure, "
             "one point per experiment (mean over seeds, 95% CI)")

    tasks = sorted({k for m in records for k in m
                    if k.startswith("task/") and k.endswith("/acc") and "@" in k})
    if tasks:
        rows = []
        for m in records:
            for k in tasks:
                if _is_number(m.get(k)):
                    task, ctx = k[len("task/"):-len("/acc")].rsplit("@", 1)
                    rows.append({"experiment": m["experiment"], "seed": m["seed"], "task": task,
                                 "context": int(ctx), "accuracy": float(m[k])})
        pl.DataFrame(rows).write_csv(out / "context_length.csv")  # also a DVC plot (dvc.yaml)
        d = pl.DataFrame(rows).to_dict(as_series=False)
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        sns.lineplot(d, x="context", y="accuracy", hue="experiment", hue_order=order, palette=palette,
                     style="task", marker="o", errorbar=("ci", 95) if len(study.seeds) > 1 else None,
                     seed=0, ax=ax)
        ax.set_xscale("log", base=2)
        ax.set(xlabel="context length (tokens)", ylabel="task accuracy (fraction correct)",
               ylim=(-0.02, 1.02), title=f"{study.name}: accuracy vs context length")
        sns.move_legend(ax, "upper left", bbox_to_anchor=(1.02, 1))
        save(fig, "accuracy_vs_context.png", "Long-context task accuracy against context length")

    proj = [k for k in ("chip/v3_671b/proj_train_tokens_per_s", "chip/v3_671b/proj_decode_tokens_per_s@32768",
                        "chip/v3_671b/proj_decode_tokens_per_s@131072")
            if all(_is_number(m.get(k)) for m in records)]
    if proj and len({m.get("chip/name") for m in records}) > 1:
        rows = [{"chip": f"{m.get('chip/name')} ({m['experiment']})", "figure": k.split("proj_", 1)[1],
                 "tokens/s per device": float(m[k])}
                for m in records if m["seed"] == study.seeds[0] for k in proj]
        d = pl.DataFrame(rows).to_dict(as_series=False)
        fig, ax = plt.subplots(figsize=(7.5, 0.5 * len(study.experiments) + 2.2))
        sns.barplot(d, y="chip", x="tokens/s per device", hue="figure", ax=ax, orient="h")
        ax.set_xscale("log")
        ax.set(ylabel="", xlabel="projected throughput at V3-671B size (tokens/s per device, log scale)",
               title=f"{study.name}: roofline projections (analytic; see chip/marked_figures)")
        sns.move_legend(ax, "upper left", bbox_to_anchor=(1.02, 1), title="projection")
        save(fig, "chip_projections.png", "Projected V3-671B training and decode throughput per device "
             "for each chip profile (roofline model, src/v4lab/chips.py)")
    return made


# --- building and publishing -----------------------------------------------------------------


def build(study: Study, root: Path, reports: Path | None = None) -> Path:
    """Publish ``study``: reports/S.md, S.csv, S.json and figures/S/*.png, then the index.
    Everything is built in a temporary folder first: an error leaves reports/ untouched."""
    t0 = time.perf_counter()
    reports = reports or root / REPORTS
    runs = load_runs(study, root)
    table = summarize(study, runs)
    reports.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{study.name}-", dir=reports))
    try:
        fig_dir = tmp / "figures"
        fig_dir.mkdir()
        made = figures(study, runs, fig_dir)
        table_md = markdown_table(study, table)
        records = [m for _, m in runs.values()]
        prov = {
            "study": study.name, "description": study.description, "baseline": study.baseline,
            "experiments": study.experiments, "seeds": study.seeds, "metrics": study.metrics,
            "overrides": study.overrides, "runs": len(runs),
            "run_git_revs": sorted({str(m.get("git_rev", "unknown")) for m in records}),
            "report_git_rev": git_rev(root),
            "corpus_sha256": sorted({str(m.get("corpus_sha256", "unknown")) for m in records}),
            "data_manifests": sorted({str(p.relative_to(root)) for p in _data_manifests(runs, root)}),
            "train_seconds_total": round(sum(float(m.get("time/train_s", 0.0)) for m in records), 1),
            "figures": [{"file": f"figures/{study.name}/{n}", "caption": c} for n, c in made],
            "table_md": table_md,
        }
        prov["report_seconds"] = round(time.perf_counter() - t0, 1)
        table.write_csv(tmp / "table.csv", float_precision=10)
        (tmp / "table.md").write_text(study_markdown(study, prov))
        (tmp / "prov.json").write_text(json.dumps(prov, indent=2) + "\n")
        final_figs = reports / "figures" / study.name
        final_figs.parent.mkdir(parents=True, exist_ok=True)
        if final_figs.exists():
            shutil.rmtree(final_figs)
        os.replace(fig_dir, final_figs)
        os.replace(tmp / "table.csv", reports / f"{study.name}.csv")
        os.replace(tmp / "table.md", reports / f"{study.name}.md")
        os.replace(tmp / "prov.json", reports / f"{study.name}.json")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    write_index(root, reports)
    log_to_wandb(study, table, reports, root)
    return reports / f"{study.name}.md"


def _data_manifests(runs: dict[str, tuple[Path, dict[str, Any]]], root: Path) -> list[Path]:
    """The prepared corpora the runs trained on (from each run's config.yaml)."""
    import yaml

    from v4lab.data.config import DataConfig
    from v4lab.data.prepare import prepared_dir

    out = set()
    for folder, _ in runs.values():
        cfg_path = folder / "config.yaml"
        if cfg_path.is_file():
            data = (yaml.safe_load(cfg_path.read_text()) or {}).get("data") or {}
            fields = DataConfig.__dataclass_fields__
            folder_data = prepared_dir(DataConfig(**{k: v for k, v in data.items() if k in fields}))
            path = folder_data if folder_data.is_absolute() else root / folder_data
            out.add((path / "manifest.json").resolve())
    return [p for p in out if p.is_relative_to(root.resolve())]


def study_markdown(study: Study, prov: dict[str, Any]) -> str:
    lines = [f"# Study `{study.name}`", "", study.description or "", "",
             f"Mean ± 95% CI (Student t) over seeds {study.seeds}; Δ = difference of the mean to the "
             f"baseline `{study.baseline}`, p = Welch's t-test, * = p < {ALPHA}. "
             "n/a: one seed gives no interval or test.", "", prov["table_md"], ""]
    for f in prov["figures"]:
        lines += [f"![{f['caption']}]({f['file']})", "", f"*{f['caption']}.*", ""]
    lines += ["## How it was made", "", *_provenance_lines(prov), ""]
    return "\n".join(lines)


def _provenance_lines(prov: dict[str, Any]) -> list[str]:
    return [
        f"- runs: {prov['runs']} ({len(prov['experiments'])} experiments x seeds {prov['seeds']}), "
        f"overrides: `{' '.join(prov['overrides']) or 'none'}`",
        f"- code: runs at commit(s) {', '.join(f'`{r[:12]}`' for r in prov['run_git_revs'])}; "
        f"report at `{prov['report_git_rev'][:12]}`",
        f"- data: {', '.join(f'`{m}`' for m in prov['data_manifests']) or 'n/a'} "
        f"(corpus sha256 {', '.join(c[:12] for c in prov['corpus_sha256'])})",
        f"- time: {prov['train_seconds_total']:,} s in trainer.fit over all runs, "
        f"report in {prov['report_seconds']} s",
        f"- rebuild: `dvc repro {prov['study']}`; compare: `python -m v4lab.report check {prov['study']}`",
    ]


def write_index(root: Path, reports: Path | None = None) -> Path:
    """reports/README.md: every published study's table and figures, and how each was made."""
    reports = reports or root / REPORTS
    lines = ["# Published tables", "",
             "Generated by `python -m v4lab.report` (the report stages of `dvc.yaml`); do not edit. "
             "Rebuild everything with `dvc repro`, one study with `dvc repro <study>`.", ""]
    pending = []
    for name in available_studies(root):
        path = reports / f"{name}.json"
        if not path.is_file():
            pending.append(name)
            continue
        prov = json.loads(path.read_text())
        lines += [f"## [{name}]({name}.md)", "", prov.get("description", ""), "",
                  f"Table: [{name}.md]({name}.md), [{name}.csv]({name}.csv)", "", prov["table_md"], ""]
        for f in prov["figures"]:
            lines += [f"![{f['caption']}]({f['file']})", ""]
        lines += _provenance_lines(prov) + [""]
    if pending:
        lines += ["## Not yet published", "", *[f"- `{n}`: `dvc repro {n}`" for n in pending], ""]
    path = reports / "README.md"
    atomic_write_text(path, "\n".join(lines))
    return path


# --- W&B ------------------------------------------------------------------------------------


def log_to_wandb(study: Study, table: pl.DataFrame, reports: Path, root: Path) -> None:
    """Log the table (wandb.Table) and figures (wandb.Image) as a ``report`` job of the study's
    group; online with wandb-workspaces installed, also save a workspace for the group."""
    mode = os.environ.get("WANDB_MODE", "offline")
    if mode == "disabled":
        return
    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb

    logs = root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    run = wandb.init(project="v4lab", group=study.name, job_type="report", name=f"report-{study.name}",
                     dir=str(logs), mode=mode if mode in ("online", "offline") else "offline",
                     config={"study": asdict(study)})
    try:
        rows = [[None if isinstance(v, float) and math.isnan(v) else v for v in r] for r in table.rows()]
        run.log({f"{study.name}/table": wandb.Table(columns=table.columns, data=rows)})
        for png in sorted((reports / "figures" / study.name).glob("*.png")):
            run.log({f"{study.name}/{png.stem}": wandb.Image(str(png))})
    finally:
        wandb.finish()
    if mode != "online":
        print(f"W&B offline: look at the runs with `wandb leet {logs / 'wandb'}`, upload them with "
              f"`wandb sync {logs / 'wandb'}/offline-run-*`", flush=True)
        return
    try:
        urls = save_dashboards(study, run.entity, logs / "wandb_dashboards.json")
    except ImportError:
        print("wandb-workspaces is not installed: `pip install -e .[dashboards]` to also save a "
              f"workspace and a report for group {study.name!r}", flush=True)
        return
    print(f"W&B dashboards for {study.name}: {urls['workspace']} {urls['report']}", flush=True)


def dashboard_specs(study: Study, entity: str):
    """The saved workspace and report for a study's W&B group (wandb-workspaces objects,
    built without network access; :func:`save_dashboards` saves them)."""
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws

    curves = ["train/loss", "val/loss", "val/bpb"]
    figures = [f"{study.name}/learning_curves", f"{study.name}/cost_vs_quality"]
    workspace = ws.Workspace(
        entity=entity, project="v4lab", name=f"study {study.name}",
        sections=[ws.Section(name="learning curves", is_open=True,
                             panels=[wr.LinePlot(x="Step", y=[c]) for c in curves]),
                  ws.Section(name="report", is_open=True,
                             panels=[wr.MediaBrowser(media_keys=figures, num_columns=2)])],
        runset_settings=ws.RunsetSettings(filters=[ws.Metric("Group") == study.name]))
    report = wr.Report(
        entity=entity, project="v4lab", title=f"v4lab study: {study.name}",
        description=study.description,
        blocks=[wr.H1(text=f"Study {study.name}"),
                wr.P(text=f"Baseline {study.baseline}; seeds {study.seeds}; "
                          f"table in reports/{study.name}.md"),
                wr.PanelGrid(runsets=[wr.Runset(entity=entity, project="v4lab",
                                                filters=f"Group = '{study.name}'")],
                             panels=[wr.LinePlot(x="Step", y=[c]) for c in curves]
                             + [wr.MediaBrowser(media_keys=figures, num_columns=2)])])
    return workspace, report


def save_dashboards(study: Study, entity: str, state: Path) -> dict[str, str]:
    """Create the study's workspace and report, or update the ones saved before (their URLs
    are kept in ``state``, a JSON file under logs/)."""
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws

    saved = json.loads(state.read_text()) if state.is_file() else {}
    workspace, report = dashboard_specs(study, entity)
    old = saved.get(study.name, {})
    if old.get("workspace"):  # update in place: keep the saved view's identity
        existing = ws.Workspace.from_url(old["workspace"])
        existing.sections, existing.runset_settings = workspace.sections, workspace.runset_settings
        workspace = existing
    if old.get("report"):
        existing_report = wr.Report.from_url(old["report"])
        existing_report.blocks, existing_report.description = report.blocks, report.description
        report = existing_report
    workspace.save()
    report.save()
    saved[study.name] = {"workspace": workspace.url, "report": report.url}
    atomic_write_text(state, json.dumps(saved, indent=2) + "\n")
    return saved[study.name]


# --- check ------------------------------------------------------------------------------------


def _tolerance(column: str) -> float:
    return registry.tolerance(column.rsplit(" ", 1)[0])


def _cell_tolerance(col: str, a: float, b: float, row: dict[str, Any]) -> float:
    """How far a rebuilt cell may move (:func:`v4lab.metrics.cell_tolerance`)."""
    mean = row.get(f"{col.rpartition(' ')[0]} mean")
    return registry.cell_tolerance(col, a, b, float(mean) if _is_number(mean) else None)


def compare(rebuilt: pl.DataFrame, reference: pl.DataFrame) -> list[str]:
    """Every cell of ``rebuilt`` that moved beyond its tolerance from ``reference``."""
    moved = []
    if rebuilt.columns != reference.columns:
        moved.append(f"columns differ: {rebuilt.columns} vs {reference.columns}")
    ref = {r["experiment"]: r for r in reference.iter_rows(named=True)}
    new = {r["experiment"]: r for r in rebuilt.iter_rows(named=True)}
    for e in sorted(set(ref) ^ set(new)):
        moved.append(f"row {e!r} only in the {'reference' if e in ref else 'rebuilt'} table")
    for e in [e for e in new if e in ref]:
        for col in [c for c in rebuilt.columns if c in reference.columns and c != "experiment"]:
            a, b = new[e][col], ref[e][col]
            if _is_number(a) and _is_number(b):
                if math.isnan(a) and math.isnan(b):
                    continue
                tol = _cell_tolerance(col, a, b, new[e])
                if not abs(a - b) <= tol:
                    moved.append(f"{e} / {col}: {b!r} -> {a!r} (tolerance {tol:.3g})")
            elif a != b and not (col.endswith(" significant") and _tolerance(col) >= 0.5):
                moved.append(f"{e} / {col}: {b!r} -> {a!r}")
    return moved


def check(study: Study, root: Path, reference: Path | None = None) -> list[str]:
    """Compare the rebuilt ``reports/S.csv`` with ``reference`` (default: git HEAD's)."""
    path = root / REPORTS / f"{study.name}.csv"
    if not path.is_file():
        raise ReportError(f"{path} does not exist: rebuild it first (dvc repro {study.name})")
    if reference is None:
        rel = f"{REPORTS}/{study.name}.csv"
        r = subprocess.run(["git", "show", f"HEAD:{rel}"], cwd=root, capture_output=True, text=True)
        if r.returncode != 0:
            raise ReportError(f"no committed {rel} in git HEAD to compare with ({r.stderr.strip()})")
        fd, tmp = tempfile.mkstemp(suffix=".csv")
        with os.fdopen(fd, "w") as f:
            f.write(r.stdout)
        try:
            ref = pl.read_csv(tmp, infer_schema_length=None)
        finally:
            os.unlink(tmp)
    else:
        ref = pl.read_csv(reference, infer_schema_length=None)
    return compare(pl.read_csv(path, infer_schema_length=None), ref)


# --- dvc.yaml ---------------------------------------------------------------------------------

DVC_HEADER = ("# Generated by `python -m v4lab.report dvc-yaml` from experiments/*.yaml: do not edit.\n"
              "# prepare@<corpus> -> train@<study>-<experiment>-s<seed> -> <study> (the report).\n"
              "# `dvc repro <study>` runs one study's whole chain; `dvc repro` every study.\n")


def _train_deps(root: Path) -> list[str]:
    """What every run depends on besides its experiment file: conf/ (but conf/experiment/),
    run.py and the package (but report.py and studies.py, which only the report stages read)."""
    conf = sorted(f"conf/{p.name}" for p in (root / "conf").iterdir()
                  if p.name != "experiment" and not p.name.startswith("."))
    src = sorted(f"src/v4lab/{p.name}" for p in (root / "src" / "v4lab").iterdir()
                 if p.name not in ("report.py", "studies.py", "__pycache__") and not p.name.startswith("."))
    return ["run.py", *conf, *src]


def _data_args(data_cfg: Any) -> list[str]:
    """``data.key=value`` arguments for ``python -m v4lab.data.prepare`` giving ``data_cfg``."""
    from v4lab.data.config import DataConfig

    default = asdict(DataConfig())
    return [f"data.{k}={json.dumps(v) if isinstance(v, list) else v}"
            for k, v in asdict(data_cfg).items() if v != default[k]]


def dvc_stages(root: Path) -> dict[str, Any]:
    """The pipeline of every study in experiments/ as a dvc.yaml mapping."""
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(root / "conf"), version_base="1.3"):
        return _dvc_stages(root)


def _dvc_stages(root: Path) -> dict[str, Any]:
    from hydra import compose
    from omegaconf import OmegaConf

    from v4lab.data.config import DataConfig
    from v4lab.data.prepare import prepared_dir

    corpora: dict[str, dict[str, str]] = {}
    runs: dict[str, dict[str, Any]] = {}
    reports: dict[str, Any] = {}
    train_deps = _train_deps(root)
    for name in available_studies(root):
        study = load_study(name, root)
        for o in study.overrides:
            if o.lstrip("+~").startswith(("hydra.run", "hydra.sweep", "logger.dir")):
                raise ReportError(f"experiments/{name}.yaml: overrides contains {o!r}, which is not allowed "
                                  "in a DVC study: runs write outputs/<study>/<experiment>-s<seed>/")
        run_files = []
        for e in study.experiments:
            cfg = compose(config_name="config",
                          overrides=[f"+experiment={e}", f"study={name}", *study.overrides])
            data_cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), cfg.data))
            folder = prepared_dir(data_cfg)
            if folder.is_absolute() or ".." in folder.parts:
                raise ReportError(f"experiments/{name}.yaml: data.root={data_cfg.root!r} is not allowed in a "
                                  "DVC study: a folder inside the repository (default: data)")
            args = _data_args(data_cfg)
            # the prepare command must reach the very folder the runs read
            check_cfg = OmegaConf.to_object(OmegaConf.merge(
                OmegaConf.structured(DataConfig),
                OmegaConf.from_dotlist([a.removeprefix("data.") for a in args])))
            assert prepared_dir(check_cfg) == folder, (args, folder)
            corpora[folder.name] = {"dir": folder.as_posix(), "args": shlex.join(args)}
            for s in study.seeds:
                key = f"{name}-{e}-s{s}"
                if key in runs:
                    raise ReportError(f"experiments/{name}.yaml: run {key} appears twice")
                runs[key] = {"study": name, "experiment": e, "seed": s, "data": folder.as_posix(),
                             "overrides": shlex.join(study.overrides)}
                run_files.append(f"outputs/{name}/{e}-s{s}")
        reports[name] = {
            "cmd": f"python -m v4lab.report build {name}",
            "deps": [f"experiments/{name}.yaml", "src/v4lab/report.py", "src/v4lab/studies.py",
                     *[f"{r}/metrics.json" for r in run_files], *[f"{r}/curves.csv" for r in run_files]],
            "outs": [{p: {"cache": False}} for p in
                     (f"reports/{name}.md", f"reports/{name}.csv", f"reports/{name}.json",
                      f"reports/figures/{name}")],
        }
    stages: dict[str, Any] = {
        "prepare": {"foreach": dict(sorted(corpora.items())), "do": {
            "cmd": "python -m v4lab.data.prepare ${item.args}",
            "deps": ["src/v4lab/data/prepare.py", "src/v4lab/config.py"],
            "outs": ["${item.dir}"]}},
        "train": {"foreach": runs, "do": {
            "cmd": "python run.py +experiment=${item.experiment} seed=${item.seed} study=${item.study} "
                   "${item.overrides}",
            "deps": ["conf/experiment/${item.experiment}.yaml", *train_deps, "${item.data}"],
            "outs": [f"outputs/${{item.study}}/${{item.experiment}}-s${{item.seed}}/{f}"
                     for f in ("config.yaml", "checkpoints")],
            "metrics": ["outputs/${item.study}/${item.experiment}-s${item.seed}/metrics.json"],
            "plots": [{"outputs/${item.study}/${item.experiment}-s${item.seed}/curves.csv": {
                "x": "step", "y": "val/bpb"}}]}},
        **reports,
    }
    plots = []
    for name in available_studies(root):
        files = [f"outputs/{name}/{r.name}/curves.csv" for r in load_study(name, root).runs()]
        plots.append({f"{name}: validation bits per byte": {
            "x": "step", "y": {f: "val/bpb" for f in files}, "x_label": "training step",
            "y_label": registry.label("val/bpb"), "template": "linear"}})
        if any(m.startswith("task/") for m in load_study(name, root).metrics):
            plots.append({f"{name}: accuracy vs context length": {
                "x": "context", "y": {f"reports/figures/{name}/context_length.csv": "accuracy"},
                "x_label": "context length (tokens)", "y_label": "task accuracy", "template": "scatter"}})
    return {"stages": stages, "plots": plots}


def dvc_yaml_text(root: Path) -> str:
    import yaml

    return DVC_HEADER + yaml.safe_dump(dvc_stages(root), sort_keys=False, width=1000)


# --- CLI --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m v4lab.report", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_build = sub.add_parser("build", help="publish a study's table and figures into reports/")
    p_build.add_argument("study")
    p_check = sub.add_parser("check", help="compare reports/S.csv with the committed one")
    p_check.add_argument("study")
    p_check.add_argument("--reference", type=Path, help="a CSV to compare with (default: git HEAD's)")
    sub.add_parser("index", help="rewrite reports/README.md")
    p_dvc = sub.add_parser("dvc-yaml", help="write dvc.yaml from experiments/*.yaml")
    p_dvc.add_argument("--check", action="store_true", help="exit 1 if dvc.yaml is not up to date")
    args = parser.parse_args(argv)
    try:
        root = find_root()
        if args.cmd == "build":
            path = build(load_study(args.study, root), root)
            print(f"published {path.relative_to(root)} (index: reports/README.md)")
        elif args.cmd == "check":
            study = load_study(args.study, root)
            moved = check(study, root, args.reference)
            for line in moved:
                print(line)
            print(f"{study.name}: {len(moved)} cell(s) moved (relative tolerance per metric: "
                  f"src/v4lab/metrics.py; deltas and CI half-widths absolute, p-values "
                  f"{registry.P_TOLERANCE} absolute)")
            return 1 if moved else 0
        elif args.cmd == "index":
            print(write_index(root))
        else:
            text, path = dvc_yaml_text(root), root / "dvc.yaml"
            if args.check:
                if not path.is_file() or path.read_text() != text:
                    print(f"{path} is out of date: run python -m v4lab.report dvc-yaml", file=sys.stderr)
                    return 1
                print(f"{path} is up to date")
            else:
                atomic_write_text(path, text)
                print(f"wrote {path}")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
