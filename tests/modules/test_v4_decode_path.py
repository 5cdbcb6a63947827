"""The V4 attention's one-token decode path (V4Attention._decode_one) and its cache store.

Decoding one token without autograd takes a path of its own (fused projections, complex
RoPE in place, no masks, top-k gathered). These tests check (a) that it is the path decoding
takes, and only then; (b) that it gives the general path's outputs, token after token, for
every switch and cache format; (c) that the entry store's spare-room buffers hold exactly
what a plain list of appended entries would (a naive model of append / keep_last).

Tolerance: the two paths compute the same sums in a different order (one matmul for all
projections of x, complex products for RoPE): fp32 round-off, ~1e-7 relative on O(1)
outputs; atol 1e-5 as in the other decode tests. With rounded caches (bf16, fp8) a
round-off difference can move a stored value across a rounding boundary, so those cases
compare the full forward with the cache stored in the same format (test_v4_attention's
test) and here only check the path is taken.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from v4_reference import DIM, M_HCA, TOPK, make_layer

from v4lab.modules.v4_cache import EntryStore, round_entries

SWITCHES = [dict(use_window=w, sink=s, overlap=o, csa_topk=k)
            for w, s, o, k in itertools.product([True, False], [True, False], [True, False], [1, TOPK])]
CASES = [pytest.param(kind, flags, id=f"{kind}-" + "-".join(f"{k}={v}" for k, v in flags.items()))
         for kind in ("sliding", "csa", "hca") for flags in SWITCHES
         if not (kind == "sliding" and not flags["use_window"])]


def decode(layer, x: torch.Tensor, general: bool = False) -> tuple[torch.Tensor, int]:
    """Token-by-token outputs and how many steps took the one-token path."""
    layer = copy.deepcopy(layer)
    taken = []
    lean = layer._decode_one
    layer._decode_one = lambda *a: taken.append(1) or lean(*a)
    if general:
        layer._lean_decode_applies = lambda x: False
    cache = layer.new_cache()
    with torch.no_grad():
        out = torch.cat([layer(x[:, t:t + 1], cache=cache) for t in range(x.shape[1])], 1)
    return out, len(taken)


@pytest.mark.parametrize("kind,flags", CASES)
def test_one_token_path_equals_general_path(kind, flags):
    layer = make_layer(kind, 50, **flags)
    x = torch.randn(2, 4 * M_HCA + 5, DIM, generator=torch.Generator().manual_seed(51))
    lean, n_lean = decode(layer, x)
    general, n_general = decode(layer, x, general=True)
    assert n_lean == x.shape[1] and n_general == 0
    torch.testing.assert_close(lean, general, atol=1e-5, rtol=0)


@pytest.mark.parametrize("fmt", ["bf16", "fp8"])
def test_one_token_path_serves_rounded_caches(fmt):
    layer = make_layer("csa", 52, kv_dtype=fmt, kv_block=4)
    x = torch.randn(1, 3 * M_HCA, DIM, generator=torch.Generator().manual_seed(53))
    _, n = decode(layer, x)
    assert n == x.shape[1]


def test_general_path_when_autograd_or_autocast_or_fp4_indexer():
    """Training-time calls (autograd), bf16 autocast and the FP4 indexer fake quantiser keep
    the general path: the one-token path has no graph-safe in-place ops, no bf16 RoPE and
    no indexer quantiser."""
    layer = make_layer("csa", 54)
    x = torch.randn(1, 1, DIM)
    assert torch.is_grad_enabled() and not layer._lean_decode_applies(x)
    with torch.no_grad():
        assert layer._lean_decode_applies(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not layer._lean_decode_applies(x)
        assert not layer._lean_decode_applies(x.bfloat16())
        layer.indexer.qk_quant = torch.nn.Identity()
        assert not layer._lean_decode_applies(x)


def test_cache_snapshots_the_weights_of_its_first_step():
    """A cache keeps the matrices it first decoded with (its keys were computed with them);
    a new cache after a weight change reads the new weights."""
    layer = make_layer("hca", 56)
    x = torch.randn(1, 3, DIM, generator=torch.Generator().manual_seed(57))
    with torch.no_grad():
        cache = layer.new_cache()
        layer(x[:, :1], cache=cache)
        kept = cache.decode_weights["x"]
        layer.wq_a.weight.mul_(2.0)
        layer(x[:, 1:2], cache=cache)
        assert cache.decode_weights["x"] is kept
        fresh = layer.new_cache()
        layer(x[:, :1], cache=fresh)
        torch.testing.assert_close(fresh.decode_weights["x"][:, :layer.wq_a.weight.shape[0]],
                                   layer.wq_a.weight.t())


@pytest.mark.parametrize("fmt", ["fp32", "bf16", "fp8"])
def test_entry_store_holds_what_a_list_would(fmt):
    """Random appends of 0-9 entries and keep_last calls (forcing compactions and growth):
    read() equals the rounding of the entries a plain list keeps, and gather() picks rows
    of it; nbytes counts the held entries only."""
    gen = torch.Generator().manual_seed(58)
    store, held = EntryStore(fmt, rope_dim=8, block=8), []
    for step in range(60):
        new = torch.randn(2, int(torch.randint(0, 10, (1,), generator=gen)), 24, generator=gen)
        store.append(new)
        held += list(new.unbind(1))
        if step % 3 == 2:
            keep = int(torch.randint(1, 20, (1,), generator=gen))
            store.keep_last(keep)
            held = held[-keep:]
        assert len(store) == len(held)
        if held:
            want = round_entries(torch.stack(held, 1), fmt, 8, 8)
            assert torch.equal(store.read(), want)
            idx = torch.randint(0, len(held), (2, 3), generator=gen)
            assert torch.equal(store.gather(idx), want[torch.arange(2)[:, None], idx])
            assert store.nbytes() == len(held) * 2 * store.bytes_per_entry()
