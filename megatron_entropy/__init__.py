"""megatron_entropy: pretraining softmax-only, entropy-guided GPTs for private inference."""

__version__ = "0.1.0"

from megatron_entropy.model.entropy import EntropyRegularization  # noqa: E402

__all__ = ["EntropyRegularization", "__version__"]
