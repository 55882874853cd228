"""Hugging Face configuration of an exported megatron_entropy model (loaded with trust_remote_code=True).

Self-contained: this file is copied next to the weights and must import only transformers.
"""

from transformers import PretrainedConfig


class MegatronEntropyConfig(PretrainedConfig):
    """A (softmax-only, entropy-guided) GPT of the paper "Entropy-Guided Attention for Private LLMs".

    Block:  x = x + MHA_t(norm1(x));  x = x + FFN(norm2(x))   or, with ffn_stabilizer="scale",
            x = beta * x + FFN(x) / alpha.  Head h divides its logits in query row i by t[h, i] sqrt(d_k)
    (learnable_temperature) — i is the absolute position of the query, also under a KV cache.
    folded=True: inference constants are folded into plain weights (weight/spectral norm, alpha, beta,
    and 1 / (t sqrt(d_k)) as a per-position query scale `query_scale` [heads, positions]).
    """

    model_type = "megatron_entropy"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]
    attribute_map = {"num_hidden_layers": "num_layers", "num_attention_heads": "num_heads",
                     "max_position_embeddings": "seq_length", "n_positions": "seq_length"}

    def __init__(self, vocab_size=512, hidden_size=128, num_layers=4, num_heads=4, seq_length=128,
                 ffn_hidden_size=512, norm="layernorm", activation="gelu", ffn_kind="two_layer",
                 ffn_stabilizer="none", stabilizer_placement="FFN", final_norm=True, learnable_temperature=False,
                 temperature_param="log", qk_bias=True, layer_norm_eps=1e-5, min_abs_alpha=1e-3,
                 min_temperature=1e-4, folded=False, fold_beta=True, variant="", use_cache=True,
                 tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=3, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.seq_length = seq_length
        self.ffn_hidden_size = ffn_hidden_size
        self.norm = norm
        self.activation = activation
        self.ffn_kind = ffn_kind
        self.ffn_stabilizer = ffn_stabilizer
        self.stabilizer_placement = stabilizer_placement
        self.final_norm = final_norm
        self.learnable_temperature = learnable_temperature
        self.temperature_param = temperature_param
        self.qk_bias = qk_bias
        self.layer_norm_eps = layer_norm_eps
        self.min_abs_alpha = min_abs_alpha
        self.min_temperature = min_temperature
        self.folded = folded
        self.fold_beta = fold_beta
        self.variant = variant
        self.use_cache = use_cache
        super().__init__(tie_word_embeddings=tie_word_embeddings, bos_token_id=bos_token_id,
                         eos_token_id=eos_token_id, pad_token_id=pad_token_id, **kwargs)

    @property
    def normalized_linears(self) -> frozenset:
        """Which linear layers weight/spectral normalisation applies to (paper Table 5)."""
        if self.ffn_stabilizer not in ("weight_norm", "spectral_norm"):
            return frozenset()
        parts = {"FFN": {"ffn"}, "QK": {"q", "k"}, "QKV": {"q", "k", "v"}, "QKVO": {"q", "k", "v", "o"}}
        names = set()
        for part in self.stabilizer_placement.split("+"):
            names |= parts[part]
        return frozenset(names)


__all__ = ["MegatronEntropyConfig"]
