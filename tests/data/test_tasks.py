"""Task generators: exact lengths, the answer present and unambiguous (checked by an
independent solver that reads only the tokens), no distractor equal to the answer,
determinism, bad input, and the training mix."""

from __future__ import annotations

import numpy as np
import pytest

from v4lab.data.tasks import (
    MIN_HAYSTACK,
    TASKS,
    Haystack,
    TaskMix,
    TaskParams,
    TaskVocab,
    count_span,
    generate,
    min_length,
)
from v4lab.errors import ConfigError


def fake_encode(text: str) -> list[int]:
    """A character-level stand-in tokenizer: one token per character (ids = code points)."""
    return [ord(c) for c in text]


@pytest.fixture(scope="module")
def vocab() -> TaskVocab:
    return TaskVocab(fake_encode)


@pytest.fixture(scope="module")
def haystack() -> Haystack:
    # "code" made of characters that also appear in task lines (letters, digits, '=', ' ')
    text = ("def f(a, b):\n    x = a + b * 3\n    return x  # see bc = 12\n" * 50)
    return Haystack(np.array(fake_encode(text), dtype=np.int64))


def _find_all(seq: list[int], span: list[int]) -> list[int]:
    return [i for i in range(len(seq) - len(span) + 1) if seq[i:i + len(span)] == span]


def _digits(v: TaskVocab, toks: list[int]) -> bool:
    return all(t in v.digits for t in toks)


def solve(task: str, prompt: list[int], v: TaskVocab, p: TaskParams) -> list[int]:
    """Answer a prompt from its tokens alone, asserting every lookup is unambiguous."""
    ask = v.ask_all if task == "niah_multivalue" else v.ask
    starts = _find_all(prompt, ask)
    q = starts[-1]
    body, tail = prompt[:q], prompt[q + len(ask):]
    assert tail[-len(v.eq):] == v.eq
    query = tail[:-len(v.eq)]

    def lookup(key: list[int]) -> list[int]:
        hits = _find_all(body, key + v.eq)
        assert len(hits) == 1, f"key occurs {len(hits)} times"
        s = hits[0] + len(key) + len(v.eq)
        return body[s:s + p.value_digits]

    if task == "positional_recall":
        assert query[:len(v.mark)] == v.mark
        d = v.digits.index(query[len(v.mark) + len(v.minus)])
        hits = _find_all(body, v.mark)
        assert len(hits) == 1
        return [body[hits[0] - d]]
    if task == "niah_multivalue":
        hits = _find_all(body, query + v.eq)
        assert len(hits) == p.n_multi
        vals = [body[h + len(query) + len(v.eq):][:p.value_digits] for h in hits]
        return v.join(vals, v.sep)
    if task == "variable_tracking":
        key = query
        for _ in range(p.n_hops):
            s = _find_all(body, key + v.eq)
            assert len(s) == 1
            rhs = body[s[0] + len(key) + len(v.eq):]
            if _digits(v, rhs[:p.value_digits]):
                return rhs[:p.value_digits]
            key = rhs[:p.key_letters]
        raise AssertionError("chain did not end in a value")
    keys = [query[i:i + p.key_letters] for i in range(0, len(query), p.key_letters + len(v.space))]
    return v.join([lookup(k) for k in keys], v.sep)


@pytest.mark.parametrize("task", TASKS)
def test_answer_present_unambiguous_and_no_distractor_equals_it(task, vocab, haystack):
    p = TaskParams()
    for seed in range(12):
        length = min_length(task, vocab, p) + 7 * seed
        ex = generate(task, length, vocab, haystack, np.random.default_rng(seed), p)
        assert len(ex.prompt) + len(ex.answer) == length and ex.task == task
        assert solve(task, ex.prompt, vocab, p) == ex.answer
        answers = (ex.answer if task == "positional_recall"
                   else [ex.answer[i:i + p.value_digits]
                         for i in range(0, len(ex.answer), p.value_digits + len(vocab.sep))])
        if task == "positional_recall":
            answers = [answers]
        for d in ex.meta["distractor_values"]:
            assert d not in answers
        assert 0 < ex.chance < 1


def test_distractors_exist_where_the_task_has_them(vocab, haystack):
    p = TaskParams()
    rng = np.random.default_rng(0)
    for task, n in (("niah_multikey", p.n_needles - 1), ("variable_tracking", p.n_chains - 1),
                    ("mqar", p.n_pairs - p.n_queries), ("positional_recall", p.run_len - 1)):
        ex = generate(task, 400, vocab, haystack, rng, p)
        assert len(ex.meta["distractor_values"]) == n
        for d in ex.meta["distractor_values"]:  # each distractor is really in the context
            assert count_span(ex.prompt, d) >= 1


def test_same_seed_same_example_other_seed_differs(vocab, haystack):
    for task in TASKS:
        a = generate(task, 300, vocab, haystack, np.random.default_rng([3, 1]))
        b = generate(task, 300, vocab, haystack, np.random.default_rng([3, 1]))
        c = generate(task, 300, vocab, haystack, np.random.default_rng([3, 2]))
        assert a.tokens == b.tokens and a.tokens != c.tokens


def test_needle_depth_varies(vocab, haystack):
    firsts = {_find_all(generate("niah_single", 500, vocab, haystack,
                                 np.random.default_rng(s)).prompt, vocab.line)[0] for s in range(20)}
    assert len(firsts) > 10


def test_haystack_containing_a_key_is_redrawn(vocab):
    # a haystack that is mostly one key "aaa = " forces redraws; those that succeed are clean
    text = "x" * 300 + "\n# aaa = 1\n"
    hay = Haystack(np.array(fake_encode(text), dtype=np.int64))
    p = TaskParams(key_letters=1)
    for s in range(10):
        ex = generate("niah_multikey", 120, vocab, hay, np.random.default_rng(s), p)
        assert solve("niah_multikey", ex.prompt, vocab, p) == ex.answer


def test_too_short_and_unknown_task_are_clear_errors(vocab, haystack):
    need = min_length("mqar", vocab)
    generate("mqar", need, vocab, haystack, np.random.default_rng(0))
    with pytest.raises(ConfigError, match=rf"too short for task 'mqar'.*>= {need}"):
        generate("mqar", need - 1, vocab, haystack, np.random.default_rng(0))
    assert need > MIN_HAYSTACK
    with pytest.raises(ConfigError, match="niah_single, niah_multikey.*positional_recall"):
        generate("needle", 100, vocab, haystack, np.random.default_rng(0))
    with pytest.raises(ConfigError, match="run_len"):
        TaskParams(run_len=12)


def test_real_tokenizer_pieces(data_root):
    """The project's byte-level BPE encodes digits and letters as single tokens."""
    from tokenizers import Tokenizer

    from conftest import TINY_DATA
    from v4lab.config import load_run_config
    from v4lab.data.prepare import prepare
    from v4lab.io import compose

    cfg = load_run_config(compose(["profile=smoke", f"data.root={data_root}", *TINY_DATA]))
    tok = Tokenizer.from_file(str(prepare(cfg.data, log=lambda *a: None) / "tokenizer.json"))
    v = TaskVocab.from_tokenizer(tok)
    assert len(set(v.digits)) == 10 and len(set(v.lower)) == 26 and len(set(v.upper)) == 26
    assert tok.decode(v.value(7, 3)) == "007" and tok.decode(v.line) == "\n# "


def test_task_mix_is_a_seeded_function_of_the_sample_index(vocab, haystack):
    mix = TaskMix(vocab, haystack.tokens, list(TASKS), 0.3, seed=5, length=257)
    picks = [mix.sample(i) for i in range(300)]
    again = TaskMix(vocab, haystack.tokens, list(TASKS), 0.3, seed=5, length=257)
    assert [again.sample(i) for i in (7, 3, 250)] == [picks[7], picks[3], picks[250]]
    n_task = sum(x is not None for x in picks)
    assert 0.2 < n_task / 300 < 0.4
    assert all(len(x) == 257 for x in picks if x is not None)
    assert TaskMix(vocab, haystack.tokens, list(TASKS), 0.0, 5, 257).sample(0) is None
    with pytest.raises(ConfigError, match=r"trainer.seq_len=63.*mqar"):
        TaskMix(vocab, haystack.tokens, ["mqar"], 0.5, 5, 64)
