"""Token shards in Megatron-core's indexed-dataset format, both ways, checked with the independent
reader/writer of tests/megatron_layout.py; the sidecar; legacy shards; Megatron's --data-path
blends; per-document packing, document starts and the EOD loss mask."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import numpy as np
import pytest

from megatron_entropy.data import DataError, IndexedTokens, TokenChunkDataset, collate, write_indexed
from megatron_entropy.data.blend import parse_data_path
from tests.megatron_layout import read_megatron, short_documents, write_megatron
from tests.unit.test_data import load_tool

IDENTITY = "f" * 64
TOKENIZER = SimpleNamespace(vocab_size=512, eos_id=2)  # what a Tokenizer tells IndexedTokens


def test_our_shards_have_megatrons_exact_layout(tmp_path):
    docs = [[5, 6, 7], [], [9] * 10]
    meta = write_indexed(str(tmp_path / "s"), docs, vocab_size=512, tokenizer_identity=IDENTITY, eos_id=2)
    got = read_megatron(str(tmp_path / "s"))
    assert got["header"] == b"MMIDIDX\x00\x00" and got["version"] == 1
    assert got["code"] == 8  # uint16
    assert got["lengths"].tolist() == [4, 1, 11]
    assert got["pointers"].tolist() == [0, 8, 10]  # bytes
    assert got["doc_indices"].tolist() == [0, 1, 2, 3]
    assert got["trailing_bytes"] == 0
    assert got["tokens"].tolist() == [5, 6, 7, 2, 2] + [9] * 10 + [2]
    with open(tmp_path / "s.json") as f:
        assert json.load(f) == meta == {
            "format_version": 2, "dtype": "uint16", "vocab_size": 512, "tokenizer_identity": IDENTITY,
            "eos_id": 2, "num_tokens": 16, "num_docs": 3, "max_token_id": 9}
    write_indexed(str(tmp_path / "big"), [[70_000, 3]], 70_001, IDENTITY)
    big = read_megatron(str(tmp_path / "big"))
    assert big["code"] == 4 and big["tokens"].tolist() == [70_000, 3]  # int32 (Megatron: >= 65500)
    assert big["pointers"].tolist() == [0]
    assert sorted(os.listdir(tmp_path)) == ["big.bin", "big.idx", "big.json", "s.bin", "s.idx", "s.json"]


def test_megatron_shards_load_with_the_tokenizer_standing_in_for_the_sidecar(tmp_path):
    prefix = str(tmp_path / "foreign")
    docs = short_documents(20, 512, eos_id=2, seed=1)
    write_megatron(prefix, docs)
    with pytest.raises(DataError, match="no sidecar .*set data.tokenizer") as error:
        IndexedTokens(prefix)
    assert "\n" not in str(error.value)
    shard = IndexedTokens(prefix, tokenizer=TOKENIZER)
    assert shard.format == "megatron" and shard.meta == {} and shard.tokenizer_identity is None
    assert shard.vocab_size == 512 and shard.eos_id == 2
    assert [shard.document(i).tolist() for i in range(len(shard))] == docs
    # the token range is checked against the tokenizer
    with pytest.raises(DataError, match=r"token id \d+ outside the tokenizer's \[0, 300\)"):
        IndexedTokens(prefix, tokenizer=SimpleNamespace(vocab_size=300, eos_id=2))
    # int32 tokens (code 4), as Megatron writes for large vocabularies
    write_megatron(str(tmp_path / "wide"), [[70_000, 1], [5]], code=4)
    assert IndexedTokens(str(tmp_path / "wide"), tokenizer=SimpleNamespace(vocab_size=70_001, eos_id=1)).tokens.tolist() == [70_000, 1, 5]


def test_documents_of_several_sequences_and_broken_indexes(tmp_path):
    prefix = str(tmp_path / "multi")
    write_megatron(prefix, [[1, 2], [3], [4, 5, 2], [6, 2]])
    index = read_megatron(prefix)
    # rewrite the document indices: documents = sequences [0, 3) and [3, 4)
    with open(prefix + ".idx", "r+b") as f:
        f.seek(26)
        f.write(np.array([3], dtype="<u8").tobytes())
        f.truncate(34 + 12 * 4)
        f.seek(0, 2)
        f.write(np.array([0, 3, 4], dtype=np.int64).tobytes())
    assert read_megatron(prefix)["lengths"].tolist() == index["lengths"].tolist()
    shard = IndexedTokens(prefix, tokenizer=TOKENIZER)
    assert shard.doc_offsets.tolist() == [0, 6, 8]

    cases = {
        "no MMIDIDX header": lambda data: b"XXXXXXXXX" + data[9:],
        "index version 2": lambda data: data[:9] + (2).to_bytes(8, "little") + data[17:],
        "dtype code 7, not an integer": lambda data: data[:17] + bytes([7]) + data[18:],
        "truncated": lambda data: data[:-8],
    }
    original = open(prefix + ".idx", "rb").read()
    for message, corrupt in cases.items():
        with open(prefix + ".idx", "wb") as f:
            f.write(corrupt(original))
        with pytest.raises(DataError, match=message.split(",")[0]) as error:
            IndexedTokens(prefix, tokenizer=TOKENIZER)
        assert "\n" not in str(error.value)
    with open(prefix + ".idx", "wb") as f:
        f.write(original)
    with open(prefix + ".bin", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(DataError, match="truncated or from another run"):
        IndexedTokens(prefix, tokenizer=TOKENIZER)


def write_legacy(prefix: str, docs, vocab=512, eos_id=2, dtype="uint16"):
    """A shard of the first format: .bin + .idx.npy offsets + .json (format_version 1)."""
    tokens = np.concatenate([np.asarray(d + [eos_id], dtype=dtype) for d in docs])
    tokens.tofile(prefix + ".bin")
    offsets = np.concatenate([[0], np.cumsum([len(d) + 1 for d in docs])]).astype(np.int64)
    np.save(prefix + ".idx.npy", offsets, allow_pickle=False)
    with open(prefix + ".json", "w") as f:
        json.dump({"format_version": 1, "dtype": dtype, "vocab_size": vocab, "tokenizer_identity": IDENTITY,
                   "eos_id": eos_id, "num_tokens": int(tokens.size), "num_docs": len(docs),
                   "max_token_id": int(tokens.max())}, f)
    return tokens


def test_legacy_shards_load_and_convert_in_place(tmp_path, capsys):
    prefix = str(tmp_path / "old")
    tokens = write_legacy(prefix, [[5, 6], [7, 8, 9], [10]])
    legacy = IndexedTokens(prefix)
    assert legacy.format == "legacy" and legacy.tokens.tolist() == tokens.tolist()
    assert legacy.doc_offsets.tolist() == [0, 3, 7, 9]

    assert load_tool("preprocess_data").main(["--convert-legacy", prefix]) == 0
    assert "converted" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path)) == ["old.bin", "old.idx", "old.json"]
    converted = IndexedTokens(prefix)
    assert converted.format == "megatron" and converted.tokens.tolist() == tokens.tolist()
    assert converted.doc_offsets.tolist() == [0, 3, 7, 9]
    assert (converted.tokenizer_identity, converted.eos_id, converted.meta["format_version"]) == (IDENTITY, 2, 2)
    assert read_megatron(prefix)["lengths"].tolist() == [3, 4, 2]

    assert load_tool("preprocess_data").main(["--convert-legacy", prefix]) == 2  # already converted
    assert capsys.readouterr().err.startswith("error: ") and sorted(os.listdir(tmp_path)) == ["old.bin", "old.idx", "old.json"]

    wide = str(tmp_path / "wide")  # uint32 ids: the same bytes as Megatron's int32, .bin kept as is
    tokens = write_legacy(wide, [[70_000, 5], [6]], vocab=70_001, dtype="uint32")
    before = open(wide + ".bin", "rb").read()
    assert load_tool("preprocess_data").main(["--convert-legacy", wide]) == 0
    assert read_megatron(wide)["code"] == 4 and read_megatron(wide)["tokens"].tolist() == tokens.tolist()
    assert open(wide + ".bin", "rb").read() == before and IndexedTokens(wide).meta["dtype"] == "int32"


def test_megatron_data_path_form():
    assert parse_data_path(["0.7 data/code 0.3 data/web"]) == (["data/code", "data/web"], [0.7, 0.3])
    assert parse_data_path(["0.7", "data/code", "0.3", "data/web"]) == (["data/code", "data/web"], [0.7, 0.3])
    assert parse_data_path(["data/a", "data/b"], [1.0, 2.0]) == (["data/a", "data/b"], [1.0, 2.0])
    assert parse_data_path(["data/a data/b"]) == (["data/a", "data/b"], [])
    for bad in (["0.7 data/code 0.3"], ["0.7 data/code data/web"], ["1 2"]):
        with pytest.raises(DataError, match="WEIGHT PREFIX"):
            parse_data_path(bad)
    with pytest.raises(DataError, match="in one place"):
        parse_data_path(["0.5 a 0.5 b"], [1.0, 1.0])


def test_per_document_packing_document_starts_and_eod_loss_mask(tmp_path):
    prefix = str(tmp_path / "docs")
    lengths = [9, 3, 13, 5]  # documents (their EOS included) of a 30-token shard, T = 4
    write_megatron(prefix, [[10 + k] * (n - 1) + [2] for k, n in enumerate(lengths)])
    per_doc = TokenChunkDataset(prefix, 4, packing="per_document", tokenizer=TOKENIZER)
    # (L - 1) // T windows per document at offsets 0, T, ...: 2 + 0 + 3 + 1, remainders dropped
    assert len(per_doc) == 6
    starts = [0, 4, 12, 16, 20, 25]
    assert [per_doc[i].tolist() for i in range(6)] == [per_doc.shards[0].tokens[s:s + 5].tolist() for s in starts]
    assert all(per_doc.document_starts(i).tolist() == [0] * 5 for i in range(6))

    stream = TokenChunkDataset(prefix, 4, document_attention="within", eod_mask_loss=True, tokenizer=TOKENIZER)
    assert len(stream) == 7
    # sample 2 = stream positions 8..12: position 8 is doc 0's EOS, 9..11 doc 1, 12 starts doc 2
    assert stream.document_starts(2).tolist() == [0, 1, 1, 1, 4]
    batch = collate(stream, [2, 0])
    assert batch.doc_start.tolist() == [[0, 1, 1, 1], [0, 0, 0, 0]]
    # no loss on the label that begins a document (its input is the previous document's EOS)
    assert batch.loss_mask.tolist() == [[0, 1, 1, 0], [1, 1, 1, 1]]
    assert batch.tokens[0].tolist() == [2, 11, 11, 2] and batch.labels[0].tolist() == [11, 11, 2, 12]
    moved = batch.to("cpu")
    assert all(getattr(moved, f).equal(getattr(batch, f)) for f in ("tokens", "labels", "loss_mask", "doc_start"))


def test_one_document_index_falls_back_to_eos(tmp_path):
    """A foreign index holding the whole shard as one document: documents are found by EOS."""
    prefix = str(tmp_path / "flat")
    write_megatron(prefix, [[5, 5, 2, 6, 6, 6, 2, 7, 2]])
    shard = IndexedTokens(prefix, tokenizer=TOKENIZER)
    assert shard.doc_offsets.tolist() == [0, 9] and shard.document_offsets().tolist() == [0, 3, 7, 9]
    dataset = TokenChunkDataset(prefix, 8, document_attention="within", tokenizer=TOKENIZER)
    assert dataset.document_starts(0).tolist() == [0, 0, 0, 3, 3, 3, 3, 7, 7]


def test_megatron_core_itself_reads_ours_and_writes_the_same_bytes(tmp_path):
    """Where megatron-core is installed (not a dependency: `pip install --no-deps megatron-core`):
    its IndexedDataset reads our shards, and its IndexedDatasetBuilder writes the same bytes."""
    indexed_dataset = pytest.importorskip("megatron.core.datasets.indexed_dataset")
    docs = [[5, 6, 7], [9] * 10, [1]]
    for vocab, dtype in ((512, np.uint16), (70_001, np.int32)):
        ours, theirs = str(tmp_path / f"ours{vocab}"), str(tmp_path / f"theirs{vocab}")
        write_indexed(ours, docs + [[70_000]] * (vocab > 65_500), vocab, IDENTITY, eos_id=2)
        dataset = indexed_dataset.IndexedDataset(ours)  # held: its mmap closes when it is dropped
        assert [dataset[i].tolist() for i in range(len(dataset))] == [d + [2] for d in docs + [[70_000]] * (vocab > 65_500)]
        builder = indexed_dataset.IndexedDatasetBuilder(theirs + ".bin", dtype=dtype)
        for doc in docs + [[70_000]] * (vocab > 65_500):
            builder.add_document(np.array(doc + [2]), [len(doc) + 1])
        builder.finalize(theirs + ".idx")
        for suffix in (".bin", ".idx"):
            with open(ours + suffix, "rb") as a, open(theirs + suffix, "rb") as b:
                assert a.read() == b.read(), (vocab, suffix)
        assert IndexedTokens(theirs, tokenizer=SimpleNamespace(vocab_size=vocab, eos_id=2)).doc_offsets.tolist() == \
            IndexedTokens(ours).doc_offsets.tolist()
