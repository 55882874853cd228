"""Document attention (data.document_attention=within) against plain causal attention (cross) in the
fused core, side by side in one process.

One step = forward and backward of `fused_entropy_attention` (context and entropy both in the
loss), fp32, on the same q, k, v; `within` gets a doc_start of documents whose lengths are drawn
uniformly in [min_doc, max_doc] (packed back to back, as the stream packing makes them). The
fused core skips key blocks outside each query block's documents, so `within` should cost at
most what `cross` costs (less, the shorter the documents) and the same memory: it never builds a
T x T mask. Repeats are interleaved (cross, within, within, cross, ...); medians of wall-clock
and process CPU time, and the peak live CPU-allocator bytes of one extra step of each (as
benchmarks/entropy_attention.py measures them). The run ends with ONE JSON object.

    python benchmarks/document_attention.py                         # T = 1024, 2048; b2 H8 d64
    python benchmarks/document_attention.py --quick                 # seconds
    python benchmarks/document_attention.py --seq-lengths 4096 --min-doc 64 --max-doc 512
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.entropy_attention import profiled_peak_bytes  # noqa: E402
from megatron_entropy.model.fused_attention import fused_entropy_attention  # noqa: E402


def packed_doc_start(batch: int, T: int, min_doc: int, max_doc: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        row, start = [], 0
        while start < T:
            n = int(torch.randint(min_doc, max_doc + 1, (1,), generator=g))
            row += [start] * min(n, T - start)
            start += n
        rows.append(row)
    return torch.tensor(rows)


def step(inputs, weights, doc_start):
    leaves = [x.detach().requires_grad_() for x in inputs]
    context, entropy = fused_entropy_attention(*leaves, causal=True, doc_start=doc_start)
    ((context * weights[0]).sum() + (entropy * weights[1]).sum()).backward()


def bench_T(T: int, args, log) -> dict:
    g = torch.Generator().manual_seed(0)
    shape = (args.batch, args.heads, T, args.head_dim)
    inputs = [torch.randn(shape, generator=g) for _ in range(3)]
    inputs[0] = inputs[0] / (0.3 * args.head_dim ** 0.5)
    weights = (torch.randn(shape, generator=g), torch.randn(shape[:-1], generator=g))
    doc_start = packed_doc_start(args.batch, T, args.min_doc, args.max_doc, seed=1)
    variants = {"cross": None, "within": doc_start}
    for name, ds in variants.items():  # warm-up
        step(inputs, weights, ds)
    wall = {name: [] for name in variants}
    cpu = {name: [] for name in variants}
    for r in range(args.repeats):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        for name in order:
            w0, c0 = time.perf_counter(), time.process_time()
            step(inputs, weights, variants[name])
            wall[name].append(1e3 * (time.perf_counter() - w0))
            cpu[name].append(1e3 * (time.process_time() - c0))
    peak = {name: profiled_peak_bytes(lambda ds=ds: step(inputs, weights, ds)) for name, ds in variants.items()}
    documents = int(sum(len(torch.unique(row)) for row in doc_start))
    out = {name: {"wall_ms": statistics.median(wall[name]), "cpu_ms": statistics.median(cpu[name]),
                  "peak_mib": peak[name] / 2**20, "wall_ms_all": [round(x, 2) for x in wall[name]]}
           for name in variants}
    out["documents"] = documents
    out["ratios"] = {"within/cross wall": out["within"]["wall_ms"] / out["cross"]["wall_ms"],
                     "within/cross cpu": out["within"]["cpu_ms"] / out["cross"]["cpu_ms"],
                     "within/cross peak memory": peak["within"] / max(peak["cross"], 1)}
    log(f"T={T}: {documents} documents; cross {out['cross']['wall_ms']:.1f} ms, within "
        f"{out['within']['wall_ms']:.1f} ms; ratios " + ", ".join(f"{k} {v:.3f}" for k, v in out["ratios"].items()))
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-lengths", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--min-doc", type=int, default=64)
    parser.add_argument("--max-doc", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="T = 256, 2 repeats")
    args = parser.parse_args(argv)
    if args.quick:
        args.seq_lengths, args.repeats, args.heads = [256], 2, 2
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cpu":
        print("note: measuring the CPU core; the Triton path is benchmarked separately", file=sys.stderr)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    results = {f"T={T}": bench_T(T, args, log) for T in args.seq_lengths}
    report = {"config": vars(args), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "results": results}
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
