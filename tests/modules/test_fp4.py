"""MXFP4 fake quantisation (v4lab.modules.fp4): the 16 e2m1 codes and their midpoints,
torch's float4_e2m1fn_x2 encoding and MX reference, block scales, straight-through gradient,
QAT / post-hoc application to routed experts."""

from __future__ import annotations

import ast
import itertools
import math
from pathlib import Path

import pytest
import torch

from conftest import deterministic
from v4lab.errors import ConfigError
from v4lab.modules.fp4 import (
    FakeFP4,
    apply_fp4_qat,
    e2m1_round,
    fake_fp4,
    mx_block_exponent,
    mxfp4_quantize,
    quantize_fp4_,
)

# The 16 e2m1 codes, written from the bit layout s|e1 e0|m (bias 1; e = 0 is subnormal:
# 0.m * 2^0), independently of the implementation.
CODES = {}
for bits in range(16):
    s, e, m = bits >> 3, (bits >> 1) & 3, bits & 1
    mag = (m * 0.5) if e == 0 else (1 + m * 0.5) * 2.0 ** (e - 1)
    CODES[bits] = -mag if s else mag
MAGS = sorted({abs(v) for v in CODES.values()})


def test_code_table_is_the_spec():
    assert MAGS == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    assert len(CODES) == 16


def test_every_code_round_trips_exactly():
    vals = torch.tensor(list(CODES.values()))
    out = e2m1_round(vals)
    assert torch.equal(out, vals)
    assert torch.equal(torch.signbit(out), torch.signbit(vals))  # -0 stays -0


def _even(mag: float) -> bool:
    """The code with mantissa bit 0."""
    bits = next(b for b, v in CODES.items() if v == mag and b < 8)
    return bits & 1 == 0


def test_every_midpoint_ties_to_the_even_code_and_neighbours_round_to_nearest():
    for lo, hi in itertools.pairwise(MAGS):
        mid = (lo + hi) / 2
        even = lo if _even(lo) else hi
        assert _even(lo) != _even(hi)
        for sign in (1.0, -1.0):
            got = e2m1_round(torch.tensor([sign * mid]))
            assert got.item() == sign * even, (lo, hi)
            below = torch.nextafter(torch.tensor(sign * mid), torch.tensor(sign * lo))
            above = torch.nextafter(torch.tensor(sign * mid), torch.tensor(sign * hi))
            assert e2m1_round(below).item() == sign * lo
            assert e2m1_round(above).item() == sign * hi
    # measured ties: 0.25->0, 0.75->1, 1.25->1, 1.75->2, 2.5->2, 3.5->4, 5->4
    ties = e2m1_round(torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]))
    assert ties.tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]


def test_beyond_six_saturates():
    x = torch.tensor([6.0, 6.5, 7.0, 7.999, 8.0, 1e30, -7.0, -1e30])
    assert e2m1_round(x).tolist() == [6.0, 6.0, 6.0, 6.0, 6.0, 6.0, -6.0, -6.0]


def test_matches_a_brute_force_nearest_search():
    """Dense sweep of [-8, 8]: nearest grid value by exhaustive search over the 16 codes,
    ties broken toward the even code, saturating."""
    torch.manual_seed(0)
    x = torch.cat([torch.arange(-8 * 256, 8 * 256 + 1) / 256, torch.randn(2000) * 3])
    grid = torch.tensor(sorted(set(CODES.values())))
    even = torch.tensor([_even(abs(v)) for v in grid.tolist()])
    d = (x[:, None] - grid[None]).abs()
    best = d.min(dim=1, keepdim=True).values
    cand = d == best
    pick = torch.where(cand.sum(1) > 1, (cand & even).float().argmax(1), cand.float().argmax(1))
    assert torch.equal(e2m1_round(x), grid[pick])


# ---- torch's own float4 e2m1 encoding --------------------------------------------------------

def _torch_mx_reference():
    """torch 2.13's float4_e2m1fn_x2 has no CPU cast (copy_kernel is not implemented for it),
    but torch ships its own reference encoder and MX quantiser in
    torch/testing/_internal/common_quantized.py (from torchao). That module imports test
    dependencies this environment lacks (expecttest), so the few functions are taken from
    its source by name and run in a namespace of their own."""
    src_path = Path(torch.__file__).parent / "testing/_internal/common_quantized.py"
    tree = ast.parse(src_path.read_text())
    wanted = {"_n_ones", "_f32_to_floatx_unpacked", "down_size", "pack_uint4",
              "_bfloat16_to_float4_e2m1fn_x2", "to_mxfp"}
    consts = {"EBITS_F32", "MBITS_F32", "F32_EXP_BIAS", "FP4_EBITS", "FP4_MBITS"}
    body = [n for n in tree.body
            if (isinstance(n, ast.FunctionDef) and n.name in wanted)
            or (isinstance(n, ast.Assign) and any(
                isinstance(t, (ast.Name, ast.Tuple)) and
                ({t.id} if isinstance(t, ast.Name) else {e.id for e in t.elts}) & consts
                for t in n.targets))]
    ns = {"torch": torch, "Tensor": torch.Tensor}
    exec(compile(ast.Module(body=body, type_ignores=[]), str(src_path), "exec"), ns)
    assert wanted <= ns.keys()
    return ns


def _decode_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """float4_e2m1fn_x2 bytes -> float32 values: low nibble first, via the code table."""
    u = packed.view(torch.uint8).reshape(-1).long()
    codes = torch.stack([u & 0xF, u >> 4], dim=1).reshape(-1)
    table = torch.tensor([CODES[b] for b in range(16)])
    return table[codes]


def test_cpu_cast_to_float4_is_not_available_in_this_torch():
    """Documents why the comparison below goes through torch's reference encoder: if a
    future torch adds the CPU cast, this test fails and the direct cast should be used."""
    assert hasattr(torch, "float4_e2m1fn_x2")
    with pytest.raises((NotImplementedError, RuntimeError)):
        torch.zeros(2).to(torch.float4_e2m1fn_x2)


def test_rounding_matches_torchs_float4_e2m1_encoder():
    ref = _torch_mx_reference()
    torch.manual_seed(1)
    mids = torch.tensor([(a + b) / 2 for a, b in itertools.pairwise(MAGS)])
    x = torch.cat([torch.arange(-8 * 64, 8 * 64) / 64, mids, -mids, torch.randn(4000) * 2.5,
                   torch.tensor(list(CODES.values()))])
    x = x[: x.numel() // 2 * 2]
    unpacked = ref["_f32_to_floatx_unpacked"](x.float(), 2, 1)   # uint8 codes, one a byte
    packed = ref["pack_uint4"](unpacked).view(torch.float4_e2m1fn_x2)
    assert packed.dtype == torch.float4_e2m1fn_x2 and packed.numel() == x.numel() // 2
    theirs = _decode_nibbles(packed)
    ours = e2m1_round(x)
    # compare values (torch's encoder maps -0.0 to code 8, ours keeps -0.0: same number)
    assert torch.equal(ours, theirs)


def test_mx_quantisation_matches_torchs_to_mxfp_with_the_ceil_rule():
    """torch's reference MX quantiser uses X = ceil(log2(amax / 6)) (its RCEIL mode); our
    ``rule='ceil'`` must give the same scales and values. Inputs are bf16 numbers (the
    reference casts to bf16 before encoding), blocks of very different magnitude."""
    ref = _torch_mx_reference()
    torch.manual_seed(2)
    w = (torch.randn(6, 128) * torch.logspace(-6, 6, 6)[:, None]).bfloat16().float()
    w[0, :32] = 0.0  # an all-zero block
    scale_e8m0, data = ref["to_mxfp"](w, block_size=32, format="mxfp4")
    x = scale_e8m0.view(torch.uint8).float() - 127
    theirs = (_decode_nibbles(data).view(6, 4, 32) * torch.exp2(x)[..., None]).view(6, 128)
    ours = mxfp4_quantize(w, rule="ceil")
    nonzero = w.view(6, 4, 32).abs().amax(-1) > 0
    amax = w.view(6, 4, 32).abs().amax(-1)
    assert torch.equal(mx_block_exponent(amax, "ceil")[nonzero], x[nonzero])
    assert torch.equal(ours, theirs)


# ---- blocks and scales ----------------------------------------------------------------------

def test_ocp_scale_is_floor_log2_amax_minus_2():
    """OCP MX v1.0: X = floor(log2(amax)) - emax(e2m1) = floor(log2 amax) - 2, so
    amax / 2^X is in [4, 8); checked at and around every power of two in a wide range."""
    p = torch.arange(-60, 61).float()
    amax = torch.cat([torch.exp2(p), torch.exp2(p) * 1.5, torch.nextafter(torch.exp2(p), torch.zeros(1))])
    x = mx_block_exponent(amax, "ocp")
    ratio = amax / torch.exp2(x)
    assert ((ratio >= 4) & (ratio < 8)).all()
    assert torch.equal(x, torch.floor(torch.log2(amax.double())).float() - 2)


def test_block_round_trip_against_a_per_block_loop():
    """Naive loop: per block of 32 along dim 1 of a [E, n, m] stack, scale from amax,
    nearest code by exhaustive search (ties to even) with saturation."""
    torch.manual_seed(3)
    w = torch.randn(2, 64, 5) * torch.tensor([1e-3, 10.0])[:, None, None]
    w[1, 3, 2] = 0.0
    out = mxfp4_quantize(w, dim=1)
    grid = sorted(set(CODES.values()))
    for e, j, b in itertools.product(range(2), range(5), range(2)):
        blk = w[e, b * 32:(b + 1) * 32, j]
        amax = blk.abs().max().item()
        scale = 2.0 ** (int(torch.floor(torch.log2(torch.tensor(amax, dtype=torch.float64)))) - 2)
        for i, v in enumerate(blk.tolist()):
            y = v / scale
            dist = [abs(y - g) for g in grid]
            best = min(dist)
            ties = [g for g, d in zip(grid, dist) if d == best]
            q = ties[0] if len(ties) == 1 else next(g for g in ties if _even(abs(g)))
            assert out[e, b * 32 + i, j].item() == q * scale, (e, b, i)
    # quantising along dim 1 == transposing, quantising the last dim, transposing back
    assert torch.equal(out, mxfp4_quantize(w.transpose(1, 2), dim=-1).transpose(1, 2))


def test_quantised_weights_are_codes_times_a_power_of_two_and_idempotent():
    torch.manual_seed(4)
    w = torch.randn(8, 96)
    q = mxfp4_quantize(w)
    assert torch.equal(mxfp4_quantize(q), q)
    amax = w.view(8, 3, 32).abs().amax(-1, keepdim=True)
    codes = q.view(8, 3, 32) / torch.exp2(mx_block_exponent(amax))
    assert torch.isin(codes, torch.tensor(list(CODES.values()))).all()
    assert mxfp4_quantize(w.bfloat16()).dtype == torch.bfloat16


def test_block_size_must_divide_the_dim():
    with pytest.raises(ConfigError, match="fp4.block_size=32 .*has 48 entries"):
        mxfp4_quantize(torch.randn(4, 48))
    mxfp4_quantize(torch.randn(4, 48), block=16)


def test_gradient_is_the_identity():
    torch.manual_seed(5)
    w = torch.randn(3, 64, requires_grad=True)
    upstream = torch.randn(3, 64)
    out = fake_fp4(w)
    assert torch.equal(out.detach(), mxfp4_quantize(w.detach()))
    out.backward(upstream)
    assert torch.equal(w.grad, upstream)


# ---- applying it to routed experts ----------------------------------------------------------

def _moe_model(expert_dim=32):
    from v4lab.model import ModelConfig, Transformer
    from v4lab.modules.args import MoEConfig

    torch.manual_seed(6)
    cfg = ModelConfig(vocab_size=64, dim=64, n_layers=2, ffn_dim=64, max_seq_len=16,
                      moe=MoEConfig(enabled=True, n_routed_experts=4, top_k=2,
                                    expert_dim=expert_dim, first_dense_layers=1))
    return Transformer(cfg)


def test_qat_forward_equals_posthoc_weights_and_trains_the_full_precision_copy():
    import copy

    model = _moe_model()
    posthoc = copy.deepcopy(model)
    assert quantize_fp4_(posthoc) == 3
    fakes = apply_fp4_qat(model)
    assert len(fakes) == 3 and all(isinstance(f, FakeFP4) for f in fakes)
    ids = torch.randint(0, 64, (2, 12))
    model.eval()
    posthoc.eval()
    assert torch.equal(model(ids), posthoc(ids))
    experts = model.blocks[1].ffn.experts
    original = experts.parametrizations.w1.original
    assert not torch.equal(original, experts.w1)            # full precision kept
    assert torch.equal(experts.w1, mxfp4_quantize(original, dim=1))
    model.train()
    model(ids).logsumexp(-1).mean().backward()
    assert original.grad is not None and original.grad.abs().sum() > 0
    for f in fakes:                                           # switched off: the plain model
        f.enabled = False
    assert torch.equal(experts.w1, original)


def test_qat_expert_stacks_still_go_to_muon():
    from v4lab.optim import split_params

    model = _moe_model()
    apply_fp4_qat(model)
    muon, adamw = split_params(model)
    names = {n for n, _ in muon}
    assert {f"blocks.1.ffn.experts.parametrizations.{w}.original" for w in ("w1", "w2", "w3")} <= names
    assert len(muon) + len(adamw) == len(list(model.parameters()))


def test_fp4_bad_input_errors():
    with pytest.raises(ConfigError, match="fp4.block_size=32 .*experts.w2"):
        apply_fp4_qat(_moe_model(expert_dim=48))            # w2's input dim is 48
    from v4lab.model import ModelConfig, Transformer

    dense = Transformer(ModelConfig(vocab_size=64, dim=32, n_layers=1, ffn_dim=32, max_seq_len=8))
    with pytest.raises(ConfigError, match="fp4.targets"):
        apply_fp4_qat(dense)
    with pytest.raises(ConfigError, match="fp4.targets='indexer'"):
        apply_fp4_qat(_moe_model(), targets=("indexer",))
    with pytest.raises(ConfigError, match="fp4.scale_rule"):
        FakeFP4(dim=1, rule="round")


# ---- trainer.quantize end to end (smoke size) -------------------------------------------------



def test_trainer_quantize_is_validated():
    from v4lab.config import TrainerConfig, load_run_config
    from v4lab.io import compose

    with pytest.raises(ConfigError, match="trainer.quantize='int4'"):
        TrainerConfig(quantize="int4").validate()
    with pytest.raises(ConfigError, match="trainer.qat_start=1.5"):
        TrainerConfig(qat_start=1.5).validate()
    with pytest.raises(ConfigError, match="trainer.quantize='fp4_qat'.*enable model.moe"):
        load_run_config(compose(["+experiment=baseline", "trainer.quantize=fp4_qat"]))


@pytest.fixture(scope="module")
def qat_runs(tmp_path_factory, smoke_overrides):
    """Smoke runs: plain, QAT from step 6 of 12, post-hoc."""
    from v4lab.io import compose
    from v4lab.train import train

    out = {}
    for mode in ("none", "fp4_qat", "fp4_posthoc"):
        run_dir = tmp_path_factory.mktemp(mode)
        cfg = compose(["+experiment=baseline", "model.moe.enabled=true", *smoke_overrides,
                       f"trainer.quantize={mode}", "trainer.qat_start=0.5"])
        out[mode] = (run_dir, train(cfg, run_dir))
    return out


def test_qat_and_posthoc_runs_train_and_differ_from_full_precision(qat_runs):
    plain = qat_runs["none"][1]
    for mode in ("fp4_qat", "fp4_posthoc"):
        run_dir, m = qat_runs[mode]
        assert m["train/steps"] == 12 and m["val/loss"] < math.log(512)
        assert m["val/loss"] != plain["val/loss"], mode
    assert qat_runs["fp4_qat"][1]["train/loss"] != plain["train/loss"]  # QAT trained through FP4
    # post-hoc trains exactly the plain model: same training loss, different evaluation
    assert qat_runs["fp4_posthoc"][1]["train/loss"] == plain["train/loss"]
    # checkpoints keep full-precision master weights (not on the e2m1 grid)
    ckpt = torch.load(qat_runs["fp4_posthoc"][0] / "checkpoints" / "last.ckpt", weights_only=False)
    w1 = ckpt["state_dict"]["model.blocks.1.ffn.experts.w1"]
    assert not torch.equal(w1, mxfp4_quantize(w1, dim=1))
    qat = torch.load(qat_runs["fp4_qat"][0] / "checkpoints" / "last.ckpt", weights_only=False)
    assert "model.blocks.1.ffn.experts.parametrizations.w1.original" in qat["state_dict"]


def test_qat_kill_and_resume_across_the_switch_equals_uninterrupted(qat_runs, tmp_path,
                                                                    smoke_overrides):
    """Killed after step 7, resumed from the step-4 checkpoint: QAT switches on at step 6
    in the resumed part; the final metrics equal the uninterrupted run's."""
    from conftest import Crash
    from v4lab.io import compose
    from v4lab.train import train

    cfg = compose(["+experiment=baseline", "model.moe.enabled=true", *smoke_overrides,
                   "trainer.quantize=fp4_qat", "trainer.qat_start=0.5"])
    run_dir = tmp_path / "resumed"
    with pytest.raises((KeyboardInterrupt, SystemExit, Exception)):
        train(cfg, run_dir, extra_callbacks=[Crash(at=7)])
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 4
    resumed = train(cfg, run_dir)
    assert deterministic(resumed) == deterministic(qat_runs["fp4_qat"][1])
