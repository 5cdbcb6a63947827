"""The paired section of a study whose runs decode the same weights with other KV caches
(``kv_cache``): one row per cache against the run's own, its findings, and its method."""

from __future__ import annotations

from v4lab.report.paired import CachePair, cache_pairs
from v4lab.report.runs import Runs
from v4lab.report.table import answers_key, fmt
from v4lab.studies.manifests import Study

CACHE_PAIRS_METHOD = (
    "Each cache decodes the same weights on the same held-out answers as the run's own cache; "
    "the answers of all seeds are pooled. n10 = answers this cache got right and the own cache "
    "wrong, n01 = the reverse; Δ = (n10 − n01) / answers; p = exact McNemar test on the pooled "
    "discordant answers (under equal accuracy each splits evenly, in every seed), Holm-corrected "
    "over the caches. The interval of Δ joins exact Clopper–Pearson intervals of the two "
    "discordant rates (Bonferroni), so it stays honest when no answer is discordant; equivalent = "
    "its 90% version lies inside ±margin (TOST at 0.05; margin from the manifest's equivalence).")


def study_cache_pairs(study: Study, runs: Runs) -> list[CachePair]:
    """The paired cache comparisons of a study whose runs record other caches' answers (the
    own cache's accuracy: the first ``probe/acc@<L>`` metric with an answer count)."""
    own = next((m for m in study.metrics if m.startswith("probe/acc@") and answers_key(m)), None)
    rows = {e: [runs[f"{e}-s{s}"][1] for s in study.seeds] for e in study.rows()}
    if own is None or not any(k.startswith("probe/kv_") for ms in rows.values() for k in ms[0]):
        return []
    return cache_pairs(rows, own, study.equivalence)


def cache_pairs_markdown(pairs: list[CachePair]) -> str:
    lines = ["| row | cache | answers | own acc | cache acc | n10 | n01 | Δ [95%] | McNemar p (Holm) | "
             "equivalent (90% interval) |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for c in pairs:
        eq = ("n/a (no margin)" if c.margin is None else
              f"{'yes' if c.equivalent else 'not shown'} within ±{c.margin:g} "
              f"([{fmt(c.eq_lo)}, {fmt(c.eq_hi)}])")
        lines.append(f"| {c.row} | {c.cache} | {c.n:,} | {fmt(c.acc_own)} | {fmt(c.acc)} | {c.n10} | "
                     f"{c.n01} | {c.delta:+.4f} [{c.lo:+.4f}, {c.hi:+.4f}] | {c.p_holm:.3g} | {eq} |")
    return "\n".join(lines)


def cache_finding(c: CachePair) -> str:
    text = (f"`{c.row}`, {c.cache} cache vs its own, {c.n:,} paired answers: Δ = {c.delta:+.4f} "
            f"(95% interval {c.lo:+.4f} to {c.hi:+.4f}; {c.n10} vs {c.n01} discordant), "
            f"McNemar Holm p = {c.p_holm:.3g}")
    if c.p_holm < 0.05:
        return text + ": a significant difference."
    if c.equivalent:
        return text + f"; equivalent within ±{c.margin:g}."
    return text + ("; no detectable difference" + (f", not shown equivalent within ±{c.margin:g}"
                                                   if c.margin is not None else "") + ".")
