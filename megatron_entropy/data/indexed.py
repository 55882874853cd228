"""Memory-mapped token shards.

A shard is three files sharing a prefix:

  <prefix>.bin      all token ids back to back, uint16 when vocab_size < 65536 else uint32;
                    every document is followed by the tokenizer's EOS id
  <prefix>.idx.npy  int64 document start offsets into .bin, length num_docs + 1
                    (offsets[-1] == num_tokens); each document's span includes its EOS
  <prefix>.json     {"format_version", "dtype", "vocab_size", "tokenizer_identity", "eos_id",
                     "num_tokens", "num_docs", "max_token_id"}

The writer builds all three under temporary names and renames them into place at the end, the
.json last, so a failed or interrupted write leaves no shard (and never a half-overwritten one).
"""

from __future__ import annotations

import json
import os
from typing import Iterable

import numpy as np

from megatron_entropy.data import DataError

FORMAT_VERSION = 1
_SUFFIXES = (".bin", ".idx.npy", ".json")
_SCAN_CHUNK = 1 << 26  # tokens per step when checking the token range of a large shard


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size < 65536 else np.uint32)


def shard_files(prefix: str) -> tuple[str, str, str]:
    """(bin, idx, json) paths of the shard at `prefix`."""
    return tuple(prefix + suffix for suffix in _SUFFIXES)


def normalize_prefix(prefix: str) -> str:
    """Accept 'x', 'x.bin', 'x.json' or 'x.idx.npy' for the shard 'x'."""
    prefix = os.fspath(prefix)
    for suffix in _SUFFIXES:
        if prefix.endswith(suffix):
            return prefix[: -len(suffix)]
    return prefix


def shard_exists(prefix: str) -> bool:
    return any(os.path.exists(path) for path in shard_files(prefix))


class ShardWriter:
    """Streams documents into one shard; `commit()` makes it appear atomically.

    Use as a context manager: leaving the block without `commit()` (e.g. on an error) removes
    the temporary files and leaves any existing shard at `prefix` untouched.
    """

    def __init__(self, prefix: str, vocab_size: int, tokenizer_identity: str,
                 eos_id: int | None = None, overwrite: bool = True):
        self.prefix = normalize_prefix(prefix)
        if not overwrite and shard_exists(self.prefix):
            raise DataError(f"token shard {self.prefix} already exists; pass --overwrite "
                            "(overwrite=True) or choose another output prefix")
        if eos_id is not None and not 0 <= eos_id < vocab_size:
            raise DataError(f"eos_id {eos_id} is outside the vocabulary of size {vocab_size}; "
                            "pass the tokenizer's eos_id")
        self.vocab_size = int(vocab_size)
        self.tokenizer_identity = str(tokenizer_identity)
        self.eos_id = eos_id
        self.dtype = token_dtype(vocab_size)
        self.offsets = [0]
        self.max_token_id = -1
        # Temp names carry the pid so two writers of the same prefix cannot mix their files.
        self._tmp = [f"{path}.{os.getpid()}.tmp" for path in shard_files(self.prefix)]
        self._bin = None
        self._done = False

    def __enter__(self):
        directory = os.path.dirname(self.prefix) or "."
        if not os.path.isdir(directory):
            raise DataError(f"output directory {directory} does not exist; create it first")
        self._bin = open(self._tmp[0], "wb")
        return self

    def add(self, tokens) -> None:
        """Append one document (a sequence of token ids); the EOS id is added after it if set."""
        ids = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if ids.size:
            low, high = int(ids.min()), int(ids.max())
            if low < 0 or high >= self.vocab_size:
                raise DataError(f"document {len(self.offsets) - 1} has token id "
                                f"{low if low < 0 else high} outside [0, {self.vocab_size}); "
                                "the tokenizer and vocab_size disagree")
            self.max_token_id = max(self.max_token_id, high)
        if self.eos_id is not None:
            ids = np.append(ids, self.eos_id)
            self.max_token_id = max(self.max_token_id, self.eos_id)
        self._bin.write(ids.astype(self.dtype).tobytes())
        self.offsets.append(self.offsets[-1] + ids.size)

    @property
    def num_docs(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_tokens(self) -> int:
        return self.offsets[-1]

    def commit(self) -> dict:
        """Finish the files and rename them into place; returns the shard metadata."""
        if self.num_docs == 0:
            raise DataError(f"no documents to write to {self.prefix}; the input is empty")
        self._bin.close()
        with open(self._tmp[1], "wb") as f:
            np.save(f, np.asarray(self.offsets, dtype=np.int64), allow_pickle=False)
        meta = {
            "format_version": FORMAT_VERSION,
            "dtype": self.dtype.name,
            "vocab_size": self.vocab_size,
            "tokenizer_identity": self.tokenizer_identity,
            "eos_id": self.eos_id,
            "num_tokens": self.num_tokens,
            "num_docs": self.num_docs,
            "max_token_id": self.max_token_id,
        }
        with open(self._tmp[2], "w") as f:
            json.dump(meta, f, indent=1)
            f.write("\n")
        for tmp, final in zip(self._tmp, shard_files(self.prefix)):
            os.replace(tmp, final)  # .json last: a shard is complete once its .json is in place
        self._done = True
        return meta

    def __exit__(self, exc_type, exc, traceback):
        if self._bin is not None and not self._bin.closed:
            self._bin.close()
        if not self._done:
            for tmp in self._tmp:
                if os.path.exists(tmp):
                    os.remove(tmp)
        return False


def write_indexed(prefix: str, token_docs: Iterable, vocab_size: int, tokenizer_identity: str,
                  *, eos_id: int | None = None, overwrite: bool = True) -> dict:
    """Write the documents in `token_docs` (sequences of token ids) as one shard at `prefix`.

    With `eos_id` set, it is appended after every document; without it the documents are
    written as given (pass documents that already end in EOS). Returns the shard metadata.
    """
    with ShardWriter(prefix, vocab_size, tokenizer_identity, eos_id, overwrite) as writer:
        for doc in token_docs:
            writer.add(doc)
        return writer.commit()


class IndexedTokens:
    """A shard opened read-only with np.memmap.

    Attributes: `tokens` (1-D memmap), `doc_offsets` (int64, num_docs + 1), `meta` (dict),
    plus `prefix`, `num_tokens`, `num_docs`, `vocab_size`, `tokenizer_identity`.
    `check_tokens` scans every token once (about 1 s per GB) to prove all ids < vocab_size.
    """

    def __init__(self, prefix: str, check_tokens: bool = True):
        self.prefix = normalize_prefix(prefix)
        bin_path, idx_path, json_path = shard_files(self.prefix)
        for path in (json_path, bin_path, idx_path):
            if not os.path.isfile(path):
                raise DataError(f"token shard file {path} does not exist; check the prefix or "
                                "make the shard with tools/preprocess_data.py")
        self.meta = self._read_meta(json_path)
        self.num_tokens = int(self.meta["num_tokens"])
        self.num_docs = int(self.meta["num_docs"])
        self.vocab_size = int(self.meta["vocab_size"])
        self.tokenizer_identity = str(self.meta["tokenizer_identity"])
        dtype = np.dtype(self.meta["dtype"])

        expected_bytes = self.num_tokens * dtype.itemsize
        actual_bytes = os.path.getsize(bin_path)
        if actual_bytes != expected_bytes:
            raise DataError(f"token shard {bin_path} has {actual_bytes} bytes but its .json says "
                            f"{self.num_tokens} {dtype.name} tokens ({expected_bytes} bytes); the "
                            "file is truncated or from another run, re-run tools/preprocess_data.py")
        self.tokens = (np.memmap(bin_path, dtype=dtype, mode="r", shape=(self.num_tokens,))
                       if self.num_tokens else np.zeros(0, dtype=dtype))
        self.doc_offsets = self._read_offsets(idx_path)
        if check_tokens:
            self.check_token_range()

    def _read_meta(self, json_path: str) -> dict:
        try:
            with open(json_path) as f:
                meta = json.load(f)
        except (OSError, ValueError) as err:
            raise DataError(f"cannot read token shard metadata {json_path} ({err}); "
                            "re-run tools/preprocess_data.py") from None
        required = ("format_version", "dtype", "vocab_size", "tokenizer_identity", "num_tokens",
                    "num_docs")
        missing = [key for key in required if key not in meta] if isinstance(meta, dict) else required
        if missing:
            raise DataError(f"token shard metadata {json_path} lacks {', '.join(missing)}; "
                            "re-run tools/preprocess_data.py")
        if meta["format_version"] != FORMAT_VERSION:
            raise DataError(f"token shard {json_path} has format version {meta['format_version']}, "
                            f"this code reads version {FORMAT_VERSION}; re-run tools/preprocess_data.py")
        if meta["dtype"] not in ("uint16", "uint32"):
            raise DataError(f"token shard {json_path} has dtype {meta['dtype']!r}, expected uint16 "
                            "or uint32; re-run tools/preprocess_data.py")
        if meta.get("max_token_id", -1) >= meta["vocab_size"]:
            raise DataError(f"token shard {json_path} holds token id {meta['max_token_id']} >= its "
                            f"vocab_size {meta['vocab_size']}; re-run tools/preprocess_data.py")
        return meta

    def _read_offsets(self, idx_path: str) -> np.ndarray:
        try:
            offsets = np.load(idx_path, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise DataError(f"cannot read token shard index {idx_path} ({err}); "
                            "re-run tools/preprocess_data.py") from None
        valid = (offsets.dtype == np.int64 and offsets.shape == (self.num_docs + 1,)
                 and offsets[0] == 0 and offsets[-1] == self.num_tokens
                 and bool(np.all(np.diff(offsets) >= 0)))
        if not valid:
            raise DataError(f"token shard index {idx_path} does not match its .json ({self.num_docs} "
                            f"docs, {self.num_tokens} tokens); re-run tools/preprocess_data.py")
        return offsets

    def check_token_range(self) -> None:
        """Raise DataError if any token id is >= vocab_size."""
        for start in range(0, self.num_tokens, _SCAN_CHUNK):
            chunk = self.tokens[start:start + _SCAN_CHUNK]
            high = int(chunk.max())
            if high >= self.vocab_size:
                position = start + int(np.argmax(chunk >= self.vocab_size))
                raise DataError(f"token shard {self.prefix}.bin holds token id {high} >= vocab_size "
                                f"{self.vocab_size} (first at token {position}); the file is corrupt "
                                "or from another tokenizer, re-run tools/preprocess_data.py")

    def document(self, i: int) -> np.ndarray:
        """Tokens of document i, including its trailing EOS."""
        return self.tokens[self.doc_offsets[i]:self.doc_offsets[i + 1]]

    def __len__(self) -> int:
        return self.num_docs

    def __repr__(self) -> str:
        return f"IndexedTokens({self.prefix!r}, docs={self.num_docs}, tokens={self.num_tokens})"
