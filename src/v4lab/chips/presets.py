"""Scale presets: full-size model configs (``conf/model/v3_671b.yaml`` and others) that a
run's architectural switches are priced at."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from v4lab.errors import ConfigError
from v4lab.io import CONF_DIR

SCALE_PRESETS = ("v3_671b", "v4_flash")


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
    """The preset's sizes with the run's architectural switches, so one experiment's
    switches are priced at full size: attention kind, VVPA, KV-cache format, sparse
    attention, MoE, hash routing (on: the preset's hash layers), Engram on/off and host memory, mHC, MTP.

    Attention kind v4 needs V4 sizes, which only a preset of kind v4 has (v4_flash): a V4
    run priced at an MLA preset (v3_671b) keeps the preset's MLA; an MLA / MHA run priced
    at a V4 preset uses that preset's MLA sizes. When both are V4 the run's V4 switches
    (window, sink, overlap, CSA/HCA cycle, cache format) apply to the preset's sizes."""
    cfg = copy.deepcopy(preset)
    ra, a = run_cfg.attention, cfg.attention
    if ra.kind != "v4" or preset.attention.kind == "v4":
        a.kind = ra.kind
    if a.kind != "v4":
        a.compress_ratios = []
    elif ra.kind == "v4":
        for key in ("use_window", "sink", "overlap", "kv_dtype"):
            setattr(a.v4, key, getattr(ra.v4, key))
        a.v4_cycle = list(ra.v4_cycle)
        if a.compress_ratios and not ra.compress_ratios:
            a.compress_ratios = []  # the run's pattern at the preset's depth
    a.vvpa = ra.vvpa
    a.kv_cache = copy.deepcopy(ra.kv_cache)
    a.sparse.enabled = ra.sparse.enabled and a.kind == "mla"
    cfg.moe.enabled = run_cfg.moe.enabled
    if not run_cfg.moe.hash_layers:  # hash routing off; on: the preset's own hash layers
        cfg.moe.hash_layers = 0
    cfg.engram.enabled = run_cfg.engram.enabled
    cfg.engram.host_memory = run_cfg.engram.host_memory
    cfg.hc.enabled, cfg.hc.constrained = run_cfg.hc.enabled, run_cfg.hc.constrained
    cfg.mtp.depth = run_cfg.mtp.depth
    return cfg.validate()
