#!/usr/bin/env python
"""Tokenize text into one memory-mapped token shard in Megatron's .bin/.idx format (see docs/data.md).

  python tools/preprocess_data.py --input 'corpus/*.jsonl' --tokenizer tok/ \\
      --output-prefix data/corpus_train --workers 8
  python tools/preprocess_data.py --convert-legacy data/old_shard   # .idx.npy -> .idx, in place

Inputs: .txt (a whole file is one document, or one per line with --txt-mode line), .jsonl (one
JSON object per line, text under --json-key), .parquet (column --json-key), or a Hugging Face
dataset (--hf-dataset). Workers tokenize in parallel but results are written in input order,
so the shard is the same for any --workers. Errors print one line and exit with code 2, and
leave nothing behind.
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_entropy.data import DataError, load_tokenizer  # noqa: E402
from megatron_entropy.data.corpus import expand_paths  # noqa: E402
from megatron_entropy.data.indexed import ShardWriter, convert_legacy, shard_exists, token_dtype  # noqa: E402

SUFFIXES = (".txt", ".jsonl", ".parquet")
BATCH_BYTES = 1 << 20  # text per worker task: big enough to amortise the inter-process copy
BATCH_DOCS = 1024


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", metavar="PATH",
                        help="local .txt/.jsonl/.parquet files, directories or globs")
    source.add_argument("--hf-dataset", metavar="NAME",
                        help="Hugging Face dataset name or local dataset directory")
    source.add_argument("--convert-legacy", metavar="PREFIX",
                        help="rewrite a shard of the old format (PREFIX.idx.npy) as PREFIX.bin/.idx/.json")
    parser.add_argument("--hf-config", default=None, help="dataset configuration name")
    parser.add_argument("--split", default="train", help="dataset split (default: train)")
    parser.add_argument("--json-key", default="text",
                        help="text field of .jsonl/.parquet/HF records (default: text)")
    parser.add_argument("--txt-mode", choices=("file", "line"), default="file",
                        help="a .txt file is one document (file) or one per non-empty line (line)")
    parser.add_argument("--tokenizer",
                        help="SentencePiece .model file or tokenizer directory (required to tokenize)")
    parser.add_argument("--output-prefix",
                        help="writes PREFIX.bin, PREFIX.idx (Megatron) and PREFIX.json (our sidecar)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="tokenizer processes (default: min(8, CPUs))")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing shard")
    return parser.parse_args(argv)


def read_txt(path: str, mode: str):
    # newline="": keep "\r\n" as written; the tokenizer must see the text exactly
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        if mode == "file":
            yield f.read()
        else:
            for line in f:
                yield line.rstrip("\r\n")


def read_jsonl(path: str, key: str):
    with open(path, encoding="utf-8", errors="replace") as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as err:
                raise DataError(f"{path}:{line_number} is not valid JSON ({err}); "
                                "fix the line or drop the file") from None
            yield _text_field(record, key, f"{path}:{line_number}")


def read_parquet(path: str, key: str):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("reading .parquet needs pyarrow; pip install pyarrow") from None
    table = pq.ParquetFile(path)
    if key not in table.schema_arrow.names:
        raise DataError(f"{path} has no column {key!r} (columns: {', '.join(table.schema_arrow.names)}); "
                        "pass --json-key COLUMN")
    for batch in table.iter_batches(columns=[key], batch_size=1024):
        for text in batch.column(0).to_pylist():
            yield _check_text(text, f"{path} column {key!r}")


def read_hf_dataset(name: str, config: str | None, split: str, key: str):
    try:
        import datasets

        datasets.disable_progress_bars()  # our own bar is enough; keeps error output to one line
        dataset = datasets.load_dataset(name, config, split=split)
    except Exception as err:  # datasets raises many types; report them all the same way
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise DataError(f"cannot load Hugging Face dataset {name!r} ({first_line}); check the name, "
                        "--hf-config and --split, and that it is cached when offline") from None
    if key not in dataset.column_names:
        raise DataError(f"dataset {name!r} has no column {key!r} (columns: "
                        f"{', '.join(dataset.column_names)}); pass --json-key COLUMN")
    for start in range(0, len(dataset), 1024):
        for text in dataset[start:start + 1024][key]:
            yield _check_text(text, f"dataset {name!r} column {key!r}")


def _text_field(record, key: str, where: str) -> str:
    if not isinstance(record, dict) or key not in record:
        raise DataError(f"{where} has no {key!r} field; pass --json-key FIELD")
    return _check_text(record[key], where)


def _check_text(text, where: str) -> str:
    if text is None:
        return ""
    if not isinstance(text, str):
        raise DataError(f"{where} holds a {type(text).__name__}, not text; pass --json-key "
                        "naming a text field")
    return text


def documents(args, paths: list[str]):
    if args.hf_dataset:
        yield from read_hf_dataset(args.hf_dataset, args.hf_config, args.split, args.json_key)
        return
    for path in paths:
        if path.endswith(".txt"):
            yield from read_txt(path, args.txt_mode)
        elif path.endswith(".jsonl"):
            yield from read_jsonl(path, args.json_key)
        else:
            yield from read_parquet(path, args.json_key)


def batches(texts):
    """Groups of non-empty documents, about BATCH_BYTES each. Empty documents are dropped
    (they would be a lone EOS); the number dropped is yielded with each batch."""
    batch, size, dropped = [], 0, 0
    for text in texts:
        if not text:
            dropped += 1
            continue
        batch.append(text)
        size += len(text)
        if size >= BATCH_BYTES or len(batch) >= BATCH_DOCS:
            yield batch, dropped
            batch, size, dropped = [], 0, 0
    if batch or dropped:
        yield batch, dropped


# Each worker process loads the tokenizer once.
_worker_tokenizer = None


def _init_worker(tokenizer_path: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = load_tokenizer(tokenizer_path)


def _encode(task):
    """(token arrays, characters read, empty documents dropped) of one batch."""
    texts, dropped = task
    dtype = token_dtype(_worker_tokenizer.vocab_size)  # compact arrays are cheap to send back
    token_docs = [np.asarray(ids, dtype=dtype) for ids in _worker_tokenizer.encode_batch(texts)]
    return token_docs, sum(len(t) for t in texts), dropped


def ordered_map(pool, function, tasks, max_in_flight: int):
    """Like pool.imap, but reads at most max_in_flight tasks ahead, so memory stays bounded
    however large the input, and a reading error surfaces here, in this thread."""
    pending = collections.deque()
    for task in tasks:
        pending.append(pool.apply_async(function, (task,)))
        if len(pending) >= max_in_flight:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def convert(prefix: str) -> str:
    started = time.perf_counter()
    meta = convert_legacy(prefix)
    return (f"converted {prefix} to .bin/.idx/.json: {meta['num_docs']:,} docs, "
            f"{meta['num_tokens']:,} tokens in {time.perf_counter() - started:.1f}s")


def preprocess(args) -> str:
    if args.convert_legacy:
        return convert(args.convert_legacy)
    missing = [flag for flag, value in (("--tokenizer", args.tokenizer),
                                        ("--output-prefix", args.output_prefix)) if not value]
    if missing:
        raise DataError(f"{' and '.join(missing)} required to tokenize text; pass them")
    if args.workers < 1:
        raise DataError(f"--workers must be >= 1, got {args.workers}")
    paths = [] if args.hf_dataset else expand_paths(args.input, SUFFIXES)
    tokenizer = load_tokenizer(args.tokenizer)
    prefix = args.output_prefix
    if shard_exists(prefix) and not args.overwrite:
        raise DataError(f"output {prefix} already exists; pass --overwrite or choose another "
                        "--output-prefix")

    from tqdm import tqdm

    directory = os.path.dirname(os.path.abspath(prefix))
    created_directory = not os.path.isdir(directory)
    os.makedirs(directory, exist_ok=True)
    started = time.perf_counter()
    dropped = text_chars = 0
    pool = None
    try:
        tasks = batches(documents(args, paths))
        if args.workers == 1:
            _init_worker(args.tokenizer)
            results = map(_encode, tasks)
        else:
            # fork where there is one: a spawned worker would re-import the whole package
            # (torch included, ~1 s each); nothing here has started threads yet.
            methods = multiprocessing.get_all_start_methods()
            context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
            pool = context.Pool(
                args.workers, initializer=_init_worker, initargs=(args.tokenizer,))
            # Results come back in input order, so the shard is the same for any --workers.
            results = ordered_map(pool, _encode, tasks, max_in_flight=2 * args.workers)
        with ShardWriter(prefix, tokenizer.vocab_size, tokenizer.identity,
                         eos_id=tokenizer.eos_id, overwrite=True) as writer, \
                tqdm(unit=" docs", desc="tokenizing", disable=None, file=sys.stderr) as progress:
            for token_docs, chars, batch_dropped in results:
                for tokens in token_docs:
                    writer.add(tokens)
                dropped += batch_dropped
                text_chars += chars
                progress.update(len(token_docs))
            if writer.num_docs == 0:
                raise DataError(f"the input holds no text ({dropped} empty documents); "
                                "check the input files and --json-key")
            meta = writer.commit()
    except BaseException:
        if created_directory and os.path.isdir(directory) and not os.listdir(directory):
            os.rmdir(directory)
        raise
    finally:
        if pool is not None:
            pool.terminate()
    seconds = time.perf_counter() - started
    return (f"wrote {prefix}: {meta['num_docs']:,} docs, {meta['num_tokens']:,} tokens "
            f"({text_chars:,} chars, {dropped:,} empty docs skipped) in {seconds:.1f}s, "
            f"{meta['num_tokens'] / max(seconds, 1e-9):,.0f} tokens/s")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        print(preprocess(args))
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
