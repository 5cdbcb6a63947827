"""Synthetic long-context tasks (RULER-style) with the code corpus as the haystack.

Every example is a function of a numpy Generator (so of a seed) and a stretch of corpus
tokens; nothing is downloaded. An :class:`Example` is a token sequence of exactly the
requested length: ``prompt`` (haystack with the task's lines inserted, then the query)
followed by ``answer``; the model reads the prompt and must produce the answer tokens.

Task lines look like Python comments so they sit naturally in code. Keys are runs of
single lowercase-letter tokens, values runs of single digit tokens (built token by
token, so every occurrence of a value is the same token sequence), symbols single
uppercase-letter tokens:

    niah_single        \\n# kqx = 417\\n ... \\n# ? kqx =            -> 417
    niah_multikey      the same with n_needles - 1 distractor needles (other keys, other values)
    niah_multivalue    one key, n_multi values in order      \\n# all kqx = -> 417, 902, 115
    niah_multiquery    n_needles needles, n_queries asked    \\n# ? kqx abc = -> 417, 902
    variable_tracking  chains  x1 = 417 ... x2 = x1 ... x3 = x2 (plus distractor chains);
                       \\n# ? x3 = -> 417
    mqar               a dense block of n_pairs pairs "k = v, k = v, ...", then n_queries keys
    positional_recall  a run of run_len distinct symbols and a marker " @@"; asks which
                       symbol stood d positions before the marker   \\n# ?  @@ -3 = -> Q

A task line never occurs by accident: the generator resamples the haystack until every
key occurs exactly as often as it was placed (and the marker once). Distractor keys and
values are drawn without replacement, so none equals an answer.

chance: the probability that a uniform guess over the task's answer space is exactly
right (values: ordered tuples of distinct values of ``value_digits`` digits; positional
recall: the run's symbols). :func:`random_guess` draws such a guess.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from v4lab.errors import ConfigError

MIN_HAYSTACK = 8  # corpus tokens a sequence must keep besides the task's own lines


@dataclass(frozen=True)
class TaskParams:
    """Sizes of the task formats (the defaults are the project's task suite)."""

    value_digits: int = 3     # digits per value: 10**value_digits possible values
    key_letters: int = 3      # letters per key: 26**key_letters possible keys
    n_needles: int = 4        # multikey / multiquery: needles in the context
    n_multi: int = 3          # multivalue: values of the one key
    n_queries: int = 2        # multiquery / mqar: keys asked at once
    n_chains: int = 2         # variable tracking: 1 chain + distractor chains
    n_hops: int = 3           # variable tracking: assignments per chain
    n_pairs: int = 12         # mqar: pairs in the block
    run_len: int = 8          # positional recall: symbols before the marker (<= 9)

    def __post_init__(self) -> None:
        for key in ("value_digits", "key_letters", "n_needles", "n_multi", "n_queries",
                    "n_chains", "n_hops", "n_pairs", "run_len"):
            if getattr(self, key) < 1:
                raise ConfigError(f"task param {key}={getattr(self, key)!r} is not allowed: >= 1")
        if not 1 <= self.run_len <= 9:
            raise ConfigError(f"task param run_len={self.run_len!r} is not allowed: 1..9")
        if self.n_queries > min(self.n_needles, self.n_pairs):
            raise ConfigError(f"task param n_queries={self.n_queries!r} is not allowed: <= "
                              f"n_needles={self.n_needles} and n_pairs={self.n_pairs}")
        n_values = 10 ** self.value_digits
        most = max(self.n_needles, self.n_multi, self.n_chains, self.n_pairs)
        if most > n_values:
            raise ConfigError(f"task param value_digits={self.value_digits!r} is not allowed: "
                              f"10**value_digits must be >= {most} distinct values")


DEFAULT_PARAMS = TaskParams()


class TaskVocab:
    """Token ids of the pieces task lines are built from, for one tokenizer.

    Digits and letters must each be one token (true for byte-level BPE, whose base
    alphabet holds every byte).
    """

    def __init__(self, encode: Callable[[str], list[int]]) -> None:
        def single(ch: str) -> int:
            ids = encode(ch)
            if len(ids) != 1:
                raise ValueError(f"the tokenizer must encode {ch!r} as one token, got {ids}")
            return ids[0]

        self.digits = [single(str(i)) for i in range(10)]
        self.lower = [single(chr(ord("a") + i)) for i in range(26)]
        self.upper = [single(chr(ord("A") + i)) for i in range(26)]
        self.line = encode("\n# ")        # a task line starts like a comment
        self.ask = encode("\n# ? ")       # a query
        self.ask_all = encode("\n# all ")  # a query for every value of a key
        self.eq = encode(" = ")
        self.sep = encode(", ")
        self.space = encode(" ")
        self.newline = encode("\n")
        self.mark = encode(" @@")
        self.minus = encode(" -")

    @classmethod
    def from_tokenizer(cls, tokenizer) -> TaskVocab:
        """From a ``tokenizers.Tokenizer``."""
        return cls(lambda s: tokenizer.encode(s).ids)

    def value(self, n: int, digits: int) -> list[int]:
        return [self.digits[int(c)] for c in f"{n:0{digits}d}"]

    def key(self, n: int, letters: int) -> list[int]:
        out = []
        for _ in range(letters):
            n, r = divmod(n, 26)
            out.append(self.lower[r])
        return out

    def join(self, parts: list[list[int]], sep: list[int]) -> list[int]:
        out: list[int] = []
        for i, p in enumerate(parts):
            out += (sep if i else []) + p
        return out


@dataclass
class Example:
    """One task sequence: ``prompt + answer`` has exactly the requested length.

    meta: what the tests and :func:`random_guess` need (keys, values, distractors, answer
    space); not seen by the model.
    """

    task: str
    prompt: list[int]
    answer: list[int]
    chance: float
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.answer


class Haystack:
    """Corpus tokens to fill the context with: a contiguous stretch from a random start
    (the shard is tiled if shorter than asked)."""

    def __init__(self, tokens: np.ndarray) -> None:
        if len(tokens) < 1:
            raise ValueError("the haystack shard is empty")
        self.tokens = tokens

    def sample(self, rng: np.random.Generator, n: int) -> list[int]:
        total = len(self.tokens)
        start = int(rng.integers(0, total))
        idx = (start + np.arange(n)) % total
        return np.asarray(self.tokens[idx], dtype=np.int64).tolist()


@dataclass
class Plan:
    """A task instance before the haystack: lines to insert (in ``order`` if given),
    the query tail, the answer, and spans whose count in the body is checked."""

    inserts: list[list[int]]
    tail: list[int]
    answer: list[int]
    chance: float
    ordered: bool = False
    checks: list[tuple[list[int], int]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def fixed(self) -> int:
        return sum(map(len, self.inserts)) + len(self.tail) + len(self.answer)


def _distinct(rng: np.random.Generator, space: int, n: int) -> list[int]:
    return [int(x) for x in rng.choice(space, size=n, replace=False)]


def _values_chance(p: TaskParams, count: int) -> float:
    n = 10 ** p.value_digits
    return 1.0 / math.perm(n, count)


def _needles(v: TaskVocab, p: TaskParams, rng, n: int):
    keys = [v.key(k, p.key_letters) for k in _distinct(rng, 26 ** p.key_letters, n)]
    vals = [v.value(x, p.value_digits) for x in _distinct(rng, 10 ** p.value_digits, n)]
    lines = [v.line + k + v.eq + x + v.newline for k, x in zip(keys, vals)]
    return keys, vals, lines


def plan_niah_single(v: TaskVocab, p: TaskParams, rng) -> Plan:
    keys, vals, lines = _needles(v, p, rng, 1)
    return Plan(lines, v.ask + keys[0] + v.eq, vals[0], _values_chance(p, 1),
                checks=[(keys[0] + v.eq, 1)],
                meta={"kind": "values", "count": 1, "keys": keys, "values": vals,
                      "distractor_values": []})


def plan_niah_multikey(v: TaskVocab, p: TaskParams, rng) -> Plan:
    keys, vals, lines = _needles(v, p, rng, p.n_needles)
    q = int(rng.integers(p.n_needles))
    return Plan(lines, v.ask + keys[q] + v.eq, vals[q], _values_chance(p, 1),
                checks=[(k + v.eq, 1) for k in keys],
                meta={"kind": "values", "count": 1, "keys": keys, "values": vals,
                      "query": [q], "distractor_values": vals[:q] + vals[q + 1:]})


def plan_niah_multivalue(v: TaskVocab, p: TaskParams, rng) -> Plan:
    key = v.key(int(rng.integers(26 ** p.key_letters)), p.key_letters)
    vals = [v.value(x, p.value_digits) for x in _distinct(rng, 10 ** p.value_digits, p.n_multi)]
    lines = [v.line + key + v.eq + x + v.newline for x in vals]
    return Plan(lines, v.ask_all + key + v.eq, v.join(vals, v.sep), _values_chance(p, p.n_multi),
                ordered=True, checks=[(key + v.eq, p.n_multi)],
                meta={"kind": "values", "count": p.n_multi, "keys": [key], "values": vals,
                      "distractor_values": []})


def plan_niah_multiquery(v: TaskVocab, p: TaskParams, rng) -> Plan:
    keys, vals, lines = _needles(v, p, rng, p.n_needles)
    qs = _distinct(rng, p.n_needles, p.n_queries)
    return Plan(lines, v.ask + v.join([keys[q] for q in qs], v.space) + v.eq,
                v.join([vals[q] for q in qs], v.sep), _values_chance(p, p.n_queries),
                checks=[(k + v.eq, 1) for k in keys],
                meta={"kind": "values", "count": p.n_queries, "keys": keys, "values": vals,
                      "query": qs, "distractor_values": [x for i, x in enumerate(vals) if i not in qs]})


def plan_variable_tracking(v: TaskVocab, p: TaskParams, rng) -> Plan:
    names = [v.key(k, p.key_letters) for k in _distinct(rng, 26 ** p.key_letters, p.n_chains * p.n_hops)]
    vals = [v.value(x, p.value_digits) for x in _distinct(rng, 10 ** p.value_digits, p.n_chains)]
    chains = []
    for c in range(p.n_chains):
        var = names[c * p.n_hops:(c + 1) * p.n_hops]
        lines = [v.line + var[0] + v.eq + vals[c] + v.newline]
        lines += [v.line + var[h] + v.eq + var[h - 1] + v.newline for h in range(1, p.n_hops)]
        chains.append(lines)
    # a random interleaving of the chains that keeps each chain's own order
    labels = rng.permutation(np.repeat(np.arange(p.n_chains), p.n_hops))
    nxt = [0] * p.n_chains
    inserts = []
    for c in labels:
        inserts.append(chains[c][nxt[c]])
        nxt[c] += 1
    last = names[p.n_hops - 1]
    return Plan(inserts, v.ask + last + v.eq, vals[0], _values_chance(p, 1), ordered=True,
                checks=[(n + v.eq, 1) for n in names],
                meta={"kind": "values", "count": 1, "keys": names, "values": vals,
                      "chain": names[:p.n_hops], "distractor_values": vals[1:]})


def plan_mqar(v: TaskVocab, p: TaskParams, rng) -> Plan:
    keys = [v.key(k, p.key_letters) for k in _distinct(rng, 26 ** p.key_letters, p.n_pairs)]
    vals = [v.value(x, p.value_digits) for x in _distinct(rng, 10 ** p.value_digits, p.n_pairs)]
    block = v.line + v.join([k + v.eq + x for k, x in zip(keys, vals)], v.sep) + v.newline
    qs = _distinct(rng, p.n_pairs, p.n_queries)
    return Plan([block], v.ask + v.join([keys[q] for q in qs], v.space) + v.eq,
                v.join([vals[q] for q in qs], v.sep), _values_chance(p, p.n_queries),
                checks=[(k + v.eq, 1) for k in keys],
                meta={"kind": "values", "count": p.n_queries, "keys": keys, "values": vals,
                      "query": qs, "distractor_values": [x for i, x in enumerate(vals) if i not in qs]})


def plan_positional_recall(v: TaskVocab, p: TaskParams, rng) -> Plan:
    run = [v.upper[i] for i in _distinct(rng, 26, p.run_len)]
    d = int(rng.integers(1, p.run_len + 1))
    line = v.line + run + v.mark + v.newline
    return Plan([line], v.ask + v.mark + v.minus + [v.digits[d]] + v.eq, [run[-d]],
                1.0 / p.run_len, checks=[(v.mark, 1)],
                meta={"kind": "symbol", "choices": run, "distance": d,
                      "distractor_values": [[t] for t in run if t != run[-d]]})


PLANS: dict[str, Callable[[TaskVocab, TaskParams, np.random.Generator], Plan]] = {
    "niah_single": plan_niah_single,
    "niah_multikey": plan_niah_multikey,
    "niah_multivalue": plan_niah_multivalue,
    "niah_multiquery": plan_niah_multiquery,
    "variable_tracking": plan_variable_tracking,
    "mqar": plan_mqar,
    "positional_recall": plan_positional_recall,
}
TASKS: tuple[str, ...] = tuple(PLANS)


def check_task(name: str, key: str = "task") -> None:
    """Raise ConfigError for an unknown task name, listing the known ones."""
    if name not in PLANS:
        raise ConfigError(f"{key}={name!r} is not allowed: an unknown task; the tasks are "
                          f"{', '.join(TASKS)}")


def min_length(name: str, vocab: TaskVocab, params: TaskParams = DEFAULT_PARAMS) -> int:
    """Fewest tokens (prompt + answer) a sequence of this task can have."""
    check_task(name)
    return PLANS[name](vocab, params, np.random.default_rng(0)).fixed + MIN_HAYSTACK


def count_span(seq: list[int], span: list[int]) -> int:
    """Occurrences of ``span`` in ``seq`` (overlapping ones counted)."""
    n, m = len(seq), len(span)
    if m == 0 or m > n:
        return 0
    a = np.asarray(seq)
    hits = np.ones(n - m + 1, dtype=bool)
    for j, tok in enumerate(span):
        hits &= a[j:n - m + 1 + j] == tok
    return int(hits.sum())


def generate(name: str, length: int, vocab: TaskVocab, haystack: Haystack,
             rng: np.random.Generator, params: TaskParams = DEFAULT_PARAMS,
             max_tries: int = 50) -> Example:
    """One example of task ``name`` with ``len(prompt) + len(answer) == length``.

    The task's lines go at uniformly random depths of a haystack stretch; if the haystack
    happens to contain a key (or the marker), a fresh stretch is drawn.
    """
    check_task(name)
    plan = PLANS[name](vocab, params, rng)
    n_hay = length - plan.fixed
    if n_hay < MIN_HAYSTACK:
        raise ConfigError(f"context length {length} is too short for task {name!r}: it needs "
                          f">= {plan.fixed + MIN_HAYSTACK} tokens ({plan.fixed} for its lines, "
                          f"query and answer, {MIN_HAYSTACK} of haystack)")
    inserts = list(plan.inserts)
    if not plan.ordered:
        inserts = [inserts[i] for i in rng.permutation(len(inserts))]
    for _ in range(max_tries):
        hay = haystack.sample(rng, n_hay)
        cuts = np.sort(rng.integers(0, n_hay + 1, size=len(inserts)))
        body: list[int] = []
        prev = 0
        for cut, ins in zip(cuts, inserts):
            body += hay[prev:cut] + ins
            prev = int(cut)
        body += hay[prev:]
        if all(count_span(body, span) == n for span, n in plan.checks):
            break
    else:
        raise RuntimeError(f"task {name!r}: the haystack kept containing a task key after "
                           f"{max_tries} draws")
    ex = Example(name, body + plan.tail, list(plan.answer), plan.chance, dict(plan.meta))
    assert len(ex.tokens) == length
    return ex


def random_guess(ex: Example, vocab: TaskVocab, rng: np.random.Generator,
                 params: TaskParams = DEFAULT_PARAMS) -> list[int]:
    """A uniform draw from the example's answer space (right with probability ex.chance)."""
    if ex.meta["kind"] == "symbol":
        choices = ex.meta["choices"]
        return [choices[int(rng.integers(len(choices)))]]
    vals = _distinct(rng, 10 ** params.value_digits, ex.meta["count"])
    return vocab.join([vocab.value(x, params.value_digits) for x in vals], vocab.sep)


class TaskMix:
    """Replaces a seeded share of training windows with task sequences.

    Whether sample ``i`` is a task sequence, which task and its content are a function of
    (seed, i) only, so a resumed run sees the same data. Haystack: the train shard.
    """

    TAG = 0x7A5C

    def __init__(self, vocab: TaskVocab, tokens: np.ndarray, tasks: list[str], share: float,
                 seed: int, length: int, params: TaskParams = DEFAULT_PARAMS) -> None:
        for t in tasks:
            check_task(t, "eval.train_tasks")
        for t in tasks:
            need = min_length(t, vocab, params)
            if length < need:
                raise ConfigError(f"trainer.seq_len={length - 1} is not allowed: task {t!r} "
                                  f"in eval.train_tasks needs sequences of >= {need} tokens "
                                  f"(trainer.seq_len >= {need - 1}); drop the task or set "
                                  "eval.train_share=0")
        self.vocab, self.haystack, self.tasks = vocab, Haystack(tokens), list(tasks)
        self.share, self.seed, self.length, self.params = share, seed, length, params

    def example(self, i: int) -> Example | None:
        """Task example of ``length`` tokens for sample i, or None (a corpus window)."""
        if self.share <= 0 or not self.tasks:
            return None
        rng = np.random.default_rng([self.seed, i, self.TAG])
        if rng.random() >= self.share:
            return None
        task = self.tasks[int(rng.integers(len(self.tasks)))]
        return generate(task, self.length, self.vocab, self.haystack, rng, self.params)

    def sample(self, i: int) -> list[int] | None:
        """Token ids of :meth:`example` (prompt + answer), or None (a corpus window)."""
        ex = self.example(i)
        return None if ex is None else ex.tokens
