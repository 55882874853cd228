"""A folded export as a JAX forward of one output token given T input tokens, cut into stages.

Each stage (analysis/pi_measured.op_inventory) is one operation class with named inputs and outputs:
tools/pi_measure.py runs the same stage functions in plaintext JAX and under SPU, and charges each
stage's communication to its class. Runs only in the PI environment (imports jax).

Softmax, written the way fixed-point two-party arithmetic needs it (a masked entry must contribute an
exact 0, and exp must only see inputs in its accurate range):
    max:        m = max_j where(mask, s, -1e4)        the public mask selects locally; the diagonal is
                x = where(mask, s - m, 0)             always allowed, so m is a real score; masked -> 0
    exp:        e = where(mask, exp(x), 0)            x <= 0 on allowed entries; masked entries are
                                                      zeroed AFTER exp (exp of a large negative fixed-
                                                      point number does not vanish); Taylor mode also
                                                      clamps x at -14 first (exp(-14) < 1 ulp)
    normalize:  p = e * (1 / sum_j e)                 sum >= 1 (the max entry gives exp(0)), so one
                                                      reciprocal per row, in its accurate range
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from megatron_entropy.analysis.pi_measured import Arch, Op, op_inventory

MASK_FILL = -1e4  # only ever inside the row max, never into exp
EXP_FLOOR = -14.0  # Taylor exp: exp(-14) = 8e-7 < 2^-18 (one ulp at 18 fraction bits)


class ExportError(Exception):
    """The directory is not a folded export this tool can run."""


# ----------------------------------------------------------------------------- reading the export

def load_export(path) -> tuple[Arch, dict[str, np.ndarray], dict]:
    """(architecture, float32 weights in x @ W orientation, raw config) of an exported directory."""
    from safetensors.numpy import load_file

    path = Path(path)
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise ExportError(f"{path} is not an exported model (config.json and model.safetensors expected); "
                          "write one with tools/convert_to_hf.py CKPT OUT --fold")
    cfg = json.loads((path / "config.json").read_text())
    sd = {k: v.astype(np.float32) for k, v in load_file(str(path / "model.safetensors")).items()}
    if cfg.get("model_type") == "gpt2":
        return (*_from_gpt2(cfg, sd), cfg)
    if cfg.get("model_type") == "megatron_entropy":
        if not cfg.get("folded"):
            raise ExportError(f"{path} is an unfolded export; export it again with tools/convert_to_hf.py --fold")
        return (*_from_ours(cfg, sd), cfg)
    raise ExportError(f"{path}: model_type {cfg.get('model_type')!r} is neither gpt2 nor megatron_entropy")


def _from_gpt2(cfg: dict, sd: dict) -> tuple[Arch, dict]:
    d, L = cfg["n_embd"], cfg["n_layer"]
    arch = Arch(L, cfg["n_head"], d, cfg.get("n_inner") or 4 * d, cfg["vocab_size"], "layernorm", "gelu",
                "two_layer", False, True, False)
    p = {"wte": sd["transformer.wte.weight"], "wpe": sd["transformer.wpe.weight"],
         "lnf.w": sd["transformer.ln_f.weight"], "lnf.b": sd["transformer.ln_f.bias"],
         "head": sd.get("lm_head.weight", sd["transformer.wte.weight"]).T.copy(), "eps": cfg.get("layer_norm_epsilon", 1e-5)}
    for i in range(L):
        s, t = f"transformer.h.{i}.", f"l{i}."
        p[t + "ln1.w"], p[t + "ln1.b"] = sd[s + "ln_1.weight"], sd[s + "ln_1.bias"]
        p[t + "ln2.w"], p[t + "ln2.b"] = sd[s + "ln_2.weight"], sd[s + "ln_2.bias"]
        p[t + "qkv.w"], p[t + "qkv.b"] = sd[s + "attn.c_attn.weight"], sd[s + "attn.c_attn.bias"]
        p[t + "o.w"], p[t + "o.b"] = sd[s + "attn.c_proj.weight"], sd[s + "attn.c_proj.bias"]
        p[t + "ffn_in.w"], p[t + "ffn_in.b"] = sd[s + "mlp.c_fc.weight"], sd[s + "mlp.c_fc.bias"]
        p[t + "ffn_out.w"], p[t + "ffn_out.b"] = sd[s + "mlp.c_proj.weight"], sd[s + "mlp.c_proj.bias"]
    return arch, p


def _from_ours(cfg: dict, sd: dict) -> tuple[Arch, dict]:
    d, L, H = cfg["hidden_size"], cfg["num_layers"], cfg["num_heads"]
    f = cfg["ffn_hidden_size"]
    residual_scale = "model.layers.0.ffn.beta" in sd
    arch = Arch(L, H, d, f, cfg["vocab_size"], cfg["norm"], cfg["activation"], cfg["ffn_kind"],
                bool(cfg["learnable_temperature"]), bool(cfg["final_norm"]), residual_scale)
    wte = sd["model.embedding.tokens.weight"]
    p = {"wte": wte, "wpe": sd["model.embedding.positions"], "head": sd.get("lm_head.weight", wte).T.copy(),
         "eps": cfg.get("layer_norm_eps", 1e-5)}
    if arch.final_norm:
        p["lnf.w"], p["lnf.b"] = sd["model.head.final_norm.weight"], sd["model.head.final_norm.bias"]
    zeros = np.zeros(d, np.float32)
    for i in range(L):
        s, t = f"model.layers.{i}.", f"l{i}."
        if arch.norm == "layernorm":
            for ours, mine in (("norm1", "ln1"), ("norm2", "ln2")):
                p[t + mine + ".w"], p[t + mine + ".b"] = sd[s + ours + ".weight"], sd[s + ours + ".bias"]
        att = s + "attention."
        p[t + "qkv.w"] = np.concatenate([sd[att + n + ".weight"].T for n in "qkv"], axis=1)
        p[t + "qkv.b"] = np.concatenate([sd.get(att + "q.bias", zeros), sd.get(att + "k.bias", zeros), zeros])
        p[t + "o.w"], p[t + "o.b"] = sd[att + "o.weight"].T.copy(), zeros
        if arch.temperature:
            p[t + "qscale"] = sd[att + "query_scale"]  # [H, positions]
        if arch.ffn_kind == "fused":
            p[t + "ffn_fc.w"] = sd[s + "ffn.fc.weight"].T.copy()
        else:
            p[t + "ffn_in.w"], p[t + "ffn_in.b"] = sd[s + "ffn.fc_in.weight"].T.copy(), np.zeros(f, np.float32)
            p[t + "ffn_out.w"], p[t + "ffn_out.b"] = sd[s + "ffn.fc_out.weight"].T.copy(), zeros
        if residual_scale:
            p[t + "beta"] = sd[s + "ffn.beta"].reshape(1)
    return arch, p


def max_positions(params: dict) -> int:
    return int(params["wpe"].shape[0])


# ----------------------------------------------------------------------------- the operations

def layer_norm(x, w, b, eps):
    mu = jnp.mean(x, axis=-1, keepdims=True)
    c = x - mu
    var = jnp.mean(c * c, axis=-1, keepdims=True)
    return c * lax.rsqrt(var + eps) * w + b


def gelu(x, form: str = "sigmoid"):
    """GPT-2's gelu_new, 0.5 x (1 + tanh(z)) with z = sqrt(2/pi) (x + 0.044715 x^3), the export's GELU.

    form="sigmoid" evaluates the same function as x * sigmoid(2z): SPU's sigmoid is 1 / (1 + exp(-x))
    on its Pade exp, 5e-4 off under CHEETAH on [-8, 8]; form="tanh" uses SPU's tanh, whose Pade
    approximation is clamped to [-3, 3] (1.1e-2 off) but sends half the bytes (docs/pi.md)."""
    z = math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)
    if form == "tanh":
        return 0.5 * x * (1.0 + jnp.tanh(z))
    return x * jax.nn.sigmoid(2.0 * z)


def softmax_max(s, mask):
    m = jnp.max(jnp.where(mask, s, MASK_FILL), axis=-1, keepdims=True)
    return jnp.where(mask, s - m, 0.0)


def softmax_exp(x, mask, exp_mode: str):
    if exp_mode == "taylor":
        x = jnp.maximum(x, EXP_FLOOR)
    return jnp.where(mask, jnp.exp(x), 0.0)  # a public select: masked entries become an exact 0


def softmax_normalize(e):
    return e * (1.0 / jnp.sum(e, axis=-1, keepdims=True))


def softmax_naive(s, mask):
    """The textbook form a plaintext model uses: wrong under fixed-point exp (kept to show why)."""
    s = jnp.where(mask, s, MASK_FILL)
    e = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
    return e / jnp.sum(e, axis=-1, keepdims=True)


def softmax_private(s, mask, exp_mode: str):
    return softmax_normalize(softmax_exp(softmax_max(s, mask), mask, exp_mode))


# ----------------------------------------------------------------------------- stages

class Stage:
    """One operation of the forward: fn(*inputs) -> outputs, all named variables."""

    def __init__(self, op: Op, fn: Callable, inputs: list[str], outputs: list[str]):
        self.op, self.fn, self.inputs, self.outputs = op, fn, inputs, outputs

    @property
    def name(self) -> str:
        return self.op.name


def build_stages(arch: Arch, params: dict, T: int, exp_mode: str = "pade", gelu_form: str = "sigmoid") -> list[Stage]:
    """The forward as stages. Variables: 'onehot' [T, V] (the client's tokens), the weights (names of
    `params`), and intermediates '<stage>.out'. The last stage's output is 'logits' [1, V]."""
    d, H = arch.hidden_size, arch.num_heads
    dk, eps = d // H, float(params["eps"])
    mask = np.tril(np.ones((T, T), dtype=bool))[None]  # [1, T, T], public
    inv_sqrt = 1.0 / math.sqrt(dk)
    stages: list[Stage] = []
    current = {"x": "onehot"}  # logical tensor -> variable name

    def heads(t):  # [T, d] -> [H, T, dk]
        return t.reshape(T, H, dk).transpose(1, 0, 2)

    def stage(op, fn, inputs, output_key):
        out = op.name + ".out"
        stages.append(Stage(op, fn, [current.get(n, n) for n in inputs], [out]))
        current[output_key] = out

    for op in op_inventory(arch, T):
        p = f"l{op.layer}."
        r = op.role
        if r == "embedding":
            stage(op, lambda x, wte, wpe: x @ wte + wpe[:T], ["x", "wte", "wpe"], "x")
        elif r in ("ln1", "ln2"):
            stage(op, lambda x, w, b: layer_norm(x, w, b, eps), ["x", p + r + ".w", p + r + ".b"], "a")
        elif r == "qkv":
            if arch.norm != "layernorm":
                current["a"] = current["x"]
            stage(op, lambda a, w, b: a @ w + b, ["a", p + "qkv.w", p + "qkv.b"], "qkv")
        elif r == "temperature":
            stage(op, lambda qkv, scale: heads(qkv[:, :d]) * scale[:, :T, None], ["qkv", p + "qscale"], "q")
        elif r == "scores":
            if arch.temperature:
                stage(op, lambda q, qkv: q @ heads(qkv[:, d:2 * d]).transpose(0, 2, 1), ["q", "qkv"], "s")
            else:
                stage(op, lambda qkv: (heads(qkv[:, :d]) * inv_sqrt) @ heads(qkv[:, d:2 * d]).transpose(0, 2, 1),
                      ["qkv"], "s")
        elif r == "softmax_max":
            stage(op, lambda s: softmax_max(s, mask), ["s"], "s")
        elif r == "softmax_exp":
            stage(op, lambda x: softmax_exp(x, mask, exp_mode), ["s"], "s")
        elif r == "softmax_normalize":
            stage(op, softmax_normalize, ["s"], "s")
        elif r == "context":
            stage(op, lambda prob, qkv: (prob @ heads(qkv[:, 2 * d:])).transpose(1, 0, 2).reshape(T, d),
                  ["s", "qkv"], "c")
        elif r == "o":
            stage(op, lambda c, w, b, x: x + c @ w + b, ["c", p + "o.w", p + "o.b", "x"], "x")
            current["a"] = current["x"]
        elif r == "ffn_fc":
            if arch.residual_scale:
                stage(op, lambda a, w: a @ w, ["a", p + "ffn_fc.w"], "ffn")
            else:
                stage(op, lambda a, w, x: x + a @ w, ["a", p + "ffn_fc.w", "x"], "x")
        elif r == "ffn_in":
            stage(op, lambda a, w, b: a @ w + b, ["a", p + "ffn_in.w", p + "ffn_in.b"], "u")
        elif r == "activation":
            act = (lambda u: gelu(u, gelu_form)) if arch.activation == "gelu" else (lambda u: jnp.maximum(u, 0.0))
            stage(op, act, ["u"], "u")
        elif r == "ffn_out":
            if arch.residual_scale:
                stage(op, lambda u, w, b: u @ w + b, ["u", p + "ffn_out.w", p + "ffn_out.b"], "ffn")
            else:
                stage(op, lambda u, w, b, x: x + u @ w + b, ["u", p + "ffn_out.w", p + "ffn_out.b", "x"], "x")
        elif r == "beta":
            stage(op, lambda x, out, beta: beta * x + out, ["x", "ffn", p + "beta"], "x")
        elif r == "final_norm":
            stage(op, lambda x, w, b: layer_norm(x[-1:], w, b, eps), ["x", "lnf.w", "lnf.b"], "x")
        elif r == "head":
            last = (lambda x: x) if arch.final_norm else (lambda x: x[-1:])
            stage(op, lambda x, w: last(x) @ w, ["x", "head"], "x")
            stages[-1].outputs = ["logits"]
        else:  # pragma: no cover - the inventory and this builder are written together
            raise AssertionError(f"no stage for role {r!r}")
    return stages


def weight_names(stages: list[Stage], params: dict) -> list[str]:
    """The weights the stages read (each enters the protocol once, as the server's secret)."""
    used = {n for s in stages for n in s.inputs if n in params}
    return [n for n in params if n in used]


def run_plaintext(stages: list[Stage], params: dict, onehot: np.ndarray) -> tuple[np.ndarray, dict]:
    """The same stages in plaintext float32 JAX: (logits [1, V], every stage's output as numpy)."""
    env = {k: v for k, v in params.items() if isinstance(v, np.ndarray)}
    env["onehot"] = onehot
    for s in stages:
        out = s.fn(*[env[n] for n in s.inputs])
        env[s.outputs[0]] = np.asarray(out)
    return env["logits"], env


def one_hot(ids: np.ndarray, vocab_size: int) -> np.ndarray:
    out = np.zeros((len(ids), vocab_size), dtype=np.float32)
    out[np.arange(len(ids)), ids] = 1.0
    return out
