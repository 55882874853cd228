"""Data pipeline: tokenizer, token shards, samples and their order, tools, default corpus cache.

Small on purpose (300 KB of corpus, vocab 512): the whole file runs in well under a minute on
two cores. Tool runs are real subprocesses, started together where they are independent.
"""

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from megatron_entropy.data import (
    DataError,
    GlobalBatchSampler,
    IndexedTokens,
    TokenChunkDataset,
    collate,
    embedded_documents,
    load_tokenizer,
    prepare_default_data,
    slice_for_rank,
    train_sentencepiece,
    write_indexed,
)
from megatron_entropy.data.order import SeededPermutation

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMALL_BYTES = 300_000
SMALL_VOCAB = 512
IDENTITY = "a" * 64

PYTHON_SOURCE = (
    "import os\n\n\n"
    "class Greeter:\n"
    '    """Says hello."""\n\n'
    "    def greet(self, name: str) -> str:\n"
    "        if not name:\n"
    "            return  'nobody'   # two spaces, then three\n"
    "        for i in range(10_000):\n"
    "\t\tpass  \n"
    "        return f\"héllo {name} ✓ 😀\"\n"
    "\n\n"
    "    \n"
    "x = {'a': [1, 2,\n"
    "         3]}\r\n"
)


def run_tools(*argv_lists, env_extra=None):
    """Run `python <argv>` for each argv list at the same time; returns CompletedProcess-likes."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", **(env_extra or {}))
    processes = [subprocess.Popen([sys.executable, *argv], cwd=REPO, env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for argv in argv_lists]
    results = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=120)
        results.append(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr))
    return results


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("tokenizer")
    return train_sentencepiece(iter(embedded_documents("train", SMALL_BYTES)), SMALL_VOCAB,
                               str(out_dir))


# --- tokenizer -------------------------------------------------------------------------------

def test_tokenizer_round_trips_python_source(tokenizer_path):
    tokenizer = load_tokenizer(tokenizer_path)
    assert (tokenizer.vocab_size, tokenizer.eos_id, tokenizer.pad_id) == (SMALL_VOCAB, 2, 3)
    for text in [PYTHON_SOURCE, "", " ", "\n\n", "    \n\t"] + embedded_documents("valid", 50_000):
        ids = tokenizer.encode(text)
        assert all(0 <= i < tokenizer.vocab_size for i in ids)
        assert tokenizer.decode(ids) == text
    assert tokenizer.encode_batch([PYTHON_SOURCE, "x"]) == [tokenizer.encode(PYTHON_SOURCE),
                                                              tokenizer.encode("x")]
    # Indentation is learned as whole pieces, not one token per space.
    assert len(tokenizer.encode("        return")) <= 3


def test_tokenizer_identity_and_determinism(tokenizer_path, tmp_path):
    tokenizer = load_tokenizer(tokenizer_path)
    with open(tokenizer_path, "rb") as f:
        assert tokenizer.identity == hashlib.sha256(f.read()).hexdigest()
    assert load_tokenizer(os.path.dirname(tokenizer_path)).identity == tokenizer.identity
    again = train_sentencepiece(iter(embedded_documents("train", SMALL_BYTES)), SMALL_VOCAB,
                                str(tmp_path))
    assert load_tokenizer(again).identity == tokenizer.identity


def test_tokenizer_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_tokenizer(str(tmp_path / "missing.model"))
    with pytest.raises(DataError, match="neither tokenizer.model"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(DataError, match="empty"):
        train_sentencepiece(iter(["", "\n"]), SMALL_VOCAB, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_huggingface_tokenizer_directory(tmp_path):
    pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    byte_level = tokenizers.pre_tokenizers.ByteLevel
    backend = tokenizers.Tokenizer(tokenizers.models.BPE())
    backend.pre_tokenizer = byte_level(add_prefix_space=False)
    backend.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                             initial_alphabet=byte_level.alphabet())
    backend.train_from_iterator([PYTHON_SOURCE] * 5, trainer)
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>").save_pretrained(
        str(tmp_path))
    tokenizer = load_tokenizer(str(tmp_path))
    assert tokenizer.kind == "huggingface" and tokenizer.eos_id == tokenizer.pad_id == 0
    assert tokenizer.decode(tokenizer.encode(PYTHON_SOURCE)) == PYTHON_SOURCE
    assert len(tokenizer.identity) == 64


# --- token shards ----------------------------------------------------------------------------

def test_shard_round_trip(tmp_path):
    docs = [[5, 6, 7], [], [9] * 10]
    meta = write_indexed(str(tmp_path / "s"), docs, vocab_size=16, tokenizer_identity=IDENTITY,
                         eos_id=1)
    shard = IndexedTokens(str(tmp_path / "s"))
    assert shard.tokens.dtype == np.uint16
    assert shard.tokens.tolist() == [5, 6, 7, 1, 1] + [9] * 10 + [1]
    assert shard.doc_offsets.tolist() == [0, 4, 5, 16]
    assert shard.document(2).tolist() == [9] * 10 + [1]
    assert meta == shard.meta and meta["num_docs"] == 3 and meta["num_tokens"] == 16
    assert IndexedTokens(str(tmp_path / "s.bin")).num_tokens == 16  # a file name works too
    write_indexed(str(tmp_path / "big"), [[70_000]], 70_001, IDENTITY, eos_id=0)
    assert IndexedTokens(str(tmp_path / "big")).tokens.dtype == np.int32  # Megatron has no uint32


def test_shard_writer_rejects_bad_tokens_and_writes_nothing(tmp_path):
    with pytest.raises(DataError, match="outside"):
        write_indexed(str(tmp_path / "s"), [[1, 2], [16]], 16, IDENTITY)
    with pytest.raises(DataError, match="no documents"):
        write_indexed(str(tmp_path / "s"), [], 16, IDENTITY)
    assert os.listdir(tmp_path) == []


def test_indexed_rejects_truncated_or_corrupt_shards(tmp_path):
    prefix = str(tmp_path / "s")
    with pytest.raises(DataError, match="does not exist"):
        IndexedTokens(prefix)
    write_indexed(prefix, [[3, 4, 5, 6]], 16, IDENTITY, eos_id=1)
    with open(prefix + ".bin", "r+b") as f:
        f.truncate(4)
    with pytest.raises(DataError, match="truncated") as error:
        IndexedTokens(prefix)
    assert "\n" not in str(error.value)
    write_indexed(prefix, [[3, 4, 5, 6]], 16, IDENTITY, eos_id=1)
    np.array([3, 4, 99, 6, 1], dtype=np.uint16).tofile(prefix + ".bin")  # same size, bad id
    with pytest.raises(DataError, match=r"99 outside the tokenizer.s \[0, 16\)"):
        IndexedTokens(prefix)


# --- samples ---------------------------------------------------------------------------------

def make_shards(tmp_path, sizes, vocab=1000, identity=IDENTITY):
    """Shards whose concatenated tokens are 0, 1, 2, ... (one document each, no EOS)."""
    prefixes, start = [], 0
    for k, size in enumerate(sizes):
        prefix = str(tmp_path / f"shard_{k}")
        write_indexed(prefix, [np.arange(start, start + size)], vocab, identity)
        prefixes.append(prefix)
        start += size
    return prefixes


def test_token_chunk_dataset_spans_shards(tmp_path):
    dataset = TokenChunkDataset(make_shards(tmp_path, [10, 7, 20]), seq_length=4)
    assert len(dataset) == (37 - 1) // 4
    for i in range(len(dataset)):
        assert dataset[i].tolist() == list(range(4 * i, 4 * i + 5))
        assert dataset[i].dtype == np.int64
    batch = collate(dataset, [2, 0])
    inputs, labels = batch.tokens, batch.labels
    assert batch.doc_start is None and batch.loss_mask is None
    assert inputs.shape == labels.shape == (2, 4)
    assert inputs.tolist() == [[8, 9, 10, 11], [0, 1, 2, 3]]
    assert labels.tolist() == [[9, 10, 11, 12], [1, 2, 3, 4]]


def test_token_chunk_dataset_tokenizer_mismatch(tmp_path):
    prefixes = make_shards(tmp_path, [100])
    TokenChunkDataset(prefixes, 8, expected_vocab_size=1000, expected_tokenizer_identity=IDENTITY)
    with pytest.raises(DataError, match=r"vocab 1000 .*uses vocab 512.*re-run tools/preprocess_data"):
        TokenChunkDataset(prefixes, 8, expected_vocab_size=512)
    with pytest.raises(DataError, match="identity bbbbbbbbbbbb"):
        TokenChunkDataset(prefixes, 8, expected_tokenizer_identity="b" * 64)
    other = str(tmp_path / "other")
    write_indexed(other, [[1, 2, 3]], 1000, "c" * 64)
    with pytest.raises(DataError, match="shard .*shard_0 uses"):
        TokenChunkDataset(prefixes + [other], 8)


def test_token_chunk_dataset_too_little_data(tmp_path):
    with pytest.raises(DataError, match="fewer than one sample"):
        TokenChunkDataset(make_shards(tmp_path, [8]), seq_length=8)
    with pytest.raises(DataError, match="no token shards"):
        TokenChunkDataset([], seq_length=8)


def batches(sampler, count):
    return [sampler.next_global_batch().tolist() for _ in range(count)]


def test_sampler_is_deterministic_and_covers_each_epoch():
    order = batches(GlobalBatchSampler(10, 4, seed=1), 5)  # 20 samples: two epochs exactly
    assert order == batches(GlobalBatchSampler(10, 4, seed=1), 5)
    assert order != batches(GlobalBatchSampler(10, 4, seed=2), 5)
    flat = sum(order, [])
    assert sorted(flat[:10]) == sorted(flat[10:]) == list(range(10))
    assert flat[:10] != flat[10:]  # a fresh permutation per epoch
    assert flat[:10] == SeededPermutation(10, [1, 0])[np.arange(10)].tolist()


def test_sampler_resume_continues_exactly():
    uninterrupted = GlobalBatchSampler(13, 5, seed=7)
    expected = batches(uninterrupted, 8)
    first = GlobalBatchSampler(13, 5, seed=7)
    head = batches(first, 3)
    state = json.loads(json.dumps(first.state_dict()))  # plain ints survive any checkpoint
    assert state["consumed_samples"] == 15
    resumed = GlobalBatchSampler(13, 5, seed=7)
    resumed.load_state_dict(state)
    assert head + batches(resumed, 5) == expected
    also = GlobalBatchSampler(13, 5, seed=7, consumed_samples=15)
    assert batches(also, 5) == expected[3:]
    with pytest.raises(DataError, match="seed"):
        GlobalBatchSampler(13, 5, seed=8).load_state_dict(state)


@pytest.mark.parametrize("dp_size", [1, 2, 4])
def test_rank_slices_make_up_the_global_batch(dp_size):
    global_batch = GlobalBatchSampler(100, 16, seed=0).next_global_batch()
    pieces = []
    for rank in range(dp_size):
        micro_batches = slice_for_rank(global_batch, rank, dp_size, micro_batch_size=2)
        assert len(micro_batches) == 16 // dp_size // 2
        assert all(len(m) == 2 for m in micro_batches)
        pieces.extend(micro_batches)
    assert np.concatenate(pieces).tolist() == global_batch.tolist()
    with pytest.raises(DataError, match="micro-batches"):
        slice_for_rank(global_batch, 0, dp_size, micro_batch_size=3)


# --- tools -----------------------------------------------------------------------------------

def load_tool(name):
    """Import tools/<name>.py as a module, to call its main(argv) in this process."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # so that worker processes can unpickle its functions
    spec.loader.exec_module(module)
    return module


def test_preprocess_tool_txt_jsonl_parquet(tokenizer_path, tmp_path, capsys):
    texts = [PYTHON_SOURCE, "def f():\n    return 1\n", "print('x')\n", "\n\nz = 3\n"]
    (tmp_path / "a.txt").write_text(texts[0], encoding="utf-8", newline="")
    with open(tmp_path / "b.jsonl", "w", encoding="utf-8") as f:
        for text in texts[1:3]:
            f.write(json.dumps({"content": text}) + "\n")
    inputs = [str(tmp_path / "a.txt"), str(tmp_path / "*.jsonl")]
    expected = texts[:3]
    try:
        import pyarrow
        import pyarrow.parquet

        pyarrow.parquet.write_table(pyarrow.table({"content": texts[3:]}), tmp_path / "c.parquet")
        inputs.append(str(tmp_path / "c.parquet"))
        expected = texts
    except ImportError:
        pass
    common = ["--input", *inputs, "--json-key", "content", "--tokenizer", tokenizer_path]
    (two,) = run_tools(["tools/preprocess_data.py", *common, "--workers", "2",
                        "--output-prefix", str(tmp_path / "out" / "w2")])
    assert two.returncode == 0, two.stderr
    assert f"{len(expected)} docs" in two.stdout and "tokens/s" in two.stdout
    assert load_tool("preprocess_data").main(
        common + ["--workers", "1", "--output-prefix", str(tmp_path / "w1")]) == 0

    tokenizer = load_tokenizer(tokenizer_path)
    shard = IndexedTokens(str(tmp_path / "out" / "w2"))
    assert shard.meta["tokenizer_identity"] == tokenizer.identity
    expected_tokens = sum((tokenizer.encode(t) + [tokenizer.eos_id] for t in expected), [])
    assert shard.tokens.tolist() == expected_tokens
    assert [tokenizer.decode(shard.document(i)[:-1]) for i in range(len(shard))] == expected
    with open(tmp_path / "out" / "w2.bin", "rb") as a, open(tmp_path / "w1.bin", "rb") as b:
        assert a.read() == b.read()  # same shard whatever the worker count


def assert_one_line_error(returncode, stdout, stderr, expected_text):
    assert returncode == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert expected_text in lines[0] and stdout == ""


def test_tool_errors_are_one_line_exit_2_and_write_nothing(tokenizer_path, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.jsonl").write_text('{"text": ""}\n\n')
    existing = str(tmp_path / "existing")
    write_indexed(existing, [[1]], SMALL_VOCAB, IDENTITY)
    before = sorted(os.listdir(tmp_path))
    out = str(tmp_path / "new" / "shard")
    tokenizer = ["--tokenizer", tokenizer_path]
    one_worker = ["--workers", "1"]

    # As scripts, the way users run them.
    scripts = run_tools(
        ["tools/preprocess_data.py", "--input", str(tmp_path / "missing.txt"), *tokenizer,
         "--output-prefix", out, *one_worker],
        ["tools/preprocess_data.py", "--input", str(tmp_path / "empty.txt"), *tokenizer,
         "--output-prefix", out, "--workers", "2"],
        ["tools/train_tokenizer.py", "--input", str(tmp_path / "missing*.txt"),
         "--vocab-size", "512", "--output", str(tmp_path / "tok")],
    )
    for result, expected in zip(scripts, ["does not exist", "no text", "matches no file"]):
        assert_one_line_error(result.returncode, result.stdout, result.stderr, expected)

    # The other cases in-process (each script start costs seconds of imports).
    preprocess, train_tokenizer = load_tool("preprocess_data"), load_tool("train_tokenizer")
    cases = [
        (preprocess, ["--input", str(tmp_path / "blank.jsonl"), *tokenizer, *one_worker,
                      "--output-prefix", out], "no text"),
        (preprocess, ["--input", str(tmp_path / "blank.jsonl"), *tokenizer, *one_worker,
                      "--output-prefix", existing], "already exists"),
        (preprocess, ["--input", str(tmp_path / "blank.jsonl"), "--tokenizer",
                      str(tmp_path / "no_tokenizer"), *one_worker, "--output-prefix", out],
         "does not exist"),
        (train_tokenizer, ["--input", str(tmp_path / "empty.txt"), "--vocab-size", "512",
                           "--output", str(tmp_path / "tok")], "empty"),
    ]
    capsys.readouterr()
    for tool, argv, expected in cases:
        returncode = tool.main(argv)
        captured = capsys.readouterr()
        assert_one_line_error(returncode, captured.out, captured.err, expected)
    assert sorted(os.listdir(tmp_path)) == before


def test_tools_help(capsys):
    for name in ("preprocess_data", "train_tokenizer"):
        with pytest.raises(SystemExit) as exit_info:
            load_tool(name).main(["--help"])
        assert exit_info.value.code == 0 and "usage:" in capsys.readouterr().out


# --- default corpus --------------------------------------------------------------------------

def test_embedded_corpus_split_and_budget():
    train = embedded_documents("train", SMALL_BYTES)
    valid = embedded_documents("valid", 10**9)
    assert sum(len(d.encode("utf-8")) for d in train) <= SMALL_BYTES
    assert sum(len(d.encode("utf-8")) for d in train) > SMALL_BYTES * 0.9
    assert len(valid) >= 3 and not set(valid) & set(embedded_documents("train", 10**9))
    assert embedded_documents("train", SMALL_BYTES) == train


def test_prepare_default_data_is_cached(tmp_path):
    logs = []
    first = prepare_default_data(str(tmp_path), SMALL_VOCAB, SMALL_BYTES, log=logs.append)
    assert any("building" in line for line in logs)
    started = time.perf_counter()
    second = prepare_default_data(str(tmp_path), SMALL_VOCAB, SMALL_BYTES, log=logs.append)
    assert time.perf_counter() - started < 1.0
    assert first == second
    tokenizer = load_tokenizer(first.tokenizer_path)
    train = TokenChunkDataset([first.train_prefix], 64, tokenizer.vocab_size, tokenizer.identity)
    valid = IndexedTokens(first.valid_prefix)
    assert len(train) > 100 and valid.num_tokens > 0
    train_docs = embedded_documents("train", SMALL_BYTES)
    assert tokenizer.decode(IndexedTokens(first.train_prefix).document(0)[:-1]) == train_docs[0]


def test_prepare_default_data_concurrent_processes(tmp_path):
    script = ("import sys; from megatron_entropy.data import prepare_default_data as p; "
              f"print(p(sys.argv[1], {SMALL_VOCAB}, {SMALL_BYTES}, log=lambda m: print('LOG', m)))")
    results = run_tools(["-c", script, str(tmp_path)], ["-c", script, str(tmp_path)],
                        env_extra={"PYTHONPATH": REPO})
    assert all(r.returncode == 0 for r in results), [r.stderr for r in results]
    paths = [r.stdout.strip().splitlines()[-1] for r in results]
    assert paths[0] == paths[1]
    assert sum(r.stdout.count("LOG default data: building") for r in results) == 1
    entries = [name for name in os.listdir(tmp_path) if not name.endswith(".lock")]
    assert len(entries) == 1 and not entries[0].startswith(".")  # no staging dirs left behind
    IndexedTokens(os.path.join(tmp_path, entries[0], "train"))
