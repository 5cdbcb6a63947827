"""``python -m v4lab.chips [--scales v3_671b,v4_flash] [hydra overrides...]``: a chip
profile's figures and the roofline projection table of the composed run's model (and the
scale presets with its switches)."""

from __future__ import annotations

import math
import sys
from typing import Any

from v4lab.chips.numerics import apply_numerics, kv_dtype
from v4lab.chips.presets import SCALE_PRESETS, load_model_preset, model_config_from_dict, with_switches
from v4lab.chips.profile import ChipConfig, available_chips, chip_from_cfg
from v4lab.chips.projection import project
from v4lab.errors import ConfigError
from v4lab.io import compose


def _fmt(v: Any) -> str:
    if isinstance(v, str):
        return v
    if v == math.inf:
        return "n/a"
    if v >= 1e9:
        return f"{v / 1e9:.1f}G"
    if v >= 1e6:
        return f"{v / 1e6:.1f}M"
    if v >= 1e4:
        return f"{v / 1e3:.1f}k"
    if v >= 100:
        return f"{v:.0f}"
    return f"{v:.3g}"


def projection_table(chip: ChipConfig, model_cfg: Any, scales: list[str]) -> Any:
    from rich.markup import escape
    from rich.table import Table

    pj = chip.projection
    marks = chip.marked_figures()
    title = (f"Projection on {chip.name} ({chip.vendor}, matmul {chip.matmul_dtype}); per "
             "device")
    caption = (f"assumed: train MFU {pj.train_mfu}, decode MFU {pj.decode_mfu}, HBM util "
               f"{pj.bw_util}, link efficiency {pj.comm_efficiency}, decode batch "
               f"{pj.decode_batch}/device (b = what fits), train seq {pj.train_seq_len}.\n"
               + (f"Rests on marked figures: {', '.join(marks)}" if marks
                  else "No marked figures."))
    table = Table(title=escape(title), caption=escape(caption))
    cols = ["scale", "params tot/act", "KV B/tok", "train tok/s/dev (bound)", "devices"]
    for L in pj.contexts:
        cols += [f"decode tok/s/dev @{L} (bound, seqs/dev)", f"mem/dev GB @{L}"]
    for c in cols:
        table.add_column(c, justify="right" if c != "scale" else "left")
    targets = [("run", model_cfg)]
    for s in scales:
        preset = load_model_preset(s)
        scaled = with_switches(preset, model_cfg)
        targets.append((f"{s} (run's switches)", scaled))
        if scaled != preset:
            targets.append((f"{s} (its own switches)", preset))
    for name, cfg in targets:
        r = project(chip, cfg)
        row = [name, f"{_fmt(r['params_total'])}/{_fmt(r['params_active'])}",
               _fmt(r["kv_bytes_per_token"]),
               f"{_fmt(r['train_tokens_per_s'])} ({r['bound_train']})",
               _fmt(r["devices_needed"])]
        for L in pj.contexts:
            row += [f"{_fmt(r[f'decode_tokens_per_s@{L}'])} ({r[f'bound_decode@{L}']}, "
                    f"{r[f'decode_batch@{L}']:.3g})", _fmt(r[f"mem_per_device_gb@{L}"])]
        table.add_row(*row)
    return table


def figures_table(chip: ChipConfig) -> Any:
    """Every figure of a profile with its confidence mark and source."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=escape(f"{chip.name}: {chip.device}"))
    for c in ("figure", "value", "confidence", "source"):
        table.add_column(c, overflow="fold")
    for key, fig in chip.figures().items():
        value = "null" if fig.value is None else f"{fig.value:.4g}"
        table.add_row(key, value, escape(fig.mark or fig.confidence), escape(fig.source))
    if chip.dtype_support is not None:
        ds = chip.dtype_support
        table.add_row("dtypes", escape(f"matmul {chip.matmul_dtypes}, kv {chip.kv_dtypes}, "
                                       f"fallback {chip.kv_fallback_dtype}"),
                      escape(ds.mark or ds.confidence), escape(ds.source))
    return table


def main(argv: list[str] | None = None) -> int:
    """``python -m v4lab.chips [--scales v3_671b,v4_flash] [hydra overrides...]``"""
    from rich.console import Console

    argv = list(sys.argv[1:] if argv is None else argv)
    scales = list(SCALE_PRESETS)
    if argv and argv[0].startswith("--scales"):
        arg = argv.pop(0)
        val = arg.split("=", 1)[1] if "=" in arg else argv.pop(0)
        scales = [s for s in val.split(",") if s]
    console = Console(width=200)
    try:
        chip_arg = [o for o in argv if o.startswith("chip=")]
        if chip_arg:  # unknown names list the profiles (before Hydra's own message)
            name = chip_arg[-1].split("=", 1)[1]
            if name not in available_chips():
                raise ConfigError(f"chip={name!r} is not allowed: one of "
                                  f"{', '.join(available_chips())}")
        try:
            cfg = compose(argv)
        except Exception as e:  # Hydra: unknown experiment / override, with its own message
            raise ConfigError(f"could not compose the config: {e}") from e
        chip = chip_from_cfg(cfg.chip)
        model_cfg = model_config_from_dict(cfg.model)
        run_cfg, matmul, notes = apply_numerics(chip, model_cfg)
        for s in scales:
            load_model_preset(s)
    except ConfigError as e:
        console.print(f"[red]error:[/red] {e}", markup=True, highlight=False)
        return 2
    console.print(figures_table(chip))
    console.print(projection_table(chip, run_cfg, scales))
    console.print(f"numerics: matmul {matmul}, KV cache {kv_dtype(run_cfg)}"
                  + "".join(f"\n  note: {n}" for n in notes), highlight=False)
    return 0

