"""Memory-mapped token shards in Megatron-core's indexed-dataset format.

A shard is two files in Megatron's layout (megatron/core/datasets/indexed_dataset.py), plus our
optional sidecar:

  <prefix>.bin   token ids back to back in the .idx's dtype (uint16 when vocab_size < 65500,
                 else int32: Megatron's `DType.optimal_dtype`); every document we write is one
                 sequence followed by the tokenizer's EOS id
  <prefix>.idx   little-endian: b"MMIDIDX\\x00\\x00" | u64 version = 1 | u8 dtype code |
                 u64 sequence count S | u64 document count D+1 | int32[S] sequence lengths |
                 int64[S] sequence byte pointers into .bin | int64[D+1] document indices
                 (document d = sequences doc_idx[d] .. doc_idx[d+1]-1; doc_idx[0] = 0)
  <prefix>.json  optional sidecar: {"format_version": 2, "dtype", "vocab_size",
                 "tokenizer_identity", "eos_id", "num_tokens", "num_docs", "max_token_id"}

Shards we write are read by Megatron's `IndexedDataset(prefix)` and Megatron's shards are read
here. A foreign shard has no sidecar: the run's tokenizer (data.tokenizer) then supplies the
vocabulary and EOS id, and the token range is checked against it. The writer builds all files
under temporary names and renames them into place at the end, the .json last, so a failed or
interrupted write leaves no shard (and never a half-overwritten one).

Shards of our first format (`.bin` + `.idx.npy` offsets + `.json` with format_version 1) still
load, read-only; `tools/preprocess_data.py --convert-legacy PREFIX` rewrites one in this format.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Iterable

import numpy as np

from megatron_entropy.data import DataError

FORMAT_VERSION = 2  # of the sidecar; 1 was the legacy .idx.npy format
LEGACY_FORMAT_VERSION = 1
INDEX_HEADER = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
# Megatron's DType codes (its enum's values); tokens are read as any integer one of them.
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64,
               7: np.float32, 8: np.uint16}
CODE_OF_DTYPE = {np.dtype(t): code for code, t in DTYPE_CODES.items()}
_PREAMBLE = struct.Struct("<9sQBQQ")  # header, version, dtype code, sequence and document counts
_SUFFIXES = (".bin", ".idx", ".json", ".idx.npy")
_SCAN_CHUNK = 1 << 26  # tokens per step when scanning a large shard


def token_dtype(vocab_size: int) -> np.dtype:
    """Megatron's choice: uint16 below 65500 ids, else int32 (it has no uint32 code)."""
    return np.dtype(np.uint16 if vocab_size < 65500 else np.int32)


def shard_files(prefix: str) -> tuple[str, str, str]:
    """(bin, idx, json) paths of the shard at `prefix`."""
    return prefix + ".bin", prefix + ".idx", prefix + ".json"


def normalize_prefix(prefix: str) -> str:
    """Accept 'x', 'x.bin', 'x.idx', 'x.json' or 'x.idx.npy' for the shard 'x'."""
    prefix = os.fspath(prefix)
    for suffix in sorted(_SUFFIXES, key=len, reverse=True):
        if prefix.endswith(suffix):
            return prefix[: -len(suffix)]
    return prefix


def shard_exists(prefix: str) -> bool:
    return any(os.path.exists(prefix + suffix) for suffix in _SUFFIXES)


def index_bytes(dtype, sequence_lengths, document_indices) -> bytes:
    """The whole .idx file for these sequences (contiguous in .bin, in order)."""
    dtype = np.dtype(dtype)
    lengths = np.asarray(sequence_lengths, dtype=np.int32)
    pointers = np.zeros(lengths.size, dtype=np.int64)
    np.cumsum(lengths[:-1], dtype=np.int64, out=pointers[1:])
    pointers *= dtype.itemsize
    documents = np.asarray(document_indices, dtype=np.int64)
    preamble = _PREAMBLE.pack(INDEX_HEADER, INDEX_VERSION, CODE_OF_DTYPE[dtype], lengths.size,
                              documents.size)
    return preamble + lengths.tobytes() + pointers.tobytes() + documents.tobytes()


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
        self.lengths = []  # one sequence per document
        self.num_tokens = 0
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
        ids = np.asarray(tokens).reshape(-1)
        if ids.size:
            low, high = int(ids.min()), int(ids.max())
            if low < 0 or high >= self.vocab_size:
                raise DataError(f"document {len(self.lengths)} has token id "
                                f"{low if low < 0 else high} outside [0, {self.vocab_size}); "
                                "the tokenizer and vocab_size disagree")
            self.max_token_id = max(self.max_token_id, high)
        if self.eos_id is not None:
            ids = np.append(ids.astype(self.dtype), np.array(self.eos_id, dtype=self.dtype))
            self.max_token_id = max(self.max_token_id, self.eos_id)
        self._bin.write(ids.astype(self.dtype, copy=False).tobytes())
        self.lengths.append(ids.size)
        self.num_tokens += ids.size

    @property
    def num_docs(self) -> int:
        return len(self.lengths)

    def commit(self) -> dict:
        """Finish the files and rename them into place; returns the sidecar metadata."""
        if self.num_docs == 0:
            raise DataError(f"no documents to write to {self.prefix}; the input is empty")
        self._bin.close()
        with open(self._tmp[1], "wb") as f:
            f.write(index_bytes(self.dtype, self.lengths, np.arange(self.num_docs + 1)))
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
        stale_legacy_index = self.prefix + ".idx.npy"
        if os.path.exists(stale_legacy_index):  # overwriting a legacy shard: drop its old index
            os.remove(stale_legacy_index)
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
    written as given (pass documents that already end in EOS). Returns the sidecar metadata.
    """
    with ShardWriter(prefix, vocab_size, tokenizer_identity, eos_id, overwrite) as writer:
        for doc in token_docs:
            writer.add(doc)
        return writer.commit()


def _fix(prefix: str) -> str:
    return f"re-run tools/preprocess_data.py for {prefix}"


def read_index(idx_path: str, bin_path: str) -> tuple[np.dtype, np.ndarray]:
    """(token dtype, document token offsets [D+1]) of a Megatron .idx, checked against .bin."""
    try:
        with open(idx_path, "rb") as f:
            preamble = f.read(_PREAMBLE.size)
        size = os.path.getsize(idx_path)
    except OSError as err:
        raise DataError(f"cannot read token shard index {idx_path} ({err}); check the file") from None
    if len(preamble) < _PREAMBLE.size or not preamble.startswith(INDEX_HEADER):
        raise DataError(f"{idx_path} is not a Megatron indexed-dataset index (no MMIDIDX header); "
                        "pass the prefix of a .bin/.idx pair made by tools/preprocess_data.py or Megatron")
    _, version, code, sequences, documents = _PREAMBLE.unpack(preamble)
    if version != INDEX_VERSION:
        raise DataError(f"{idx_path} has index version {version}, this code reads version "
                        f"{INDEX_VERSION}; {_fix(idx_path[:-4])}")
    if code not in DTYPE_CODES or not np.issubdtype(DTYPE_CODES[code], np.integer):
        raise DataError(f"{idx_path} has dtype code {code}, not an integer token type; "
                        "a token shard holds integer ids")
    expected = _PREAMBLE.size + 12 * sequences + 8 * documents
    if size != expected or documents < 1:
        raise DataError(f"token shard index {idx_path} has {size} bytes but its header describes "
                        f"{expected} ({sequences} sequences, {documents} document indices); the file "
                        f"is truncated, multimodal or corrupt, {_fix(idx_path[:-4])}")
    dtype = np.dtype(DTYPE_CODES[code])
    lengths = np.fromfile(idx_path, dtype=np.int32, count=sequences, offset=_PREAMBLE.size)
    pointers = np.fromfile(idx_path, dtype=np.int64, count=sequences,
                           offset=_PREAMBLE.size + 4 * sequences)
    doc_index = np.fromfile(idx_path, dtype=np.int64, count=documents,
                            offset=_PREAMBLE.size + 12 * sequences)
    sequence_starts = np.zeros(sequences + 1, dtype=np.int64)
    np.cumsum(lengths, dtype=np.int64, out=sequence_starts[1:])
    contiguous = bool((lengths >= 0).all()) and np.array_equal(pointers, sequence_starts[:-1] * dtype.itemsize)
    if not contiguous:
        raise DataError(f"token shard index {idx_path} has sequences that are not stored back to "
                        f"back in its .bin; {_fix(idx_path[:-4])}")
    if doc_index[0] != 0 or doc_index[-1] != sequences or bool((np.diff(doc_index) < 0).any()):
        raise DataError(f"token shard index {idx_path} has document indices that do not run from 0 "
                        f"to its {sequences} sequences; {_fix(idx_path[:-4])}")
    actual = os.path.getsize(bin_path)
    if actual != sequence_starts[-1] * dtype.itemsize:
        raise DataError(f"token shard {bin_path} has {actual} bytes but its .idx says "
                        f"{sequence_starts[-1]} {dtype.name} tokens; the file is truncated or from "
                        f"another run, {_fix(bin_path[:-4])}")
    return dtype, sequence_starts[doc_index]


class IndexedTokens:
    """A shard opened read-only with np.memmap.

    Attributes: `tokens` (1-D memmap), `doc_offsets` (int64, num_docs + 1), `meta` (the sidecar,
    {} without one), `format` ("megatron" or "legacy"), plus `prefix`, `num_tokens`, `num_docs`,
    `vocab_size`, `tokenizer_identity` and `eos_id` (None where neither the sidecar nor `tokenizer`
    says). `tokenizer` (a data.Tokenizer) stands in for a missing sidecar. `check_tokens` scans
    every token once (about 1 s per GB) to prove all ids are in [0, vocab_size).
    """

    def __init__(self, prefix: str, check_tokens: bool = True, tokenizer=None):
        self.prefix = normalize_prefix(prefix)
        bin_path, idx_path, json_path = shard_files(self.prefix)
        legacy_idx = self.prefix + ".idx.npy"
        self.format = "megatron" if os.path.isfile(idx_path) or not os.path.isfile(legacy_idx) else "legacy"
        needed = (bin_path, idx_path) if self.format == "megatron" else (json_path, bin_path, legacy_idx)
        for path in needed:
            if not os.path.isfile(path):
                raise DataError(f"token shard file {path} does not exist; check the prefix or "
                                "make the shard with tools/preprocess_data.py")
        self.meta = self._read_meta(json_path) if os.path.isfile(json_path) else {}
        if self.format == "megatron":
            dtype, self.doc_offsets = read_index(idx_path, bin_path)
        else:
            dtype, self.doc_offsets = self._read_legacy(bin_path, legacy_idx)
        self.num_tokens = int(self.doc_offsets[-1])
        self.num_docs = int(self.doc_offsets.size - 1)
        if self.meta and (self.meta["num_tokens"], self.meta["num_docs"]) != (self.num_tokens, self.num_docs):
            raise DataError(f"token shard sidecar {json_path} says {self.meta['num_tokens']} tokens in "
                            f"{self.meta['num_docs']} docs but the index holds {self.num_tokens} in "
                            f"{self.num_docs}; the files are from different runs, {_fix(self.prefix)}")
        known = self.meta or ({} if tokenizer is None else {
            "vocab_size": tokenizer.vocab_size, "tokenizer_identity": None, "eos_id": tokenizer.eos_id})
        if not known:
            raise DataError(f"token shard {self.prefix} has no sidecar {json_path} saying which "
                            "tokenizer made it; set data.tokenizer to that tokenizer")
        self.vocab_size = int(known["vocab_size"])
        self.tokenizer_identity = known["tokenizer_identity"]
        self.eos_id = known.get("eos_id")
        self.tokens = (np.memmap(bin_path, dtype=dtype, mode="r", shape=(self.num_tokens,))
                       if self.num_tokens else np.zeros(0, dtype=dtype))
        if check_tokens:
            self.check_token_range()

    def _read_meta(self, json_path: str) -> dict:
        try:
            with open(json_path) as f:
                meta = json.load(f)
        except (OSError, ValueError) as err:
            raise DataError(f"cannot read token shard metadata {json_path} ({err}); "
                            f"{_fix(self.prefix)}") from None
        required = ("format_version", "dtype", "vocab_size", "tokenizer_identity", "num_tokens",
                    "num_docs")
        missing = [key for key in required if key not in meta] if isinstance(meta, dict) else required
        if missing:
            raise DataError(f"token shard metadata {json_path} lacks {', '.join(missing)}; "
                            f"{_fix(self.prefix)}")
        wanted = FORMAT_VERSION if self.format == "megatron" else LEGACY_FORMAT_VERSION
        if meta["format_version"] != wanted:
            raise DataError(f"token shard {json_path} has format version {meta['format_version']}, "
                            f"expected {wanted} next to its {'.idx' if wanted == 2 else '.idx.npy'}; "
                            f"{_fix(self.prefix)}")
        if meta.get("max_token_id", -1) >= meta["vocab_size"]:
            raise DataError(f"token shard {json_path} holds token id {meta['max_token_id']} >= its "
                            f"vocab_size {meta['vocab_size']}; {_fix(self.prefix)}")
        return meta

    def _read_legacy(self, bin_path: str, idx_path: str) -> tuple[np.dtype, np.ndarray]:
        if self.meta["dtype"] not in ("uint16", "uint32"):
            raise DataError(f"token shard {self.prefix}.json has dtype {self.meta['dtype']!r}, "
                            f"expected uint16 or uint32; {_fix(self.prefix)}")
        dtype = np.dtype(self.meta["dtype"])
        expected_bytes = int(self.meta["num_tokens"]) * dtype.itemsize
        if os.path.getsize(bin_path) != expected_bytes:
            raise DataError(f"token shard {bin_path} has {os.path.getsize(bin_path)} bytes but its "
                            f".json says {self.meta['num_tokens']} {dtype.name} tokens "
                            f"({expected_bytes} bytes); the file is truncated or from another run, "
                            f"{_fix(self.prefix)}")
        try:
            offsets = np.load(idx_path, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise DataError(f"cannot read token shard index {idx_path} ({err}); "
                            f"{_fix(self.prefix)}") from None
        valid = (offsets.dtype == np.int64 and offsets.shape == (int(self.meta["num_docs"]) + 1,)
                 and offsets[0] == 0 and offsets[-1] == int(self.meta["num_tokens"])
                 and bool(np.all(np.diff(offsets) >= 0)))
        if not valid:
            raise DataError(f"token shard index {idx_path} does not match its .json; {_fix(self.prefix)}")
        return dtype, offsets

    def check_token_range(self) -> None:
        """Raise DataError if any token id is outside [0, vocab_size)."""
        for start in range(0, self.num_tokens, _SCAN_CHUNK):
            chunk = self.tokens[start:start + _SCAN_CHUNK]
            low, high = int(chunk.min()), int(chunk.max())
            if low < 0 or high >= self.vocab_size:
                bad = low if low < 0 else high
                position = start + int(np.argmax((chunk < 0) | (chunk >= self.vocab_size)))
                raise DataError(f"token shard {self.prefix}.bin holds token id {bad} outside the "
                                f"tokenizer's [0, {self.vocab_size}) (first at token {position}); the "
                                "shard is corrupt or from another tokenizer, set data.tokenizer to the "
                                "one that made it or re-run tools/preprocess_data.py")

    def document_offsets(self) -> np.ndarray:
        """Document start offsets [num_docs' + 1]: the .idx's, or, where the index holds the whole
        shard as one document, the positions after each EOS (all a foreign shard may tell us)."""
        if self.num_docs > 1 or self.eos_id is None:
            return self.doc_offsets
        ends = [np.flatnonzero(self.tokens[s:s + _SCAN_CHUNK] == self.eos_id) + s + 1
                for s in range(0, self.num_tokens, _SCAN_CHUNK)]
        inner = np.concatenate([np.zeros(0, np.int64), *ends]).astype(np.int64)
        return np.unique(np.concatenate([[0], inner, [self.num_tokens]]))

    def document(self, i: int) -> np.ndarray:
        """Tokens of document i, including its trailing EOS."""
        return self.tokens[self.doc_offsets[i]:self.doc_offsets[i + 1]]

    def __len__(self) -> int:
        return self.num_docs

    def __repr__(self) -> str:
        return f"IndexedTokens({self.prefix!r}, docs={self.num_docs}, tokens={self.num_tokens})"


def convert_legacy(prefix: str) -> dict:
    """Rewrite the legacy shard at `prefix` (.idx.npy) in place as .bin + .idx + sidecar.

    The .bin stays as it is: its uint16 ids are Megatron's uint16, and uint32 ids (all below
    vocab_size < 2^31, checked) have the same bytes as int32. Only the index and the sidecar are
    written (temp files, renamed .idx first, .json second, then the .idx.npy removed); an
    interrupted conversion is simply run again.
    """
    prefix = normalize_prefix(prefix)
    legacy_idx = prefix + ".idx.npy"
    if not os.path.isfile(legacy_idx):
        raise DataError(f"{prefix} has no legacy index {legacy_idx}; nothing to convert")
    if os.path.exists(prefix + ".idx"):  # left by an interrupted conversion: the legacy files rule
        os.remove(prefix + ".idx")
    shard = IndexedTokens(prefix)
    dtype = np.dtype(np.uint16 if shard.tokens.dtype == np.uint16 else np.int32)
    meta = dict(shard.meta, format_version=FORMAT_VERSION, dtype=dtype.name)
    lengths = np.diff(shard.doc_offsets)
    if shard.num_docs and lengths.max() >= 2**31:
        raise DataError(f"{prefix} holds a document of {int(lengths.max())} tokens, more than a Megatron "
                        "index can hold (int32 lengths); re-run tools/preprocess_data.py on its text")
    idx_path, json_path = prefix + ".idx", prefix + ".json"
    tmp_idx, tmp_json = f"{idx_path}.{os.getpid()}.tmp", f"{json_path}.{os.getpid()}.tmp"
    try:
        with open(tmp_idx, "wb") as f:
            f.write(index_bytes(dtype, lengths, np.arange(shard.num_docs + 1)))
        with open(tmp_json, "w") as f:
            json.dump(meta, f, indent=1)
            f.write("\n")
        os.replace(tmp_idx, idx_path)
        os.replace(tmp_json, json_path)
    finally:
        for tmp in (tmp_idx, tmp_json):
            if os.path.exists(tmp):
                os.remove(tmp)
    os.remove(legacy_idx)
    return meta
