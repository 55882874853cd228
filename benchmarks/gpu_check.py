"""One prepared GPU check (one CUDA device, at most ~8 minutes), printing ONE JSON object.

  (a) accuracy: the Triton kernels against the PyTorch path and a float64 reference over the
      temperature grid of tests/unit/test_entropy_gradients.py (t 1e-3 .. 10, short and long rows,
      causal or not, context / entropy / both), in fp32 and bf16; and the Triton self-check verdict;
  (b) speed: full training steps (forward, backward, AdamW) of an L6 d768 H12 model, EReg with the
      fused core vs SM(t)+ScFuFFN through SDPA without the regulariser, T = 1024, 2048, 4096;
  (c) the 1b preset's width (d2560, 20 heads, T 2048; fewer layers to fit one GPU) trained for 20
      steps in bf16 autocast: tokens/s and MFU (the variant's own FLOP count, as in the train log).

    python benchmarks/gpu_check.py                 # on a CUDA machine; --json-out FILE to keep it
    python benchmarks/gpu_check.py --cpu-dry-run   # the whole control flow on tiny CPU shapes (CI)

Without a GPU (and without --cpu-dry-run) it says so and exits 0. Each part records its own
error instead of stopping the others; a deadline skips what would not fit.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu-dry-run", action="store_true", help="run every part on tiny CPU shapes")
    p.add_argument("--json-out", help="also write the JSON object to this file")
    p.add_argument("--deadline-s", type=float, default=450.0, help="skip parts that start after this")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's dense bf16 peak for MFU (default: 989 for H100/H200, else none)")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# (a) accuracy


def check_accuracy(device, dry_run: bool) -> dict:
    import torch

    from megatron_entropy.model import fused_attention as fa
    from megatron_entropy.model.triton_attention import triton_entropy_attention
    from tests.unit.test_entropy_gradients import CORES, gradients, reference_core, relative_error

    def on(device_, core, dtype):
        def run(q, k, v, causal):
            args = [x.to(device=device_, dtype=dtype) for x in (q, k, v)]
            context, entropy = core(*args, causal)
            return context.cpu(), entropy.cpu()
        return run

    # Gradients flow back through .to(device, dtype), so the leaves stay on CPU in float64/fp32.
    cores = {"triton": lambda q, k, v, c: triton_entropy_attention(q, k, v, c),
             "pytorch": lambda q, k, v, c: fa.blocked_entropy_attention(q, k, v, c),
             "eager": CORES["eager"]}
    # The interpreter multiplies bf16 bit patterns in tl.dot (triton#11584): fp16 stands in there.
    dtypes = {"fp32": torch.float32, ("fp16" if dry_run else "bf16"): (torch.float16 if dry_run else torch.bfloat16)}
    grid = dict(t=(1e-2, 1.0), T=(17,), d=(16,)) if dry_run else \
        dict(t=(1e-3, 1e-2, 1e-1, 1.0, 10.0), T=(1, 17, 64, 150, 1000), d=(32, 64, 128))
    report = {"self_check": {}, "worst": {}, "cases": 0, "failures": []}
    for name, dtype in dtypes.items():
        report["self_check"][name] = fa.triton_self_check(triton_entropy_attention, device, dtype) or "passed"
        worst = {}
        for t0 in grid["t"]:
            for T in grid["T"]:
                for d in grid["d"]:
                    for causal in (True, False):
                        for mode in ("both", "entropy", "context"):
                            want = gradients(reference_core, torch.float64, t0, T, d, causal, mode)
                            errs = {}
                            for core_name, core in cores.items():
                                on_device = on(device, core, dtype if core_name != "eager" else torch.float32)
                                got = gradients(on_device, torch.float32, t0, T, d, causal, mode)
                                errs[core_name] = [relative_error(g, w) for g, w in zip(got, want)]
                            report["cases"] += 1
                            for i, grad in enumerate(("dq", "dk", "dv", "dt")):
                                key = f"t={t0:g}/{grad}"
                                row = worst.setdefault(key, {c: 0.0 for c in cores})
                                for c in cores:
                                    row[c] = max(row[c], errs[c][i])
                                # 16-bit: the rounded inputs alone move the answer (logits ~1/t),
                                # so Triton is held to the PyTorch path on the same inputs.
                                bound = (max(10 * errs["eager"][i] + 1e-6, 2e-4) if name == "fp32"
                                         else 2 * errs["pytorch"][i] + 1e-2)
                                if not errs["triton"][i] <= bound:
                                    report["failures"].append([name, t0, T, d, causal, mode, grad,
                                                               errs["triton"][i], errs["eager"][i]])
        report["worst"][name] = {k: {c: float(f"{v:.2e}") for c, v in row.items()} for k, row in worst.items()}
    report["ok"] = not report["failures"] and all(v == "passed" for v in report["self_check"].values())
    return report


# ---------------------------------------------------------------------------------------------
# (b), (c): whole training steps


def build_model(preset: str, overrides: list[str], device):
    import torch

    from megatron_entropy.config import build_config
    from megatron_entropy.model.gpt import GPTModel, parameter_groups

    cfg = build_config(preset, overrides).model
    model = GPTModel(cfg, seed=1).to(device)
    model.aux_scale.value = 1.0
    opt = torch.optim.AdamW(parameter_groups(model, 0.1), lr=1e-4, betas=(0.9, 0.95),
                            fused=device.type == "cuda")
    return cfg, model, opt


def train_steps(model, opt, batch: int, T: int, vocab: int, steps: int, device, bf16: bool) -> list[float]:
    """Wall seconds of each full step (forward, backward, optimizer) after one warm-up step."""
    import torch

    g = torch.Generator(device="cpu").manual_seed(0)
    tokens = torch.randint(0, vocab, (batch, T + 1), generator=g).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for step in range(steps + 1):
        sync()
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        opt.step()
        sync()
        if step:
            times.append(time.perf_counter() - start)
        if not math.isfinite(float(loss.detach())):
            raise FloatingPointError(f"loss {float(loss.detach())} at step {step}")
    return times


def check_speed(device, dry_run: bool) -> dict:
    import torch

    shape = ["--model.num_layers", "2", "--model.hidden_size", "64", "--model.num_heads", "4"] if dry_run else \
        ["--model.num_layers", "6", "--model.hidden_size", "768", "--model.num_heads", "12"]
    lengths, tokens_per_step = ((64, 128), 512) if dry_run else ((1024, 2048, 4096), 16384)
    out = {}
    for T in lengths:
        row = {}
        for name, variant, core in (("sdpa_noreg", "SM(t)+ScFuFFN", "sdpa"), ("fused_reg", "EReg(SM(t)+ScFuFFN)", "fused")):
            overrides = shape + ["--model.variant", variant, "--model.attention_core", core,
                                 "--model.seq_length", str(T), "--model.vocab_size", "4096"]
            cfg, model, opt = build_model("tiny", overrides, device)
            times = train_steps(model, opt, max(1, tokens_per_step // T), T, 4096, 3 if dry_run else 10,
                                device, bf16=not dry_run)
            row[name] = {"median_ms": round(1e3 * statistics.median(times), 2),
                         "tokens_per_s": round(tokens_per_step / statistics.median(times))}
            del model, opt
            if device.type == "cuda":
                torch.cuda.empty_cache()
        row["fused_over_sdpa"] = round(row["fused_reg"]["median_ms"] / row["sdpa_noreg"]["median_ms"], 3)
        out[f"T={T}"] = row
    return out


def check_1b_width(device, dry_run: bool, peak_tflops) -> dict:
    import torch

    from megatron_entropy.analysis.flops import throughput, training_flops_per_token

    if dry_run:
        overrides = ["--model.num_layers", "2", "--model.hidden_size", "80", "--model.num_heads", "4",
                     "--model.seq_length", "64", "--model.vocab_size", "4096"]
        batch, steps = 2, 3
    else:  # the preset's width and length; 4 layers x micro-batch 4 fit one GPU with room to spare
        overrides = ["--model.num_layers", "4", "--model.vocab_size", "50304"]
        batch, steps = 4, 20
    cfg, model, opt = build_model("1b", overrides, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = train_steps(model, opt, batch, cfg.seq_length, cfg.vocab_size, steps, device, bf16=True)
    tokens_per_s = batch * cfg.seq_length / statistics.median(times)
    result = {"layers": cfg.num_layers, "hidden": cfg.hidden_size, "heads": cfg.num_heads,
              "seq_length": cfg.seq_length, "micro_batch": batch, "steps": steps,
              "median_step_ms": round(1e3 * statistics.median(times), 1), "tokens_per_s": round(tokens_per_s),
              **throughput(training_flops_per_token(cfg), tokens_per_s, 1, peak_tflops)}
    if device.type == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.cpu_dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported
    import torch

    if not args.cpu_dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; nothing to check (use --cpu-dry-run to exercise the script)")
        return 0
    device = torch.device("cpu" if args.cpu_dry_run else "cuda")
    peak = args.peak_tflops
    name = "cpu (dry run)" if args.cpu_dry_run else torch.cuda.get_device_name(0)
    if peak is None and any(g in name for g in ("H100", "H200")):
        peak = 989.0
    report = {"device": name, "torch": torch.__version__, "dry_run": args.cpu_dry_run, "peak_tflops": peak}
    try:
        import triton
        report["triton"] = triton.__version__
    except ImportError:
        report["triton"] = None
    start = time.perf_counter()
    parts = [("accuracy", lambda: check_accuracy(device, args.cpu_dry_run)),
             ("speed", lambda: check_speed(device, args.cpu_dry_run)),
             ("1b_width", lambda: check_1b_width(device, args.cpu_dry_run, peak))]
    for key, part in parts:
        if time.perf_counter() - start > args.deadline_s:
            report[key] = {"skipped": f"deadline of {args.deadline_s:.0f} s reached"}
            continue
        part_start = time.perf_counter()
        print(f"gpu_check: {key} ...", file=sys.stderr, flush=True)
        try:
            report[key] = part()
        except Exception as e:  # keep the other parts' results
            report[key] = {"error": f"{type(e).__name__}: {e}"}
        report[key]["seconds"] = round(time.perf_counter() - part_start, 1)
    report["seconds"] = round(time.perf_counter() - start, 1)
    text = json.dumps(report)
    print(text)
    if args.json_out:
        with open(args.json_out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
