"""Prepare a code corpus: files -> train/val/test split -> byte-level BPE -> token shards.

The default source is this Python's standard library (``data.source=stdlib``), a real
code corpus that is on every machine; ``data.source=/path/to/code`` uses your own.
Files are split by a stable hash of their relative path, a byte-level BPE tokenizer is
trained on the train split only, and each split becomes a uint16 memmap of token ids with
documents separated by the end-of-text token. ``manifest.json`` records the source, the
Python version, counts, and sha256 digests of the corpus and of every written file.

Preparation is idempotent (a prepared folder whose manifest matches is reused, and only
read: a complete corpus on a read-only disk is fine) and atomic (everything is written to
a temporary folder that is renamed into place at the end).

    python -m v4lab.data.prepare                      # the default corpus
    python -m v4lab.data.prepare data.source=~/code data.vocab_size=8192
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import hashlib
import json
import os
import platform
import shutil
import sys
import sysconfig
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from v4lab.data.config import DataConfig

EOT = "<|endoftext|>"
SPLITS = ("train", "val", "test")
FORMAT_VERSION = 1
# The standard library's own test suites, IDLE and vendored packages are left out of the
# default corpus: tests are repetitive, and site-packages is not the standard library.
STDLIB_EXCLUDE = ("site-packages/**", "test/**", "**/tests/**", "idlelib/**",
                  "lib2to3/tests/**", "__phello__/**", "config-*/**")


class DataError(RuntimeError):
    """Prepared data is missing or corrupt; the message says how to (re)prepare it."""


@dataclass
class SourceFile:
    relpath: str
    text: str


def source_root(cfg: DataConfig) -> Path:
    """The folder the corpus is read from."""
    if cfg.source == "stdlib":
        return Path(sysconfig.get_paths()["stdlib"])
    root = Path(cfg.source).expanduser()
    if not root.is_dir():
        raise DataError(f"data.source={cfg.source!r} is not a directory: use 'stdlib' or a "
                        "folder of source files")
    return root.resolve()


def _matches(relpath: str, patterns: list[str] | tuple[str, ...]) -> bool:
    # fnmatch's * also crosses '/', so '**/x' and 'x/**' behave as one expects of globs here;
    # a leading '**/' also matches at the top level.
    return any(fnmatch.fnmatch(relpath, p) or (p.startswith("**/") and fnmatch.fnmatch(relpath, p[3:]))
               for p in patterns)


def collect_files(cfg: DataConfig) -> list[SourceFile]:
    """Files of the source matching include and not exclude, sorted by relative path.

    Files that are not valid UTF-8 are skipped; when every matching file is, the error
    says so (and names one) rather than that nothing matched.
    """
    root = source_root(cfg)
    exclude = list(cfg.exclude) + (list(STDLIB_EXCLUDE) if cfg.source == "stdlib" else [])
    rels = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            rel = Path(dirpath, name).relative_to(root).as_posix()
            if _matches(rel, cfg.include) and not _matches(rel, exclude):
                rels.append(rel)
    rels.sort()
    if cfg.max_files:
        rels = rels[: cfg.max_files]
    files, not_utf8 = [], []
    for rel in rels:
        try:
            files.append(SourceFile(rel, (root / rel).read_bytes().decode("utf-8")))
        except UnicodeDecodeError:
            not_utf8.append(rel)
    if not files and not_utf8:
        raise DataError(f"{len(not_utf8)} files in {root} match data.include={list(cfg.include)} but "
                        f"none is UTF-8 text (e.g. {root / not_utf8[0]}): convert them to UTF-8 or "
                        "point data.source at UTF-8 source files")
    if not files:
        raise DataError(f"no files in {root} match data.include={list(cfg.include)} "
                        f"(excluding {exclude})")
    return files


def split_of(relpath: str, val_fraction: float, test_fraction: float) -> str:
    """Stable split assignment from the sha256 of the relative path."""
    u = int.from_bytes(hashlib.sha256(relpath.encode()).digest()[:8], "big") / 2**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def corpus_sha256(files: list[SourceFile]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.relpath.encode() + b"\0" + f.text.encode() + b"\0")
    return h.hexdigest()


def prepared_dir(cfg: DataConfig) -> Path:
    """The folder for this corpus + settings: readable name plus a hash of the settings."""
    settings = json.dumps({k: v for k, v in asdict(cfg).items() if k != "root"}
                          | {"format": FORMAT_VERSION}, sort_keys=True, default=str)
    tag = hashlib.sha256(settings.encode()).hexdigest()[:10]
    name = "stdlib" if cfg.source == "stdlib" else Path(cfg.source).expanduser().name or "source"
    return Path(cfg.root) / f"{name}-v{cfg.vocab_size}-{tag}"


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on ``texts`` (deterministic for the same input)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tok


def token_byte_lengths(tok) -> np.ndarray:
    """UTF-8 bytes each token id stands for ([vocab] int64); 0 for special tokens.

    Byte-level BPE writes every byte as one printable character, so a token's byte count
    is its string length. Summed over a token stream it equals the text's UTF-8 size.
    """
    vocab = tok.get_vocab_size()
    special = {tok.token_to_id(EOT)}
    lengths = np.zeros(vocab, dtype=np.int64)
    for i in range(vocab):
        piece = tok.id_to_token(i)
        lengths[i] = 0 if (i in special or piece is None) else len(piece)
    return lengths


def _encode_split(tok, texts: list[str]) -> np.ndarray:
    eot = tok.token_to_id(EOT)
    out: list[int] = []
    for enc in tok.encode_batch(texts):
        out.extend(enc.ids)
        out.append(eot)
    return np.asarray(out, dtype=np.uint16)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def unigram_bpb(train: np.ndarray, evaluate: np.ndarray, token_bytes: np.ndarray) -> float:
    """Bits per byte of a unigram model (train counts, add-one smoothing) on ``evaluate``.

    The reference a language model must beat; special tokens are not scored.
    """
    vocab = len(token_bytes)
    counts = np.bincount(train.astype(np.int64), minlength=vocab).astype(np.float64) + 1.0
    logp = np.log2(counts / counts.sum())
    ids = evaluate.astype(np.int64)
    scored = token_bytes[ids] > 0
    return float(-logp[ids[scored]].sum() / token_bytes[ids[scored]].sum())


@contextlib.contextmanager
def _exclusive(lock_path: Path):
    """Hold an exclusive lock on ``lock_path`` (parallel runs and DDP ranks that need the
    same corpus prepare it once: the others wait, then find it ready)."""
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        f = open(lock_path, "a")
    except OSError as e:
        raise DataError(f"{lock_path.parent} is not writable ({e.strerror}) and the corpus there is "
                        "not prepared: prepare it where you can write (data.root=DIR), or ask its owner "
                        "to run `python -m v4lab.data.prepare` with these data settings") from e
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def prepare(cfg: DataConfig, force: bool = False, log=print) -> Path:
    """Prepare the corpus described by ``cfg`` (idempotent); returns its folder. A complete
    corpus is only read (no lock taken: the folder is renamed into place whole)."""
    out = prepared_dir(cfg)
    if not force:
        try:
            verify(out)
            return out
        except DataError:
            pass
    with _exclusive(out.parent / f".{out.name}.lock"):
        return _prepare_locked(cfg, out, force, log)


def _prepare_locked(cfg: DataConfig, out: Path, force: bool, log) -> Path:
    if not force:
        try:
            verify(out)
            return out
        except DataError:
            pass
    t0 = time.perf_counter()
    files = collect_files(cfg)
    by_split: dict[str, list[SourceFile]] = {s: [] for s in SPLITS}
    for f in files:
        by_split[split_of(f.relpath, cfg.val_fraction, cfg.test_fraction)].append(f)
    for s in SPLITS:
        if not by_split[s]:
            raise DataError(f"split {s!r} got no files out of {len(files)}: use a larger "
                            "source or larger data.val_fraction / data.test_fraction")
    log(f"[data] {len(files)} files from {source_root(cfg)}; training tokenizer "
        f"(vocab {cfg.vocab_size}) on {len(by_split['train'])} train files")
    tok = train_tokenizer([f.text for f in by_split["train"]], cfg.vocab_size)
    token_bytes = token_byte_lengths(tok)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    try:
        tok.save(str(tmp / "tokenizer.json"))
        shards, stats = {}, {}
        for s in SPLITS:
            ids = _encode_split(tok, [f.text for f in by_split[s]])
            shards[s] = ids
            ids.tofile(tmp / f"{s}.bin")
            stats[s] = {"files": len(by_split[s]), "tokens": int(len(ids)),
                        "bytes": int(sum(len(f.text.encode()) for f in by_split[s]))}
        manifest = {
            "format": FORMAT_VERSION,
            "source": cfg.source,
            "source_root": str(source_root(cfg)),
            "python_version": platform.python_version(),
            "python_implementation": sys.implementation.name,
            "config": {k: v for k, v in asdict(cfg).items() if k != "root"},
            "splits": stats,
            "vocab_size": tok.get_vocab_size(),
            "eot_id": tok.token_to_id(EOT),
            "corpus_sha256": corpus_sha256(files),
            "unigram_val_bpb": unigram_bpb(shards["train"], shards["val"], token_bytes),
            "files_sha256": {name: _sha256_file(tmp / name)
                             for name in ["tokenizer.json"] + [f"{s}.bin" for s in SPLITS]},
            "seconds": round(time.perf_counter() - t0, 2),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"[data] prepared {out} in {manifest['seconds']} s: "
        + ", ".join(f"{s} {stats[s]['tokens']:,} tokens" for s in SPLITS))
    return out


def verify(folder: Path) -> dict:
    """Check a prepared folder against its manifest; returns the manifest.

    Raises :class:`DataError` naming what is missing or corrupt and how to fix it.
    """
    how = ("prepare it with `python -m v4lab.data.prepare` (add --force to rebuild), or "
           "just run the experiment, which prepares missing data")
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        raise DataError(f"prepared data not found at {folder}: {how}")
    try:
        manifest = json.loads(manifest_path.read_text())
        expected = manifest["files_sha256"]
    except (json.JSONDecodeError, KeyError) as e:
        raise DataError(f"{manifest_path} is corrupt ({e}): {how}") from e
    for name, digest in expected.items():
        path = folder / name
        if not path.is_file():
            raise DataError(f"{path} is missing: {how}")
        if _sha256_file(path) != digest:
            raise DataError(f"{path} is corrupt (sha256 differs from the manifest): {how}")
    return manifest


def main(argv: list[str] | None = None) -> int:
    """CLI: ``python -m v4lab.data.prepare [--force] [data.key=value ...]``."""
    from omegaconf import OmegaConf

    argv = list(sys.argv[1:] if argv is None else argv)
    force = "--force" in argv
    overrides = [a.removeprefix("data.") for a in argv if a != "--force"]
    cfg_dict = OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.from_dotlist(overrides))
    cfg = OmegaConf.to_object(cfg_dict)
    cfg.validate()
    folder = prepare(cfg, force=force)
    m = verify(folder)
    print(json.dumps({"folder": str(folder), "corpus_sha256": m["corpus_sha256"],
                      "splits": m["splits"], "unigram_val_bpb": round(m["unigram_val_bpb"], 4)},
                     indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

