"""Cross entropy over vocabulary-sharded logits, never materialising full logits on one rank.

Each TP rank holds logits for vocabulary rows [start, start + V/tp). The log-sum-exp and the
target logit are assembled with three all-reduces (max, sum of exp, target logit), as in
Megatron. Padded vocabulary entries (ids >= true_vocab_size) are masked to -inf so padding never
changes the loss, whatever the TP size.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_entropy.parallel.mappings import all_reduce_no_grad


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, vocab_start, true_vocab_size, group):
        ctx.input_dtype = logits.dtype
        logits = logits.float()
        local_vocab = logits.shape[-1]
        padded = torch.arange(vocab_start, vocab_start + local_vocab, device=logits.device) >= true_vocab_size
        logits = logits.masked_fill(padded, float("-inf"))

        row_max = logits.max(dim=-1).values
        all_reduce_no_grad(row_max, group, op=dist.ReduceOp.MAX)
        shifted = logits - row_max[..., None]

        in_shard = (target >= vocab_start) & (target < vocab_start + local_vocab)
        local_target = (target - vocab_start).masked_fill(~in_shard, 0)
        target_logit = shifted.gather(-1, local_target[..., None]).squeeze(-1).masked_fill(~in_shard, 0.0)
        all_reduce_no_grad(target_logit, group)

        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)
        all_reduce_no_grad(sum_exp, group)
        loss = sum_exp.log() - target_logit

        softmax = exp / sum_exp[..., None]
        ctx.save_for_backward(softmax, local_target, in_shard)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local_target, in_shard = ctx.saved_tensors
        grad = softmax
        grad.scatter_add_(-1, local_target[..., None], -in_shard[..., None].to(grad.dtype))
        return (grad * grad_loss[..., None]).to(ctx.input_dtype), None, None, None, None


def vocab_parallel_cross_entropy(logits, target, *, vocab_start: int = 0, true_vocab_size: int | None = None,
                                 group=None) -> torch.Tensor:
    """Per-token loss [...] from local logits [..., V_local] (fp32 math whatever the input dtype)."""
    true_vocab_size = true_vocab_size if true_vocab_size is not None else vocab_start + logits.shape[-1]
    return _VocabParallelCrossEntropy.apply(logits, target, vocab_start, true_vocab_size, group)
