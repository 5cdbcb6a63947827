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

Usage: PYTHONPATH=src python3 scripts/engram_allocation.py [--write]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from v4lab.modules.args import EngramConfig
from v4lab.modules.engram import engram_table_params

DIM, N_LAYERS, FFN_DIM = 192, 4, 512            # conf/model/small.yaml
MOE = dict(expert_dim=128, top_k=2, n_shared_experts=2, first_dense_layers=1)
ENGRAM = dict(layers=[1], ngram_orders=[2, 3], heads_per_order=4, head_dim=32)
BUDGET_EXPERTS = 16                              # M: inactive routed experts at 0%
PCTS = (0, 25, 50, 75, 100)
N_MOE_LAYERS = N_LAYERS - MOE["first_dense_layers"]
# the router's dim * n per MoE layer is returned as one SwiGLU column (3 dim) per expert
assert N_MOE_LAYERS == 3, "router compensation by ffn_dim needs 3 MoE layers"
LOOKED_UP = len(ENGRAM["ngram_orders"]) * ENGRAM["heads_per_order"] * ENGRAM["head_dim"]
MIN_TABLE = ENGRAM["heads_per_order"]            # EngramConfig.validate's lower bound


def expert_params() -> int:
    """Parameters of one routed expert summed over the MoE layers (SwiGLU: 3 matrices)."""
    return 3 * DIM * MOE["expert_dim"] * N_MOE_LAYERS


def table_params(table_size: int) -> int:
    return engram_table_params(EngramConfig(enabled=True, table_size=table_size, **ENGRAM))


def budget() -> int:
    """P: M inactive experts plus the inactive rows of the smallest table."""
    return BUDGET_EXPERTS * expert_params() + table_params(MIN_TABLE) - LOOKED_UP


def table_size_for(target: int) -> int:
    """Largest table_size whose Engram table parameters are <= target (bisection)."""
    lo, hi = MIN_TABLE, max(MIN_TABLE, target)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if table_params(mid) <= target:
            lo = mid
        else:
            hi = mid - 1
    return lo


def allocation(pct: int) -> dict:
    inactive_experts = BUDGET_EXPERTS * (100 - pct) // 100
    assert inactive_experts * 100 == BUDGET_EXPERTS * (100 - pct), pct
    n_routed = inactive_experts + MOE["top_k"] if pct < 100 else 0
    table = MIN_TABLE if pct == 0 else table_size_for(
        budget() - inactive_experts * expert_params() + LOOKED_UP)
    eng = table_params(table)
    return dict(pct=pct, n_routed_experts=n_routed, table_size=table, engram_params=eng,
                inactive_experts=inactive_experts, ffn_dim=FFN_DIM - n_routed,
                sparse=inactive_experts * expert_params() + eng - LOOKED_UP, budget=budget())


def moe_yaml(a: dict) -> str:
    if a["n_routed_experts"] == 0:
        shared = MOE["n_shared_experts"] + MOE["top_k"]
        return ("  moe:\n"
                f"    enabled: false       # = {shared} shared experts x {MOE['expert_dim']}:"
                f" one SwiGLU of width {a['ffn_dim']}\n")
    return ("  moe:\n    enabled: true\n"
            f"    n_routed_experts: {a['n_routed_experts']}\n"
            + "".join(f"    {k}: {v}\n" for k, v in MOE.items()))


def yaml_text(a: dict) -> str:
    share = (a["engram_params"] - LOOKED_UP) / a["sparse"]
    return (
        "# @package _global_\n"
        f"# Allocation sweep, {a['pct']}%: sparse (inactive) budget P = {a['budget']:,} params;\n"
        f"# Engram table {a['engram_params']:,} ({a['engram_params'] - LOOKED_UP:,} inactive,"
        f" {share:.1%} of this point's {a['sparse']:,}),\n"
        f"# {a['inactive_experts']} inactive routed experts x {expert_params():,}"
        f" (n_routed_experts {a['n_routed_experts']}).\n"
        "# Active parameters are identical at every point: Engram stays on (same projections),\n"
        "# at 100% the top_k routed experts' width moves into shared experts (= dense FFN 512),\n"
        "# and ffn_dim = 512 - n_routed_experts returns the router's dim x n_routed per MoE layer.\n"
        "# Generated by scripts/engram_allocation.py (model size: small); see its docstring.\n"
        f"experiment: alloc_{a['pct']}\n"
        "model:\n"
        f"  ffn_dim: {a['ffn_dim']}\n"
        + moe_yaml(a) +
        "  engram:\n    enabled: true\n"
        + "".join(f"    {k}: {v}\n" for k, v in ENGRAM.items())
        + f"    table_size: {a['table_size']}\n"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="write conf/experiment/alloc_*.yaml")
    args = ap.parse_args()
    print("| pct | routed experts | ffn_dim | table_size | Engram table params | "
          "sparse params | Engram share |")
    print("|---|---|---|---|---|---|---|")
    rows = [allocation(pct) for pct in PCTS]
    for a in rows:
        share = (a["engram_params"] - LOOKED_UP) / a["sparse"]
        print(f"| {a['pct']} | {a['n_routed_experts']} | {a['ffn_dim']} | {a['table_size']} | "
              f"{a['engram_params']:,} | {a['sparse']:,} | {share:.2%} |")
        if args.write:
            out = Path(__file__).resolve().parents[1] / "conf" / "experiment" / f"alloc_{a['pct']}.yaml"
            out.write_text(yaml_text(a))
    sparse = [a["sparse"] for a in rows]
    print(f"total-parameter spread: {max(sparse) - min(sparse):,} params "
          f"({(max(sparse) - min(sparse)) / budget():.4%} of P)")


if __name__ == "__main__":
    main()
