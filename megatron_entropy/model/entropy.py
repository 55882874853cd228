"""The entropy regulariser (paper Algorithm 1), its auxiliary-loss attachment and statistics.

For layer l, head h, sample b and query position i, with E the row entropy of attention:
    delta = E[b, h, i] - theta[l, h] * log T
    penalty[l, h] = sum_{b,i} delta^2 * 1(|delta| > gamma * log T)          ("paper_sum")
    L_entropy = (1/L) sum_l (1/H) sum_h penalty[l, h],   loss = CE + lambda * L_entropy
The official code sums over the micro-batch's sequences and positions, so its value (and the
meaning of lambda) depends on the micro-batch shape and on how a global batch is split into
micro-batches and data-parallel ranks. The default "token_mean" reduction averages over (b, i)
instead and multiplies by `reference_tokens` (16,384 = the paper's 128 x 128 micro-batch), which
equals the paper's value at the paper's batch shape and is the same for every parallel layout.
The paper's text (section 4, Eq. 4) describes a third form, "paper_text": average the entropy over
the micro-batch's sequences and query positions first, then one thresholded square per head:
    Ebar[l, h] = mean_{b,i} E[b, h, i],   delta = Ebar - theta[l, h] * log T
    penalty[l, h] = delta^2 * 1(|delta| > gamma * log T)
It has no token count in it (lambda is not rescaled), and a head whose rows deviate in both
directions can have a mean inside the margin and no penalty at all.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from megatron_entropy.parallel.recompute import is_recomputing


def head_penalties(entropy: torch.Tensor, theta: torch.Tensor, log_t: float, tolerance: float,
                   reduction: str = "token_mean", reference_tokens: int = 16384) -> torch.Tensor:
    """Per-head penalty [h] from row entropies [b, h, T] (fp32) and threshold fractions theta [h]."""
    if reduction == "paper_text":  # mean entropy per head first, then one penalty per head
        head_delta = entropy.float().mean(dim=(0, 2)) - theta.float() * log_t
        outside = head_delta.abs() > tolerance * log_t
        return torch.where(outside, head_delta, torch.zeros_like(head_delta)).square()
    delta = entropy.float() - theta.float()[None, :, None] * log_t
    outside = delta.abs() > tolerance * log_t
    squared = torch.where(outside, delta, torch.zeros_like(delta)).square()
    if reduction == "paper_sum":
        return squared.sum(dim=(0, 2))
    if reduction == "token_mean":
        return squared.mean(dim=(0, 2)) * reference_tokens
    raise ValueError(f"unknown entropy reduction {reduction!r}")


class AuxLossScale:
    """The factor by which the engine scales the main loss before backward.

    DeepSpeed divides the loss by the gradient-accumulation steps (and multiplies by the fp16 loss
    scale). An auxiliary loss attached inside the model never passes through engine.backward, so
    its gradient must be scaled by the same factor; the training loop keeps this up to date.
    """

    def __init__(self) -> None:
        self.value = 1.0


class AttachAuxLoss(torch.autograd.Function):
    """Forward: identity on `hidden`. Backward: also sends d(aux) = scale into aux's graph.

    This lets each layer add its own penalty to the objective where it is computed, so nothing
    extra travels through pipeline stages (Megatron-core does the same for MoE aux losses).
    """

    @staticmethod
    def forward(ctx, hidden, aux_loss, scale: float):
        ctx.scale, ctx.aux_shape = scale, aux_loss.shape
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad_hidden):
        grad_aux = torch.full(ctx.aux_shape, ctx.scale, dtype=torch.float32, device=grad_hidden.device)
        return grad_hidden, grad_aux, None


class EntropyStats:
    """Per (layer, head) entropy sums, NaN counts and the penalty value, for logging.

    Each rank fills the slots of the layers and heads it owns; `reduce` sums over all ranks (every
    slot has exactly one owner per data-parallel replica) and divides by the data-parallel size,
    so every parallel layout yields the same matrix.
    """

    def __init__(self, num_layers: int, num_heads: int):
        self.num_layers, self.num_heads = num_layers, num_heads
        self.active = False
        self.reset()

    def reset(self) -> None:
        self.entropy_sum = torch.zeros(self.num_layers, self.num_heads, dtype=torch.float64)
        self.count = torch.zeros(self.num_layers, self.num_heads, dtype=torch.float64)
        self.nan_count = torch.zeros(self.num_layers, dtype=torch.float64)
        self.penalty = torch.zeros((), dtype=torch.float64)  # lambda-weighted, summed over micro-batches
        self.micro_batches = 0

    @torch.no_grad()
    def record(self, layer: int, head_offset: int, entropy: torch.Tensor) -> None:
        """entropy [b, h_local, T] of layer `layer`, heads head_offset .. head_offset + h_local."""
        if not self.active or is_recomputing():  # an activation recompute is not another micro-batch
            return
        e = entropy.detach().double().cpu()
        nan = torch.isnan(e)
        heads = slice(head_offset, head_offset + e.shape[1])
        self.entropy_sum[layer, heads] += torch.where(nan, 0.0, e).sum(dim=(0, 2))
        self.count[layer, heads] += (~nan).sum(dim=(0, 2)).double()
        self.nan_count[layer] += nan.sum().double()

    @torch.no_grad()
    def record_penalty(self, value: torch.Tensor) -> None:
        if self.active and not is_recomputing():
            self.penalty += value.detach().double().cpu()

    def reduce(self, state=None) -> dict:
        """Reduce across ranks; returns plain Python values (identical on every rank)."""
        packed = torch.cat([
            self.entropy_sum.flatten(), self.count.flatten(), self.nan_count,
            self.penalty.reshape(1), torch.tensor([float(self.micro_batches)], dtype=torch.float64),
        ])
        dp_size = 1
        if state is not None and state.world_size > 1:
            # Over the whole world (the default group). Not all_reduce_no_grad(packed, None): in
            # the TP mappings a None group means "one rank", so that was a silent no-op and each
            # rank logged only its own heads' entropies and penalty.
            dist.all_reduce(packed, op=dist.ReduceOp.SUM)
            dp_size = state.dp_size
        n = self.num_layers * self.num_heads
        entropy_sum, count = packed[:n].view_as(self.count), packed[n:2 * n].view_as(self.count)
        nan_count = packed[2 * n:2 * n + self.num_layers]
        # Every rank of a replica counted the same micro-batches; each replica's sum arrives
        # once per rank, so normalise by ranks-per-replica x micro-batches.
        ranks_per_replica = (state.world_size // dp_size) if state is not None else 1
        micro = float(packed[-1]) / max(ranks_per_replica, 1)
        mean = (entropy_sum / count.clamp_min(1)).where(count > 0, torch.full_like(count, float("nan")))
        return {
            "entropy": mean.tolist(),
            "nan_counts": (nan_count / dp_size).tolist(),
            "entropy_reg_loss": float(packed[-2]) / max(micro, 1.0),
        }


def entropy_bins(matrix, max_value: float | None = None) -> list[float]:
    """Share of heads in [0, m/4), [m/4, m/2), [m/2, 3m/4), [3m/4, m] (paper Fig. 2a).

    m is the largest observed head entropy of the model (not log T), as in the paper.
    """
    values = torch.as_tensor(matrix, dtype=torch.float64).flatten()
    values = values[~torch.isnan(values)]
    if values.numel() == 0:
        return [float("nan")] * 4
    m = float(values.max()) if max_value is None else max_value
    if m <= 0:
        return [1.0, 0.0, 0.0, 0.0]
    index = torch.clamp((values / (m / 4)).floor(), 0, 3).long()
    counts = torch.bincount(index, minlength=4).double()
    return (counts / values.numel()).tolist()


class EntropyRegularization:
    """Drop-in entropy regulariser for Hugging Face models (the official code's API).

    `compute_loss(attentions, reg_threshold_weights, num_heads, num_layers)` takes the tuple of
    attention maps from `output_attentions=True`. Thresholds may be one [H] vector (the official
    example, shared by every layer) or per layer: an [L, H] tensor or a list of L [H] tensors —
    the paper's Theta in R^{L x H}; the official example's reuse of layer 0's thresholds is a bug
    we do not copy. Entropies are computed in fp32 (the official nansum hides fp16 NaNs).
    """

    def __init__(self, loss_coeff: float = 1e-5, tolerance_margin_factor: float = 0.20,
                 context_size: int | None = None):
        self.loss_coeff = loss_coeff
        self.tolerance_margin_factor = tolerance_margin_factor
        self.context_size = context_size

    @staticmethod
    def compute_entropy(attention_matrix: torch.Tensor) -> torch.Tensor:
        """Row entropy [..., T] of attention probabilities [..., T, T], in fp32.

        Masked keys have p = 0 exactly. Their term is 0, and so must be its gradient's effect:
        xlogy(p, p) has the value 0 there but the gradient log 0 = -inf, which the softmax
        backward turns into NaN in every query/key gradient of the row (sum_j p_j g_j = 0 * inf).
        log of where(p > 0, p, 1) is 0 at p = 0 with a zero gradient, and log p elsewhere, so
        the gradient is -(log p + 1) wherever p > 0 -- the official -sum p log(p + 1e-9)'s up to
        that epsilon -- and finite at p = 0, where the softmax backward multiplies it by p = 0."""
        p = attention_matrix.float()
        log_p = torch.log(torch.where(p > 0, p, torch.ones_like(p)))
        return -(p * log_p).sum(dim=-1)

    def compute_loss(self, attentions, reg_threshold_weights, num_heads: int, num_layers: int) -> torch.Tensor:
        context_size = self.context_size or attentions[0].shape[-1]
        log_t = math.log(context_size)
        total = attentions[0].new_zeros((), dtype=torch.float32)
        for layer, attn in enumerate(attentions):
            theta = _thresholds_for_layer(reg_threshold_weights, layer, num_heads).to(attn.device)
            penalties = head_penalties(self.compute_entropy(attn)[:, :num_heads], theta, log_t,
                                       self.tolerance_margin_factor, reduction="paper_sum")
            total = total + penalties.sum() / num_heads
        return self.loss_coeff * total / num_layers

    @staticmethod
    def log_entropy_metrics(attention_matrices, step=None, logger=None) -> dict:
        metrics = {}
        for i, attn in enumerate(attention_matrices):
            per_head = EntropyRegularization.compute_entropy(attn).mean(dim=(0, 2))
            for h, value in enumerate(per_head.tolist()):
                metrics[f"attn.{i}.head.{h}.entropy"] = value
        if logger is not None:
            logger.log(metrics, step=step) if step is not None else logger.log(metrics)
        return metrics


def _thresholds_for_layer(weights, layer: int, num_heads: int) -> torch.Tensor:
    if isinstance(weights, (list, tuple)):
        if len(weights) and torch.as_tensor(weights[0]).dim() >= 1:
            return torch.as_tensor(weights[layer]).float()
        return torch.as_tensor(weights).float()
    weights = torch.as_tensor(weights).float()
    if weights.dim() == 2:
        return weights[layer]
    if weights.dim() == 1 and weights.numel() == num_heads:
        return weights
    raise ValueError(f"reg_threshold_weights must have shape [num_heads] or [num_layers, num_heads], got {tuple(weights.shape)}")
