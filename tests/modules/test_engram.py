"""Engram: hashing, collision statistics, gate/value/conv against a naive loop, decode,
host memory, optimizer tags, canonical ids, config errors."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from v4lab.errors import ConfigError
from v4lab.model import ModelConfig, Transformer
from v4lab.modules.args import AttentionConfig, EngramConfig, KVCacheConfig
from v4lab.modules.context import ForwardContext
from v4lab.modules.engram import Engram, engram_params, engram_table_params, table_primes

SRC = os.path.join(os.path.dirname(__file__), "..", "..", "src")


def ecfg(**kw) -> EngramConfig:
    base = dict(enabled=True, layers=[0], ngram_orders=[2, 3], heads_per_order=2,
                table_size=53, head_dim=4, kernel_size=4)
    base.update(kw)
    return EngramConfig(**base)


def model_cfg(engram: EngramConfig, vocab: int = 97) -> ModelConfig:
    return ModelConfig(vocab_size=vocab, dim=32, n_layers=2, ffn_dim=48, max_seq_len=64,
                       attention=AttentionConfig(kind="mha", n_heads=2, head_dim=16,
                                                 kv_cache=KVCacheConfig(dtype="fp32")),
                       engram=engram)


def randomize(module: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if p.dim() == 1 else 0.0))


# ---- hashing -------------------------------------------------------------------------------
def naive_rows(eng: Engram, ids: list[int], t: int) -> list[int]:
    """Packed rows of position t of one sequence, with Python integers."""
    canon, mult = eng.canonical_ids.tolist(), eng.multipliers.tolist()
    orders, offsets = eng.table_order.tolist(), eng.offsets.tolist()
    rows = []
    for j in range(eng.n_tables):
        mix = 0
        for k in range(orders[j]):
            c = canon[ids[t - k]] if t - k >= 0 else eng.vocab_size
            mix ^= c * mult[j][k]
        rows.append(offsets[j] + mix % eng.primes[j])
    return rows


def test_hash_matches_python_integers_and_primes_are_distinct():
    eng = Engram(16, ecfg(ngram_orders=[3, 2, 4]), 1, vocab_size=1000)
    primes = table_primes(ecfg(ngram_orders=[3, 2, 4]))
    assert len(set(primes)) == len(primes) == 6 and min(primes) >= 53
    assert all(all(p % f for f in range(2, int(p**0.5) + 1)) for p in primes)
    ids = torch.randint(0, 1000, (2, 11), generator=torch.Generator().manual_seed(1))
    idx = eng.hash_indices(eng.window(ids, 11))
    assert idx.shape == (2, 11, 6)
    for b in range(2):
        for t in range(11):
            assert idx[b, t].tolist() == naive_rows(eng, ids[b].tolist(), t)
    # every row lands inside its own sub-table
    lo, hi = eng.offsets, eng.offsets + eng.modulus
    assert bool(((idx >= lo) & (idx < hi)).all())


def test_layers_use_different_seeds():
    ids = torch.arange(40).view(1, 40)
    a, b = Engram(16, ecfg(), 0, 97), Engram(16, ecfg(), 1, 97)
    assert not torch.equal(a.hash_indices(a.window(ids, 40)), b.hash_indices(b.window(ids, 40)))


@pytest.mark.process
def test_hash_deterministic_across_processes():
    ids = torch.randint(0, 5000, (2, 30), generator=torch.Generator().manual_seed(3))
    eng = Engram(16, ecfg(table_size=1009), 3, 5000)
    here = eng.hash_indices(eng.window(ids, 30)).tolist()
    code = (
        "import json, sys, torch\n"
        "from v4lab.modules.engram import Engram\n"
        "from v4lab.modules.args import EngramConfig\n"
        "torch.manual_seed(12345)\n"  # a different global RNG state must not matter
        "cfg = EngramConfig(enabled=True, layers=[0], ngram_orders=[2, 3], heads_per_order=2,"
        " table_size=1009, head_dim=4)\n"
        "eng = Engram(16, cfg, 3, 5000)\n"
        "ids = torch.tensor(json.loads(sys.stdin.read()))\n"
        "print(json.dumps(eng.hash_indices(eng.window(ids, 30)).tolist()))\n"
    )
    env = dict(os.environ, PYTHONPATH=os.path.abspath(SRC), PYTHONHASHSEED="7")
    out = subprocess.run([sys.executable, "-c", code], input=json.dumps(ids.tolist()),
                         capture_output=True, text=True, env=env, check=True)
    assert json.loads(out.stdout) == here


def naive_collision_rate(eng: Engram, ids: torch.Tensor) -> tuple[float, list[tuple[int, int]]]:
    """Rate per the docstring definition with Python sets; also (distinct n-grams, p) per table."""
    canon = eng.canonical_ids.tolist()
    rows = {(b, t): naive_rows(eng, seq, t)
            for b, seq in enumerate(ids.tolist()) for t in range(len(seq))}
    rates, sizes = [], []
    for j in range(eng.n_tables):
        n = int(eng.table_order[j])
        bucket_of = {}
        for b, seq in enumerate(ids.tolist()):
            for t in range(len(seq)):
                gram = tuple(canon[seq[t - k]] if t - k >= 0 else eng.vocab_size
                             for k in range(n))
                bucket_of[gram] = rows[b, t][j]
        load: dict[int, int] = {}
        for r in bucket_of.values():
            load[r] = load.get(r, 0) + 1
        rates.append(sum(load[r] > 1 for r in bucket_of.values()) / len(bucket_of))
        sizes.append((len(bucket_of), eng.primes[j]))
    return sum(rates) / len(rates), sizes


def test_collision_rate_definition_and_expected_for_uniform_hashing():
    eng = Engram(16, ecfg(table_size=1009), 0, 50_000)
    ids = torch.randint(0, 50_000, (4, 256), generator=torch.Generator().manual_seed(0))
    win = eng.window(ids, 256)
    measured = eng.collision_rate(win, eng.hash_indices(win))
    naive, sizes = naive_collision_rate(eng, ids)
    assert measured == pytest.approx(naive, abs=1e-6)
    # uniform hashing of U distinct items into p rows: P(item shares its row) = 1-(1-1/p)^(U-1)
    expected = sum(1 - (1 - 1 / p) ** (u - 1) for u, p in sizes) / len(sizes)
    assert 0.5 < expected < 0.8
    assert measured == pytest.approx(expected, abs=0.03)
    # orders whose n-gram code overflows int64 take the tuple path: same definition
    wide = Engram(16, ecfg(ngram_orders=[2, 5], table_size=211), 0, 50_000)
    win = wide.window(ids[:2, :64], 64)
    rate = wide.collision_rate(win, wide.hash_indices(win))
    assert rate == pytest.approx(naive_collision_rate(wide, ids[:2, :64])[0], abs=1e-6)
    # a much larger table collides much less, again as predicted
    big = Engram(16, ecfg(table_size=100_003), 0, 50_000)
    win = big.window(ids, 256)
    rate = big.collision_rate(win, big.hash_indices(win))
    assert rate == pytest.approx(1 - (1 - 1 / 100_003) ** 1023, abs=0.01)


# ---- the layer against a naive per-position computation ------------------------------------
def rms(v: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return v / torch.sqrt((v * v).mean() + eps) * w


def naive_gate(score: float, signed_sqrt: bool) -> float:
    """The gate of one position from its scaled dot product (Engram demo: signed sqrt)."""
    if signed_sqrt:
        score = math.copysign(math.sqrt(max(abs(score), 1e-6)), score) if score != 0 else 0.0
    return 1 / (1 + math.exp(-score))


def naive_engram(eng: Engram, x: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, float]:
    b, t, d = x.shape
    eps = eng.norm_h.eps
    wk, wv, table = eng.w_k.weight, eng.w_v.weight, eng.table.weight
    u = torch.zeros(b, t, d)
    alphas = []
    for bi in range(b):
        for ti in range(t):
            e = torch.cat([table[r] for r in naive_rows(eng, ids[bi].tolist(), ti)])
            k, v = wk @ e, wv @ e
            s = (rms(x[bi, ti], eng.norm_h.weight, eps) * rms(k, eng.norm_k.weight, eps)).sum()
            a = naive_gate(float(s) / math.sqrt(d), eng.signed_sqrt_gate)
            alphas.append(a)
            u[bi, ti] = a * v
    y = torch.zeros_like(u)
    w = eng.conv.weight[:, 0, :]  # [dim, K]
    kk, dil = eng.kernel_size, eng.dilation
    for bi in range(b):
        z = torch.stack([rms(u[bi, ti], eng.norm_conv.weight, eps) for ti in range(t)])
        for ti in range(t):
            acc = torch.zeros(d)
            for i in range(kk):
                src = ti - (kk - 1 - i) * dil
                if src >= 0:
                    acc += w[:, i] * z[src]
            y[bi, ti] = u[bi, ti] + acc * torch.sigmoid(acc)
    return y, sum(alphas) / len(alphas)


@pytest.mark.parametrize("gate", ["signed_sqrt", "plain"])
def test_gate_value_conv_match_naive_loop(gate):
    torch.manual_seed(0)
    eng = Engram(12, ecfg(ngram_orders=[2, 3], gate=gate), 0, 97).double()
    randomize(eng)
    x = torch.randn(2, 9, 12, dtype=torch.float64)
    ids = torch.randint(0, 97, (2, 9))
    ctx = ForwardContext(positions=torch.arange(9), input_ids=ids, step=0)
    with torch.no_grad():
        y = eng(x, ctx)
        ref, gate_mean = naive_engram(eng, x, ids)
    # RMSNorm computes in fp32 (norm.py), hence fp32-level agreement
    torch.testing.assert_close(y, ref.double(), rtol=1e-5, atol=1e-6)
    stats = ctx.mean_stats()
    assert stats["engram/gate_mean"] == pytest.approx(gate_mean, rel=1e-6)
    assert 0 <= stats["engram/bucket_collision_rate"] <= 1


def naive_engram_streams(eng: Engram, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The multi-stream layer position by position and stream by stream: own key slice and
    gains per stream, shared value, per-stream conv norm, conv over all n*dim channels."""
    b, t, n, d = x.shape
    eps = eng.norm_h.eps
    wk, wv, table = eng.w_k.weight, eng.w_v.weight, eng.table.weight
    gh, gk, gc = eng.norm_h.weight, eng.norm_k.weight, eng.norm_conv.weight
    part = lambda w, i: w[i * d:(i + 1) * d]  # noqa: E731
    u = torch.zeros(b, t, n, d, dtype=torch.float64)
    for bi in range(b):
        for ti in range(t):
            e = torch.cat([table[r] for r in naive_rows(eng, ids[bi].tolist(), ti)])
            v = wv @ e
            for i in range(n):
                k = part(wk, i) @ e
                s = (rms(x[bi, ti, i], part(gh, i), eps) * rms(k, part(gk, i), eps)).sum()
                u[bi, ti, i] = naive_gate(float(s) / math.sqrt(d), True) * v
    y = torch.zeros_like(u)
    w = eng.conv.weight[:, 0, :]  # [n*dim, K]
    kk, dil = eng.kernel_size, eng.dilation
    for bi in range(b):
        for i in range(n):
            z = torch.stack([rms(u[bi, ti, i], part(gc, i), eps) for ti in range(t)])
            for ti in range(t):
                acc = torch.zeros(d, dtype=torch.float64)
                for j in range(kk):
                    src = ti - (kk - 1 - j) * dil
                    if src >= 0:
                        acc += part(w, i)[:, j] * z[src]
                y[bi, ti, i] = u[bi, ti, i] + acc * torch.sigmoid(acc)
    return y


def test_streams_gate_each_stream_separately_match_naive_loop():
    torch.manual_seed(0)
    eng = Engram(12, ecfg(ngram_orders=[2, 3]), 0, 97, n_streams=3).double()
    assert eng.w_k.weight.shape == (36, eng.n_tables * 4) and eng.conv.weight.shape[0] == 36
    randomize(eng)
    x = torch.randn(2, 7, 3, 12, dtype=torch.float64)
    ids = torch.randint(0, 97, (2, 7))
    ctx = ForwardContext(positions=torch.arange(7), input_ids=ids, step=0)
    with torch.no_grad():
        y = eng(x, ctx)
        ref = naive_engram_streams(eng, x, ids)
        alpha = eng.gate(x, eng.w_k(eng.embed(ctx, 7, x.device)[2]).unflatten(-1, (3, 12)))
    # RMSNorm and the gate compute in fp32, hence fp32-level agreement
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    assert float((alpha[:, :, 0] - alpha[:, :, 1]).abs().max()) > 0.05  # gates differ per stream
    with pytest.raises(ValueError, match="streams"):
        eng(x[:, :, :2], ctx)


def test_one_stream_layer_on_streams_equals_the_plain_layer():
    torch.manual_seed(0)
    eng = Engram(12, ecfg(), 0, 97)
    randomize(eng)
    x = torch.randn(2, 9, 12)
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        plain = eng(x, ForwardContext(positions=torch.arange(9), input_ids=ids))
        streams = eng(x.unsqueeze(2), ForwardContext(positions=torch.arange(9), input_ids=ids))
    torch.testing.assert_close(streams[:, :, 0], plain, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_signed_sqrt_gate_matches_per_position_loop():
    """The gate alone, position by position, over scores from ~1e-8 to ~1 of both signs."""
    torch.manual_seed(0)
    eng = Engram(12, ecfg(), 0, 97)
    randomize(eng)
    k = torch.randn(3, 40, 12)
    v = k * eng.norm_h.weight * eng.norm_k.weight  # the score is linear in h along v
    v = v / v.norm(dim=-1, keepdim=True)
    h0 = torch.randn(3, 40, 12)
    size = torch.logspace(-7, 1, 40).view(1, 40, 1) * torch.sign(torch.randn(3, 40, 1))
    h = h0 - (h0 * v).sum(-1, keepdim=True) * v + size * v
    alpha = eng.gate(h, k)
    plain = Engram(12, ecfg(gate="plain"), 0, 97)
    plain.load_state_dict(eng.state_dict())
    alpha_plain = plain.gate(h, k)
    score32 = eng.gate_score(h, k)
    worst_score = worst_transform = worst_gate = 0.0
    scores = []
    for b in range(3):
        for t in range(40):
            hn = rms(h[b, t].double(), eng.norm_h.weight.double(), eng.norm_h.eps)
            kn = rms(k[b, t].double(), eng.norm_k.weight.double(), eng.norm_k.eps)
            score = float((hn * kn).sum()) / math.sqrt(12)
            scores.append(abs(score))
            worst_score = max(worst_score, abs(float(score32[b, t, 0]) - score))
            # the transform, on the module's own fp32 score
            worst_transform = max(worst_transform, abs(float(alpha[b, t, 0])
                                                       - naive_gate(float(score32[b, t, 0]), True)))
            # end to end where the square root's slope (1 / (2 sqrt|g|) <= 16) keeps the
            # fp32 round-off of g (~1e-7) small; near 0 that round-off can flip the sign of
            # g, and the gate moves by up to 2 * 0.25 * sqrt(1e-6) = 5e-4 (in the demo too)
            if abs(score) > 1e-3:
                worst_gate = max(worst_gate, abs(float(alpha[b, t, 0]) - naive_gate(score, True)))
            assert float(alpha_plain[b, t, 0]) == pytest.approx(naive_gate(score, False), abs=1e-6)
    assert min(scores) < 1e-6 and max(scores) > 0.3  # both sides of the 1e-6 floor covered
    print(f"score {worst_score:.1e}, transform {worst_transform:.1e}, gate {worst_gate:.1e}")
    assert worst_score < 1e-6 and worst_transform < 1e-6 and worst_gate < 1e-6
    assert float((alpha - alpha_plain).abs().max()) > 0.05  # the two gates differ
    assert float(eng.gate(torch.zeros(1, 1, 12), k[:1, :1])) == 0.5  # g = 0 stays 0


def test_no_stats_at_inference():
    eng = Engram(12, ecfg(), 0, 97).eval()
    ctx = ForwardContext(positions=torch.arange(5), input_ids=torch.randint(0, 97, (1, 5)))
    eng(torch.randn(1, 5, 12), ctx)
    assert ctx.stats == {}


# ---- in the model ----------------------------------------------------------------------------
def test_engram_off_is_the_plain_model():
    torch.manual_seed(0)
    plain = Transformer(model_cfg(EngramConfig(enabled=False)))
    torch.manual_seed(0)
    off = Transformer(model_cfg(ecfg(enabled=False, layers=[0, 1], table_size=101)))
    assert off.state_dict().keys() == plain.state_dict().keys()
    assert not any("engram" in k for k in off.state_dict())
    assert engram_params(off) == 0 and engram_table_params(off.cfg.engram) == 0
    ids = torch.randint(0, 97, (2, 12))
    torch.testing.assert_close(off(ids), plain(ids), rtol=0, atol=0)

    # an Engram whose value projection is zero adds nothing: same outputs as the plain model
    on = Transformer(model_cfg(ecfg(layers=[0, 1])))
    missing, unexpected = on.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(".engram." in k for k in missing)
    for blk in on.blocks:
        randomize(blk.engram)
        torch.nn.init.zeros_(blk.engram.w_v.weight)
    torch.testing.assert_close(on(ids), plain(ids), rtol=0, atol=0)
    randomize(on.blocks[1].engram.w_v, seed=5)
    assert not torch.allclose(on(ids), plain(ids))


@pytest.mark.parametrize("host_memory", [False, True])
def test_decode_token_by_token_equals_full_forward(host_memory):
    torch.manual_seed(0)
    cfg = ecfg(layers=[0, 1], ngram_orders=[2, 4], host_memory=host_memory)
    model = Transformer(model_cfg(cfg)).double().eval()
    for blk in model.blocks:
        randomize(blk.engram, seed=blk.layer_idx)  # non-zero conv weights
        blk.engram.double()
    ids = torch.randint(0, 97, (2, 21))
    with torch.no_grad():
        full = model(ids)
        caches = model.new_caches(2, 21)
        outs = [model.forward_cached(ids[:, :6], caches, 0, history=ids[:, :6])]
        for t in range(6, 21):
            outs.append(model.forward_cached(ids[:, t:t + 1], caches, t, history=ids[:, :t + 1]))
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-5, atol=1e-6)


def test_optimizer_group_of_the_table():
    model = Transformer(model_cfg(ecfg(lr_multiplier=7.5)))
    table = model.blocks[0].engram.table.weight
    groups = [g for g in model.optimizer_groups(0.1) if any(p is table for p in g["params"])]
    assert len(groups) == 1
    assert groups[0]["lr_multiplier"] == 7.5 and groups[0]["weight_decay"] == 0.0
    assert len(groups[0]["params"]) == 1  # only the table carries that multiplier


def test_param_accounting():
    cfg = ecfg(layers=[0, 1])
    model = Transformer(model_cfg(cfg))
    rows = sum(table_primes(cfg))
    assert engram_table_params(cfg) == 2 * rows * cfg.head_dim
    eng = model.blocks[0].engram
    assert eng.table.weight.shape == (rows, cfg.head_dim)
    assert eng.inactive_params_per_token() == (rows - 4) * cfg.head_dim
    per_layer = sum(p.numel() for p in eng.parameters())
    assert engram_params(model) == 2 * per_layer


def test_host_memory_prefetches_indices_once_and_matches(monkeypatch):
    torch.manual_seed(0)
    dev = Transformer(model_cfg(ecfg(layers=[0, 1])))
    host = Transformer(model_cfg(ecfg(layers=[0, 1], host_memory=True)))
    host.load_state_dict(dev.state_dict())
    calls = []
    original = Engram.hash_indices

    def counting(self, window):
        calls.append(self.layer_idx)
        return original(self, window)

    monkeypatch.setattr(Engram, "hash_indices", counting)
    ids = torch.randint(0, 97, (2, 10))
    ctx = ForwardContext(positions=torch.arange(10), step=0)
    out = host(ids, ctx)
    assert calls == [0, 1]  # once per layer, all before the first block ran
    assert set(ctx.prefetched) == {"engram.0", "engram.1"}
    torch.testing.assert_close(out, dev(ids), rtol=0, atol=0)
    out.sum().backward()
    assert host.blocks[0].engram.table.weight.grad is not None
    # the table ignores moves of the model (stays in host memory, in its own dtype)
    host.double()
    assert host.blocks[0].engram.table.weight.dtype == torch.float32
    assert host.blocks[0].engram.w_v.weight.dtype == torch.float64
    assert host(ids).dtype == torch.float64


def test_canonical_ids_shared_tokens_hash_alike():
    model = Transformer(model_cfg(ecfg()))
    canon = torch.arange(97)
    canon[50] = 10  # token 50 is a variant of token 10
    model.set_canonical_ids(canon)
    eng = model.blocks[0].engram
    assert torch.equal(model.state_dict()["blocks.0.engram.canonical_ids"], canon)
    a = torch.tensor([[3, 10, 4, 10]])
    b = torch.tensor([[3, 50, 4, 50]])
    assert torch.equal(eng.hash_indices(eng.window(a, 4)), eng.hash_indices(eng.window(b, 4)))
    with pytest.raises(ValueError, match="shape"):
        model.set_canonical_ids(torch.arange(10))
    with pytest.raises(ValueError, match="lie in"):
        model.set_canonical_ids(torch.arange(97) + 1)


# ---- bad configuration ----------------------------------------------------------------------
@pytest.mark.parametrize("kw, key", [
    (dict(ngram_orders=[1, 2]), "model.engram.ngram_orders=[1, 2]"),
    (dict(layers=[0, 2]), "model.engram.layers=[0, 2]"),
    (dict(layers=[-1]), "model.engram.layers=[-1]"),
    (dict(table_size=3, heads_per_order=4), "model.engram.table_size=3"),
    (dict(gate="sqrt"), "model.engram.gate='sqrt'"),
])
def test_bad_config_fails_before_training(kw, key):
    with pytest.raises(ConfigError) as err:
        Transformer(model_cfg(ecfg(**kw)))
    assert str(err.value).startswith(key) and "is not allowed" in str(err.value)
