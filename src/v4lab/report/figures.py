"""The study's figures (PNG, seaborn), one function per figure. Each draws from the runs
and returns its ``(file name, caption)``, or None when the runs hold nothing to draw."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from v4lab import metrics as registry
from v4lab.report.runs import ReportError, Runs
from v4lab.stats import is_number, mean_ci
from v4lab.studies.manifests import Study

Made = tuple[str, str] | None  # (file name, caption)


@dataclass
class Canvas:
    """What every figure needs: the study, its runs, the output folder and one colour per
    table row (the same across figures)."""

    study: Study
    runs: Runs
    out: Path
    palette: dict[str, Any] = field(default_factory=dict)

    @property
    def records(self) -> list[dict[str, Any]]:
        """Each run's metrics, ``experiment`` replaced by its table row's label (the
        experiment and its sweep values)."""
        return [{**m, "experiment": row} for row, _, m in labelled(self.study, self.runs)]

    def save(self, fig, name: str, caption: str) -> tuple[str, str]:
        import matplotlib.pyplot as plt

        fig.savefig(self.out / name, dpi=130, bbox_inches="tight")
        plt.close(fig)
        return name, caption


def labelled(study: Study, runs: Runs, trained: bool = False) -> list[tuple[str, Path, dict[str, Any]]]:
    """(row label, folder, metrics) of each run, in the study's order; every row's (a row
    sharing another's runs has them under its own name) or, with ``trained``, only the
    rows that have runs of their own."""
    return [(r.row, *runs[r.name]) for r in (study.runs() if trained else study.row_runs())
            if r.name in runs]


def curves(study: Study, runs: Runs) -> pl.DataFrame | None:
    """Every run's curves.csv with its row label (as ``experiment``) and seed, or None when no
    run has one (rows sharing another's runs: drawn once, under the row that trained them)."""
    frames = []
    for row, folder, m in labelled(study, runs, trained=True):
        path = folder / "curves.csv"
        if path.is_file():
            try:
                df = pl.read_csv(path, infer_schema_length=None)
            except Exception as e:
                raise ReportError(f"{path}: corrupt curves.csv ({e}); rerun the run") from e
            frames.append(df.with_columns(pl.lit(row).alias("experiment"),
                                          pl.lit(int(m["seed"])).alias("seed")))
    if not frames:
        return None
    return pl.concat(frames, how="diagonal_relaxed")


def t_band(values) -> tuple[float, float]:
    """A seaborn ``errorbar``: the 95% Student-t interval of the mean over seeds (not a
    bootstrap, which over 3 seeds is far too narrow)."""
    m = mean_ci(list(values))
    return (m.mean, m.mean) if m.n < 2 else (m.lo, m.hi)


def learning_curves(c: Canvas) -> Made:
    """Training loss, answer loss and val/bpb against the step, one line per experiment."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    data = curves(c.study, c.runs)
    if data is None:
        return None
    study = c.study
    order = [r for r in study.rows() if r in set(data["experiment"].to_list())]
    cols = [col for col in ("train/loss", "train/answer_loss", "val/bpb", "probe/acc")
            if col in data.columns and data[col].is_not_null().any()]
    fig, axes = plt.subplots(1, len(cols), figsize=(5.2 * len(cols), 3.8), squeeze=False)
    for ax, col in zip(axes[0], cols):
        d = data.filter(pl.col(col).is_not_null()).select("step", col, "experiment", "seed")
        d = d.to_dict(as_series=False)
        sns.lineplot(d, x="step", y=col, hue="experiment", hue_order=order, palette=c.palette,
                     errorbar=t_band if len(study.seeds) > 1 else None, seed=0, marker="o",
                     markersize=3, ax=ax, legend=ax is axes[0][-1])
        ax.set(xlabel="training step", ylabel=registry.label(col), title=col)
        if col == "train/answer_loss":  # a uniform guess over the 10 digits
            ax.axhline(math.log(10), color="grey", ls="--", lw=1, label="chance (ln 10)")
        if col == "probe/acc":
            _guess_lines(ax, c.records)
            ax.set(ylabel="held-out accuracy", ylim=(-0.02, 1.02))
    leg = axes[0][-1].get_legend()
    if leg is not None:
        sns.move_legend(axes[0][-1], "upper left", bbox_to_anchor=(1.02, 1), title="experiment")
    fig.suptitle(f"{study.name}: learning curves (mean over {len(study.seeds)} seed(s)"
                 + (", 95% Student-t band)" if len(study.seeds) > 1 else ")"))
    return c.save(fig, "learning_curves.png", "Learning curves: training loss"
                  + (", loss on task answer tokens (dashed: chance, ln 10 per digit)"
                     if "train/answer_loss" in cols else "")
                  + (" and held-out probe accuracy (dashed: chance; dotted: without the lookup)"
                     if "probe/acc" in cols else " and validation bits per byte")
                  + " against the training step, one line per experiment")


def _spread(records: list[dict], k: str) -> float:
    """Relative range (max - min) / max of metric ``k`` over the runs (0 when all equal)."""
    values = [abs(float(m[k])) for m in records]
    return (max(values) - min(values)) / max(values) if max(values) > 0 else 0.0


def cost_vs_quality(c: Canvas) -> Made:
    """val/bpb (or test/bpb) against each cost figure, one point per experiment."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter, MaxNLocator

    records = c.records
    quality = next((q for q in ("val/bpb", "test/bpb") if all(q in m for m in records)), None)
    # An axis on which every experiment sits at (almost) the same cost says nothing: skip it
    # (the experts study holds active parameters fixed; its swept variable is the total).
    costs = [k for k in ("cost/params_total", "cost/params_active", "cost/kv_bytes_per_token",
                         "cost/train_flops_per_token")
             if all(is_number(m.get(k)) for m in records) and _spread(records, k) > 0.02]
    if not (quality and costs):
        return None
    d = pl.DataFrame([{"experiment": m["experiment"], "seed": m["seed"], quality: m[quality],
                       **{k: float(m[k]) for k in costs}} for m in records])
    agg = d.group_by("experiment", maintain_order=True).agg(
        pl.col(quality).mean().alias("q"), pl.col(quality).std().alias("sd"), pl.len().alias("n"),
        *[pl.col(k).mean() for k in costs])
    fig, axes = plt.subplots(1, len(costs), figsize=(4.6 * len(costs), 3.8), squeeze=False)
    for ax, k in zip(axes[0], costs):
        for r in agg.iter_rows(named=True):
            err = mean_ci(d.filter(pl.col("experiment") == r["experiment"])[quality].to_list()).half_width
            ax.errorbar(r[k], r["q"], yerr=None if math.isnan(err) else err, fmt="o", capsize=3,
                        color=c.palette[r["experiment"]], label=r["experiment"])
        lo, hi = agg[k].min(), agg[k].max()
        if lo > 0 and hi / lo > 20:
            ax.set_xscale("log")
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))
        ax.xaxis.set_major_locator(MaxNLocator(5))
        ax.set(xlabel=registry.label(k), ylabel=registry.label(quality),
               title=f"{quality} vs {k.split('/', 1)[1]}")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, title="experiment", loc="upper left", bbox_to_anchor=(1.0, 0.95))
    fig.suptitle(f"{c.study.name}: cost vs quality (lower is better on both axes; bars: 95% CI)")
    fig.tight_layout()
    return c.save(fig, "cost_vs_quality.png", f"Cost vs quality: {quality} against each cost figure, "
                  "one point per experiment (mean over seeds, 95% CI)")


def accuracy_vs_context(c: Canvas) -> Made:
    """Long-context task accuracy against context length; also context_length.csv (a DVC plot)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    records = c.records
    tasks = sorted({k for m in records for k in m
                    if k.startswith("task/") and k.endswith("/acc") and "@" in k})
    if not tasks:
        return None
    rows = []
    for m in records:
        for k in tasks:
            if is_number(m.get(k)):
                task, ctx = k[len("task/"):-len("/acc")].rsplit("@", 1)
                rows.append({"experiment": m["experiment"], "seed": m["seed"], "task": task,
                             "context": int(ctx), "accuracy": float(m[k])})
    pl.DataFrame(rows).write_csv(c.out / "context_length.csv")  # also a DVC plot (dvc.yaml)
    d = pl.DataFrame(rows).to_dict(as_series=False)
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    sns.lineplot(d, x="context", y="accuracy", hue="experiment", hue_order=c.study.rows(),
                 palette=c.palette, style="task", marker="o",
                 errorbar=t_band if len(c.study.seeds) > 1 else None, seed=0, ax=ax)
    beyond = sorted({int(k.rsplit("@", 1)[1].split("/")[0]) for m in records for k, v in m.items()
                     if k.startswith("task/") and k.endswith("/extrapolated") and v == 1})
    if beyond:  # contexts longer than the model was trained on
        ax.axvspan(beyond[0] / 2 ** 0.5, beyond[-1] * 2 ** 0.5, color="grey", alpha=0.12, lw=0,
                   label="extrapolated (beyond the trained length)")
    ax.set_xscale("log", base=2)
    ax.set(xlabel="context length (tokens)", ylabel="task accuracy (fraction correct)",
           ylim=(-0.02, 1.02), title=f"{c.study.name}: accuracy vs context length")
    sns.move_legend(ax, "upper left", bbox_to_anchor=(1.02, 1))
    return c.save(fig, "accuracy_vs_context.png", "Long-context task accuracy against context length"
                  + " (grey: contexts beyond the trained length, extrapolation)" * bool(beyond))


def _guess_lines(ax, records: list[dict[str, Any]]) -> None:
    """A probe's chance (uniform guess) and baseline (no lookup) as horizontal lines."""
    for k, ls, what in (("probe/chance", "--", "chance"), ("probe/baseline", ":", "without the lookup")):
        if records and is_number(records[0].get(k)):
            ax.axhline(float(records[0][k]), color="grey", ls=ls, lw=1, label=what)


def probe_accuracy_vs_context(c: Canvas) -> Made:
    """Probe accuracy at each evaluated length (decode path), one line per experiment;
    lines that coincide stay apart by marker, line style and a small sideways offset."""
    import matplotlib.pyplot as plt

    records = c.records
    keys = sorted({k for m in records for k in m if k.startswith("probe/acc@")},
                  key=lambda k: int(k.rsplit("@", 1)[1]))
    if len(keys) < 2:
        return None
    order, styles = c.study.rows(), ["o-", "s--", "^-.", "D:", "v-", "P--", "X-."]
    fig, ax = plt.subplots(figsize=(6.6, 4.0))
    for i, row in enumerate(order):
        ms = [m for m in records if m["experiment"] == row]
        xs = [int(k.rsplit("@", 1)[1]) * 2 ** (0.04 * (i - (len(order) - 1) / 2)) for k in keys]
        cis = [mean_ci([float(m[k]) for m in ms]) for k in keys]
        yerr = [0 if math.isnan(ci.half_width) else ci.half_width for ci in cis]
        ax.errorbar(xs, [ci.mean for ci in cis], yerr=yerr, fmt=styles[i % len(styles)], capsize=3,
                    color=c.palette[row], label=row, markersize=5)
    trained = int(keys[0].rsplit("@", 1)[1])
    ax.axvline(trained, color="grey", ls="-", lw=0.8, alpha=0.5, label="trained length")
    _guess_lines(ax, records)
    ax.set_xscale("log", base=2)
    ax.set_xticks([int(k.rsplit("@", 1)[1]) for k in keys], [k.rsplit("@", 1)[1] for k in keys])
    ax.set(xlabel="sequence length (tokens, decoded token by token)", ylabel="held-out accuracy",
           ylim=(-0.02, 1.02), title=f"{c.study.name}: probe accuracy vs length")
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.tight_layout()
    return c.save(fig, "probe_accuracy_vs_length.png", "Probe accuracy against sequence length, "
                  "trained at the first length (mean over seeds, 95% Student-t bars; points "
                  "offset sideways so that coinciding lines stay visible)")


def chip_projections(c: Canvas) -> Made:
    """Projected V3-671B throughput per chip profile (when the study compares chips)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    records, study = c.records, c.study
    proj = [k for k in ("chip/v3_671b/proj_train_tokens_per_s", "chip/v3_671b/proj_decode_tokens_per_s@32768",
                        "chip/v3_671b/proj_decode_tokens_per_s@131072")
            if all(is_number(m.get(k)) for m in records)]
    if not proj or len({m.get("chip/name") for m in records}) < 2:
        return None

    def label(m: dict[str, Any]) -> str:  # a chip-swept row already names its chip
        chip, row = str(m.get("chip/name")), m["experiment"]
        return row if chip in row else f"{chip} ({row})"

    rows = [{"chip": label(m), "figure": k.split("proj_", 1)[1],
             "tokens/s per device": float(m[k])}
            for m in records if m["seed"] == study.seeds[0] for k in proj]
    d = pl.DataFrame(rows).to_dict(as_series=False)
    fig, ax = plt.subplots(figsize=(7.5, 0.5 * len(study.rows()) + 2.2))
    # dots, not bars: a bar's length means nothing on a log axis
    sns.stripplot(d, y="chip", x="tokens/s per device", hue="figure", ax=ax, orient="h", size=7,
                  jitter=False, dodge=True)
    ax.set_xscale("log")
    ax.set(ylabel="", xlabel="projected throughput at V3-671B size (tokens/s per device, log scale)",
           title=f"{study.name}: roofline projections (analytic; see chip/marked_figures)")
    sns.move_legend(ax, "upper left", bbox_to_anchor=(1.02, 1), title="projection")
    return c.save(fig, "chip_projections.png", "Projected V3-671B training and decode throughput per "
                  "device for each chip profile (roofline model, src/v4lab/chips.py)")


NOT_QUALITY = ("cost/", "speed/", "final/", "time/", "host/", "chip/")  # not what a row achieves


def quality_vs_axis(c: Canvas) -> Made:
    """Quality against the study's ``axis`` (the swept quantity its rows are points of), one
    panel per quality metric of the manifest (at most 2): the mean over seeds with its 95%
    Student-t interval, each seed a faint dot, the reference row marked."""
    import matplotlib.pyplot as plt

    axis, records = c.study.axis, c.records
    if axis is None:
        return None
    by_row = {row: [m for m in records if m["experiment"] == row]
              for row in (*axis.values, c.study.baseline)}
    wanted = [k for k in c.study.metrics if not k.startswith(NOT_QUALITY)]
    # a metric with the same value in every run (e.g. steps_to_90 censored at the budget
    # when no row reaches 90%) would be a flat panel that says nothing: left out
    metrics = [k for k in wanted if _varies([m.get(k) for row in axis.values for m in by_row[row]])][:2]
    if not metrics:
        return None
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 3.8), squeeze=False,
                             sharex=True)  # the same axis values in every panel, skipped rows too
    for ax, k in zip(axes[0], metrics):
        _axis_panel(c, ax, k, by_row)
    legend: dict[str, Any] = {}  # every panel's entries once (a row may lack one metric)
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    fig.legend(list(legend.values()), list(legend), loc="upper left", bbox_to_anchor=(1.0, 0.95))
    fig.suptitle(f"{c.study.name}: {' and '.join(metrics)} vs {axis.label}")
    fig.tight_layout()
    n = len(c.study.seeds)
    return c.save(fig, "quality_vs_axis.png", f"{' and '.join(metrics)} against {axis.label}"
                  + " (log scale)" * axis.log + f": the mean over {n} seed(s) with error bars of "
                  "the 95% Student-t interval of the mean, each seed a faint dot; the reference row "
                  f"({c.study.baseline}) "
                  + ("is ringed" if c.study.baseline in axis.values else
                     "has no axis value: its mean is the dashed line, its interval the grey band")
                  + ". A row without a metric is left out of that panel; a metric equal in every run "
                  "has no panel.")


def _varies(values: list[Any]) -> bool:
    """Whether the numeric ``values`` hold at least two different numbers."""
    return len({float(v) for v in values if is_number(v)}) > 1


def _axis_panel(c: Canvas, ax, k: str, by_row: dict[str, list[dict[str, Any]]]) -> None:
    """One metric's curve over the axis: means joined in axis order, t-interval bars, seeds."""
    axis = c.study.axis
    values = {row: [float(m[k]) for m in ms if is_number(m.get(k))] for row, ms in by_row.items()}
    ref = c.study.baseline
    if ref not in axis.values and values[ref]:  # off the axis: a horizontal reference band
        ax.axhspan(*t_band(values[ref]), color="grey", alpha=0.2, lw=0)
        ax.axhline(mean_ci(values[ref]).mean, color="grey", ls="--", lw=1, label=f"reference ({ref})")
    # a row without the metric is skipped
    points = sorted((x, row, values[row]) for row, x in axis.values.items() if values[row])
    means = [mean_ci(v).mean for _, _, v in points]
    ax.plot([x for x, _, _ in points], means, color="grey", lw=1, zorder=1)
    for (x, row, v), mean in zip(points, means):
        lo, hi = t_band(v)
        ax.scatter([x] * len(v), v, color=c.palette[row], alpha=0.35, s=16, lw=0, zorder=2)
        ax.errorbar(x, mean, yerr=[[mean - lo], [hi - mean]], fmt="o", capsize=3,
                    color=c.palette[row], label=row, zorder=3)
        if row == c.study.baseline:
            ax.scatter(x, mean, s=160, facecolors="none", edgecolors="black", lw=1.2, zorder=4,
                       label=f"reference ({row})")
    if axis.log:
        ax.set_xscale("log")
    ax.set_xticks(sorted(axis.values.values()), [f"{x:g}" for x in sorted(axis.values.values())])
    ax.minorticks_off()
    ax.set(xlabel=axis.label, ylabel=registry.label(k), title=k)


FIGURES = (learning_curves, cost_vs_quality, quality_vs_axis, accuracy_vs_context,
           probe_accuracy_vs_context, chip_projections)


def draw(study: Study, runs: Runs, out: Path) -> list[tuple[str, str]]:
    """Write the study's PNG figures into ``out``; returns [(file name, caption)]."""
    import matplotlib

    matplotlib.use("Agg")
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="paper")
    order = study.rows()
    palette = dict(zip(order, sns.color_palette("tab10" if len(order) <= 10 else "husl", len(order))))
    canvas = Canvas(study, runs, out, palette)
    return [made for figure in FIGURES if (made := figure(canvas)) is not None]
