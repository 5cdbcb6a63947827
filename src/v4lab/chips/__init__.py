"""Target chips: profiles, this host's timing, the numerics a chip gives a run, and an
analytic roofline cost projection. One job per module:

- :mod:`~v4lab.chips.profile`: the schema of ``conf/chip/<name>.yaml`` (every figure a
  ``{value, source, confidence}``), loading and pure checks;
- :mod:`~v4lab.chips.host`: this machine's matmul peaks and copy bandwidth for the
  ``cpu_host`` profile (timed, cached, re-measured when stale or timed under load);
- :mod:`~v4lab.chips.numerics`: the matmul / KV-cache dtypes a chip gives a run
  (fallbacks, Lightning precision) and :func:`build_numerics`, the step a run takes when
  it is built;
- :mod:`~v4lab.chips.projection`: the roofline projection and a run's ``chip/*`` metrics
  (counts from :mod:`v4lab.accounting`, the one FLOP model);
- :mod:`~v4lab.chips.presets`: full-size model presets (``conf/model/v3_671b.yaml``, ...);
- :mod:`~v4lab.chips.cli`: ``python -m v4lab.chips [hydra overrides]`` prints the table.
"""

from v4lab.chips.host import host_cache_path, host_key, matmul_flops, measure_host
from v4lab.chips.numerics import (
    apply_numerics,
    build_numerics,
    kv_dtype,
    kv_dtype_key,
    resolve_numerics,
    training_precision,
    with_kv_dtype,
)
from v4lab.chips.presets import SCALE_PRESETS, load_model_preset, model_config_from_dict, with_switches
from v4lab.chips.profile import (
    CONFIDENCES,
    ChipConfig,
    Figure,
    ProjectionConfig,
    SupportNote,
    available_chips,
    chip_from_cfg,
    load_chip,
)
from v4lab.chips.projection import RUN_PRESETS, chip_metrics, project, run_chip_metrics

__all__ = [
    "CONFIDENCES", "RUN_PRESETS", "SCALE_PRESETS", "ChipConfig", "Figure", "ProjectionConfig", "SupportNote",
    "apply_numerics", "available_chips", "build_numerics", "chip_from_cfg", "chip_metrics",
    "host_cache_path", "host_key", "kv_dtype", "kv_dtype_key", "load_chip", "load_model_preset",
    "matmul_flops",
    "measure_host", "model_config_from_dict", "project", "resolve_numerics",
    "run_chip_metrics", "training_precision", "with_kv_dtype", "with_switches",
]
