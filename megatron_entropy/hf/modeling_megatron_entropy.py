"""Hugging Face model of an exported megatron_entropy checkpoint (AutoModelForCausalLM, trust_remote_code=True).

Self-contained (copied next to the weights; imports only torch and transformers). The computation is
megatron_entropy's GPTModel at one process, tensor for tensor:

    x = tokens[ids] + positions[pos]
    per layer:  h = x + MHA_t(norm1(x));   x = h + FFN(norm2(h))   or   x = beta * h + FFN(h) / alpha
    logits = final_norm(x) @ tokens^T   (tied) or lm_head(final_norm(x))

MHA_t multiplies query row i of head h by 1 / (t[h, i] sqrt(d_k)) before q k^T. i is the query's
position in its sequence: with a KV cache the new query of a step sits at position past_length + j
(or `position_ids`, which generate() derives from the attention mask under left padding), never at
its index inside the step. The KV cache is transformers' DynamicCache; `output_attentions=True`
returns every layer's attention probabilities.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_megatron_entropy import MegatronEntropyConfig

try:  # transformers >= 5: initialisers that leave loaded weights alone
    from transformers import initialization as _init
except ImportError:  # pragma: no cover
    _init = nn.init

_CACHE_FIELD = "cache" if "cache" in getattr(CausalLMOutputWithPast, "__dataclass_fields__", {}) else "past_key_values"

ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x, approximate="tanh"),  # GPT-2's gelu_new
    "relu": F.relu,
    "identity": lambda x: x,
}


class NormalizedLinear(nn.Module):
    """y = x W^T + b, W optionally weight-normalised (g / ||W_row||) or spectrally normalised (/ u^T W v)."""

    def __init__(self, in_features, out_features, bias=False, normalization="none"):
        super().__init__()
        self.normalization = normalization
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        if normalization == "weight_norm":
            self.weight_g = nn.Parameter(torch.ones(out_features))
        elif normalization == "spectral_norm":
            # The power-iteration vectors as training left them (not updated at inference).
            self.register_buffer("spectral_u", torch.zeros(out_features))
            self.register_buffer("spectral_v", torch.zeros(in_features))

    def effective_weight(self):
        w = self.weight
        if self.normalization == "weight_norm":
            norms = (w.float() ** 2).sum(dim=1).sqrt().clamp_min(1e-12)
            return w * (self.weight_g / norms).to(w.dtype)[:, None]
        if self.normalization == "spectral_norm":
            return w / torch.dot(self.spectral_u, w @ self.spectral_v)
        return w

    def forward(self, x):
        return F.linear(x, self.effective_weight(), self.bias)


def _norm(config):
    if config.norm == "layernorm":
        return nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
    return nn.Identity()


class MegatronEntropyAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        d, H = config.hidden_size, config.num_heads
        self.config, self.layer_idx = config, layer_idx
        self.num_heads, self.head_dim = H, d // H

        def linear(name, bias):
            norm = config.ffn_stabilizer if (not config.folded and name in config.normalized_linears) else "none"
            return NormalizedLinear(d, d, bias, norm)

        self.q, self.k, self.v = linear("q", config.qk_bias), linear("k", config.qk_bias), linear("v", False)
        self.o = linear("o", False)
        self.log_temperature = self.temperature = None
        if config.folded:
            # 1 / (t[h, i] sqrt(d_k)) per head h and query position i, folded at export.
            self.register_buffer("query_scale", torch.full((H, config.seq_length), 1.0 / math.sqrt(self.head_dim)))
        elif config.learnable_temperature:
            shape = (H, config.seq_length)
            if config.temperature_param == "log":
                self.log_temperature = nn.Parameter(torch.zeros(shape))
            else:
                self.temperature = nn.Parameter(torch.ones(shape))

    def scale_table(self):
        """[heads, seq_length]: the factor query row i of head h is multiplied by."""
        base = 1.0 / math.sqrt(self.head_dim)
        if self.config.folded:
            return self.query_scale
        if self.log_temperature is not None:
            return base / self.log_temperature.exp()
        if self.temperature is not None:
            return base / self.temperature.clamp_min(self.config.min_temperature)
        return None

    def forward(self, x, positions, mask, cache=None, output_attentions=False):
        b, n, _ = x.shape

        def heads(t):
            return t.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        table = self.scale_table()
        if table is None:
            q = q * (1.0 / math.sqrt(self.head_dim))
        else:  # per query position: positions [b, n] index the table's columns
            q = q * table[:, positions].permute(1, 0, 2).to(q.dtype)[..., None]
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        scores = (q.float() @ k.float().transpose(-1, -2)).masked_fill(~mask, torch.finfo(torch.float32).min)
        probs = torch.softmax(scores, dim=-1)
        context = (probs.to(v.dtype) @ v).transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim)
        return self.o(context), (probs if output_attentions else None)


class MegatronEntropyFeedForward(nn.Module):
    def __init__(self, config):
        super().__init__()
        d = config.hidden_size
        norm = config.ffn_stabilizer if (not config.folded and "ffn" in config.normalized_linears) else "none"
        self.fused = config.ffn_kind == "fused"
        if self.fused:
            self.fc = NormalizedLinear(d, d, False, norm)
        else:
            self.fc_in = NormalizedLinear(d, config.ffn_hidden_size, False, norm)
            self.fc_out = NormalizedLinear(config.ffn_hidden_size, d, False, norm)
        self.activation = ACTIVATIONS[config.activation]
        self.min_abs_alpha = config.min_abs_alpha
        self.alpha = self.beta = None
        if config.ffn_stabilizer == "scale":
            if not config.folded:
                self.alpha = nn.Parameter(torch.ones(1))
            if not config.folded or not config.fold_beta:
                self.beta = nn.Parameter(torch.ones(1))

    def forward(self, x):
        if self.fused:
            return self.fc(x)
        return self.fc_out(self.activation(self.fc_in(x)))

    def residual(self, x, out):
        if self.alpha is not None:
            alpha = self.alpha.abs().clamp_min(self.min_abs_alpha).copysign(self.alpha)
            return self.beta * x + out / alpha
        if self.beta is not None:
            return self.beta * x + out
        return x + out


class MegatronEntropyBlock(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.norm1 = _norm(config)
        self.attention = MegatronEntropyAttention(config, layer_idx)
        self.norm2 = _norm(config)
        self.ffn = MegatronEntropyFeedForward(config)

    def forward(self, x, positions, mask, cache=None, output_attentions=False):
        attn, probs = self.attention(self.norm1(x), positions, mask, cache, output_attentions)
        h = x + attn
        return self.ffn.residual(h, self.ffn(self.norm2(h))), probs


class MegatronEntropyEmbedding(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.positions = nn.Parameter(torch.zeros(config.seq_length, config.hidden_size))

    def forward(self, input_ids, positions):
        return self.tokens(input_ids) + self.positions[positions]


class MegatronEntropyHead(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.final_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if config.final_norm \
            else nn.Identity()


class MegatronEntropyPreTrainedModel(PreTrainedModel):
    config_class = MegatronEntropyConfig
    base_model_prefix = "model"
    _no_split_modules = ["MegatronEntropyBlock"]
    supports_gradient_checkpointing = False

    def _init_weights(self, module):
        if isinstance(module, (NormalizedLinear, nn.Embedding)):
            _init.normal_(module.weight, mean=0.0, std=0.02)
            if getattr(module, "bias", None) is not None:
                _init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            _init.ones_(module.weight)
            _init.zeros_(module.bias)


class MegatronEntropyModel(MegatronEntropyPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embedding = MegatronEntropyEmbedding(config)
        self.layers = nn.ModuleList(MegatronEntropyBlock(config, i) for i in range(config.num_layers))
        self.head = MegatronEntropyHead(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.embedding.tokens

    def set_input_embeddings(self, value):
        self.embedding.tokens = value

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=False,
                output_attentions=False, output_hidden_states=False):
        b, n = input_ids.shape
        device = input_ids.device
        if use_cache and cache is None:
            cache = DynamicCache()
        past = cache.get_seq_length() if cache is not None else 0
        total = past + n
        if position_ids is None:
            if attention_mask is not None and attention_mask.shape[-1] == total and not bool(attention_mask.all()):
                # left padding: every sequence starts at position 0 (as in training)
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, past:]
            else:
                position_ids = torch.arange(past, total, device=device).expand(b, n)
        position_ids = position_ids.to(device).expand(b, n)
        if int(position_ids.max()) >= self.config.seq_length:
            raise ValueError(f"position {int(position_ids.max())} is beyond the model's seq_length "
                             f"{self.config.seq_length} (learned positions and temperatures end there)")
        query_index = torch.arange(past, total, device=device)
        mask = (torch.arange(total, device=device)[None, :] <= query_index[:, None])[None, None]  # causal
        if attention_mask is not None:
            mask = mask & attention_mask[:, None, None, -total:].bool().to(device)
        x = self.embedding(input_ids, position_ids)
        hidden_states, attentions = ((x,) if output_hidden_states else None), (() if output_attentions else None)
        for layer in self.layers:
            x, probs = layer(x, position_ids, mask, cache, output_attentions)
            if output_hidden_states:
                hidden_states += (x,)
            if output_attentions:
                attentions += (probs,)
        return self.head.final_norm(x), cache, hidden_states, attentions


class MegatronEntropyForCausalLM(MegatronEntropyPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embedding.tokens.weight"}

    def __init__(self, config):
        super().__init__(config)
        self.model = MegatronEntropyModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embedding.tokens

    def set_input_embeddings(self, value):
        self.model.embedding.tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, past_key_values=None,
                labels=None, use_cache=None, output_attentions=None, output_hidden_states=None, return_dict=None,
                logits_to_keep=0, **kwargs):
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.training:
            use_cache = False
        output_attentions = bool(output_attentions if output_attentions is not None
                                 else getattr(self.config, "output_attentions", False))
        output_hidden_states = bool(output_hidden_states if output_hidden_states is not None
                                    else getattr(self.config, "output_hidden_states", False))
        hidden, cache, hidden_states, attentions = self.model(
            input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache, use_cache=use_cache,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states)
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                   labels[:, 1:].reshape(-1).to(logits.device), ignore_index=-100)
        out = CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=hidden_states, attentions=attentions,
                                     **{_CACHE_FIELD: cache if use_cache else None})
        return out if return_dict is not False else out.to_tuple()


__all__ = ["MegatronEntropyForCausalLM", "MegatronEntropyModel", "MegatronEntropyPreTrainedModel"]
