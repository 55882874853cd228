"""What the entropy regulariser costs per training step, side by side in one process (issue #8).

Variants (same GPTModel shape, same seed, fp32, torch AdamW; full training steps = forward,
backward and optimizer step):

  a  sdpa_noreg      SM(t)+ScFuFFN without the regulariser; attention_core=sdpa: PyTorch SDPA,
                     since no entropy is needed (statistics inactive). (auto/eager/fused no longer
                     take SDPA for a learnable temperature: its backward is less exact at small t.)
  b  eager_reg       EReg(SM(t)+ScFuFFN), attention_core=eager: the probabilities are built.
  c  fused_reg       EReg(SM(t)+ScFuFFN), attention_core=fused: entropy without T x T tensors.
  d  official_reg    the published recipe: SM(t)+ScFuFFN with Hugging-Face-style eager attention
                     that materialises and returns the probabilities (output_attentions=True),
                     then the official EntropyRegularization loss -- a Python loop over layers and
                     heads, -nansum(A log(A + 1e-9)) -- with learnable thresholds [L, H].

Repeats are interleaved (a b c d a b c d ...) so that a change in machine load hits every variant
alike; the medians of wall-clock and of process CPU time (all threads) are reported, and ratios
against (a). Peak memory is measured on one extra step per variant with torch.profiler
(profile_memory=True): the running sum of the CPU allocator's allocation/free events, i.e. the
highest number of bytes that were live *on top of* what was live when the step began (parameters
and AdamW state; gradients are set to None before the step, so they are counted in the peak).
`resident_mib` is that starting point: parameters + AdamW state. The run ends with ONE JSON object.

    python benchmarks/entropy_attention.py                      # T = 512, 1024, 2048 (L6 d256 H8, b2)
    python benchmarks/entropy_attention.py --quick              # smoke run, tiny sizes, seconds
    python benchmarks/entropy_attention.py --seq-lengths 1024 --variants a c --repeats 7
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import megatron_entropy.model.attention as attention_module  # noqa: E402
from megatron_entropy.config import build_config  # noqa: E402
from megatron_entropy.model.gpt import GPTModel, parameter_groups  # noqa: E402

VARIANTS = {
    "a": ("sdpa_noreg", "SM(t)+ScFuFFN", "sdpa"),
    "b": ("eager_reg", "EReg(SM(t)+ScFuFFN)", "eager"),
    "c": ("fused_reg", "EReg(SM(t)+ScFuFFN)", "fused"),
    "d": ("official_reg", "SM(t)+ScFuFFN", "eager"),
}


# ----------------------------------------------------------------------------- (d): the published recipe

def hf_eager_attention(q, k, v, store: list):
    """Hugging Face GPT-2 eager attention (q already scaled): causal mask with finfo.min, softmax,
    probabilities returned to the caller as with output_attentions=True."""
    T = q.shape[-2]
    weights = q @ k.transpose(-1, -2)
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    weights = torch.where(causal, weights, torch.tensor(torch.finfo(weights.dtype).min, dtype=weights.dtype))
    probs = torch.softmax(weights, dim=-1)
    store.append(probs)
    return probs @ v


def official_entropy_loss(attentions, reg_threshold_weights, num_heads: int, num_layers: int,
                          loss_coeff: float = 1e-5, tolerance_margin_factor: float = 0.20):
    """The official EntropyRegularization.compute_loss, literally: per layer, per head, in Python
    (with per-layer thresholds, the paper's Theta in R^{L x H})."""
    max_entropy = math.log(attentions[0].shape[-1])
    tolerance_margin = tolerance_margin_factor * max_entropy
    total = 0.0
    for layer_idx, attn_mat in enumerate(attentions):
        ent_val = -torch.nansum(attn_mat * torch.log(attn_mat + 1e-9), dim=-1)
        layer_loss = 0.0
        for head_idx in range(num_heads):
            head_entropy = ent_val[:, head_idx, :]
            threshold = reg_threshold_weights[layer_idx, head_idx] * max_entropy
            deviation = torch.abs(head_entropy - threshold)
            penalty = torch.square(torch.where(deviation > tolerance_margin, deviation, torch.zeros_like(deviation)))
            layer_loss = layer_loss + penalty.sum()
        total = total + layer_loss / num_heads
    return loss_coeff * total / num_layers


@contextlib.contextmanager
def materialised_attention(store: list):
    """Route the model's attention through hf_eager_attention (benchmark-only monkeypatch)."""
    original = attention_module.attention_core
    attention_module.attention_core = lambda name, q, k, v, need_entropy, **_: (hf_eager_attention(q, k, v, store), None)
    try:
        yield
    finally:
        attention_module.attention_core = original


# ----------------------------------------------------------------------------- setup and one step

class Runner:
    def __init__(self, key: str, args, T: int):
        self.key = key
        self.name, variant, core = VARIANTS[key]
        cfg = build_config("tiny", [
            "--model.variant", variant, "--model.attention_core", core,
            "--model.num_layers", str(args.layers), "--model.hidden_size", str(args.hidden),
            "--model.num_heads", str(args.heads), "--model.seq_length", str(T),
            "--model.vocab_size", str(args.vocab), "--model.entropy_reg_coeff", "1e-5",
        ]).model
        self.cfg = cfg
        self.model = GPTModel(cfg, seed=1337)
        self.model.train()
        self.model.stats.active = False  # no logging step: the entropy statistics stay off
        self.model.aux_scale.value = 1.0  # we call loss.backward() ourselves
        self.thresholds = None
        params = parameter_groups(self.model, 0.1)
        if key == "d":
            self.thresholds = torch.nn.Parameter(torch.full((cfg.num_layers, cfg.num_heads), 0.5))
            params.append({"params": [self.thresholds], "weight_decay": 0.0})
        self.optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), foreach=True)
        g = torch.Generator().manual_seed(T)
        tokens = torch.randint(0, args.vocab, (args.batch, T + 1), generator=g)
        self.inputs, self.labels = tokens[:, :-1], tokens[:, 1:]

    def step(self) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        if self.key == "d":
            store: list = []
            with materialised_attention(store):
                loss = self.model(self.inputs, self.labels)
            loss = loss + official_entropy_loss(store, self.thresholds, self.cfg.num_heads, self.cfg.num_layers,
                                                loss_coeff=self.cfg.entropy_reg_coeff)
            del store
        else:
            loss = self.model(self.inputs, self.labels)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())

    def resident_bytes(self) -> int:
        """Parameters + optimizer state (what is live when a step begins, grads set to None)."""
        seen, total = set(), 0
        tensors = [p for group in self.optimizer.param_groups for p in group["params"]]
        tensors += [t for state in self.optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
        for t in tensors:
            key = t.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
        return total


def profiled_peak_bytes(fn) -> int:
    """Highest live CPU allocator bytes above the starting level while fn runs (torch.profiler
    memory events: +bytes per allocation, -bytes per free, in time order)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        if e.device_type() != torch.autograd.DeviceType.CPU:
            continue
        live += e.nbytes()
        peak = max(peak, live)
    return peak


# ----------------------------------------------------------------------------- driver

def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def bench_T(T: int, keys: list[str], args, log) -> dict:
    runners = {k: Runner(k, args, T) for k in keys}
    losses = {}
    for k, r in runners.items():  # warm-up (allocates AdamW state, first-call overheads)
        for _ in range(args.warmup):
            losses[k] = r.step()
    wall = {k: [] for k in keys}
    cpu = {k: [] for k in keys}
    for rep in range(args.repeats):
        order = keys if rep % 2 == 0 else keys[::-1]  # a b c d, d c b a, ...: no fixed neighbour
        for k in order:
            gc.collect()
            w0, c0 = time.perf_counter(), time.process_time()
            runners[k].step()
            cpu[k].append(time.process_time() - c0)
            wall[k].append(time.perf_counter() - w0)
        log(f"T={T} repeat {rep + 1}/{args.repeats}: " +
            ", ".join(f"{k} {wall[k][-1] * 1e3:.0f} ms" for k in keys) + f" | load {load_average()}")
    out = {}
    for k in keys:
        r = runners[k]
        entry = {
            "name": r.name,
            "wall_ms": statistics.median(wall[k]) * 1e3,
            "cpu_ms": statistics.median(cpu[k]) * 1e3,
            "wall_ms_all": [round(x * 1e3, 1) for x in wall[k]],
            "cpu_ms_all": [round(x * 1e3, 1) for x in cpu[k]],
            "tokens_per_s": args.batch * T / statistics.median(wall[k]),
            "loss_after_warmup": losses.get(k),
        }
        if args.memory:
            gc.collect()
            r.optimizer.zero_grad(set_to_none=True)
            entry["peak_step_mib"] = profiled_peak_bytes(r.step) / 2**20
            entry["resident_mib"] = r.resident_bytes() / 2**20
            entry["peak_total_mib"] = entry["peak_step_mib"] + entry["resident_mib"]
        out[k] = entry
    del runners
    gc.collect()
    ratios = {}
    if "a" in out:
        for k in keys:
            if k == "a":
                continue
            ratios[f"{k}/a"] = {m: out[k][m] / out["a"][m] for m in ("wall_ms", "cpu_ms", "peak_step_mib", "peak_total_mib")
                                if m in out[k]}
    for num, den in (("c", "b"), ("c", "d")):
        if num in out and den in out:
            ratios[f"{num}/{den}"] = {m: out[num][m] / out[den][m] for m in ("wall_ms", "cpu_ms", "peak_step_mib")
                                      if m in out[num]}
    return {"variants": out, "ratios": ratios}


TARGETS = {  # issue #8, on CPU: (ratio, T, bound)
    "time c/a at T=1024": ("c/a", 1024, ("wall_ms", "cpu_ms"), 1.10),
    "time c/a at T=2048": ("c/a", 2048, ("wall_ms", "cpu_ms"), 1.15),
    "peak memory c/a at T=2048": ("c/a", 2048, ("peak_total_mib", "peak_step_mib"), 1.10),
}


def targets(results: dict) -> dict:
    """Each target with the measured ratios (every metric it applies to) and whether it is met."""
    out = {}
    for name, (ratio, T, metrics, bound) in TARGETS.items():
        measured = results.get(f"T={T}", {}).get("ratios", {}).get(ratio, {})
        values = {m: measured[m] for m in metrics if m in measured}
        if values:
            out[name] = {"bound": bound, **values, "met": {m: v <= bound for m, v in values.items()}}
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-lengths", type=int, nargs="+", default=[512, 1024, 2048])
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads (default 1: on a shared machine every multi-threaded op "
                        "waits for its descheduled partner thread, and the timings measure the scheduler)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the profiled memory step")
    p.add_argument("--quick", action="store_true", help="smoke run: T 64/128, L2 d64 H4, 2 repeats")
    p.add_argument("--json-out", type=str, default=None, help="also write the JSON object here")
    args = p.parse_args(argv)
    if args.quick:
        args.seq_lengths, args.layers, args.hidden, args.heads, args.vocab = [64, 128], 2, 64, 4, 512
        args.repeats = 2
    torch.set_num_threads(args.threads)
    keys = [k for k in VARIANTS if k in args.variants]

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    load_before = load_average()
    started = time.perf_counter()
    results = {}
    for T in args.seq_lengths:
        results[f"T={T}"] = bench_T(T, keys, args, log)
    report = {
        "benchmark": "entropy_attention",
        "targets": targets(results),
        "config": {"layers": args.layers, "hidden": args.hidden, "heads": args.heads, "batch": args.batch,
                   "vocab": args.vocab, "seq_lengths": args.seq_lengths, "repeats": args.repeats,
                   "warmup": args.warmup, "dtype": "float32", "optimizer": "torch AdamW (foreach)"},
        "variants": {k: {"name": VARIANTS[k][0], "model_variant": VARIANTS[k][1], "attention_core": VARIANTS[k][2]}
                     for k in keys},
        "machine": {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                    "platform": platform.platform(), "load_average_before": load_before,
                    "load_average_after": load_average(), "wall_s": time.perf_counter() - started,
                    "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024},
        "results": results,
    }
    text = json.dumps(report, indent=1)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n")
    print(text, flush=True)
    return report


if __name__ == "__main__":
    main()
