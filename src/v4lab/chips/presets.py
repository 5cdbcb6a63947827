"""Scale presets: full-size model configs (``conf/model/v3_671b.yaml`` and others) that a
run's architectural switches are priced at."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from v4lab.errors import ConfigError
from v4lab.io import CONF_DIR

SCALE_PRESETS = ("v3_671b", "v4_flash_est")


def model_config_from_dict(d: Any) -> Any:
    """A validated ModelConfig from a (composed) mapping."""
    from omegaconf import OmegaConf

    from v4lab.model import ModelConfig

    if not isinstance(d, dict):
        d = OmegaConf.to_container(d, resolve=True)
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), d))
    return cfg.validate()


def load_model_preset(name: str, conf_dir: Path | str | None = None) -> Any:
    """ModelConfig of ``conf/model/<name>.yaml`` (a scale preset; self-contained YAML)."""
    from omegaconf import OmegaConf

    path = Path(conf_dir or CONF_DIR) / "model" / f"{name}.yaml"
    if not path.is_file():
        avail = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ConfigError(f"scale={name!r} is not allowed: one of {', '.join(avail)}")
    d = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    assert isinstance(d, dict)
    d.pop("defaults", None)
    return model_config_from_dict(d)


def with_switches(preset: Any, run_cfg: Any) -> Any:
    """The preset's sizes with the run's architectural switches (attention kind, VVPA,
    KV-cache format, sparse attention, MoE, Engram on/off and host memory), so one
    experiment's switches are priced at full size."""
    cfg = copy.deepcopy(preset)
    ra, a = run_cfg.attention, cfg.attention
    a.kind, a.vvpa = ra.kind, ra.vvpa
    a.kv_cache = copy.deepcopy(ra.kv_cache)
    a.sparse.enabled = ra.sparse.enabled
    cfg.moe.enabled = run_cfg.moe.enabled
    cfg.engram.enabled = run_cfg.engram.enabled
    cfg.engram.host_memory = run_cfg.engram.host_memory
    return cfg.validate()
