"""The shipped lm-eval task set, built deterministically from the embedded corpus' validation files.

The embedded corpus (data/corpus.py) holds out ~2% of the standard library's files by a hash of
their paths; no model trained on the default data has seen them. Two tasks are made from them:

  me_next_line    multiple choice: the 8 lines before a line of code (at most 400 characters),
                  then which of 4 lines (ASCII, at most 60 characters) comes next. The 3
                  distractors are lines from other held-out files with the same indentation and
                  a length within 25% (or 4 characters), so neither whitespace nor length gives
                  the answer away. Chance: acc 0.25.
  me_rolling_ppl  rolling log-likelihood of 40 snippets of whole lines (at most 1200 characters,
                  at most 6 per file): byte_perplexity and bits_per_byte
                  (lm-eval's word_perplexity means little on code: it is not reported).

The files live in megatron_entropy/downstream/task_files/ (YAML configs, JSONL data, and the
loader the YAMLs name with `!function`, so lm-eval's `include_path` works from any directory).
`python tools/make_harness_tasks.py` rewrites them; MANIFEST.json records the Python version
whose standard library they came from (another version's library gives other examples).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import sys
from pathlib import Path

TASK_DIR = Path(__file__).resolve().parent / "task_files"
TAG = "megatron_entropy"  # lm-eval tag: every shipped task
SEED = 20260101
NEXT_LINE_EXAMPLES = 200
CONTEXT_LINES, CONTEXT_CHARS, CHOICES = 8, 400, 4
ROLLING_SNIPPETS, SNIPPET_CHARS, SNIPPETS_PER_FILE = 40, 1200, 6

INSTALL_HINT = "lm-evaluation-harness is not installed; install it with pip install -e .[eval]"
_TASK_LINE = re.compile(r"^task:\s*(\S+)\s*$", re.M)


def shipped_task_names() -> list[str]:
    """Task names of the shipped YAML files (read as text: no lm_eval import needed)."""
    names = []
    for path in sorted(TASK_DIR.glob("*.yaml")):
        match = _TASK_LINE.search(path.read_text())
        if match:
            names.append(match.group(1))
    return names


def unknown_tasks(names: list[str]) -> list[str]:
    """The names that are neither a shipped task nor their tag."""
    known = set(shipped_task_names()) | {TAG}
    return [name for name in names if name not in known]


def _candidate_line(line: str) -> bool:
    """A line worth predicting: code, not blank, no trailing whitespace, ASCII and at most 60
    characters (so even a character-level tokenizer fits a choice in a 64-token model)."""
    text = line.strip()
    return 8 <= len(text) and len(line) <= 60 and line.isascii() and line == line.rstrip() \
        and not text.startswith("#")


def _indent(line: str) -> str:
    return line[: len(line) - len(line.lstrip())]


def next_line_examples(documents: list[str], rng: random.Random) -> list[dict]:
    lines_of = [doc.split("\n") for doc in documents]
    by_indent: dict[str, list[tuple[int, str]]] = {}
    positions = []
    for d, lines in enumerate(lines_of):
        for i, line in enumerate(lines):
            if not _candidate_line(line):
                continue
            by_indent.setdefault(_indent(line), []).append((d, line))
            before = lines[i - 1] if i else ""
            # the context must end in a non-space character: lm-eval moves trailing whitespace into
            # the continuation, which would then differ from the "\n" + line every choice starts with
            if i >= CONTEXT_LINES and before.strip() and before == before.rstrip():
                positions.append((d, i))
    rng.shuffle(positions)
    examples, used = [], set()
    for d, i in positions:
        lines, target = lines_of[d], lines_of[d][i]
        pool = sorted({line for doc, line in by_indent[_indent(target)]
                       if doc != d and line != target and abs(len(line) - len(target)) <= max(4, len(target) // 4)})
        if len(pool) < CHOICES - 1 or (d, i) in used:
            continue
        context_lines = lines[i - CONTEXT_LINES:i]
        while len("\n".join(context_lines)) > CONTEXT_CHARS and len(context_lines) > 1:
            context_lines = context_lines[1:]
        context = "\n".join(context_lines)
        if len(context) > CONTEXT_CHARS:
            continue
        choices = ["\n" + line for line in [target] + rng.sample(pool, CHOICES - 1)]
        order = list(range(CHOICES))
        rng.shuffle(order)
        examples.append({"context": context, "choices": [choices[k] for k in order], "label": order.index(0)})
        used.add((d, i))
        if len(examples) == NEXT_LINE_EXAMPLES:
            break
    return examples


def rolling_snippets(documents: list[str], rng: random.Random) -> list[dict]:
    candidates = []
    for lines in (doc.split("\n") for doc in documents):
        starts = list(range(0, len(lines), 40))  # windows of up to 40 lines, cut to SNIPPET_CHARS
        rng.shuffle(starts)
        taken = 0
        for start in starts:
            text = ""
            for line in lines[start:start + 40]:
                if len(text) + len(line) + 1 > SNIPPET_CHARS:
                    break
                text += line + "\n"
            if len(text.strip()) >= SNIPPET_CHARS // 2:
                candidates.append({"text": text})
                taken += 1
            if taken == SNIPPETS_PER_FILE:
                break
    rng.shuffle(candidates)
    return candidates[:ROLLING_SNIPPETS]


YAML_HEADER = "# Written by tools/make_harness_tasks.py from the embedded corpus' held-out files; do not edit.\n"

NEXT_LINE_YAML = YAML_HEADER + f"""task: me_next_line
tag: {TAG}
custom_dataset: !function local_jsonl.load
dataset_kwargs:
  file: me_next_line.jsonl
output_type: multiple_choice
test_split: test
doc_to_text: context
doc_to_choice: choices
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

ROLLING_YAML = YAML_HEADER + f"""task: me_rolling_ppl
tag: {TAG}
custom_dataset: !function local_jsonl.load
dataset_kwargs:
  file: me_rolling_ppl.jsonl
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: text
metric_list:
  - metric: byte_perplexity
  - metric: bits_per_byte
metadata:
  version: 1.0
"""

LOADER = '''"""Loads a shipped task's JSONL file (next to this file) as the `test` split, offline."""

import json
from pathlib import Path


def load(file, **_metadata):
    import datasets

    path = Path(__file__).resolve().parent / file
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    return {"test": datasets.Dataset.from_list(rows)}
'''


def build(out: Path = TASK_DIR) -> dict:
    """(Re)write every task file under `out`; returns the manifest."""
    from megatron_entropy.data.corpus import embedded_documents

    documents = embedded_documents("valid", 10**9)
    rng = random.Random(SEED)
    data = {"me_next_line.jsonl": next_line_examples(documents, rng),
            "me_rolling_ppl.jsonl": rolling_snippets(documents, rng)}
    out.mkdir(parents=True, exist_ok=True)
    files = {"me_next_line.yaml": NEXT_LINE_YAML, "me_rolling_ppl.yaml": ROLLING_YAML, "local_jsonl.py": LOADER}
    files.update({name: "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
                  for name, rows in data.items()})
    for name, text in files.items():
        (out / name).write_text(text, encoding="utf-8")
    manifest = {"python": sys.version.split()[0], "seed": SEED, "held_out_files": len(documents),
                "examples": {name: len(rows) for name, rows in data.items()},
                "sha256": {name: hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
                           for name, text in sorted(files.items())}}
    (out / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest
