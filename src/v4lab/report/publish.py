"""Publishing a study: ``reports/S.md``, ``S.csv``, ``S.json`` (provenance) and
``figures/S/*.png``, then the index ``reports/README.md`` of every published study."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from v4lab.io import atomic_write_text, git_rev
from v4lab.report import swap
from v4lab.report.caches import CACHE_PAIRS_METHOD, cache_finding, cache_pairs_markdown, study_cache_pairs
from v4lab.report.dashboards import log_to_wandb
from v4lab.report.figures import draw
from v4lab.report.runs import Runs, load_runs, with_shared_rows
from v4lab.report.table import findings, markdown_table, method_text, summarize
from v4lab.studies.manifests import Study, available_studies

REPORTS = "reports"


def build(study: Study, root: Path, reports: Path | None = None) -> Path:
    """Publish ``study``: reports/S.md, S.csv, S.json and figures/S/*.png, then the index,
    as one change (:mod:`v4lab.report.swap`). Everything is built in a stage folder first:
    a refusal or an error while drawing leaves reports/ untouched; what an earlier killed
    build left is finished or removed first."""
    t0 = time.perf_counter()
    reports = reports or root / REPORTS
    trained = load_runs(study, root)
    runs = with_shared_rows(study, trained, root)  # one entry per row and seed
    table = summarize(study, runs)
    reports.mkdir(parents=True, exist_ok=True)

    def reindex() -> None:
        write_index(root, reports)

    swap.recover(reports, reindex)
    stage = swap.new_stage(reports, study.name)
    try:
        made = draw(study, runs, stage / "figures")
        prov = provenance(study, trained, made, markdown_table(study, table), root)
        prov["findings"], prov["method"] = findings(study, table), method_text(study, table)
        pairs = study_cache_pairs(study, runs)
        if pairs:
            prov["cache_pairs"] = [asdict(c) | {"delta": c.delta, "equivalent": c.equivalent} for c in pairs]
            prov["findings"] += [cache_finding(c) for c in pairs]
            prov["cache_pairs_md"] = cache_pairs_markdown(pairs)
        prov["report_seconds"] = round(time.perf_counter() - t0, 1)
        table.write_csv(stage / f"{study.name}.csv", float_precision=10)
        (stage / f"{study.name}.json").write_text(json.dumps(prov, indent=2) + "\n")
        (stage / f"{study.name}.md").write_text(study_markdown(study, prov))
        swap.commit(stage, reports, study.name, reindex)
    finally:
        swap.cleanup(stage, reports, reindex)
    log_to_wandb(study, table, reports, root)
    return reports / f"{study.name}.md"


def provenance(study: Study, runs: Runs, made: list[tuple[str, str]], table_md: str,
               root: Path) -> dict[str, Any]:
    """What ``S.json`` records: the study, the code and data it was made from, the table."""
    records = [m for _, m in runs.values()]
    return {
        "study": study.name, "description": study.description, "baseline": study.baseline,
        "experiments": study.experiments, "seeds": study.seeds, "metrics": study.metrics,
        **({"sweep": study.sweep} if study.sweep else {}),
        **({"shared_runs": study.shared} if study.shared else {}),
        "overrides": study.overrides, "runs": len(runs),
        "run_git_revs": sorted({str(m.get("git_rev", "unknown")) for m in records}),
        "report_git_rev": git_rev(root),
        "corpus_sha256": sorted({str(m.get("corpus_sha256", "unknown")) for m in records}),
        "data_manifests": sorted({str(p.relative_to(root)) for p in _data_manifests(runs, root)}),
        "train_seconds_total": round(sum(float(m.get("time/train_s", 0.0)) for m in records), 1),
        "figures": [{"file": f"figures/{study.name}/{n}", "caption": c} for n, c in made],
        "table_md": table_md,
    }


def _data_manifests(runs: Runs, root: Path) -> list[Path]:
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
    """reports/S.md: the description, the findings generated from the table (significant
    effects, equivalences shown, nulls with their MDE), the method, the table, the figures
    and how it was made."""
    lines = [f"# Study `{study.name}`", "", study.description or "", ""]
    if prov.get("findings"):
        lines += ["## Findings", "", *[f"- {f}" for f in prov["findings"]], ""]
    lines += [prov["method"], "", prov["table_md"], ""]
    if prov.get("cache_pairs_md"):
        lines += ["## Caches on the same weights (paired)", "", CACHE_PAIRS_METHOD, "",
                  prov["cache_pairs_md"], ""]
    for f in prov["figures"]:
        lines += [f"![{f['caption']}]({f['file']})", "", f"*{f['caption']}.*", ""]
    lines += ["## How it was made", "", *_provenance_lines(prov), ""]
    return "\n".join(lines)


def _provenance_lines(prov: dict[str, Any]) -> list[str]:
    return [
        f"- runs: {prov['runs']} ({len(prov['experiments'])} experiments"
        + "".join(f" x {k} {vs}" for k, vs in prov.get("sweep", {}).items())
        + f" x seeds {prov['seeds']}"
        + "".join(f"; one {k} per class trained, the others' rows show its runs: {classes}"
                  for k, classes in prov.get("shared_runs", {}).items())
        + "), "
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
