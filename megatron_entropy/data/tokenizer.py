"""Tokenizers: a SentencePiece model or a local Hugging Face tokenizer behind one small class.

`Tokenizer.identity` is a sha256 of the tokenizer file contents. Token shards and checkpoints
record it, so data made with one tokenizer is never silently trained with another.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from typing import Iterable, Iterator, Sequence

from megatron_entropy.data import DataError

# Files that define a Hugging Face tokenizer; their contents make up its identity.
_HF_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
)

# Fixed ids for the tokenizers we train; <pad> is an extra control piece after <unk>, <s>, </s>.
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3


class Tokenizer:
    """Text <-> token ids. Use `load_tokenizer` to make one.

    Attributes: vocab_size, eos_id, pad_id (equals eos_id when the tokenizer has no pad token),
    identity (sha256 hex of the tokenizer files), path (what it was loaded from).
    """

    def __init__(self, backend, kind: str, path: str, identity: str):
        self._backend = backend
        self.kind = kind  # "sentencepiece" or "huggingface"
        self.path = path
        self.identity = identity
        if kind == "sentencepiece":
            self.vocab_size = int(backend.get_piece_size())
            eos, pad = backend.eos_id(), backend.pad_id()
        else:
            self.vocab_size = len(backend)  # includes added tokens, unlike backend.vocab_size
            eos, pad = backend.eos_token_id, backend.pad_token_id
        if eos is None or eos < 0:
            raise DataError(f"tokenizer at {path} has no end-of-document (eos) token; "
                            "use a tokenizer that defines one (tools/train_tokenizer.py makes one)")
        self.eos_id = int(eos)
        self.pad_id = int(pad) if pad is not None and pad >= 0 else self.eos_id

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS (EOS is added per document by the shard writer)."""
        if self.kind == "sentencepiece":
            return self._backend.encode(text)
        return self._backend.encode(text, add_special_tokens=False)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        texts = list(texts)
        if self.kind == "sentencepiece":
            return self._backend.encode(texts)
        return self._backend(texts, add_special_tokens=False)["input_ids"]

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self.kind == "sentencepiece":
            return self._backend.decode(ids)
        return self._backend.decode(ids, skip_special_tokens=False,
                                    clean_up_tokenization_spaces=False)

    def __repr__(self) -> str:
        return (f"Tokenizer({self.kind}, vocab_size={self.vocab_size}, eos_id={self.eos_id}, "
                f"identity={self.identity[:12]}…, path={self.path!r})")


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _load_sentencepiece(model_file: str, shown_path: str) -> Tokenizer:
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor()
    try:
        processor.load(model_file)
    except (OSError, RuntimeError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"cannot read SentencePiece model {model_file} ({first_line}); "
                        "pass a valid .model file or re-run tools/train_tokenizer.py") from None
    return Tokenizer(processor, "sentencepiece", shown_path, _sha256_file(model_file))


def _load_huggingface(directory: str) -> Tokenizer:
    present = [name for name in _HF_TOKENIZER_FILES if os.path.isfile(os.path.join(directory, name))]
    if not present:
        raise DataError(f"{directory} holds neither tokenizer.model nor Hugging Face tokenizer files "
                        "(tokenizer.json, vocab.json, ...); pass a tokenizer directory or .model file")
    from transformers import AutoTokenizer  # slow to import: only when needed

    try:
        # Local files only, and never run code shipped with the directory.
        backend = AutoTokenizer.from_pretrained(directory, local_files_only=True,
                                                trust_remote_code=False)
    except Exception as err:  # transformers raises many types; report them all the same way
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise DataError(f"cannot load the Hugging Face tokenizer in {directory} ({first_line}); "
                        "check the tokenizer files there") from None
    identity = hashlib.sha256()
    for name in present:
        identity.update(f"{name}\0{_sha256_file(os.path.join(directory, name))}\n".encode())
    return Tokenizer(backend, "huggingface", directory, identity.hexdigest())


def load_tokenizer(path: str) -> Tokenizer:
    """Load a SentencePiece `.model` file, or a directory holding `tokenizer.model`
    (SentencePiece, preferred when present) or a Hugging Face tokenizer (local files only)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataError(f"tokenizer path {path} does not exist; pass a SentencePiece .model file or "
                        "a tokenizer directory (make one with tools/train_tokenizer.py)")
    if os.path.isfile(path):
        return _load_sentencepiece(path, path)
    spm_file = os.path.join(path, "tokenizer.model")
    if os.path.isfile(spm_file):
        return _load_sentencepiece(spm_file, path)
    return _load_huggingface(path)


def _lines_of(documents: Iterable[str]) -> Iterator[str]:
    """SentencePiece trains on 'sentences'; for source code one line is the natural unit.
    Newlines themselves are a user-defined piece, so they need not appear in training text."""
    for document in documents:
        for line in document.split("\n"):
            if line:
                yield line


def _read_text_files(paths: Sequence[str]) -> Iterator[str]:
    for path in paths:
        with open(path, encoding="utf-8", errors="replace", newline="") as f:
            yield f.read()


def train_sentencepiece(text_files, vocab_size: int, out_dir: str) -> str:
    """Train a byte-fallback BPE SentencePiece model and return the path of `out_dir/tokenizer.model`.

    `text_files` is a list/tuple of text file paths, or any other iterable of document strings.
    The settings keep text exactly (no normalisation, spaces kept, newline is its own piece,
    unknown characters fall back to bytes), so decode(encode(x)) == x for source code.
    Ids: <unk>=0, <s>=1, </s>=2 (eos), <pad>=3. Training is single-threaded and so deterministic:
    the same text and vocab_size give a byte-identical model (and identity).
    """
    import sentencepiece as spm

    if isinstance(text_files, (str, bytes)):
        raise DataError("train_sentencepiece takes a list of file paths or an iterator of texts, "
                        "not a single string; wrap it in a list")
    if isinstance(text_files, (list, tuple)):
        missing = [p for p in text_files if not os.path.isfile(p)]
        if missing:
            raise DataError(f"tokenizer training file {str(missing[0])[:200]!r} does not exist; pass "
                            "existing text files (use iter(texts) for in-memory documents)")
        documents = _read_text_files(text_files)
    else:
        documents = iter(text_files)
    if vocab_size < 300:
        raise DataError(f"vocab_size {vocab_size} is too small for a byte-fallback tokenizer "
                        "(256 byte pieces + specials + characters); use at least 300")

    # Peek so that an empty corpus gives our error, not SentencePiece's.
    sentences = _lines_of(documents)
    first = next(sentences, None)
    if first is None:
        raise DataError("tokenizer training text is empty; pass files or documents with text")

    def all_sentences():
        yield first
        yield from sentences

    model = io.BytesIO()  # writing to memory keeps temp paths out of the model (and its identity)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=all_sentences(),
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            byte_fallback=True,
            character_coverage=1.0,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            split_digits=True,
            allow_whitespace_only_pieces=True,  # indentation runs become single pieces
            user_defined_symbols=["\n"],
            max_sentence_length=16384,
            unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID, pad_piece="<pad>",
            num_threads=1,
            minloglevel=2,
        )
    except RuntimeError as err:
        first_line = (str(err).strip().splitlines() or ["unknown error"])[0]
        raise DataError(f"SentencePiece training failed ({first_line}); "
                        "use more text or a different vocab_size") from None

    os.makedirs(out_dir, exist_ok=True)
    out_path = os.path.join(out_dir, "tokenizer.model")
    fd, tmp_path = tempfile.mkstemp(dir=out_dir, prefix=".tokenizer.model.")
    with os.fdopen(fd, "wb") as f:
        f.write(model.getvalue())
    os.chmod(tmp_path, 0o644)  # mkstemp makes it private; a tokenizer is shared with other users
    os.replace(tmp_path, out_path)
    return out_path
