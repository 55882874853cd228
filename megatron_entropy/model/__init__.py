"""The paper's models: plain PyTorch modules built from a variant's BlockSpec."""

from megatron_entropy.model.entropy import EntropyRegularization, EntropyStats, entropy_bins
from megatron_entropy.model.gpt import GPTModel, parameter_groups
from megatron_entropy.model.variants import VARIANTS, BlockSpec, resolve_spec

__all__ = ["VARIANTS", "BlockSpec", "EntropyRegularization", "EntropyStats", "GPTModel", "entropy_bins",
           "parameter_groups", "resolve_spec"]
