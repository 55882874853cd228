"""Downstream evaluation end to end with the real lm-evaluation-harness on the shipped tasks: a tiny
model trained with periodic lm-eval, then tools/eval_harness.py on its checkpoint and on its Hugging
Face export; the routes must agree request by request, and lm-eval's log-likelihoods must equal our
own forward pass summing log-probabilities (a multiple-choice example and a rolling document)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, SMALL_DATA, SMALL_MODEL, base_env
from tests.e2e.test_checkpoint import run_tool

pytest.importorskip("lm_eval", reason="the eval extra (pip install -e .[eval]) is not installed")

LIMIT = 8  # documents per task: enough to compare every kind of request, cheap on CPU
TOLERANCE = 1e-4  # |difference| of summed log-likelihoods (fp32, a few dozen tokens each)


@pytest.fixture(scope="module")
def trained(data_cache, tmp_path_factory) -> Path:
    """A 4-step run with lm-eval every 2 steps; returns its run directory (checkpoint at step 4)."""
    run_dir = tmp_path_factory.mktemp("harness_run")
    cmd = [sys.executable, str(REPO / "train.py"), *SMALL_DATA, *SMALL_MODEL, "--train.max_steps", "4",
           "--train.eval_iters", "1", "--logging.run_dir", str(run_dir), "--logging.wandb", "off",
           "--logging.progress_bar", "false", "--logging.figures", "false",
           "--train.eval_harness_tasks", "megatron_entropy", "--train.eval_harness_interval", "2",
           "--train.eval_harness_limit", str(LIMIT)]
    proc = subprocess.run(cmd, env=base_env(data_cache), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def routes(trained, tmp_path_factory) -> dict:
    """tools/eval_harness.py's full results (with every request) on the checkpoint and on its export."""
    from megatron_entropy.hf.export import export_checkpoint

    out = tmp_path_factory.mktemp("harness_results")
    hf_dir = out / "hf"
    export_checkpoint(trained / "checkpoints", hf_dir, say=lambda *_: None)
    results = {}
    for name, source in (("checkpoint", trained / "checkpoints"), ("hf", hf_dir)):
        code, stdout, stderr = run_tool("eval_harness.py", [str(source), "--limit", str(LIMIT), "--log-samples",
                                                            "--output", str(out / f"{name}.json"), "--json",
                                                            "--no-progress"])
        assert code == 0, stderr[-3000:]
        results[name] = json.loads((out / f"{name}.json").read_text())
        results[name]["printed"] = json.loads(stdout.strip().splitlines()[-1])
    return results


def loglikelihoods(results: dict, task: str) -> list[list[float]]:
    """Per document, per request: lm-eval's summed log-likelihood."""
    return [[float(r[0]) for r in sample["filtered_resps"]] if isinstance(sample["filtered_resps"][0], list)
            else [float(sample["filtered_resps"][0])] for sample in results["samples"][task]]


def test_periodic_records_equal_the_checkpoint_route(trained, routes):
    records = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    harness = [r for r in records if r["kind"] == "harness"]
    assert [r["step"] for r in harness] == [2, 4]
    keys = {"me_next_line/acc", "me_next_line/acc_norm", "me_rolling_ppl/byte_perplexity",
            "me_rolling_ppl/bits_per_byte"}
    assert keys <= set(harness[0])
    printed = routes["checkpoint"]["printed"]
    assert "step 4" in printed["model"] and "MegatronEntropyForCausalLM" in printed["model"]
    for key in keys:  # the in-training copy is the model the checkpoint holds
        assert math.isclose(harness[1][key], printed[key], rel_tol=1e-6), key
    assert 0.0 <= printed["me_next_line/acc"] <= 1.0 and printed["me_rolling_ppl/byte_perplexity"] > 1.0


def test_checkpoint_and_hf_export_agree_request_by_request(routes):
    for task in ("me_next_line", "me_rolling_ppl"):
        ours, exported = loglikelihoods(routes["checkpoint"], task), loglikelihoods(routes["hf"], task)
        assert len(ours) == len(exported) == LIMIT
        worst = max(abs(a - b) for x, y in zip(ours, exported) for a, b in zip(x, y, strict=True))
        assert worst <= TOLERANCE, (task, worst)
        if task == "me_next_line":
            assert all(len(x) == 4 for x in ours)


def _reference(trained):
    """megatron_entropy's own GPTModel on the checkpoint's tensors and the training tokenizer."""
    from megatron_entropy.data.tokenizer import load_tokenizer
    from megatron_entropy.hf.export import load_full, reference_model

    path, meta, cfg, full = load_full(trained / "checkpoints")
    return reference_model(cfg, full), load_tokenizer(path / meta["tokenizer"]["file"]), cfg.model.seq_length


def _summed_logprob(model, inputs: list[int], targets: list[int], count: int, vocab: int) -> float:
    """Sum of log p(target) over the last `count` positions of one forward pass (padded vocabulary cut)."""
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([inputs])).float()[0, :, :vocab]
    logp = torch.log_softmax(logits.double(), dim=-1)
    picked = logp[torch.arange(len(targets)), torch.tensor(targets)]
    return float(picked[len(targets) - count:].sum())


def test_lm_eval_loglikelihoods_equal_our_forward_pass(trained, routes):
    model, tokenizer, seq = _reference(trained)
    sample = routes["checkpoint"]["samples"]["me_next_line"][0]
    doc, theirs = sample["doc"], loglikelihoods(routes["checkpoint"], "me_next_line")[0]
    for choice, expected in zip(doc["choices"], theirs, strict=True):
        # every choice starts with "\n", its own token: the context's tokens are a prefix of the whole
        context, continuation = tokenizer.encode(doc["context"]), tokenizer.encode(choice)
        assert tokenizer.encode(doc["context"] + choice) == context + continuation
        tokens = (context + continuation)[-(seq + 1):]  # left-truncated to the model's length
        mine = _summed_logprob(model, tokens[:-1], tokens[1:], len(continuation), tokenizer.vocab_size)
        assert abs(mine - expected) <= TOLERANCE, (choice, mine, expected)

    sample = routes["checkpoint"]["samples"]["me_rolling_ppl"][0]
    expected = loglikelihoods(routes["checkpoint"], "me_rolling_ppl")[0][0]
    stream = [tokenizer.eos_id] + tokenizer.encode(sample["doc"]["text"])  # the document follows an eos
    assert len(stream) > 2 * seq  # several windows, the last one partial
    total, done = 0.0, 0
    while done < len(stream) - 1:  # disjoint windows of seq predictions; the last one right-aligned
        end = min(done + seq, len(stream) - 1)
        start = max(0, end - seq)
        total += _summed_logprob(model, stream[start:end], stream[start + 1:end + 1], end - done,
                                 tokenizer.vocab_size)
        done = end
    assert abs(total - expected) <= TOLERANCE * 10, (total, expected)  # ~300 tokens summed


def test_bad_input_is_one_line_exit_2(trained, tmp_path, data_cache):
    code, _, err = run_tool("eval_harness.py", [str(tmp_path / "missing")])
    assert code == 2 and err.count("\n") == 1 and "does not exist" in err
    (tmp_path / "empty").mkdir()
    code, _, err = run_tool("eval_harness.py", [str(tmp_path / "empty")])
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
    code, _, err = run_tool("eval_harness.py", [str(trained / "checkpoints"), "--tasks", "hellaswag"])
    assert code == 2 and "unknown lm-eval task hellaswag" in err and "me_next_line" in err
    # without the eval extra: lm_eval cannot be imported
    probe = ("import sys, runpy; sys.modules['lm_eval'] = None; sys.argv = ['eval_harness.py', sys.argv[1]]; "
             f"runpy.run_path({str(REPO / 'tools/eval_harness.py')!r}, run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", probe, str(trained / "checkpoints")], env=base_env(data_cache),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().endswith("pip install -e .[eval]"), proc.stderr[-2000:]
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), "--train.eval_harness_tasks", "[me_next_line, nope]"],
                          env=base_env(data_cache), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "unknown task nope" in proc.stderr, proc.stderr


def test_config_refuses_sharded_layouts():
    from megatron_entropy.config import ConfigError, build_config

    cfg = build_config("tiny", ["--train.eval_harness_tasks", "me_next_line", "--parallel.tensor", "2"])
    with pytest.raises(ConfigError, match="parallel.tensor=1 and parallel.pipeline=1"):
        cfg.validate(world_size=2)
    build_config("tiny", ["--train.eval_harness_tasks", "megatron_entropy"]).validate(world_size=2)


def test_shipped_tasks_are_what_the_generator_writes(tmp_path):
    from megatron_entropy.downstream.local_tasks import TASK_DIR, build

    shipped = json.loads((TASK_DIR / "MANIFEST.json").read_text())
    if shipped["python"] != sys.version.split()[0]:
        pytest.skip(f"tasks built from Python {shipped['python']}'s standard library, this is {sys.version.split()[0]}")
    manifest = build(tmp_path)
    assert manifest == shipped
    for path in sorted(TASK_DIR.iterdir()):
        if path.is_file():
            assert (tmp_path / path.name).read_bytes() == path.read_bytes(), path.name
    assert manifest["examples"] == {"me_next_line.jsonl": 200, "me_rolling_ppl.jsonl": 40}
