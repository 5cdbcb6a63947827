"""W&B for a published study: the table (wandb.Table) and figures (wandb.Image) logged as a
``report`` job of the study's group, and, online with wandb-workspaces installed, a saved
workspace and report for the group."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict
from pathlib import Path

import polars as pl

from v4lab.io import atomic_write_text
from v4lab.studies.manifests import Study


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
