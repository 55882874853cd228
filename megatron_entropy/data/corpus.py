"""Corpora: the embedded default one (the Python standard library's own source code), and
the expansion of user input paths for the tools.

It is on every machine that runs Python, so a run needs no download to train on real code.
Files are taken in sorted relative-path order, as UTF-8 (undecodable files are skipped), and
split into train/valid by a hash of their relative path, so the split depends only on the
file names. `prepare_default_data` turns it into a tokenizer plus train/valid token shards,
cached on disk and safe to call from many processes at once.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import math
import os
import shutil
import sysconfig
import tempfile
import time

from megatron_entropy.data import DataError

# Bump when anything changes what a cache entry holds (corpus rules, tokenizer settings, format).
CACHE_VERSION = 2  # 2: shards in Megatron's .bin/.idx format
VALID_FRACTION = 0.02
MIN_VALID_FILES = 3
VALID_BUDGET_DIVISOR = 20  # the valid split gets max_bytes // 20
# Directory names never descended into: installed packages, test suites, and two big,
# rarely-used tools. Kept small so the corpus is "the library", as a user reads it.
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib",
                           "lib2to3", "__pycache__"})


def expand_paths(patterns: list[str], suffixes: tuple[str, ...], any_named_file: bool = False) -> list[str]:
    """Files named by `patterns` (files, directories searched recursively, or globs), in the
    given order, each directory's and glob's matches sorted, duplicates dropped.

    Directories contribute their files ending in `suffixes`. Files named directly or by a glob
    must end in one of them too, unless `any_named_file` (the caller reads anything as text).
    """
    found, seen = [], set()
    for pattern in patterns:
        if os.path.isdir(pattern):
            matches = sorted(p for p in glob.glob(os.path.join(glob.escape(pattern), "**", "*"),
                                                  recursive=True)
                             if os.path.isfile(p) and p.endswith(suffixes))
        elif os.path.isfile(pattern):
            matches = [pattern]
        else:
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        if not matches:
            raise DataError(f"input {pattern} does not exist or matches no file; check the path")
        for path in matches:
            if not any_named_file and not path.endswith(suffixes):
                raise DataError(f"input {path} is not a {'/'.join(suffixes)} file; "
                                "convert it or pass a supported file")
            if path not in seen:
                seen.add(path)
                found.append(path)
    return found


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def corpus_files(root: str | None = None) -> list[str]:
    """Relative paths (with '/') of the corpus .py files, sorted."""
    root = root or stdlib_root()
    found = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in EXCLUDED_DIRS]
        relative_dir = os.path.relpath(directory, root)
        for name in files:
            if name.endswith(".py"):
                found.append(os.path.normpath(os.path.join(relative_dir, name)).replace(os.sep, "/"))
    if not found:
        raise DataError(f"no .py files found under the standard library at {root}; "
                        "make token shards of your own text with tools/preprocess_data.py")
    return sorted(found)


def _path_hash(relative_path: str) -> str:
    return hashlib.sha256(relative_path.encode("utf-8")).hexdigest()


def valid_files(relative_paths: list[str]) -> set[str]:
    """The ~2% of files (at least MIN_VALID_FILES) with the smallest path hashes."""
    count = max(MIN_VALID_FILES, math.ceil(VALID_FRACTION * len(relative_paths)))
    return set(sorted(relative_paths, key=_path_hash)[:count])


def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", newline="") as f:  # text exactly as stored
            return f.read()
    except (UnicodeDecodeError, OSError):
        return None


def embedded_documents(split: str, max_bytes: int) -> list[str]:
    """The `split` ("train" or "valid") files' texts, in path order, up to max_bytes of UTF-8.

    The file that crosses the budget is cut at its last newline inside the budget, so the total
    is at most max_bytes and every document ends at a line boundary.
    """
    if split not in ("train", "valid"):
        raise DataError(f"unknown split {split!r}; use 'train' or 'valid'")
    if max_bytes < 1:
        raise DataError(f"max_bytes must be >= 1, got {max_bytes}")
    root = stdlib_root()
    paths = corpus_files(root)
    held_out = valid_files(paths)
    documents, used = [], 0
    for relative_path in paths:
        if (relative_path in held_out) != (split == "valid"):
            continue
        text = _read_text(os.path.join(root, relative_path))
        if not text:
            continue
        data = text.encode("utf-8")
        room = max_bytes - used
        if len(data) > room:
            cut = data.rfind(b"\n", 0, room) + 1  # 0 when no newline fits
            if cut:
                documents.append(data[:cut].decode("utf-8"))
            break
        documents.append(text)
        used += len(data)
    return documents


@dataclasses.dataclass(frozen=True)
class DefaultData:
    tokenizer_path: str  # the SentencePiece .model file
    train_prefix: str    # token shard prefixes (see indexed.py)
    valid_prefix: str


def _cache_key(vocab_size: int, max_bytes: int) -> str:
    """Changes whenever the corpus files, the settings or the code that builds the cache do."""
    import sentencepiece

    root = stdlib_root()
    listing = []
    for relative_path in corpus_files(root):
        stat = os.stat(os.path.join(root, relative_path))
        listing.append([relative_path, stat.st_size, stat.st_mtime_ns])
    description = {"cache_version": CACHE_VERSION, "vocab_size": vocab_size, "max_bytes": max_bytes,
                   "sentencepiece": sentencepiece.__version__, "files": listing}
    return hashlib.sha256(json.dumps(description).encode()).hexdigest()[:16]


def _entry(directory: str) -> DefaultData:
    return DefaultData(tokenizer_path=os.path.join(directory, "tokenizer.model"),
                       train_prefix=os.path.join(directory, "train"),
                       valid_prefix=os.path.join(directory, "valid"))


def _build(directory: str, vocab_size: int, max_bytes: int, log) -> dict:
    """Write tokenizer.model, train.* and valid.* shards and done.json into `directory`."""
    from megatron_entropy.data.indexed import write_indexed
    from megatron_entropy.data.tokenizer import load_tokenizer, train_sentencepiece

    started = time.perf_counter()
    train_docs = embedded_documents("train", max_bytes)
    valid_docs = embedded_documents("valid", max(1, max_bytes // VALID_BUDGET_DIVISOR))
    if not train_docs or not valid_docs:
        raise DataError(f"max_bytes={max_bytes} leaves an empty train or valid split of the "
                        "default corpus; use a larger max_bytes")
    model_path = train_sentencepiece(iter(train_docs), vocab_size, directory)
    tokenizer = load_tokenizer(model_path)
    counts = {}
    for split, docs in (("train", train_docs), ("valid", valid_docs)):
        meta = write_indexed(os.path.join(directory, split), tokenizer.encode_batch(docs),
                             tokenizer.vocab_size, tokenizer.identity, eos_id=tokenizer.eos_id)
        counts[split] = {"docs": meta["num_docs"], "tokens": meta["num_tokens"],
                         "bytes": sum(len(d.encode("utf-8")) for d in docs)}
    summary = {"vocab_size": vocab_size, "max_bytes": max_bytes, "stdlib": stdlib_root(),
               "tokenizer_identity": tokenizer.identity, "splits": counts,
               "build_seconds": round(time.perf_counter() - started, 3)}
    with open(os.path.join(directory, "done.json"), "w") as f:
        json.dump(summary, f, indent=1)
    log(f"default data: built in {summary['build_seconds']:.1f}s: "
        f"train {counts['train']['docs']} files / {counts['train']['tokens']:,} tokens, "
        f"valid {counts['valid']['docs']} files / {counts['valid']['tokens']:,} tokens")
    return summary


def prepare_default_data(cache_dir: str, vocab_size: int, max_bytes: int, log=print) -> DefaultData:
    """Tokenizer + train/valid shards of the embedded corpus, built once into
    `cache_dir/<key>/` and reused. Several processes may call this at once: one builds (under a
    file lock, into a temp dir renamed into place when complete), the others wait and reuse it.
    """
    from filelock import FileLock

    key = _cache_key(vocab_size, max_bytes)
    directory = os.path.join(cache_dir, f"stdlib-v{vocab_size}-b{max_bytes}-{key}")
    if os.path.isfile(os.path.join(directory, "done.json")):  # complete entries only exist whole
        return _entry(directory)

    os.makedirs(cache_dir, exist_ok=True)
    with FileLock(directory + ".lock"):
        if os.path.isfile(os.path.join(directory, "done.json")):  # built while we waited
            return _entry(directory)
        log(f"default data: building {directory} (standard library source, {max_bytes:,} bytes, "
            f"vocab {vocab_size})")
        staging = tempfile.mkdtemp(dir=cache_dir, prefix=f".{os.path.basename(directory)}.tmp-")
        try:
            _build(staging, vocab_size, max_bytes, log)
            os.chmod(staging, 0o755)  # mkdtemp makes it private; the cache may be shared
            try:
                os.replace(staging, directory)
            except OSError:
                # Only possible without a working lock (some network filesystems): another
                # process finished first, and its entry is as good as ours.
                if not os.path.isfile(os.path.join(directory, "done.json")):
                    raise
        finally:
            if os.path.isdir(staging):  # failed, or lost a race on a filesystem without locks
                shutil.rmtree(staging, ignore_errors=True)
    return _entry(directory)
