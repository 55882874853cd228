"""megatron_entropy: pretraining softmax-only, entropy-guided GPTs for private inference."""

__version__ = "0.1.0"
__all__ = ["EntropyRegularization", "__version__"]


def __getattr__(name):
    # Lazy, so tools that never touch torch (data preprocessing) start fast.
    if name == "EntropyRegularization":
        from megatron_entropy.model.entropy import EntropyRegularization

        return EntropyRegularization
    raise AttributeError(f"module 'megatron_entropy' has no attribute {name!r}")
