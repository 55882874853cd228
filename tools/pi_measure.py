#!/usr/bin/env python
"""Measure a folded export's private-inference cost under a real two-party protocol (SecretFlow SPU).

    .venv-pi/bin/python tools/pi_measure.py EXPORT_DIR [--protocol cheetah|semi2k] [--seq-length T] [--json]
    .venv-pi/bin/python tools/pi_measure.py --study OUT EXPORT_DIR[@T,T] ... [--seq-lengths 16 32]
    .venv-pi/bin/python tools/pi_measure.py --check-softmax [--protocol semi2k]

Runs in the PI environment (scripts/setup_pi.sh, `make pi-setup`), never in the training one.
EXPORT_DIR: tools/convert_to_hf.py CKPT OUT --fold (or tools/pi_exports.py). The unit is the paper's:
one output token given T input tokens, embedding and vocabulary projection included. Both parties run
in this process (SPU's simulation: threads linked in memory); client tokens and server weights are
both secret-shared. Reports bytes (both directions) and send actions per operation class, wall time,
the logits' error against the same forward in plaintext JAX, and a latency model
    latency = compute + bytes / bandwidth + rounds x RTT   (rounds = party 0's send actions)
at --bandwidth-mbps / --rtt-ms (default the paper's 100 Mbps / 80 ms). --study measures several
exports, fits per-operation costs (analysis/pi_measured.py) and writes OUT/pi_study.{json,md}.
Bad input: one `error:` line, exit code 2.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def fail(message: str, code: int = 2):
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


try:
    import numpy as np
    import spu  # noqa: F401
except ImportError:
    fail("spu is not installed in this Python; run tools/pi_measure.py with the PI environment's Python "
         "(bash scripts/setup_pi.sh, then .venv-pi/bin/python tools/pi_measure.py ...)")

from megatron_entropy.analysis import pi_measured  # noqa: E402
from megatron_entropy.pi import jax_model  # noqa: E402
from megatron_entropy.pi.spu_session import TwoPartySession, runtime_config  # noqa: E402


def _warm_up(session: TwoPartySession) -> dict:
    """Everything the protocol sets up once per session (Cheetah: OT and HE keys), on a tiny program."""
    import jax.numpy as jnp

    a = np.linspace(-1, 1, 4, dtype=np.float32).reshape(2, 2)
    session.put("warmup.a", a)
    b = np.stack([a, a])  # batched matmuls (the attention's) set up their own kernels

    def program(x, y):
        return jnp.exp(jnp.maximum(x @ x, 0.0)) * (1.0 / (2.0 + x * x)), jnp.einsum("hij,hjk->hik", y, y)

    session.put("warmup.b", b)
    exe = session.compile(program, [a, b], ["warmup.a", "warmup.b"], ["warmup.out", "warmup.out2"])
    stats = session.run(exe)
    return {"name": "setup", "op_class": "setup", "dims": {}, "bytes": stats.bytes, "actions": stats.send_actions,
            "seconds": stats.seconds, "pphlo": stats.ops}


def measure(export_dir, protocol: str = "cheetah", seq_length: int | None = None, exp_mode: str = "pade",
            seed: int = 0, bandwidth_mbps: float = 100.0, rtt_ms: float = 80.0, gelu_form: str = "sigmoid",
            progress=None) -> dict:
    """One private forward of `export_dir`; returns the JSON-able measurement."""
    try:
        arch, params, hf_config = jax_model.load_export(export_dir)
    except jax_model.ExportError as e:
        fail(str(e))
    T = seq_length or jax_model.max_positions(params)
    if not 2 <= T <= jax_model.max_positions(params):
        fail(f"--seq-length {T} is outside 2..{jax_model.max_positions(params)} (the model's positions)")
    ids = np.random.default_rng(seed).integers(0, arch.vocab_size, T)
    onehot = jax_model.one_hot(ids, arch.vocab_size)
    stages = jax_model.build_stages(arch, params, T, exp_mode, gelu_form)
    plain_logits, env = jax_model.run_plaintext(stages, params, onehot)

    start = time.perf_counter()
    session = TwoPartySession(runtime_config(protocol, exp_mode))
    rows = [_warm_up(session)]
    for name in jax_model.weight_names(stages, params):
        session.put(name, params[name])
    session.put("onehot", onehot)
    for stage in stages:
        exe = session.compile(stage.fn, [env[n] for n in stage.inputs], stage.inputs, stage.outputs)
        stats = session.run(exe)
        rows.append({"name": stage.name, "op_class": stage.op.op_class, "dims": stage.op.dims,
                     "bytes": stats.bytes, "actions": stats.send_actions, "seconds": stats.seconds,
                     "pphlo": stats.ops})
        if progress:
            progress(stage.name)
    private_logits = session.reveal("logits")
    wall = time.perf_counter() - start

    err = np.abs(private_logits - plain_logits)
    by_class: dict[str, dict] = {}
    for row in rows:
        acc = by_class.setdefault(row["op_class"], {"bytes": 0, "actions": 0, "seconds": 0.0})
        for k in ("bytes", "actions", "seconds"):
            acc[k] += row[k]
    total = {k: sum(c[k] for c in by_class.values()) for k in ("bytes", "actions", "seconds")}
    total["latency_s"] = pi_measured.latency(total["bytes"], total["actions"], total["seconds"],
                                             bandwidth_mbps * 1e6, rtt_ms / 1e3)
    return {
        "export": str(export_dir), "variant": hf_config.get("variant") or "SM+LN+G", "arch": vars(arch),
        "seq_length": T, "protocol": protocol, "field": "FM64", "fxp_fraction_bits": 18, "exp_mode": exp_mode,
        "gelu_form": gelu_form,
        "seed": seed, "tokens": ids.tolist(), "wall_s": wall,
        "network": {"bandwidth_mbps": bandwidth_mbps, "rtt_ms": rtt_ms},
        "total": total, "by_class": by_class, "stages": rows,
        "logits_plaintext": plain_logits[0].tolist(), "logits_private": private_logits[0].tolist(),
        "error": {"max_abs": float(err.max()), "max_rel": float(err.max() / max(np.abs(plain_logits).max(), 1e-12)),
                  "argmax_equal": bool(np.argmax(plain_logits) == np.argmax(private_logits))},
    }


def print_measurement(r: dict) -> None:
    a, t = r["arch"], r["total"]
    print(f"{r['export']}: {r['variant']} L={a['num_layers']} H={a['num_heads']} d={a['hidden_size']} "
          f"V={a['vocab_size']} T={r['seq_length']}, {r['protocol'].upper()} (FM64, 18 fraction bits, exp {r['exp_mode']})")
    print(f"  {'class':18s} {'MB':>10s} {'send actions':>13s} {'compute s':>10s}")
    for name in pi_measured.CLASSES:
        if name in r["by_class"]:
            c = r["by_class"][name]
            print(f"  {name:18s} {c['bytes'] / 1e6:10.3f} {c['actions']:13d} {c['seconds']:10.2f}")
    print(f"  {'total':18s} {t['bytes'] / 1e6:10.3f} {t['actions']:13d} {t['seconds']:10.2f}")
    n = r["network"]
    print(f"  latency model at {n['bandwidth_mbps']:g} Mbps / {n['rtt_ms']:g} ms RTT: {t['latency_s']:.1f} s "
          f"(compute {t['seconds']:.1f} + transfer {8 * t['bytes'] / (n['bandwidth_mbps'] * 1e6):.1f} "
          f"+ rounds {t['actions'] * n['rtt_ms'] / 1e3:.1f}); wall {r['wall_s']:.1f} s")
    e = r["error"]
    print(f"  logits vs plaintext: max |err| {e['max_abs']:.2e} ({e['max_rel']:.2e} of max |logit|), "
          f"argmax {'equal' if e['argmax_equal'] else 'DIFFERENT'}")


# ----------------------------------------------------------------------------- softmax check

def adversarial_rows(T: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Scores [1, 4, T, T] and their mask: causal rows (the first is fully masked but one), rows with one
    entry far above the rest (very sharp), rows spanning [-30, 30], and near-uniform rows."""
    rng = np.random.default_rng(0)
    causal = np.tril(np.ones((T, T), dtype=bool))
    s = np.stack([
        rng.normal(0, 1, (T, T)),  # ordinary
        np.where(np.eye(T, dtype=bool), 40.0, rng.normal(0, 1, (T, T))),  # one entry 40 above the rest
        rng.uniform(-30, 30, (T, T)),  # a wide range: exp inputs down to -60
        rng.normal(0, 1e-3, (T, T)),  # near uniform
    ]).astype(np.float32)[None]
    return s, causal[None, None]


def check_softmax(protocol: str, exp_mode: str) -> dict:
    scores, mask = adversarial_rows()
    m = mask.astype(np.float64)
    z = np.where(mask, scores.astype(np.float64), -np.inf)
    ref = np.exp(z - z.max(-1, keepdims=True)) * m
    ref /= ref.sum(-1, keepdims=True)
    out = {}
    for name, fn in (("private", lambda s: jax_model.softmax_private(s, mask[0], exp_mode)),
                     ("naive", lambda s: jax_model.softmax_naive(s, mask[0]))):
        session = TwoPartySession(runtime_config(protocol, exp_mode))
        session.put("s", scores)
        session.run(session.compile(fn, [scores], ["s"], ["p"]))
        p = session.reveal("p")
        rows = np.abs(p - ref).max(-1)[0]  # [kind, T]
        out[name] = {"max_abs": float(rows.max()), "per_kind": dict(zip(("ordinary", "sharp", "wide", "uniform"),
                                                                        rows.max(-1).tolist())),
                     "first_row_max_abs": float(rows[:, 0].max()),
                     "masked_mass_max": float((p * (1 - m)).sum(-1).max()),
                     "row_sum_err_max": float(np.abs(p.sum(-1) - 1).max())}
    return {"protocol": protocol, "exp_mode": exp_mode, "T": int(scores.shape[-1]), **out}


# ----------------------------------------------------------------------------- study

def study(out: Path, exports: list[str], seq_lengths: list[int] | None, protocol: str, exp_mode: str,
          budget_min: float, bandwidth_mbps: float, rtt_ms: float, gelu_form: str = "sigmoid") -> int:
    from tqdm import tqdm

    from megatron_entropy.pi.report import write_report

    out.mkdir(parents=True, exist_ok=True)
    jobs = []
    for spec in exports:  # DIR or DIR@T1,T2 (that export's own T values)
        e, _, own = spec.partition("@")
        _, params, _ = jax_model.load_export(e)
        wanted = [int(t) for t in own.split(",")] if own else (seq_lengths or [jax_model.max_positions(params)])
        jobs += [(e, T) for T in wanted if 2 <= T <= jax_model.max_positions(params)]
    jobs.sort(key=lambda j: (j[1], j[0]))  # small shapes first: a budget cut keeps a complete small grid
    results, start, skipped = [], time.perf_counter(), []
    bar = tqdm(jobs, desc="pi_measure study", unit="run", file=sys.stderr)
    for export_dir, T in bar:
        if (time.perf_counter() - start) / 60 > budget_min:
            skipped.append({"export": export_dir, "seq_length": T})
            continue
        bar.set_postfix_str(f"{Path(export_dir).name} T={T}")
        results.append(measure(export_dir, protocol, T, exp_mode, 0, bandwidth_mbps, rtt_ms, gelu_form))
        (out / "pi_study.json").write_text(json.dumps({"measurements": results}, indent=1))
    wall_min = (time.perf_counter() - start) / 60
    rows = [s for r in results for s in r["stages"]]
    model = pi_measured.fit(rows)
    doc = {"protocol": protocol, "exp_mode": exp_mode, "gelu_form": gelu_form, "wall_min": wall_min, "skipped": skipped,
           "network": {"bandwidth_mbps": bandwidth_mbps, "rtt_ms": rtt_ms}, "coefficients": model,
           "measurements": results}
    (out / "pi_study.json").write_text(json.dumps(doc, indent=1))
    (out / "pi_measured_coefficients.json").write_text(json.dumps(
        {"protocol": protocol, "exp_mode": exp_mode, "gelu_form": gelu_form, "field": "FM64", "fxp_fraction_bits": 18,
         "source": "tools/pi_measure.py --study", "coefficients": model}, indent=1))
    write_report(doc, out / "pi_study.md")
    print(f"wrote {out / 'pi_study.json'}, {out / 'pi_study.md'}, {out / 'pi_measured_coefficients.json'} "
          f"({len(results)} runs, {wall_min:.1f} min{f', {len(skipped)} skipped by the budget' if skipped else ''})")
    return 0


def main(argv: list[str] | None = None) -> int:
    import argparse

    class Parser(argparse.ArgumentParser):
        def error(self, message):
            fail(message)

    parser = Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("exports", nargs="*", metavar="EXPORT_DIR")
    parser.add_argument("--protocol", choices=("cheetah", "semi2k"), default="cheetah")
    parser.add_argument("--seq-length", type=int, help="T input tokens (default: the model's positions)")
    parser.add_argument("--exp-mode", choices=("pade", "taylor"), default="pade",
                        help="SPU's fixed-point exp: pade (accurate, default) or taylor (cheaper, ~1e-3 off)")
    parser.add_argument("--gelu", choices=("sigmoid", "tanh"), default="sigmoid",
                        help="GELU as x*sigmoid(2z) (accurate, default) or via SPU's clamped tanh (half the bytes)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random input tokens")
    parser.add_argument("--bandwidth-mbps", type=float, default=100.0)
    parser.add_argument("--rtt-ms", type=float, default=80.0)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--study", metavar="OUT", help="measure every EXPORT_DIR, fit, write OUT/pi_study.*")
    parser.add_argument("--seq-lengths", nargs="+", type=int, help="with --study: the T values to measure")
    parser.add_argument("--budget-min", type=float, default=30.0, help="with --study: start no run after this")
    parser.add_argument("--check-softmax", action="store_true",
                        help="the private softmax (and the naive one) on adversarial rows vs float64")
    args = parser.parse_args(argv)
    if args.bandwidth_mbps <= 0 or args.rtt_ms < 0:
        fail("--bandwidth-mbps must be > 0 and --rtt-ms >= 0")
    if args.check_softmax:
        print(json.dumps(check_softmax(args.protocol, args.exp_mode), indent=1))
        return 0
    if not args.exports:
        fail("give an EXPORT_DIR (tools/convert_to_hf.py CKPT OUT --fold), or --check-softmax")
    for e in args.exports:
        e, _, own = e.partition("@")
        if own and not all(t.isdigit() for t in own.split(",")):
            fail(f"{e}@{own}: give the T values as DIR@16,32")
        if not Path(e).is_dir():
            fail(f"{e} is not a directory; write an export with tools/convert_to_hf.py CKPT OUT --fold")
    if args.study:
        return study(Path(args.study), args.exports, args.seq_lengths, args.protocol, args.exp_mode,
                     args.budget_min, args.bandwidth_mbps, args.rtt_ms, args.gelu)
    if len(args.exports) != 1:
        fail("give one EXPORT_DIR (several only with --study OUT)")
    result = measure(args.exports[0], args.protocol, args.seq_length, args.exp_mode, args.seed,
                     args.bandwidth_mbps, args.rtt_ms, args.gelu)
    if args.json:
        print(json.dumps(result))
    else:
        print_measurement(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
