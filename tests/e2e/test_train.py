"""train.py end to end through the real DeepSpeed engine: ZeRO stages, data parallel, bad input."""

import json
import math
import shutil
import sys

import pytest

from tests.conftest import REPO

STEPS = ["--train.max_steps", "4", "--logging.log_interval", "1", "--train.global_batch_size", "8",
         "--train.micro_batch_size", "4", "--train.eval_iters", "1", "--train.eval_interval", "0",
         "--train.save_dir", ""]


def assert_close_lists(a, b, rel=1e-5):
    assert len(a) == len(b) and len(a) > 0
    for x, y in zip(a, b):
        assert math.isclose(x, y, rel_tol=rel, abs_tol=1e-7), (a, b)


@pytest.fixture(scope="module")
def zero0_losses(data_cache, tmp_path_factory):
    """Reference: one process, ZeRO-0 (plain data-parallel engine)."""
    from tests.conftest import SMALL_DATA, SMALL_MODEL, base_env
    import subprocess

    run_dir = tmp_path_factory.mktemp("zero0")
    cmd = [sys.executable, str(REPO / "train.py"), *SMALL_DATA, *SMALL_MODEL, *STEPS,
           "--deepspeed", str(REPO / "ds_configs/zero0.json"), "--logging.run_dir", str(run_dir),
           "--logging.wandb", "off", "--logging.progress_bar", "false", "--logging.figures", "false"]
    proc = subprocess.run(cmd, env=base_env(data_cache), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    return {key: [r[key] for r in train] for key in ("lm_loss", "entropy_reg_loss")}


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stages_single_process_match_zero0(run_train, zero0_losses, stage):
    run = run_train(STEPS + ["--deepspeed", str(REPO / f"ds_configs/zero{stage}.json")])
    assert_close_lists(run.losses("lm_loss"), zero0_losses["lm_loss"])
    assert_close_lists(run.losses("entropy_reg_loss"), zero0_losses["entropy_reg_loss"])


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_two_process_data_parallel_matches_single_process(run_train, zero0_losses, stage):
    run = run_train(STEPS + ["--deepspeed", str(REPO / f"ds_configs/zero{stage}.json")], nproc=2)
    assert_close_lists(run.losses("lm_loss"), zero0_losses["lm_loss"])
    assert_close_lists(run.losses("entropy_reg_loss"), zero0_losses["entropy_reg_loss"])


def test_loss_falls_and_everything_is_logged(run_train):
    run = run_train(["--train.max_steps", "40", "--logging.log_interval", "10", "--train.eval_interval", "20",
                     "--train.eval_iters", "2", "--logging.figures", "true", "--train.lr", "3e-3",
                     "--train.warmup_steps", "5"])
    train = run.kind("train")
    assert [r["step"] for r in train] == [10, 20, 30, 40]
    for key in ("step", "loss", "lm_loss", "entropy_reg_loss", "lr", "grad_norm", "tokens_per_s", "entropy",
                "entropy_bins", "nan_counts", "theta", "temperature_mean", "alpha", "beta"):
        assert key in train[-1], key
    assert len(train[-1]["entropy"]) == 2 and len(train[-1]["entropy"][0]) == 4
    assert train[-1]["lm_loss"] < train[0]["lm_loss"] - 0.5
    assert all(math.isfinite(r["loss"]) for r in train)
    assert run.kind("eval") and run.kind("final")[0]["val_ppl"] > 1
    assert "perplexity" in run.proc.stdout
    assert (run.run_dir / "figures" / "entropy_heatmap.png").stat().st_size > 1000
    assert (run.run_dir / "checkpoints" / "latest").read_text().strip() == "step_0000040"


def test_deepspeed_launcher_runs_the_main_job(run_train):
    deepspeed = shutil.which("deepspeed", path=str(REPO / ".venv" / "bin")) or shutil.which("deepspeed")
    if deepspeed is None:
        pytest.skip("the deepspeed launcher is not on PATH")
    run = run_train(["--deepspeed", str(REPO / "ds_configs/zero2.json"), "--train.max_steps", "3",
                     "--logging.log_interval", "1", "--train.eval_iters", "1", "--train.save_dir", ""],
                    launcher=[deepspeed, "--num_gpus", "1", "--master_port", str(__import__("tests.conftest").conftest.free_port())])
    assert len(run.kind("train")) == 3 and run.kind("final")


def test_bf16_trains_with_finite_loss_and_fp32_entropies(run_train):
    run = run_train(STEPS + ["--deepspeed", str(REPO / "ds_configs/zero1.json"), "--train.precision", "bf16"])
    train = run.kind("train")
    assert len(train) == 4 and all(math.isfinite(r["lm_loss"]) for r in train)
    assert all(math.isfinite(v) for row in train[-1]["entropy"] for v in row)


def test_wandb_offline_writes_a_local_run(run_train):
    run = run_train(STEPS + ["--logging.wandb", "offline"])
    assert list(run.run_dir.glob("wandb/offline-run-*")), "no offline wandb run directory"


BAD_INPUTS = [
    (["--model.variant", "SM+XX"], "model.variant='SM+XX' is unknown"),
    (["--model.num_heads", "3"], "does not divide model.hidden_size"),
    (["--model.entropy_reg_coeff", "-0.1"], "entropy_reg_coeff"),
    (["--data.train_data", "/nonexistent/shard"], "/nonexistent/shard"),
    (["--model.bogus", "1"], "unknown config key 'model.bogus'"),
    (["--deepspeed", "/nonexistent.json"], "does not exist"),
]


@pytest.mark.parametrize("args, fragment", BAD_INPUTS)
def test_bad_input_is_one_line_exit_2_nothing_written(run_train, args, fragment):
    run = run_train(args, check=False)
    assert run.proc.returncode == 2, run.proc.stderr[-3000:]
    lines = [line for line in run.proc.stderr.strip().splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and fragment in lines[-1], run.proc.stderr[-3000:]
    assert not [line for line in lines if "Traceback" in line]
    assert not run.run_dir.exists()


def test_empty_data_and_tokenizer_mismatch(run_train, tmp_path, data_cache):
    from megatron_entropy.data.indexed import write_indexed

    too_short = tmp_path / "too_short"  # fewer tokens than one sample: an empty dataset
    write_indexed(str(too_short), [[5, 6, 7]], vocab_size=512, tokenizer_identity="x")
    run = run_train(["--data.train_data", str(too_short)], check=False)
    assert run.proc.returncode == 2 and "error: " in run.proc.stderr, run.proc.stderr[-2000:]
    assert not run.run_dir.exists()
    empty_dir = tmp_path / "empty_dir"
    empty_dir.mkdir()
    run = run_train(["--data.train_data", str(empty_dir / "nothing")], check=False)
    assert run.proc.returncode == 2 and "error: " in run.proc.stderr and not run.run_dir.exists()

    other = tmp_path / "other"
    write_indexed(str(other), [[1, 2, 3] * 100], vocab_size=300, tokenizer_identity="another")
    tokenizer = next((data_cache / "megatron_entropy").rglob("tokenizer.model"))
    run = run_train(["--data.train_data", str(other), "--data.tokenizer", str(tokenizer)], check=False)
    assert run.proc.returncode == 2, run.proc.stderr[-2000:]
    assert "re-run tools/preprocess_data.py" in run.proc.stderr.strip().splitlines()[-1]
    assert not run.run_dir.exists()


def test_ds_config_contradicting_our_config_is_refused(run_train, tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_batch_size": 64, "zero_optimization": {"stage": 1}}))
    run = run_train(["--deepspeed", str(ds)], check=False)
    assert run.proc.returncode == 2
    assert "train_batch_size=64" in run.proc.stderr and "train.global_batch_size" in run.proc.stderr


def test_megatron_layout_corpus_trains_with_documents_and_bad_ones_are_refused(run_train, tmp_path, data_cache):
    """Shards written by the test in Megatron's .bin/.idx layout, without our sidecar, train through
    train.py (Megatron's blend form, document attention, per-document packing, EOD loss mask) when
    data.tokenizer names their tokenizer; without it, or with ids outside it: one line, exit 2."""
    from tests.megatron_layout import read_megatron, short_documents, write_megatron

    tokenizer = next((data_cache / "megatron_entropy").rglob("tokenizer.model"))
    text = read_megatron(str(tokenizer.parent / "train"))["tokens"]
    code, web = tmp_path / "code", tmp_path / "web"
    write_megatron(str(code), short_documents(300, 512, eos_id=2, seed=0, high=150, source=text))
    write_megatron(str(web), short_documents(100, 512, eos_id=2, seed=1, low=70, high=200, source=text[20000:]))
    data = ["--data.valid_data", str(code), "--data.tokenizer", str(tokenizer)]
    for packing in ("stream", "per_document"):
        run = run_train(STEPS + data + ["--data.train_data", f"0.7 {code} 0.3 {web}", "--data.packing", packing,
                                        "--data.document_attention", "within", "--data.eod_mask_loss", "true"])
        losses = run.losses()
        assert len(losses) == 4 and all(math.isfinite(x) for x in losses), packing
        assert "blend of 2 sources" in run.proc.stdout

    bad = tmp_path / "bad"
    write_megatron(str(bad), [[5, 600, 2]] * 100)  # id 600 >= the tokenizer's 512
    for args, fragment in ((["--data.train_data", str(code)], "set data.tokenizer"),
                           (["--data.train_data", str(bad), "--data.tokenizer", str(tokenizer)],
                            "holds token id 600 outside the tokenizer's [0, 512)")):
        run = run_train(STEPS + args, check=False)
        lines = [line for line in run.proc.stderr.strip().splitlines() if line.strip()]
        assert run.proc.returncode == 2 and lines[-1].startswith("error: ") and fragment in lines[-1], run.proc.stderr[-2000:]
        assert not run.run_dir.exists()
