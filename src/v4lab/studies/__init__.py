"""Studies: named sets of experiments x sweep values x seeds that become one published table.

A study is a manifest, ``experiments/<name>.yaml`` (:mod:`.manifests`). The same
manifest drives every engine: DVC expands it into one stage per run (:mod:`.dvcyaml`
writes ``dvc.yaml``), and :mod:`.launch` turns it into one Hydra multirun (``run.py -m``),
which Hydra's launchers run sequentially, in parallel on this machine
(``hydra/launcher=local``) or as a SLURM job array (``hydra/launcher=slurm``)::

    python -m v4lab.studies list
    python -m v4lab.studies run components --launcher slurm hydra.launcher.partition=gpu
    python -m v4lab.studies run smoke --dry-run          # print the command only
    python -m v4lab.studies status components            # which runs have metrics.json

Every run of study ``S`` lands in ``<base>/S/<run>/`` (``<run>``: ``<experiment>-s<seed>``,
or with a sweep ``<experiment>-<axis>_<value>-s<seed>``, e.g. ``full-chip_ascend_910c-s0``)
with ``<base>`` ``multirun`` (a sweep) or ``outputs`` (one run at a time, e.g. a DVC stage); the one run
finder, :mod:`.finder`, finds the runs whichever engine produced them, for the report
(:mod:`v4lab.report`) and for ``status``.
"""

from v4lab.studies.finder import RUN_BASES, RunError, Scan, collect, read_metrics, run_dir, scan
from v4lab.studies.launch import LAUNCHERS, multirun_command
from v4lab.studies.manifests import (
                                     Run,
                                     Study,
                                     available_experiments,
                                     available_studies,
                                     find_root,
                                     load_study,
)

__all__ = ["LAUNCHERS", "RUN_BASES", "Run", "RunError", "Scan", "Study", "available_experiments",
           "available_studies", "collect", "find_root", "load_study", "multirun_command",
           "read_metrics", "run_dir", "scan"]
