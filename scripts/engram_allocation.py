"""Derive conf/experiment/alloc_<pct>.yaml: share a fixed sparse-parameter budget between
Engram's table and DeepSeekMoE's routed experts (the Engram paper's allocation sweep,
at the `small` model size), at EXACTLY equal active parameters and, as close as the
integer table shapes allow, equal total parameters.

The sparse budget P is what a token does NOT pass through (total - active): the routed
experts beyond the top_k a token uses, plus the Engram table rows beyond the one row
per (order, head) a token looks up (Engram paper: hashed N-gram tables are sparse
parameters, only the looked-up rows are active).

    P = (n_routed_experts - top_k) * E  +  (table_params - n_tables * head_dim)
    E = 3 * dim * expert_dim * (n_layers - first_dense_layers)   (one routed expert, SwiGLU)

pct% of P goes to Engram's table, the rest to inactive routed experts; P = M experts'
worth (M = BUDGET_EXPERTS, a multiple of 4, so every pct in steps of 25 is an integer
expert count) plus the inactive rows of the smallest table the code allows.

Design choices that keep the active parameters exactly equal (a referee's checklist):

- Engram stays enabled at every point with the same layers, orders, heads and head_dim,
  so its projections, norms, conv and looked-up rows (all active) are identical; at 0%
  the table is the smallest the config allows (table_size = heads_per_order: 8 prime
  sub-tables of 5..29 rows), counted honestly in P.
- 100%: no routed experts. The top_k routed experts' active width moves into the shared
  experts: shared width (n_shared + top_k) * expert_dim = 512, one SwiGLU per layer, which
  is exactly the dense FFN of width 512 (the shared experts ARE one SwiGLU of width
  n_shared * expert_dim, modules/args.MoEConfig). The MoE config refuses
  n_routed_experts = 0 / top_k = 0 (nothing to route), so this point is written as
  moe.enabled: false with ffn_dim 512 - the same computation with no router.
- The router W_g [n_routed_experts, dim] is active (every token uses it) and grows with
  the expert count: dim * n_routed per MoE layer. With 3 MoE layers (small: 4 layers, the
  first dense) that is 3 * dim * n_routed, exactly one SwiGLU column per expert of the
  dense first layer, so ffn_dim = 512 - n_routed_experts gives the router its parameters
  back (the first layer is 0..4% narrower than 512; the 100% point has no router and
  ffn_dim 512).

Total parameters then differ only by the table's rounding (table_size is the largest
whose table does not exceed its target): the script prints the spread.

--size probe (study `facts`, conf/experiment/facts_alloc_<pct>.yaml): the same design at
the probe model's widths (conf/model/probe.yaml = tiny: dim 64, 2 layers, ffn_dim 128;
Engram as tiny's: layer 1, orders 2 and 3, 2 heads of 16). Differences, and why:

- One MoE layer (layer 1; layer 0 dense), so the router's dim * n_routed is a third of a
  dense SwiGLU column (3 * dim) per expert: ffn_dim = 128 - n_routed / 3, which needs
  n_routed to be a multiple of 3 at every point. n_routed = inactive + top_k with the
  inactive count M, M/2 (and 3M/4, M/4) forces top_k to a multiple of 3 as well: top_k 3
  routed + 1 shared expert of width 32 = 128, tiny's active width (tiny: 2 + 2).
- M = 12 inactive experts (a multiple of 12: integer and divisible by 3 at every 25%):
  n_routed 15 / 12 / 9 / 6 / 0, ffn_dim of layer 0 123 / 124 / 125 / 126 / 128.
- Sweep points 0, 50, 100 (the study's rows; 25 and 75 would be integer too).

Usage: PYTHONPATH=src python3 scripts/engram_allocation.py [--size small|probe] [--write]
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from v4lab.modules.args import EngramConfig
from v4lab.modules.engram import engram_table_params


@dataclass(frozen=True)
class Size:
    """One model size's widths (its conf/model file) and the sweep derived at it."""

    model: str                      # conf/model/<model>.yaml (the widths below are its)
    prefix: str                     # conf/experiment/<prefix>_<pct>.yaml
    dim: int
    n_layers: int
    ffn_dim: int
    moe: dict = field(default_factory=dict)
    engram: dict = field(default_factory=dict)
    budget_experts: int = 16        # M: inactive routed experts at 0%
    pcts: tuple = (0, 25, 50, 75, 100)

    @property
    def n_moe_layers(self) -> int:
        return self.n_layers - self.moe["first_dense_layers"]

    @property
    def looked_up(self) -> int:
        """Active table parameters: one row per (order, head) and layer."""
        e = self.engram
        return len(e["ngram_orders"]) * e["heads_per_order"] * e["head_dim"] * len(e["layers"])

    @property
    def min_table(self) -> int:
        return self.engram["heads_per_order"]  # EngramConfig.validate's lower bound

    @property
    def shared_width(self) -> int:
        """Active FFN width of an MoE layer: (n_shared + top_k) experts; = ffn_dim."""
        return (self.moe["n_shared_experts"] + self.moe["top_k"]) * self.moe["expert_dim"]

    def router_columns(self, n_routed: int) -> int:
        """Dense SwiGLU columns (3 * dim params each) of layer 0 that give the router's
        dim * n_routed per MoE layer back."""
        cols, rest = divmod(n_routed * self.n_moe_layers, 3)
        assert rest == 0, f"{self.model}: router of {n_routed} experts is not whole columns"
        return cols


SIZES = {
    "small": Size("small", "alloc", 192, 4, 512,      # conf/model/small.yaml
                  dict(expert_dim=128, top_k=2, n_shared_experts=2, first_dense_layers=1),
                  dict(layers=[1], ngram_orders=[2, 3], heads_per_order=4, head_dim=32)),
    "probe": Size("probe", "facts_alloc", 64, 2, 128,  # conf/model/probe.yaml (tiny widths)
                  dict(expert_dim=32, top_k=3, n_shared_experts=1, first_dense_layers=1),
                  dict(layers=[1], ngram_orders=[2, 3], heads_per_order=2, head_dim=16),
                  budget_experts=12, pcts=(0, 50, 100)),
}


def expert_params(z: Size) -> int:
    """Parameters of one routed expert summed over the MoE layers (SwiGLU: 3 matrices)."""
    return 3 * z.dim * z.moe["expert_dim"] * z.n_moe_layers


def table_params(z: Size, table_size: int) -> int:
    return engram_table_params(EngramConfig(enabled=True, table_size=table_size, **z.engram))


def budget(z: Size) -> int:
    """P: M inactive experts plus the inactive rows of the smallest table."""
    return z.budget_experts * expert_params(z) + table_params(z, z.min_table) - z.looked_up


def table_size_for(z: Size, target: int) -> int:
    """Largest table_size whose Engram table parameters are <= target (bisection)."""
    lo, hi = z.min_table, max(z.min_table, target)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if table_params(z, mid) <= target:
            lo = mid
        else:
            hi = mid - 1
    return lo


def allocation(z: Size, pct: int) -> dict:
    inactive_experts = z.budget_experts * (100 - pct) // 100
    assert inactive_experts * 100 == z.budget_experts * (100 - pct), pct
    n_routed = inactive_experts + z.moe["top_k"] if pct < 100 else 0
    table = z.min_table if pct == 0 else table_size_for(
        z, budget(z) - inactive_experts * expert_params(z) + z.looked_up)
    eng = table_params(z, table)
    return dict(pct=pct, n_routed_experts=n_routed, table_size=table, engram_params=eng,
                inactive_experts=inactive_experts, ffn_dim=z.ffn_dim - z.router_columns(n_routed),
                sparse=inactive_experts * expert_params(z) + eng - z.looked_up, budget=budget(z))


def moe_yaml(z: Size, a: dict) -> str:
    if a["n_routed_experts"] == 0:
        shared = z.moe["n_shared_experts"] + z.moe["top_k"]
        return ("  moe:\n"
                f"    enabled: false       # = {shared} shared experts x {z.moe['expert_dim']}:"
                f" one SwiGLU of width {a['ffn_dim']}\n")
    return ("  moe:\n    enabled: true\n"
            f"    n_routed_experts: {a['n_routed_experts']}\n"
            + "".join(f"    {k}: {v}\n" for k, v in z.moe.items()))


def yaml_text(z: Size, a: dict) -> str:
    share = (a["engram_params"] - z.looked_up) / a["sparse"]
    per_column = "" if z.n_moe_layers == 3 else f" / {3 // z.n_moe_layers}"
    return (
        "# @package _global_\n"
        f"# Allocation sweep, {a['pct']}%: sparse (inactive) budget P = {a['budget']:,} params;\n"
        f"# Engram table {a['engram_params']:,} ({a['engram_params'] - z.looked_up:,} inactive,"
        f" {share:.1%} of this point's {a['sparse']:,}),\n"
        f"# {a['inactive_experts']} inactive routed experts x {expert_params(z):,}"
        f" (n_routed_experts {a['n_routed_experts']}).\n"
        "# Active parameters are identical at every point: Engram stays on (same projections),\n"
        f"# at 100% the top_k routed experts' width moves into shared experts (= dense FFN {z.ffn_dim}),\n"
        f"# and ffn_dim = {z.ffn_dim} - n_routed_experts{per_column} returns the router's dim x n_routed"
        " per MoE layer.\n"
        f"# Generated by scripts/engram_allocation.py (model size: {z.model}); see its docstring.\n"
        f"experiment: {z.prefix}_{a['pct']}\n"
        "model:\n"
        f"  ffn_dim: {a['ffn_dim']}\n"
        + moe_yaml(z, a) +
        "  engram:\n    enabled: true\n"
        + "".join(f"    {k}: {v}\n" for k, v in z.engram.items())
        + f"    table_size: {a['table_size']}\n"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="small",
                    help="model widths: small (alloc_*) or probe (facts_alloc_*)")
    ap.add_argument("--write", action="store_true",
                    help="write conf/experiment/<prefix>_<pct>.yaml")
    args = ap.parse_args()
    z = SIZES[args.size]
    print("| pct | routed experts | ffn_dim | table_size | Engram table params | "
          "sparse params | Engram share |")
    print("|---|---|---|---|---|---|---|")
    rows = [allocation(z, pct) for pct in z.pcts]
    for a in rows:
        share = (a["engram_params"] - z.looked_up) / a["sparse"]
        print(f"| {a['pct']} | {a['n_routed_experts']} | {a['ffn_dim']} | {a['table_size']} | "
              f"{a['engram_params']:,} | {a['sparse']:,} | {share:.2%} |")
        if args.write:
            out = (Path(__file__).resolve().parents[1] / "conf" / "experiment"
                   / f"{z.prefix}_{a['pct']}.yaml")
            out.write_text(yaml_text(z, a))
    sparse = [a["sparse"] for a in rows]
    print(f"total-parameter spread: {max(sparse) - min(sparse):,} params "
          f"({(max(sparse) - min(sparse)) / budget(z):.4%} of P)")


if __name__ == "__main__":
    main()
