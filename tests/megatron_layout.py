"""An independent reader and writer of Megatron-core's indexed dataset (.bin/.idx), written from
its documented layout (megatron/core/datasets/readme.md, indexed_dataset.py), not from our code:

  .idx = b"MMIDIDX\\x00\\x00" | <Q version 1 | <B dtype code | <Q sequence count S |
         <Q document count D+1 | int32[S] lengths | int64[S] byte pointers | int64[D+1] doc indices
  dtype codes: 1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16
"""

from __future__ import annotations

import struct

import numpy as np

CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
         8: np.uint16}


def read_megatron(prefix: str) -> dict:
    """Every field of PREFIX.idx, and PREFIX.bin's tokens as the .idx's dtype."""
    with open(prefix + ".idx", "rb") as f:
        data = f.read()
    header = data[:9]
    version, = struct.unpack("<Q", data[9:17])
    code, = struct.unpack("<B", data[17:18])
    sequences, = struct.unpack("<Q", data[18:26])
    documents, = struct.unpack("<Q", data[26:34])
    position = 34
    lengths = np.frombuffer(data, np.int32, sequences, position)
    position += 4 * sequences
    pointers = np.frombuffer(data, np.int64, sequences, position)
    position += 8 * sequences
    doc_indices = np.frombuffer(data, np.int64, documents, position)
    position += 8 * documents
    tokens = np.fromfile(prefix + ".bin", dtype=CODES[code])
    return dict(header=header, version=version, code=code, lengths=lengths, pointers=pointers,
                doc_indices=doc_indices, trailing_bytes=len(data) - position, tokens=tokens)


def write_megatron(prefix: str, documents: list[list[int]], code: int = 8) -> None:
    """One sequence per document, as Megatron's preprocess_data.py writes them."""
    dtype = np.dtype(CODES[code])
    lengths = [len(doc) for doc in documents]
    pointers = np.concatenate([[0], np.cumsum(lengths)[:-1]]) * dtype.itemsize
    with open(prefix + ".bin", "wb") as f:
        for doc in documents:
            f.write(np.asarray(doc, dtype=dtype).tobytes())
    with open(prefix + ".idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00")
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<B", code))
        f.write(struct.pack("<Q", len(documents)))
        f.write(struct.pack("<Q", len(documents) + 1))
        f.write(np.asarray(lengths, dtype=np.int32).tobytes())
        f.write(np.asarray(pointers, dtype=np.int64).tobytes())
        f.write(np.arange(len(documents) + 1, dtype=np.int64).tobytes())


def short_documents(count: int, vocab: int, eos_id: int, seed: int = 0, low: int = 3, high: int = 40,
                    source=None):
    """Documents of low..high-1 tokens, each ending in eos_id (Megatron's --append-eod): random
    ids, or consecutive pieces of the token array `source` (real text, so a model can learn it)."""
    rng = np.random.default_rng(seed)
    docs, position = [], 0
    for _ in range(count):
        n = int(rng.integers(low - 1, high - 1))
        if source is None:
            body = rng.integers(0, vocab, n).tolist()
        else:
            body = [int(t) for t in source[position:position + n]]
            position += n
        docs.append([t if t != eos_id else eos_id + 1 for t in body] + [eos_id])
    return docs
