"""Config: presets, dotted overrides, variant resolution, one-line validation errors."""

import pytest

from megatron_entropy.config import ConfigError, build_config, describe_keys, parse_overrides
from megatron_entropy.model.variants import VARIANTS

PRESETS = ["tiny", "gpt2_small_codeparrot_t128", "gpt2_small_languini_t512", "gpt2_18l_codeparrot_t128", "1b"]


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_load_and_validate(preset):
    cfg = build_config(preset)
    cfg.validate(world_size=cfg.parallel.tensor * cfg.parallel.pipeline)
    assert cfg.model.num_layers >= 1


def test_paper_presets_match_the_paper():
    cfg = build_config("gpt2_small_codeparrot_t128")
    m = cfg.model
    assert (m.num_layers, m.num_heads, m.hidden_size, m.seq_length) == (12, 12, 768, 128)
    assert (m.temperature_init, m.entropy_reg_coeff, m.entropy_tolerance) == (1e-2, 1e-5, 0.2)
    lang = build_config("gpt2_small_languini_t512").model
    assert (lang.seq_length, lang.temperature_init, lang.entropy_reg_coeff) == (512, 0.1, 5e-5)
    assert build_config("gpt2_18l_codeparrot_t128").model.num_layers == 18


def test_overrides_are_typed():
    cfg = build_config("tiny", ["--model.num_layers", "3", "--train.lr=1e-4", "--logging.wandb", "off",
                                "--model.final_norm", "true", "--data.train_data", "a", "--model.vocab_size", "none"])
    assert cfg.model.num_layers == 3 and isinstance(cfg.model.num_layers, int)
    assert cfg.train.lr == 1e-4 and cfg.logging.wandb == "off" and cfg.model.final_norm is True
    assert cfg.data.train_data == ["a"] and cfg.model.vocab_size is None


@pytest.mark.parametrize("args, fragment", [
    (["--model.nope", "1"], "unknown config key 'model.nope'"),
    (["--modle.num_layers", "1"], "unknown config key"),
    (["--model.num_layers", "two"], "model.num_layers='two' must be an integer"),
    (["--model.num_layers"], "needs a value"),
    (["stray"], "unexpected argument"),
])
def test_bad_overrides_are_one_line_errors(args, fragment):
    with pytest.raises(ConfigError) as e:
        build_config("tiny", args)
    assert fragment in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("args, fragment", [
    (["--model.variant", "SM+XX"], "model.variant='SM+XX' is unknown"),
    (["--model.num_heads", "3"], "does not divide model.hidden_size"),
    (["--model.entropy_reg_coeff", "-1"], "entropy_reg_coeff=-1.0 must be >= 0"),
    (["--model.ffn_kind", "fused", "--model.variant", "SM+LN+G"], "needs model.activation=identity"),
    (["--parallel.tensor", "3"], "does not divide model.num_heads"),
    (["--parallel.tensor", "2"], "exceeds the world size 1"),
    (["--train.global_batch_size", "12", "--train.micro_batch_size", "8"], "not a multiple"),
    (["--train.precision", "fp8"], "train.precision='fp8'"),
])
def test_validation_names_key_and_fix(args, fragment):
    with pytest.raises(ConfigError) as e:
        build_config("tiny", args).validate(world_size=1)
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_variant_switches_override_the_variant():
    cfg = build_config("tiny", ["--model.variant", "SM+ScFuFFN", "--model.learnable_temperature", "true"])
    spec = cfg.model.spec()
    assert spec.learnable_temperature and spec.ffn_kind == "fused" and not spec.entropy_reg
    assert build_config("tiny", ["--model.variant", "SM+LN+G"]).model.spec() == VARIANTS["SM+LN+G"]


def test_every_key_is_documented():
    doc = (__import__("pathlib").Path(__file__).parents[2] / "docs" / "configuration.md").read_text()
    missing = [key for key, _, _ in describe_keys() if f"`{key}`" not in doc]
    assert not missing, f"undocumented config keys: {missing}"


def test_parse_overrides_none_and_equals():
    assert parse_overrides(["--a.b=3", "--c.d", "none"]) == [("a.b", "3"), ("c.d", "none")]
    cfg = build_config("tiny", ["--train.inject_nan_at", "5:1", "--model.variant", "SM", "--train.lr", "1e-4",
                                "--train.save_dir", "", "--data.tokenizer", "none"])
    assert cfg.train.inject_nan_at == "5:1" and cfg.model.variant == "SM" and cfg.train.lr == 1e-4
    assert cfg.train.save_dir == "" and cfg.data.tokenizer is None
    assert build_config("tiny", ["--data.train_data", "[a, b]"]).data.train_data == ["a", "b"]


def test_perplexity_of_a_diverged_loss_is_inf_not_an_error():
    import math

    from megatron_entropy.training.metrics import perplexity

    assert perplexity(2.0) == math.exp(2.0)
    assert perplexity(1e4) == math.inf
    assert math.isnan(perplexity(float("nan")))
