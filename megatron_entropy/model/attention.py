"""Causal self-attention with the paper's learnable temperature and entropy penalty.

Head h of layer l divides its logits in query row i by t[h, i] * sqrt(d_k) (paper Section 2,
"SM(t)"). Because that is a per-row scale, we fold it into q before the core: scores = q' k^T with
q'_i = q_i / (t_i sqrt(d_k)). The attention *core* then only needs (q', k, v) and returns the
context and, when asked, every row's entropy in fp32. Cores:
  eager  materialises the probabilities;
  fused  never materialises T x T (model/fused_attention.py: blocked CPU autograd / Triton);
  auto   fused where it pays off (CUDA, or T >= FUSED_AUTO_MIN_SEQ), eager elsewhere;
  sdpa   as auto, but PyTorch SDPA whenever no entropy is needed, even with a learnable temperature.
Every configured core takes PyTorch SDPA on steps that need neither the entropy nor a temperature
gradient (e.g. variants without SM(t), evaluation). Both our cores return the gradient of
softmax(s - row max) so that the temperature's gradient stays exact at small t (select_core).
Under tensor parallelism each rank owns H / tp heads: their Q/K/V columns, their temperature rows
and their thresholds theta; its penalty covers only those heads.

Document attention (data.document_attention=within): doc_start [b, T] gives each query row i the
first key of its document, so row i attends keys doc_start[b, i] <= j <= i only, its entropy
covers only its document, and its temperature row is its position inside the document,
i - doc_start[b, i]. Every core honours it: eager and SDPA through a boolean [b, 1, T, T] mask,
the fused cores by skipping key blocks outside the document (no T x T mask).
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron_entropy.model.entropy import head_penalties
from megatron_entropy.parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron_entropy.parallel.mappings import copy_to_tp_region

log = logging.getLogger(__name__)
MIN_TEMPERATURE = 1e-4  # the raw temperature is clamped here in the forward (ambiguity A1)
# auto: the fused core from this sequence length on (always on CUDA). On CPU (1 thread, fp32, fwd + bwd
# with entropy, head_dim 32) it ties with the eager core at T = 64 and is 1.35-1.8x faster at T = 128,
# 2-2.4x at 256, 3-6x at 512 -- and needs O(T) instead of O(T^2) memory (docs/fused_attention.md).
FUSED_AUTO_MIN_SEQ = 128


def allowed_keys(T: int, doc_start=None, device=None) -> torch.Tensor:
    """Boolean mask of the keys each query may see: [T, T] causal, or with doc_start [b, 1, T, T]
    causal within the query's document (doc_start[b, i] <= j <= i)."""
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    if doc_start is None:
        return causal
    keys = torch.arange(T, device=device)
    return (causal & (keys[None, None, :] >= doc_start[:, :, None].to(device)))[:, None]


def eager_core(q, k, v, causal: bool = True, need_entropy: bool = True, doc_start=None):
    """Reference core. q already carries every logit scale. Returns (context, entropy | None).
    Computes in fp32 from the materialised T x T probabilities (the entropy only when asked).
    doc_start [b, T]: document attention (module doc)."""
    q, k = q.float(), k.float()
    scores = q @ k.transpose(-1, -2)
    causal = causal or doc_start is not None
    if causal:
        allowed = allowed_keys(scores.shape[-1], doc_start, scores.device)
        scores = scores.masked_fill(~allowed, float("-inf"))
    scores = scores - _row_mean_score(scores)
    log_probs = torch.log_softmax(scores, dim=-1)
    probs = log_probs.exp()
    context = probs.to(v.dtype) @ v
    if not need_entropy:
        return context, None
    # H_i = -sum_j p_ij log p_ij. Each log p <= 0 in floating point, so H >= 0 even for the very
    # sharp rows a small temperature makes (lse - sum p s would cancel catastrophically there).
    # Masked entries have p = 0 and must not contribute 0 * -inf.
    if causal:
        log_probs = log_probs.masked_fill(~allowed, 0.0)
    entropy = -(probs * log_probs).sum(dim=-1)
    return context, entropy


def sdpa_core(q, k, v, causal: bool = True, doc_start=None):
    """PyTorch's fused attention (flash / memory-efficient kernels): context only. Its backward
    forms D = rowsum(dO * O) as FlashAttention does, without our row-max re-centring, so the
    gradient of a learnable temperature is ~6e-4 off at t = 1e-2 and ~3e-2 at t = 1e-3 (fp32,
    docs/fused_attention.md): used only where no temperature gradient flows, or when asked.
    doc_start: a boolean document mask (PyTorch picks a kernel that takes one)."""
    if doc_start is not None:
        mask = allowed_keys(q.shape[-2], doc_start, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0), None
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=1.0), None


def _row_mean_score(scores):
    """c_i = sum_j p_ij s_ij [..., T, 1], differentiable in s with p = softmax(s) held constant.

    Subtracting c changes no probability (softmax is shift invariant) and, in exact arithmetic,
    no gradient either: ds_ij = dx_ij - p_ij sum_k dx_ik and sum_k dx_ik = 0. In fp32 that row
    sum is a rounding residual r_i, and it matters for the temperature: t scales q, so
    dt_i = -q_i . dq_i / t = -sum_j ds_ij s_ij / t, where r_i meets the logits' size (~10^3 at
    t = 1e-3). Re-centring ds removes r_i before it meets them: the eager core's dt error at
    t = 1e-3 drops from 4e-3 to ~1e-4 (docs/fused_attention.md, "Accuracy")."""
    with torch.no_grad():
        p = torch.softmax(scores, dim=-1)
    return (p * scores.nan_to_num(neginf=0.0)).sum(-1, keepdim=True)


def document_positions(doc_start: torch.Tensor) -> torch.Tensor:
    """[b, T] position of each token inside its document: i - doc_start[b, i]."""
    return torch.arange(doc_start.shape[-1], device=doc_start.device) - doc_start


_warned: set[str] = set()


def _fused_core():
    try:
        from megatron_entropy.model.fused_attention import fused_entropy_attention
    except ImportError as e:  # only when the fused module is unavailable
        _say_once("fused-import", logging.WARNING,
                  "attention_core: the fused attention core is unavailable (%s); falling back to eager", e)
        return None
    return fused_entropy_attention


def _say_once(key: str, level: int, msg: str, *args) -> None:
    if key not in _warned:
        _warned.add(key)
        log.log(level, msg, *args)


def select_core(name: str, q, need_entropy: bool, temperature_grad: bool = False) -> str:
    """Which core runs: 'sdpa' (PyTorch's flash/efficient kernels), 'fused' or 'eager'.

    SDPA cannot return the entropy, and its backward gives a learnable temperature a gradient that
    is off at small temperatures (sdpa_core), so it runs only when neither is needed -- or always
    when no entropy is needed under attention_core=sdpa. auto = fused on CUDA or for
    T >= FUSED_AUTO_MIN_SEQ, eager below; fused and auto fall back to eager (saying so once) when
    the fused core cannot be used."""
    if not need_entropy and (name == "sdpa" or not temperature_grad):
        if name == "fused":
            _say_once("fused-no-entropy", logging.INFO,
                      "attention_core=fused: no entropy and no temperature gradient needed, using SDPA")
        return "sdpa"
    if name == "eager" or (name in ("auto", "sdpa") and not (q.is_cuda or q.shape[-2] >= FUSED_AUTO_MIN_SEQ)):
        return "eager"
    return "fused" if _fused_core() is not None else "eager"


def attention_core(name: str, q, k, v, need_entropy: bool, temperature_grad: bool = False, doc_start=None):
    """Dispatch to the configured core (select_core). Returns (context, entropy | None).
    doc_start [b, T] (or None): document attention, honoured by whichever core runs."""
    core = select_core(name, q, need_entropy, temperature_grad)
    if core == "sdpa":
        return sdpa_core(q, k, v, causal=True, doc_start=doc_start)
    if core == "fused":
        context, entropy = _fused_core()(q, k, v, causal=True, doc_start=doc_start)
        return context, entropy if need_entropy else None
    return eager_core(q, k, v, causal=True, need_entropy=need_entropy, doc_start=doc_start)


class ParallelSelfAttention(nn.Module):
    def __init__(self, cfg, spec, state, layer_number: int, seed: int):
        super().__init__()
        d, H = cfg.hidden_size, cfg.num_heads
        self.state, self.layer_number, self.core = state, layer_number, cfg.attention_core
        self.num_heads, self.heads_local, self.head_dim = H, H // state.tp_size, d // H
        self.head_offset = state.tp_rank * self.heads_local
        normalized = spec.normalized_linears
        stabilizer = spec.ffn_stabilizer

        def column(name, bias):
            return ColumnParallelLinear(
                d, d, state=state, bias=bias, copy_input=False, init_std=cfg.init_std, seed=seed,
                normalization=stabilizer if name in normalized else "none",
                name=f"layers.{layer_number}.attention.{name}",
            )

        self.q, self.k, self.v = column("q", cfg.qk_bias), column("k", cfg.qk_bias), column("v", False)
        self.o = RowParallelLinear(
            d, d, state=state, bias=False, init_std=cfg.init_std, seed=seed,
            normalization=stabilizer if "o" in normalized else "none",
            name=f"layers.{layer_number}.attention.o",
        )
        # t[h, i] as a raw parameter (the paper's literal reading, clamped) or as log t. With the
        # raw form and t0 = 1e-2, one Adam step of lr ~1e-3 moves t by ~10% and a few steps drive
        # it through zero; the log form takes relative steps and keeps t > 0 (ambiguity A1).
        self.temperature = self.log_temperature = None
        if spec.learnable_temperature:
            shape = (self.heads_local, cfg.seq_length)
            if cfg.temperature_param == "log":
                self.log_temperature = nn.Parameter(torch.full(shape, math.log(cfg.temperature_init)))
            else:
                self.temperature = nn.Parameter(torch.full(shape, cfg.temperature_init))
            param = self.log_temperature if self.log_temperature is not None else self.temperature
            param.partition_dim, param.no_weight_decay = 0, True
        self.theta = None
        if spec.entropy_reg:
            self.theta = nn.Parameter(torch.full((self.heads_local,), cfg.entropy_threshold_init))
            self.theta.partition_dim, self.theta.no_weight_decay = 0, True
        self.reg = dict(coeff=cfg.entropy_reg_coeff, tolerance=cfg.entropy_tolerance,
                        reduction=cfg.entropy_reduction, reference_tokens=cfg.entropy_reference_tokens,
                        num_layers=cfg.num_layers)

    def effective_temperature(self) -> torch.Tensor | None:
        """t[heads_local, seq_length] as the forward uses it (None without SM(t))."""
        if self.log_temperature is not None:
            return self.log_temperature.exp()
        if self.temperature is not None:
            return self.temperature.clamp_min(MIN_TEMPERATURE)
        return None

    def row_scale(self, T: int, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Factor multiplying each query row's logits, 1 / (t * sqrt(d_k)): [heads_local, T], or
        [b, heads_local, T] for positions [b, T] (rows restarted per document, t[:, positions])."""
        base = 1.0 / math.sqrt(self.head_dim)
        t = self.effective_temperature()
        if t is None:
            return torch.full((self.heads_local, T), base)
        if positions is None:
            return base / t[:, :T]
        return base / t[:, positions.to(t.device)].transpose(0, 1)

    def forward(self, x: torch.Tensor, stats=None, doc_start: torch.Tensor | None = None):
        """x [b, T, d] (replicated) -> (output [b, T, d], lambda-weighted penalty or None).
        doc_start [b, T]: document attention (module doc)."""
        b, T, _ = x.shape
        x = copy_to_tp_region(x, self.state.tp_group)

        def heads(t):
            return t.view(b, T, self.heads_local, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        if doc_start is None:
            scale = self.row_scale(T).to(device=q.device)[None]
        else:
            scale = self.row_scale(T, document_positions(doc_start)).to(device=q.device)
        q = q * scale.to(q.dtype)[..., None]
        want_penalty = self.theta is not None and self.training
        want_stats = stats is not None and stats.active
        temperature = self.log_temperature if self.log_temperature is not None else self.temperature
        temperature_grad = temperature is not None and temperature.requires_grad and torch.is_grad_enabled()
        context, entropy = attention_core(self.core, q, k, v, need_entropy=want_penalty or want_stats,
                                          temperature_grad=temperature_grad, doc_start=doc_start)
        out = self.o(context.transpose(1, 2).reshape(b, T, self.heads_local * self.head_dim))

        penalty = None
        if entropy is not None:
            if want_stats:
                stats.record(self.layer_number, self.head_offset, entropy)
            if want_penalty:
                per_head = head_penalties(entropy, self.theta, math.log(T), self.reg["tolerance"],
                                          self.reg["reduction"], self.reg["reference_tokens"])
                # (1/H) sum over heads and (1/L) over layers, with the *global* H and L.
                penalty = self.reg["coeff"] * per_head.sum() / (self.num_heads * self.reg["num_layers"])
                if want_stats:
                    stats.record_penalty(penalty)
        return out, penalty
