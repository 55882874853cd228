#!/usr/bin/env python
"""Write folded exports of freshly initialised models, for private-inference cost measurement.

    python tools/pi_exports.py OUT [--variants SM+LN+G SM+ScFuFFN ...] [--layers 1 2] [--hidden-sizes 64 128]
                               [--heads 4] [--seq-length 64] [--vocab-size 512] [--seed 0]

One directory per variant and shape, OUT/<variant slug>-L<layers>-d<hidden>, written exactly as
tools/convert_to_hf.py --fold writes a trained checkpoint (same HF classes, folding and files).
PI cost depends only on shapes, so random weights suffice for cost; the weights are drawn at
trained-model scale (unit-variance embeddings, 1/sqrt(fan-in) matmuls, temperatures and alpha/beta
away from 1) so that the fixed-point error measured on them is representative. Bad input: one
`error:` line, exit code 2.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_entropy.analysis.cli import OneLineParser, fail  # noqa: E402

STUDY_VARIANTS = ("SM+LN+G", "SM+LN+R", "SM+ScFuFFN", "EReg(SM(t)+ScFuFFN)")


def slug(variant: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in variant).strip("-").lower()


def trained_scale_weights(model, seed: int) -> None:
    """Replace the initialisation with weights of a trained model's magnitude (see module doc)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("tokens.weight"):
                p.copy_(noise)
            elif name.endswith("positions"):
                p.copy_(0.3 * noise)
            elif name.endswith("log_temperature"):
                p.copy_(0.5 * noise)
            elif name.endswith("attention.temperature"):
                p.copy_(torch.exp(0.5 * noise))
            elif name.endswith(("ffn.alpha", "ffn.beta")):
                p.copy_(1.0 + 0.3 * noise)
            elif name.endswith("weight_g") or ".norm" in name or "final_norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * noise)
            elif name.endswith(".bias"):
                p.copy_(0.05 * noise)
            elif p.dim() == 2:
                p.copy_(noise / p.shape[1] ** 0.5)


def write_export(variant: str, out: Path, layers: int, hidden: int, heads: int, seq_length: int, vocab: int,
                 seed: int) -> dict:
    import torch
    from transformers import GPT2LMHeadModel

    from megatron_entropy.config import Config
    from megatron_entropy.hf import export
    from megatron_entropy.model.gpt import GPTModel
    from megatron_entropy.parallel.state import ParallelState
    from megatron_entropy.training import reshard

    cfg = Config()
    m = cfg.model
    m.variant, m.num_layers, m.hidden_size, m.num_heads = variant, layers, hidden, heads
    m.seq_length, m.vocab_size = seq_length, vocab
    m.spec()
    model = GPTModel(m, ParallelState.single(), seed=seed).eval()
    trained_scale_weights(model, seed)
    names = reshard.canonical_names(model)
    full = {}
    for key, tensor in model.state_dict().items():
        value = tensor.detach().float()
        if names[key] in reshard.VOCAB_TENSORS:
            value = value[:vocab]
        full[names[key]] = value
    ids = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}  # no tokenizer: fixed small ids
    export._quiet_transformers()
    if export.is_gpt2(m):
        hf = GPT2LMHeadModel(export.gpt2_config(m, ids)).float().eval()
        hf.load_state_dict(export.to_gpt2_state(full, m), strict=False)
        kind = "GPT2LMHeadModel"
    else:
        from megatron_entropy.hf.configuration_megatron_entropy import MegatronEntropyConfig
        from megatron_entropy.hf.modeling_megatron_entropy import MegatronEntropyForCausalLM

        plain = export.build_ours(export.hf_config(m, ids), export.to_ours_state(full, m))
        hf = export.fold_model(plain, m, ids, say=lambda *_: None)
        MegatronEntropyConfig.register_for_auto_class()
        MegatronEntropyForCausalLM.register_for_auto_class("AutoModelForCausalLM")
        kind = "MegatronEntropyForCausalLM (folded)"
    hf.save_pretrained(str(out), safe_serialization=True)
    summary = {"source": "random (trained-scale) initialisation", "seed": seed, "variant": variant, "class": kind,
               "folded": kind != "GPT2LMHeadModel", "vocab_size": vocab}
    (out / "megatron_entropy_export.json").write_text(json.dumps(summary, indent=1))
    with torch.no_grad():  # the export must compute what our own model computes
        ids_in = torch.randint(0, vocab, (1, seq_length), generator=torch.Generator().manual_seed(seed))
        ref, got = model(ids_in).float()[..., :vocab], hf(ids_in).logits.float()
    rel = float((ref - got).abs().max() / ref.abs().max())
    if rel > 1e-4:
        fail(f"{out}: the export's logits differ from the model's by {rel:.1e}; please report this", code=1)
    return summary


def main(argv: list[str] | None = None) -> int:
    from megatron_entropy.model.variants import VARIANTS

    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", metavar="OUT", help="directory to write the exports into (created)")
    parser.add_argument("--variants", nargs="+", default=list(STUDY_VARIANTS), metavar="NAME")
    parser.add_argument("--layers", nargs="+", type=int, default=[1])
    parser.add_argument("--hidden-sizes", nargs="+", type=int, default=[64])
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq-length", type=int, default=64, help="positions of the models (largest T measured)")
    parser.add_argument("--vocab-size", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for v in args.variants:
        if v not in VARIANTS:
            fail(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
    for d in args.hidden_sizes:
        if d % args.heads:
            fail(f"--hidden-sizes {d} is not divisible by --heads {args.heads}")
    if min(args.layers) < 1 or args.seq_length < 2 or args.vocab_size < 2:
        fail("--layers must be >= 1, --seq-length >= 2 and --vocab-size >= 2")
    out = Path(args.out)
    targets = [(v, L, d, out / f"{slug(v)}-L{L}-d{d}") for v in args.variants for L in args.layers
               for d in args.hidden_sizes]
    existing = [t for *_, t in targets if t.exists()]
    if existing:
        fail(f"{existing[0]} already exists; pass a new OUT directory")
    for variant, L, d, target in targets:
        write_export(variant, target, L, d, args.heads, args.seq_length, args.vocab_size, args.seed)
        print(f"wrote {target} ({variant}, L={L}, d={d}, H={args.heads}, positions {args.seq_length}, "
              f"vocabulary {args.vocab_size})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
