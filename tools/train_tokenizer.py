#!/usr/bin/env python
"""Train a SentencePiece BPE tokenizer for code (see docs/data.md).

  python tools/train_tokenizer.py --embedded --vocab-size 4096 --output runs/tokenizer
  python tools/train_tokenizer.py --input 'corpus/*.txt' --vocab-size 32000 --output tok/

Writes OUTPUT/tokenizer.model (load it with load_tokenizer(OUTPUT)). Byte fallback, no
normalisation, whitespace and newlines kept exactly; eos id 2, pad id 3. The same text and
vocab size give a byte-identical model. Errors print one line and exit with code 2, writing nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_entropy.data import DataError, embedded_documents, load_tokenizer  # noqa: E402
from megatron_entropy.data import train_sentencepiece  # noqa: E402
from megatron_entropy.data.corpus import expand_paths  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", metavar="FILE",
                        help="UTF-8 text files, directories (their .txt/.py files) or globs")
    source.add_argument("--embedded", action="store_true",
                        help="train on the embedded default corpus (Python standard library)")
    parser.add_argument("--max-bytes", type=int, default=4_000_000,
                        help="with --embedded: bytes of the corpus to use (default: 4000000)")
    parser.add_argument("--vocab-size", type=int, required=True)
    parser.add_argument("--output", required=True, help="directory for tokenizer.model")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing OUTPUT/tokenizer.model")
    return parser.parse_args(argv)


def train(args) -> str:
    model_path = os.path.join(args.output, "tokenizer.model")
    if os.path.exists(model_path) and not args.overwrite:
        raise DataError(f"{model_path} already exists; pass --overwrite or choose another --output")
    if args.embedded:
        texts = iter(embedded_documents("train", args.max_bytes))
    else:
        # Named files of any name are read as text; directories contribute their .txt/.py files.
        texts = expand_paths(args.input, suffixes=(".txt", ".py"), any_named_file=True)
    started = time.perf_counter()
    train_sentencepiece(texts, args.vocab_size, args.output)
    tokenizer = load_tokenizer(args.output)
    return (f"wrote {model_path}: vocab {tokenizer.vocab_size}, eos {tokenizer.eos_id}, "
            f"pad {tokenizer.pad_id}, identity {tokenizer.identity[:16]}, "
            f"{time.perf_counter() - started:.1f}s")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        print(train(args))
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
