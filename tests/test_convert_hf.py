"""Hugging Face import/export against transformers (PyTorch, CPU) as the independent reference.

Each case builds a small randomly initialized model with transformers, saves it, imports it
(scanned and unrolled layers, sharded over data x fsdp x tensor) and compares logits; then
exports our params and checks that ``from_pretrained`` gives the same logits again.
"""

import dataclasses
import json
import os

import chex
import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from instructrl import convert, sharding  # noqa: E402
from instructrl.model import Transformer  # noqa: E402

ATOL = 1e-4
VOCAB = 128

CASES = {
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=32, n_embd=64, n_layer=2, n_head=4
    ),
    "llama-gqa-untied": lambda: transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        rope_theta=500.0,
        tie_word_embeddings=False,
    ),
    # Llama 3.1 RoPE scaling: a short original context puts every regime of the ramp in play.
    "llama-tied-rope-llama3": lambda: transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        rope_scaling=dict(
            rope_type="llama3",
            factor=4.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=16,
        ),
    ),
    "qwen2-bias": lambda: transformers.Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    ),
}


def _randomize(model):
    """Default inits leave norms at 1 and biases at 0; perturb everything so that a swapped
    or transposed tensor cannot go unnoticed."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * 0.1
            p.copy_(1.0 + noise if "norm" in name or "ln_" in name else noise)
    return model.eval()


def _hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens))).logits.float().numpy()


def _ours(cfg, head, params, tokens):
    return np.asarray(Transformer(cfg, head=head).apply({"params": params}, tokens))


@pytest.fixture(scope="module")
def mesh():
    return sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})


@pytest.mark.parametrize("case", list(CASES))
def test_import_and_export_match_transformers(case, mesh, tmp_path):
    torch.manual_seed(0)
    model = _randomize(transformers.AutoModelForCausalLM.from_config(CASES[case]()))
    model.save_pretrained(tmp_path / "hf")
    tokens = np.random.default_rng(0).integers(0, VOCAB, (2, 24)).astype(np.int32)
    ref = _hf_logits(model, tokens)

    for scan in (True, False):
        cfg, head, params = convert.load_pretrained(str(tmp_path / "hf"), mesh, scan_layers=scan)
        assert head == "lm"
        assert cfg.rope_scaling == ("llama3" if "rope-llama3" in case else "none")
        ours = _ours(cfg, head, params, tokens)
        chex.assert_shape(ours, (2, 24, VOCAB))
        chex.assert_type(ours, np.float32)
        diff = np.abs(ours - ref).max()
        print(f"{case} scan_layers={scan}: import max |logits diff| = {diff:.2e}")
        assert diff < ATOL

    # Sharded straight into place: the embedding's vocab axis is split over "tensor".
    embed = params["embed"]["embedding"]
    assert embed.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    chex.assert_shape(embed.addressable_shards[0].data, (VOCAB // 2, cfg.d_model // 2))

    convert.export_hf(params, cfg, str(tmp_path / "out"))
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    diff = np.abs(_hf_logits(back, tokens) - ref).max()
    print(f"{case}: export -> from_pretrained max |logits diff| = {diff:.2e}")
    assert diff < ATOL


def test_reward_model_export_and_import(mesh, tmp_path):
    """A scalar head goes out as a one-label *ForSequenceClassification (its bias in
    config.json) and comes back with the same values."""
    config = CASES["llama-gqa-untied"]()
    config.num_labels = 1
    config.pad_token_id = 0
    model = _randomize(transformers.AutoModelForSequenceClassification.from_config(config))
    model.save_pretrained(tmp_path / "hf")
    tokens = np.random.default_rng(1).integers(1, VOCAB, (2, 16)).astype(np.int32)
    with torch.no_grad():
        ref = model(torch.tensor(tokens)).logits.numpy()[:, 0]  # reward at the last token

    cfg, head, params = convert.load_pretrained(str(tmp_path / "hf"), mesh)
    assert head == "scalar"
    values = _ours(cfg, head, params, tokens)  # (B, T)
    chex.assert_shape(values, (2, 16))
    np.testing.assert_allclose(values[:, -1], ref, atol=ATOL)

    params["scalar_head"]["bias"] = params["scalar_head"]["bias"] + 0.5
    convert.export_hf(params, cfg, str(tmp_path / "out"), head="scalar", pad_token_id=0)
    back = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        exported = back.eval()(torch.tensor(tokens)).logits.numpy()[:, 0]
    np.testing.assert_allclose(exported + 0.5, ref + 0.5, atol=ATOL)
    _, _, again = convert.load_pretrained(str(tmp_path / "out"), mesh)
    np.testing.assert_allclose(_ours(cfg, "scalar", again, tokens)[:, -1], ref + 0.5, atol=ATOL)
    # A reward model that averages over the response has no HF equivalent: refused, not
    # exported as a last-token model.
    mean_cfg = dataclasses.replace(cfg, reward_readout="mean")
    with pytest.raises(ValueError, match="reward_readout='mean'"):
        convert.export_hf(params, mean_cfg, str(tmp_path / "mean"), head="scalar")
    assert not (tmp_path / "mean").exists()


def test_errors_name_the_architecture_and_the_tensor(tmp_path):
    model = transformers.AutoModelForCausalLM.from_config(CASES["llama-gqa-untied"]())
    model.save_pretrained(tmp_path)
    with open(tmp_path / "config.json") as f:
        config = json.load(f)

    def rewrite(**fields):
        with open(tmp_path / "config.json", "w") as f:
            json.dump({**config, **fields}, f)

    rewrite(model_type="bert", architectures=["BertModel"])
    with pytest.raises(ValueError, match="unsupported architecture.*bert"):
        convert.load_pretrained(str(tmp_path))
    rewrite(intermediate_size=100)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight.*\(96, 64\)"):
        convert.load_pretrained(str(tmp_path))
    rewrite(num_hidden_layers=3)
    with pytest.raises(KeyError, match=r"model\.layers\.2\."):
        convert.load_pretrained(str(tmp_path))
    assert os.path.isfile(tmp_path / "model.safetensors")
