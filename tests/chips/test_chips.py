"""Chip profiles: schema, host timing, numerics policy, roofline projection, CLI (v4lab.chips).

The model arithmetic the projection prices (params, KV bytes, FLOPs) is tested in
test_accounting.py."""

from __future__ import annotations

import copy
import json
import math
import time

import pytest
from omegaconf import OmegaConf

from v4lab import accounting, chips
from v4lab.chips import cli
from v4lab.chips import host as chip_host
from v4lab.errors import ConfigError
from v4lab.io import CONF_DIR, atomic_write_json
from v4lab.model import ModelConfig
from v4lab.modules.args import AttentionConfig, KVCacheConfig

ALL_CHIPS = ("nvidia_h800", "nvidia_h20", "nvidia_h100", "ascend_910b", "ascend_910c",
             "ascend_950", "cambricon_mlu590", "cambricon_mlu370", "cpu_host")

# measured just now on a quiet machine: good to use (not stale, not under load)
FAKE_HOST = {"cpu": "fake", "torch": "x", "threads": 1,
             "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "fp32_tflops": 0.1,
             "bf16_tflops": 0.05, "mem_tbps": 0.01, "memory_gb": 16.0, "busy_cpus": 0.0,
             "cores": 1, "load_per_core": 0.0}


@pytest.fixture(autouse=True)
def _host_cache(tmp_path, monkeypatch):
    """Every test gets its own host-peak cache, pre-filled with fake figures (no timing)."""
    monkeypatch.setenv("V4LAB_CACHE_DIR", str(tmp_path / "cache"))
    atomic_write_json(chips.host_cache_path(), {chips.host_key(): FAKE_HOST}, indent=1, sort_keys=True)


def _raw(name: str) -> dict:
    d = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "chip" / f"{name}.yaml"))
    assert isinstance(d, dict)
    return d


def _mla_cfg(**kw) -> ModelConfig:
    att = AttentionConfig(kind="mla", n_heads=4, q_lora_rank=24, kv_lora_rank=128,
                          qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                          **kw)
    return ModelConfig(vocab_size=64, dim=32, n_layers=2, ffn_dim=48, attention=att)


# ---- profiles and schema ---------------------------------------------------------------
def test_available_profiles_are_the_issue_list():
    assert set(chips.available_chips()) == set(ALL_CHIPS)


@pytest.mark.parametrize("name", ALL_CHIPS)
def test_every_profile_loads_with_sources(name):
    chip = chips.load_chip(name)
    assert chip.name == name
    assert chip.peak_flops() > 0
    for key, fig in chip.figures().items():
        assert fig.source.strip(), key
        assert fig.confidence in chips.CONFIDENCES, key
    # the chips study sweeps every profile
    from v4lab.studies import load_study

    assert name in load_study("chips", CONF_DIR.parent).sweep["chip"]


def test_unverified_and_roadmap_figures_are_marked():
    mlu590 = chips.load_chip("cambricon_mlu590")
    assert all(f.mark == "[unverified]" for f in mlu590.figures().values())
    a950 = chips.load_chip("ascend_950")
    assert "peak_tflops.fp8[roadmap]" in a950.marked_figures()
    assert chips.load_chip("nvidia_h100").marked_figures() == []


@pytest.mark.parametrize("drop", ["memory_gb", "hbm_tbps", "interconnect_gbps", "dtype_support"])
def test_missing_required_figure_fails_clearly(drop):
    d = _raw("nvidia_h800")
    del d[drop]
    with pytest.raises(ConfigError, match=rf"chip\.{drop} is missing in profile 'nvidia_h800'"):
        chips.ChipConfig.from_dict(d)


def test_missing_peak_and_missing_source_fail_clearly():
    d = _raw("ascend_910b")
    del d["peak_tflops"]["fp8"]
    with pytest.raises(ConfigError, match=r"chip\.peak_tflops\.fp8 is missing"):
        chips.ChipConfig.from_dict(d)
    d = _raw("ascend_910b")
    d["hbm_tbps"]["source"] = ""
    with pytest.raises(ConfigError, match=r"chip\.hbm_tbps\.source=''"):
        chips.ChipConfig.from_dict(d)


@pytest.mark.parametrize("value", [0.0, -5.0])
def test_zero_or_negative_peak_is_rejected(value):
    d = _raw("nvidia_h100")
    d["peak_tflops"]["bf16"]["value"] = value
    with pytest.raises(ConfigError, match=rf"chip\.peak_tflops\.bf16\.value={value!r} is not "
                                          r"allowed: a number > 0"):
        chips.ChipConfig.from_dict(d)


@pytest.mark.parametrize("key,value,match", [
    ("matmul_dtypes", ["bf16", "fp6"], r"chip\.matmul_dtypes='fp6' is not allowed: dtype names"),
    ("kv_dtypes", ["bf16", "nf4"], r"chip\.kv_dtypes='nf4' is not allowed: dtype names"),
    ("matmul_dtype", "fp8", r"chip\.matmul_dtype='fp8' is not allowed: one of the chip's"),
    ("on_unsupported", "ignore", r"chip\.on_unsupported='ignore' is not allowed"),
    ("kv_fallback_dtype", "fp8", r"chip\.kv_fallback_dtype='fp8' is not allowed"),
])
def test_unknown_dtypes_and_policies_are_rejected(key, value, match):
    d = _raw("ascend_910c")
    d[key] = value
    with pytest.raises(ConfigError, match=match):
        chips.ChipConfig.from_dict(d)


def test_unknown_peak_dtype_and_confidence_are_rejected():
    d = _raw("nvidia_h20")
    d["peak_tflops"]["tf32"] = {"value": 74, "source": "x", "confidence": "high"}
    with pytest.raises(ConfigError, match=r"chip\.peak_tflops='tf32' is not allowed"):
        chips.ChipConfig.from_dict(d)
    d = _raw("nvidia_h20")
    d["memory_gb"]["confidence"] = "sure"
    with pytest.raises(ConfigError, match=r"chip\.memory_gb\.confidence='sure'"):
        chips.ChipConfig.from_dict(d)


def test_wrong_type_and_unknown_key_name_the_key():
    d = _raw("nvidia_h20")
    d["memory_gb"]["value"] = "lots"
    with pytest.raises(ConfigError, match="memory_gb"):
        chips.ChipConfig.from_dict(d)
    d = _raw("nvidia_h20")
    d["hbm_tbs"] = 4
    with pytest.raises(ConfigError, match="hbm_tbs"):
        chips.ChipConfig.from_dict(d)


def test_unknown_chip_lists_available_profiles():
    with pytest.raises(ConfigError, match=r"chip='h9000' is not allowed: one of ascend_910b, "
                                          r"ascend_910c, .*nvidia_h800"):
        chips.load_chip("h9000")


def test_chip_schema_is_an_omegaconf_structured_config():
    """The run config can hold `chip: ChipConfig` (merged like the other sections)."""
    merged = OmegaConf.merge(OmegaConf.structured(chips.ChipConfig), _raw("ascend_910c"))
    chip = OmegaConf.to_object(merged).validate()
    assert chip.peak_tflops["bf16"].value == 752
    host = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(chips.ChipConfig),
                                               _raw("cpu_host")))
    with pytest.raises(ConfigError, match="missing"):
        copy.deepcopy(host).validate()  # figures come from the measurement
    assert host.resolve().peak_tflops["fp32"].value == FAKE_HOST["fp32_tflops"]


# ---- cpu_host measurement ---------------------------------------------------------------
def test_cpu_host_uses_cached_measurement_without_timing(monkeypatch):
    monkeypatch.setattr(chip_host, "_measure", lambda: pytest.fail("measured despite the cache"))
    chip = chips.load_chip("cpu_host")
    assert chip.peak_tflops["fp32"].value == 0.1 and chip.hbm_tbps.value == 0.01
    assert chip.matmul_dtype == "fp32" and "measured on this host" in chip.hbm_tbps.source


def test_host_measurement_runs_once_and_is_cached_atomically(monkeypatch, tmp_path):
    monkeypatch.setenv("V4LAB_CACHE_DIR", str(tmp_path / "fresh"))
    monkeypatch.setattr(chip_host, "load_now", lambda: (0.0, 1, 0.0))  # a quiet machine
    m = chips.measure_host()  # real timing, ~3 s
    assert m["fp32_tflops"] > 0 and m["bf16_tflops"] > 0 and m["mem_tbps"] > 0
    assert m["memory_gb"] > 0
    path = chips.host_cache_path()
    assert json.loads(path.read_text())[chips.host_key()] == m
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left
    monkeypatch.setattr(chip_host, "_measure", lambda: pytest.fail("measured twice"))
    assert chips.measure_host() == m


def _cache_with(record: dict) -> None:
    atomic_write_json(chips.host_cache_path(), {chips.host_key(): record}, indent=1, sort_keys=True)


def _fake_timing(monkeypatch) -> list[int]:
    """_measure replaced by a quiet-machine record with fp32 peak 0.2; returns a call log."""
    calls: list[int] = []

    def measure():
        calls.append(1)
        return {**FAKE_HOST, "fp32_tflops": 0.2,
                "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    monkeypatch.setattr(chip_host, "_measure", measure)
    return calls


def test_validating_a_run_config_measures_nothing_and_writes_no_file(monkeypatch, tmp_path):
    """Issue 13: config validation is pure; host peaks are measured when the run is built."""
    from v4lab.config import load_run_config
    from v4lab.io import compose

    monkeypatch.setenv("V4LAB_CACHE_DIR", str(tmp_path / "empty"))
    monkeypatch.setattr(chip_host, "_measure", lambda: pytest.fail("validation measured"))
    cfg = load_run_config(compose(["profile=smoke"]))
    assert cfg.chip.name == "cpu_host" and cfg.chip.measured and cfg.chip.peak_tflops == {}
    assert not (tmp_path / "empty").exists()  # no cache written
    # values that need no measurement are still checked
    with pytest.raises(ConfigError, match="chip.matmul_dtype"):
        load_run_config(compose(["profile=smoke", "chip.matmul_dtype=fp8"]))
    calls = _fake_timing(monkeypatch)
    model_cfg, matmul, _ = chips.build_numerics(cfg.chip, cfg.model)
    assert calls == [1] and cfg.chip.peak_tflops["fp32"].value == 0.2 and matmul == "fp32"
    assert chips.host_cache_path().is_file()


@pytest.mark.parametrize("days,retimed", [(29, False), (31, True)])
def test_stale_host_peaks_are_measured_again(monkeypatch, days, retimed):
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - days * 86400))
    _cache_with({**FAKE_HOST, "when": when})
    calls = _fake_timing(monkeypatch)
    m = chips.measure_host()
    assert bool(calls) == retimed and m["fp32_tflops"] == (0.2 if retimed else 0.1)
    assert json.loads(chips.host_cache_path().read_text())[chips.host_key()] == m


def test_old_cache_record_without_load_is_measured_again(monkeypatch):
    _cache_with({k: v for k, v in FAKE_HOST.items() if k not in ("load_per_core", "busy_cpus")})
    calls = _fake_timing(monkeypatch)
    assert chips.measure_host()["fp32_tflops"] == 0.2 and calls == [1]


def test_peaks_measured_under_load_are_marked_low_and_retimed_when_quiet(monkeypatch):
    """Issue 18: a record timed under load is used (marked low) while the machine is still
    busy, and timed again once it is quiet."""
    _cache_with({**FAKE_HOST, "load_per_core": 1.5, "busy_cpus": 4.0, "cores": 2})
    calls = _fake_timing(monkeypatch)
    monkeypatch.setattr(chip_host, "load_now", lambda: (3.0, 2, 1.0))  # still busy
    chip = chips.load_chip("cpu_host")
    assert calls == [] and chip.peak_tflops["fp32"].value == 0.1
    assert chip.peak_tflops["fp32"].confidence == "low" and "under load" in chip.hbm_tbps.source
    assert "peak_tflops.fp32[low]" in chip.marked_figures()
    cfg = _mla_cfg().validate()
    assert "peak_tflops.bf16[low]" in chips.chip_metrics(chip, cfg)["chip/marked_figures"]
    monkeypatch.setattr(chip_host, "load_now", lambda: (1.2, 2, 0.1))  # quiet now
    chip = chips.load_chip("cpu_host")
    assert calls == [1] and chip.peak_tflops["fp32"].value == 0.2
    assert chip.peak_tflops["fp32"].confidence == "medium" and chip.marked_figures() == []


def test_load_per_core_leaves_out_this_process(monkeypatch):
    monkeypatch.setattr(chip_host, "busy_cpus", lambda: 0.0)  # only this process running
    monkeypatch.setattr(chip_host, "usable_cpus", lambda: 2.0)
    assert chip_host.load_now() == (0.0, 2.0, 0.0)
    monkeypatch.setattr(chip_host, "busy_cpus", lambda: 2.0)
    assert chip_host.load_now()[2] == pytest.approx(1.0)


# ---- numerics ---------------------------------------------------------------------------
def test_fp8_kv_on_chip_without_fp8_is_an_error_naming_the_ways_out():
    cfg = _mla_cfg(kv_cache=KVCacheConfig(dtype="fp8")).validate()
    chip = chips.load_chip("ascend_910b")
    with pytest.raises(ConfigError) as e:
        chips.resolve_numerics(chip, cfg)
    msg = str(e.value)
    for part in ("ascend_910b", "'fp8'", "model.attention.kv_cache.dtype=int8",
                 "chip.on_unsupported=fallback"):
        assert part in msg


@pytest.mark.parametrize("name", ["ascend_910b", "ascend_910c"])
def test_fallback_uses_int8_on_ascend_and_records_it(name):
    cfg = _mla_cfg(kv_cache=KVCacheConfig(dtype="fp8")).validate()
    chip = chips.load_chip(name, on_unsupported="fallback")
    matmul, kv, notes = chips.resolve_numerics(chip, cfg)
    assert (matmul, kv) == ("bf16", "int8") and "fallback" in notes[0]
    m = chips.chip_metrics(chip, cfg)
    assert m["chip/kv_dtype_effective"] == "int8" and m["chip/kv_dtype_requested"] == "fp8"
    new_cfg, _, _ = chips.apply_numerics(chip, cfg)
    assert new_cfg.attention.kv_cache.dtype == "int8" and cfg.attention.kv_cache.dtype == "fp8"


def test_supported_dtype_passes_through_and_no_fallback_chip_says_so():
    cfg = _mla_cfg(kv_cache=KVCacheConfig(dtype="fp8")).validate()
    assert chips.resolve_numerics(chips.load_chip("nvidia_h800"), cfg)[:2] == ("bf16", "fp8")
    d = _raw("cambricon_mlu370")
    d["kv_fallback_dtype"], d["on_unsupported"] = None, "fallback"
    with pytest.raises(ConfigError, match="documents no fallback"):
        chips.resolve_numerics(chips.ChipConfig.from_dict(d), cfg)


def test_a_built_run_records_the_kv_dtype_it_uses():
    """Issue 13: config.yaml (asdict of the run config after build_numerics) holds the
    effective KV dtype; rebuilding from it (evaluate.load_run) changes nothing more."""
    from dataclasses import asdict

    from v4lab.config import load_run_config
    from v4lab.io import compose

    cfg = load_run_config(compose(["chip=ascend_910c", "chip.on_unsupported=fallback", "profile=smoke",
                                   "model.attention.kind=mla",
                                   "model.attention.kv_cache.dtype=fp8"]))
    requested = cfg.model
    cfg.model, matmul, notes = chips.build_numerics(cfg.chip, requested)
    assert (cfg.model.attention.kv_cache.dtype, matmul) == ("int8", "bf16") and "fallback" in notes[0]
    assert requested.attention.kv_cache.dtype == "fp8"  # chip/kv_dtype_requested comes from it
    saved = load_run_config(OmegaConf.create(asdict(cfg)))
    assert saved.model.attention.kv_cache.dtype == "int8"
    again, _, notes = chips.apply_numerics(saved.chip, saved.model)
    assert again == saved.model and notes == []


# ---- projection ---------------------------------------------------------------------------
def test_v3_pretraining_projection_lands_on_published_gpu_hours():
    """DeepSeek-V3: 14.8T tokens, 2.664M H800 GPU-hours. Assumed MFU: 0.40 of the dense
    bf16 peak (about 0.20 of the FP8 peak V3's FP8 GEMMs could reach)."""
    chip = chips.load_chip("nvidia_h800")
    assert chip.projection.train_mfu == 0.40
    cfg = chips.load_model_preset("v3_671b")
    r = chips.project(chip, cfg)
    assert r["bound_train"] == "compute"
    gpu_hours = 14.8e12 / r["train_tokens_per_s"] / 3600
    assert abs(gpu_hours / 2.664e6 - 1) < 0.10, gpu_hours


def test_projection_responds_to_switches():
    chip = chips.load_chip("nvidia_h800")
    base = chips.load_model_preset("v3_671b")
    dense = chips.project(chip, base)
    fp8 = copy.deepcopy(base)
    fp8.attention.kv_cache = KVCacheConfig(dtype="fp8")
    sparse = copy.deepcopy(fp8)
    sparse.attention.sparse.enabled = True
    r8, rs = chips.project(chip, fp8), chips.project(chip, sparse)
    L = 131072
    assert dense[f"bound_decode@{L}"] == "memory"
    assert r8[f"decode_tokens_per_s@{L}"] > dense[f"decode_tokens_per_s@{L}"]
    assert rs[f"decode_tokens_per_s@{L}"] > r8[f"decode_tokens_per_s@{L}"]
    # the indexer costs more than top-k saves at 4K tokens, far less at 128K
    assert (accounting.prefill_flops_per_token(sparse, L)
            < 0.5 * accounting.prefill_flops_per_token(base, L))
    # a slower chip is slower; more memory per device needs fewer devices
    h20 = chips.project(chips.load_chip("nvidia_h20"), base)
    assert h20["train_tokens_per_s"] < dense["train_tokens_per_s"]
    assert h20["devices_needed_weights"] < dense["devices_needed_weights"]
    for key, v in dense.items():
        assert isinstance(v, str) or (math.isfinite(v) and v >= 0), key


def test_engram_in_host_memory_leaves_device_memory():
    cfg = chips.load_model_preset("v4_flash")
    cfg.engram.enabled = True  # the preset's Engram sizes are an estimate, off by default
    on_host = accounting.param_counts(cfg)
    cfg.engram.host_memory = False
    on_device = accounting.param_counts(cfg)
    assert on_host["engram_table"] > 0
    assert on_device["device"] - on_host["device"] == on_host["engram_table"]
    assert on_host["total"] == on_device["total"]


def test_v4_flash_projection_works_and_prices_its_own_kv():
    """The v4_flash preset (V4 attention, mHC, MTP, hash-routed MoE) projects on a chip:
    every figure finite, KV per token the compressed entries' growth (21 CSA layers x
    (604 + 256) / 4 + 20 HCA layers x 604 / 128 B), the windows on top in the bytes held
    per sequence, and a decode step that reads far less than V3's dense MLA at 128K."""
    chip = chips.load_chip("nvidia_h800")
    cfg = chips.load_model_preset("v4_flash")
    r = chips.project(chip, cfg)
    for key, v in r.items():
        assert isinstance(v, str) or (math.isfinite(v) and v >= 0), key
    assert r["kv_bytes_per_token"] == 21 * (604 + 256) / 4 + 20 * 604 / 128
    assert r["params_total"] == accounting.param_counts(cfg)["total"]  # with the MTP module
    L = 131072
    assert accounting.kv_bytes_held(cfg, L) == (43 * 127 * 604 + 21 * (L // 4) * (604 + 256)
                                                + 20 * (L // 128) * 604)
    v3 = chips.project(chip, chips.load_model_preset("v3_671b"))
    assert r[f"decode_tokens_per_s@{L}"] > v3[f"decode_tokens_per_s@{L}"]
    assert r[f"mem_per_device_gb@{L}"] > 0


@pytest.mark.parametrize("experiment", ["v4", "no_csa", "no_window", "full", "baseline"])
def test_run_switches_priced_at_both_presets(experiment):
    """A lab experiment's switches at full size: a V4 run at v4_flash keeps V4 attention
    with the run's V4 switches; at v3_671b (no V4 sizes) it stays MLA; an MLA / MHA run at
    v4_flash uses the preset's MLA sizes. Every projection works."""
    from v4lab.config import load_run_config
    from v4lab.io import compose

    run = load_run_config(compose([f"+experiment={experiment}", "profile=smoke"])).model
    chip = chips.load_chip("nvidia_h800")
    flash = chips.with_switches(chips.load_model_preset("v4_flash"), run)
    v3 = chips.with_switches(chips.load_model_preset("v3_671b"), run)
    assert flash.attention.kind == run.attention.kind
    assert v3.attention.kind == ("mla" if run.attention.kind == "v4" else run.attention.kind)
    assert (flash.hc.enabled, flash.mtp.depth) == (run.hc.enabled, run.mtp.depth)
    if run.attention.kind == "v4":
        assert flash.attention.v4.use_window == run.attention.v4.use_window
        assert flash.attention.v4_cycle == run.attention.v4_cycle
        assert flash.attention.v4.head_dim == 512  # the preset's sizes
    for cfg in (flash, v3):
        r = chips.project(chip, cfg)
        assert all(isinstance(v, str) or math.isfinite(v) for v in r.values())
        assert r["params_total"] == accounting.param_counts(cfg)["total"]


def test_chip_metrics_are_flat_and_named():
    cfg = _mla_cfg().validate()
    presets = {"v3_671b": chips.load_model_preset("v3_671b")}
    m = chips.chip_metrics(chips.load_chip("ascend_910c"), cfg, presets)
    for key in ("chip/name", "chip/matmul_dtype", "chip/kv_dtype_effective",
                "chip/proj_train_tokens_per_s", "chip/bound_train",
                "chip/proj_decode_tokens_per_s@32768", "chip/proj_decode_tokens_per_s@131072",
                "chip/devices_needed@32768", "chip/mem_per_device_gb@131072",
                "chip/v3_671b/proj_train_tokens_per_s", "chip/v3_671b/params_total",
                "chip/v3_671b/devices_needed@131072"):
        assert key in m, key
    assert all(isinstance(v, (str, float)) for v in m.values())
    assert m["chip/v3_671b/params_total"] < 700e9  # run switches (no MoE) priced at V3 size


# ---- CLI ------------------------------------------------------------------------------------
def test_cli_prints_projection_table(capsys):
    assert cli.main(["chip=ascend_910b", "chip.on_unsupported=fallback"]) == 0
    out = capsys.readouterr().out
    assert "ascend_910b" in out and "v3_671b" in out and "v4_flash" in out
    assert "[low]" in out  # the 910B's low-confidence figures are marked


def test_cli_unknown_chip_lists_profiles(capsys):
    assert cli.main(["chip=h9000"]) == 2
    out = capsys.readouterr().out
    assert "h9000" in out and "ascend_910c" in out and "cpu_host" in out


def test_cli_bad_value_fails_before_anything_runs(capsys):
    assert cli.main(["chip=nvidia_h100", "chip.peak_tflops.bf16.value=-1"]) == 2
    assert "chip.peak_tflops.bf16.value=-1.0 is not allowed" in capsys.readouterr().out


def test_cli_fp8_kv_on_ascend_errors_then_falls_back(capsys):
    mla_fp8 = ["model.attention.kind=mla", "model.attention.kv_cache.dtype=fp8"]
    assert cli.main(["chip=ascend_910c", *mla_fp8]) == 2  # the profile alone: an error
    out = capsys.readouterr().out
    assert "ascend_910c" in out and "chip.on_unsupported=fallback" in out
    # opting into the documented fallback, as the chips study does
    assert cli.main(["chip=ascend_910c", "chip.on_unsupported=fallback", *mla_fp8]) == 0
    out = capsys.readouterr().out
    assert "KV cache int8" in out and "fallback" in out


def test_cli_unknown_experiment_is_a_clear_error(capsys):
    assert cli.main(["+experiment=nowhere"]) == 2
    assert "nowhere" in capsys.readouterr().out
