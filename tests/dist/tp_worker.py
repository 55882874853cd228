"""Per-rank workers for the tensor-parallel tests (run through tests/dist/harness.py).

`tp_equivalence` builds, for every case, the TP model on all ranks and (on rank 0 only) the
single-process reference from the same seed, runs the same batch through both and compares on
rank 0: initial weights (shards gathered along partition_dim; must be bit-identical), gathered
logits, LM loss, the entropy penalty, the entropy-statistics matrix, every parameter's gradient
(gathered along partition_dim; replicated ones also checked for identity across TP ranks), the
spectral-norm power-iteration vectors, then the losses over a few plain torch AdamW steps.
Rank 0 returns a JSON-able report; the parent test asserts on it.
"""

from __future__ import annotations

import math
import os
import time

import torch
import torch.distributed as dist

from megatron_entropy.config import ModelConfig
from megatron_entropy.model.gpt import GPTModel, parameter_groups
from megatron_entropy.model.variants import VARIANTS
from megatron_entropy.parallel.state import ParallelState

EREG = "EReg(SM(t)+ScFuFFN)"
BATCH, SEQ = 4, 32
# Small and fast; init_std 0.1 and temperature 0.1 make attention clearly non-uniform (entropy is
# stationary at the uniform distribution, so near-uniform attention would hide penalty gradients);
# the reference token count equals the batch's tokens, so lambda * penalty is O(LM loss).
BASE = dict(num_layers=2, hidden_size=64, num_heads=4, seq_length=SEQ, vocab_size=1003,
            make_vocab_size_divisible_by=1, entropy_reg_coeff=1e-2, entropy_reference_tokens=BATCH * SEQ,
            init_std=0.1, temperature_init=0.1, attention_core="eager")

CASES: dict[str, dict] = {name: {"variant": name} for name in VARIANTS}
CASES.update({
    # Table 5's widest placement, with SM(t) and EReg switched on so the penalty's gradients
    # pass through normalised (TP-sharded) Q and K.
    "SM+SN @QKVO+FFN +EReg": dict(variant="SM+SN", stabilizer_placement="QKVO+FFN",
                                  learnable_temperature=True, entropy_reg=True),
    "SM+WN @QKVO+FFN +EReg": dict(variant="SM+WN", stabilizer_placement="QKVO+FFN",
                                  learnable_temperature=True, entropy_reg=True),
    "EReg raw t, paper_sum": dict(variant=EREG, temperature_param="raw", entropy_reduction="paper_sum"),
    "EReg fused core": dict(variant=EREG, attention_core="fused"),
    # The default padding multiple: 1100 -> 1152 (TP1), 1280 (TP2), 1536 (TP4: rank 3 is all padding).
    "EReg vocab 1100/128": dict(variant=EREG, vocab_size=1100, make_vocab_size_divisible_by=128),
    "SM+LN+G untied, vocab 1100/128": dict(variant="SM+LN+G", tie_embeddings=False, vocab_size=1100,
                                           make_vocab_size_divisible_by=128),
})


def model_config(case: str) -> ModelConfig:
    return ModelConfig(**dict(BASE, **CASES[case]))


def init_process_group() -> None:
    if not dist.is_initialized():
        dist.init_process_group("gloo", rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))


def gather(t: torch.Tensor, dim: int | None, state: ParallelState) -> torch.Tensor:
    """The full tensor from every TP rank's shard (collective on the TP group)."""
    if dim is None or state.tp_size == 1:
        return t.detach().clone()
    parts = [torch.empty_like(t) for _ in range(state.tp_size)]
    dist.all_gather(parts, t.detach().contiguous(), group=state.tp_group)
    return torch.cat(parts, dim=dim)


def all_copies(t: torch.Tensor, state: ParallelState) -> list[torch.Tensor]:
    parts = [torch.empty_like(t) for _ in range(state.tp_size)]
    dist.all_gather(parts, t.detach().contiguous(), group=state.tp_group)
    return parts


def rel(a: torch.Tensor, b: torch.Tensor, floor: float = 0.0) -> float:
    """||a - b|| / max(||b||, floor) in float64."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).norm() / max(float(b.norm()), floor, 1e-300))


def fit(full: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Cut the vocab padding of a gathered tensor down to the reference shape.

    Returns the cut tensor and the largest |value| in the rows cut away (padding must stay zero).
    """
    if full.shape == like.shape:
        return full, 0.0
    assert full.dim() == like.dim() and full.shape[1:] == like.shape[1:] and full.shape[0] >= like.shape[0], \
        (tuple(full.shape), tuple(like.shape))
    extra = full[like.shape[0]:]
    return full[: like.shape[0]], float(extra.abs().max()) if extra.numel() else 0.0


def batch(cfg: ModelConfig, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(4321 + step)
    ids = torch.randint(0, cfg.vocab_size, (BATCH, SEQ), generator=g)
    labels = torch.randint(0, cfg.vocab_size, (BATCH, SEQ), generator=g)
    ids[0, :3] = torch.tensor([0, cfg.vocab_size - 1, cfg.vocab_size - 2])  # first and last shard
    labels[0, :3] = torch.tensor([cfg.vocab_size - 1, 0, cfg.vocab_size - 1])
    return ids, labels


def forward_backward(model: GPTModel, ids, labels, state):
    """Logits (no grad), then loss with the penalty attached and recorded, then backward."""
    model.train()
    model.zero_grad(set_to_none=True)
    model.stats.reset()
    model.stats.active = False
    with torch.no_grad():
        logits = model(ids)
    model.stats.reset()
    model.stats.active = True
    model.stats.micro_batches = 1
    model.aux_scale.value = 1.0
    loss = model(ids, labels)
    loss.backward()
    model.stats.active = False
    reduced = model.stats.reduce(state)
    return logits, loss.detach(), reduced


def compare_case(case: str, state: ParallelState, steps: int, seed: int) -> dict | None:
    cfg = model_config(case)
    lead = state.rank == 0
    started = time.perf_counter()
    model = GPTModel(cfg, state, seed=seed)
    ref = GPTModel(model_config(case), ParallelState.single(), seed=seed) if lead else None
    ref_params = dict(ref.named_parameters()) if lead else {}
    report: dict = {"max_init_abs_diff": 0.0, "max_padding_abs": 0.0, "grad_rel": {},
                    "replicated_grad_max_abs_diff": 0.0, "params": {}}

    # 1. Same seed -> the TP shards are slices of the reference weights, bit for bit.
    for name, p in model.named_parameters():
        dim = getattr(p, "partition_dim", "missing")
        assert dim != "missing", f"{case}: parameter {name} has no partition_dim"
        full = gather(p, dim, state)
        if lead:
            full, pad = fit(full, ref_params[name])
            report["max_init_abs_diff"] = max(report["max_init_abs_diff"], float((full - ref_params[name]).abs().max()))
            report["max_padding_abs"] = max(report["max_padding_abs"], pad)
            report["params"][name] = {"partition_dim": dim, "shape": list(p.shape)}

    # 2. One forward/backward on the same batch.
    ids, labels = batch(cfg, 0)
    logits, loss, reduced = forward_backward(model, ids, labels, state)
    if lead:
        r_logits, r_loss, r_reduced = forward_backward(ref, ids, labels, ParallelState.single())
        report["logits_rel"] = rel(logits, r_logits)
        report["loss"], report["loss_ref"] = float(loss), float(r_loss)
        report["loss_rel"] = rel(loss, r_loss)
        report["penalty"], report["penalty_ref"] = reduced["entropy_reg_loss"], r_reduced["entropy_reg_loss"]
        report["penalty_rel"] = rel(reduced["entropy_reg_loss"], r_reduced["entropy_reg_loss"])
        report["entropy_rel"] = rel(torch.tensor(reduced["entropy"]), torch.tensor(r_reduced["entropy"]))
        report["entropy_nan"] = bool(torch.tensor(reduced["entropy"]).isnan().any())
        report["entropy_mean"] = float(torch.tensor(r_reduced["entropy"]).mean())

    grads = {}
    for name, p in model.named_parameters():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        dim = p.partition_dim
        if dim is None and state.tp_size > 1:
            copies = all_copies(g, state)
            if lead:
                diff = max(float((c - copies[0]).abs().max()) for c in copies)
                report["replicated_grad_max_abs_diff"] = max(report["replicated_grad_max_abs_diff"], diff)
        full = gather(g, dim, state)
        if lead:
            full, pad = fit(full, ref_params[name])
            report["max_padding_abs"] = max(report["max_padding_abs"], pad)
            grads[name] = full
    if lead:
        ref_grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in ref.named_parameters()}
        total = math.sqrt(sum(float(g.double().square().sum()) for g in ref_grads.values()))
        report["grad_norm_ref"] = total
        for name, g in grads.items():
            report["grad_rel"][name] = {
                "rel": rel(g, ref_grads[name]),
                # Relative to the whole model's gradient: for tensors whose gradient is zero in
                # exact arithmetic (the K bias: softmax is invariant to a per-row shift) and so
                # is pure rounding noise, its own norm is no yardstick.
                "rel_global": rel(g, ref_grads[name], floor=total) if total else 0.0,
                "norm_ref": float(ref_grads[name].norm()),
            }
        report["grad_rel_global_all"] = math.sqrt(sum(
            float((g.double() - ref_grads[n].double()).square().sum()) for n, g in grads.items())) / max(total, 1e-300)

    # Sharded buffers (spectral-norm u, v after the power iterations).
    buf_rel = 0.0
    ref_modules = dict(ref.named_modules()) if lead else {}
    for mname, module in model.named_modules():
        for bname, dim in getattr(module, "buffer_partition_dims", {}).items():
            full = gather(getattr(module, bname).float(), dim, state)
            if lead:
                buf_rel = max(buf_rel, rel(full, getattr(ref_modules[mname], bname).float()))
    report["buffer_rel"] = buf_rel

    # 3. A few plain AdamW steps (weight decay on the decay group); losses must still agree.
    opt = torch.optim.AdamW(parameter_groups(model, 0.1), lr=1e-3)
    ref_opt = torch.optim.AdamW(parameter_groups(ref, 0.1), lr=1e-3) if lead else None
    losses, ref_losses, penalties, ref_penalties = [], [], [], []
    for step in range(1, steps + 1):
        opt.step()
        ids, labels = batch(cfg, step)
        _, loss, red = forward_backward(model, ids, labels, state)
        losses.append(float(loss))
        penalties.append(red["entropy_reg_loss"])
        if lead:
            ref_opt.step()
            _, r_loss, r_red = forward_backward(ref, ids, labels, ParallelState.single())
            ref_losses.append(float(r_loss))
            ref_penalties.append(r_red["entropy_reg_loss"])
    param_rel = {}
    for name, p in model.named_parameters():
        full = gather(p, p.partition_dim, state)
        if lead:
            full, _ = fit(full, ref_params[name])
            param_rel[name] = rel(full, ref_params[name])
    if lead:
        report["losses"], report["losses_ref"] = losses, ref_losses
        report["step_loss_rel"] = max(rel(a, b) for a, b in zip(losses, ref_losses)) if steps else 0.0
        report["step_penalty_rel"] = max(rel(a, b) for a, b in zip(penalties, ref_penalties)) if steps else 0.0
        report["param_rel_after_steps"] = param_rel
        report["seconds"] = time.perf_counter() - started
    return report if lead else None


def tp_equivalence(tp: int, cases: list[str] | None = None, steps: int = 3, seed: int = 1234) -> dict | None:
    torch.set_num_threads(1)
    init_process_group()
    started = time.perf_counter()
    state = ParallelState.from_topology(tensor=tp)
    out = {"tp": tp, "world_size": state.world_size, "cases": {}}
    for case in cases or list(CASES):
        report = compare_case(case, state, steps, seed)
        if report is not None:
            out["cases"][case] = report
    out["seconds"] = time.perf_counter() - started
    dist.barrier()
    dist.destroy_process_group()
    return out if state.rank == 0 else None


# ----------------------------------------------------------------------------- DeepSpeed engine

def _train_config(tp: int, dp: int, variant: str, grad_clip: float, lr: float):
    from megatron_entropy.config import Config

    cfg = Config()
    cfg.model = model_config(variant)
    cfg.parallel.tensor = tp
    cfg.train.global_batch_size, cfg.train.micro_batch_size = BATCH, BATCH // dp
    cfg.train.grad_clip, cfg.train.lr, cfg.train.min_lr, cfg.train.warmup_steps = grad_clip, lr, lr / 10, 2
    cfg.train.max_steps, cfg.train.precision = 10, "fp32"
    return cfg


def ds_engine_equivalence(tp: int, zero_stages: list[int], steps: int = 3, variant: str = EREG,
                          grad_clip: float = 0.05, lr: float = 1e-3, seed: int = 1234) -> dict | None:
    """DeepSpeed engines (our engine.initialize, TensorParallelMPU) at TP=tp x DP=world/tp against
    plain torch (AdamW + clip_grad_norm_ + the same schedule) on the TP=1 model on rank 0.

    grad_clip is small so that clipping is active: a wrong TP norm would change the update.
    Compares, per ZeRO stage: the grad norm DeepSpeed reports, the losses, the final parameters.
    """
    import deepspeed  # noqa: F401  (imported before init so its comm layer wraps ours)

    from megatron_entropy.training.engine import build_ds_config, initialize, make_optimizer

    torch.set_num_threads(1)
    init_process_group()
    world = dist.get_world_size()
    dp = world // tp
    state = ParallelState.from_topology(tensor=tp)
    lead = state.rank == 0
    out: dict = {"tp": tp, "dp": dp, "stages": {}}

    cfg = _train_config(tp, dp, variant, grad_clip, lr)
    ref_losses, ref_norms, ref_params = [], [], {}
    if lead:  # the single-process reference: plain torch, whole global batch
        ref = GPTModel(model_config(variant), ParallelState.single(), seed=seed)
        opt, sched = make_optimizer(cfg, ref)
        for step in range(steps):
            ids, labels = batch(cfg.model, step)
            loss = ref(ids, labels)
            loss.backward()
            ref_norms.append(float(torch.nn.utils.clip_grad_norm_(ref.parameters(), grad_clip)))
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            ref_losses.append(float(loss))
        ref_params = {n: p.detach().clone() for n, p in ref.named_parameters()}

    for stage in zero_stages:
        started = time.perf_counter()
        model = GPTModel(model_config(variant), state, seed=seed)
        ds_config = build_ds_config(cfg, {"zero_optimization": {"stage": stage}}, world)
        engine, _, _ = initialize(cfg, model, ds_config, state)
        mb = BATCH // dp
        losses, norms = [], []
        for step in range(steps):
            ids, labels = batch(cfg.model, step)
            rows = slice(state.dp_rank * mb, (state.dp_rank + 1) * mb)
            loss = engine(ids[rows], labels[rows])
            engine.backward(loss)
            engine.step()
            mean = loss.detach().clone()
            dist.all_reduce(mean)  # mean over DP of the per-replica mean (TP copies are equal)
            losses.append(float(mean) / world)
            norm = engine.get_global_grad_norm()
            norms.append(None if norm is None else float(norm))
        params = {}
        module = engine.module
        if stage == 3:
            from deepspeed.runtime.zero import GatheredParameters

            ctx = GatheredParameters(list(module.parameters()))
        else:
            import contextlib

            ctx = contextlib.nullcontext()
        with ctx:
            for name, p in module.named_parameters():
                full = gather(p.detach().float(), p.partition_dim, state)
                if lead:
                    params[name] = full
        if lead:
            param_rel = {}
            for name, full in params.items():
                full, _ = fit(full, ref_params[name])
                param_rel[name] = rel(full, ref_params[name])
            out["stages"][str(stage)] = {
                "losses": losses, "losses_ref": ref_losses, "norms": norms, "norms_ref": ref_norms,
                "loss_rel": max(rel(a, b) for a, b in zip(losses, ref_losses)),
                "norm_rel": max(rel(a, b) for a, b in zip(norms, ref_norms)) if None not in norms else None,
                "param_rel": param_rel, "seconds": time.perf_counter() - started,
            }
        del engine, model
    dist.barrier()
    dist.destroy_process_group()
    return out if lead else None
