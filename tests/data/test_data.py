"""Corpus preparation and data order."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT
from v4lab.data.config import DataConfig
from v4lab.data.datamodule import ResumableSampler, TrainWindows
from v4lab.data.prepare import (
    DataError,
    collect_files,
    prepare,
    prepared_dir,
    split_of,
    token_byte_lengths,
    unigram_bpb,
    verify,
)

INCLUDE = ["json/*.py", "email/*.py", "http/*.py", "urllib/*.py", "xml/dom/*.py", "logging/*.py"]


@pytest.fixture(scope="module")
def prepared(data_root):
    cfg = DataConfig(include=INCLUDE, vocab_size=512, root=str(data_root))
    return cfg, prepare(cfg, log=lambda *_: None)


def test_manifest_records_source_counts_and_digests(prepared):
    cfg, folder = prepared
    m = json.loads((folder / "manifest.json").read_text())
    assert m["source"] == "stdlib" and m["python_version"].count(".") == 2
    assert len(m["corpus_sha256"]) == 64
    files = collect_files(cfg)
    assert sum(s["files"] for s in m["splits"].values()) == len(files)
    for split in ("train", "val", "test"):
        tokens = np.fromfile(folder / f"{split}.bin", dtype=np.uint16)
        assert len(tokens) == m["splits"][split]["tokens"] > 0


def test_token_bytes_add_up_to_the_text_bytes(prepared):
    _, folder = prepared
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    lengths = token_byte_lengths(tok)
    text = 'def f(x):\n    return {"ü": x}  # naïve\n'
    ids = tok.encode(text).ids
    assert lengths[ids].sum() == len(text.encode())
    assert tok.decode(ids) == text


def test_split_is_a_stable_function_of_the_path():
    assert split_of("json/decoder.py", 0.05, 0.05) == split_of("json/decoder.py", 0.05, 0.05)
    splits = [split_of(f"pkg/m{i}.py", 0.1, 0.1) for i in range(2000)]
    assert 0.07 < splits.count("val") / 2000 < 0.13 and 0.07 < splits.count("test") / 2000 < 0.13


def test_prepare_is_idempotent_and_detects_corruption(prepared):
    cfg, folder = prepared
    before = (folder / "train.bin").stat().st_mtime_ns
    assert prepare(cfg, log=lambda *_: None) == folder
    assert (folder / "train.bin").stat().st_mtime_ns == before  # reused, not rewritten
    corrupt = folder.parent / "corrupt-copy"
    shutil.rmtree(corrupt, ignore_errors=True)
    shutil.copytree(folder, corrupt)
    with open(corrupt / "val.bin", "r+b") as f:
        f.write(b"\xff\xff")
    with pytest.raises(DataError, match="val.bin is corrupt.*python -m v4lab.data.prepare"):
        verify(corrupt)
    (corrupt / "manifest.json").unlink()
    with pytest.raises(DataError, match="not found.*prepare"):
        verify(corrupt)


def test_other_source_directory_and_missing_source(tmp_path):
    src = tmp_path / "code"
    for i in range(60):
        (src / f"pkg{i % 3}").mkdir(parents=True, exist_ok=True)
        (src / f"pkg{i % 3}" / f"m{i}.py").write_text(f"def f{i}(x):\n    return x * {i}\n" * 20)
    cfg = DataConfig(source=str(src), vocab_size=300, root=str(tmp_path / "data"),
                     val_fraction=0.2, test_fraction=0.2)
    folder = prepare(cfg, log=lambda *_: None)
    assert folder == prepared_dir(cfg) and folder.name.startswith("code-v300-")
    with pytest.raises(DataError, match="data.source='/nonexistent' is not a directory"):
        prepare(DataConfig(source="/nonexistent", root=str(tmp_path)), log=lambda *_: None)


def test_unigram_bpb_matches_a_naive_computation():
    rng = np.random.default_rng(0)
    token_bytes = np.array([0, 1, 2, 3, 1], dtype=np.int64)  # token 0 is special
    train = rng.integers(0, 5, 500).astype(np.uint16)
    ev = rng.integers(0, 5, 200).astype(np.uint16)
    counts = {t: 1 + int((train == t).sum()) for t in range(5)}
    total = sum(counts.values())
    bits = sum(-math.log2(counts[int(t)] / total) for t in ev if t != 0)
    nbytes = sum(int(token_bytes[int(t)]) for t in ev)
    assert unigram_bpb(train, ev, token_bytes) == pytest.approx(bits / nbytes, rel=1e-12)


def test_training_windows_are_a_seeded_function_of_the_sample_index():
    tokens = np.arange(1000, dtype=np.uint16)
    a, b = TrainWindows(tokens, 9, 300, seed=3), TrainWindows(tokens, 9, 300, seed=3)
    order = [int(a[i][0][0]) for i in range(300)]
    assert order == [int(b[i][0][0]) for i in reversed(range(300))][::-1]  # any access order
    first_pass = sorted(order[: a.n_slots])
    assert first_pass == list(range(0, a.n_slots * 9, 9))  # every slot once per pass
    assert order != [int(TrainWindows(tokens, 9, 300, seed=4)[i][0][0]) for i in range(300)]
    window, answer_len = a[5]
    assert torch.equal(window[1:], window[:-1] + 1) and answer_len == 0  # contiguous, corpus


def test_resumable_sampler_skips_consumed_samples_and_keeps_epoch_length():
    s = ResumableSampler(10, start=4)
    assert list(s) == [4, 5, 6, 7, 8, 9] and len(s) == 10


@pytest.mark.process
def test_prepare_cli(tmp_path):
    r = subprocess.run([sys.executable, "-m", "v4lab.data.prepare", "data.include=[json/*.py]",
                        "data.vocab_size=300", f"data.root={tmp_path}", "data.val_fraction=0.3",
                        "data.test_fraction=0.3"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout[r.stdout.index("{"):])
    assert out["splits"]["train"]["tokens"] > 0 and len(out["corpus_sha256"]) == 64
