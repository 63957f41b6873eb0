import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load():
    spec = importlib.util.spec_from_file_location(
        "bench_sample", os.path.join(ROOT, "scripts", "bench_sample.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_sample_prints_tokens_per_s_table(capsys):
    bench = _load()
    # Batches divide the 8 simulated devices the default mesh (data=-1) spreads them over.
    argv = ["--preset", "tiny", "--batch", "8", "16", "--prompt-len", "8", "--new-tokens", "8"]
    argv += ["--repeats", "1", "--bandwidth-gbs", "10", "--hf"]
    result = bench.main(argv)
    out = capsys.readouterr().out
    assert "new tokens/s" in out and "floor tok/s" in out
    assert [r["batch"] for r in result["rows"]] == [8, 16]
    for row in result["rows"]:
        assert row["tokens_per_s"] > 0 and 0 < row["fraction_of_floor"]
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        assert "skipped" in result["hf"]
    else:
        assert all(r["hf_tokens_per_s"] > 0 for r in result["rows"])


def test_bytes_per_step_counts_params_and_kv_cache():
    bench = _load()
    from instructrl.model import count_params
    from instructrl.presets import preset

    cfg = preset("gpt2-small", dtype="bfloat16", param_dtype="bfloat16")
    got = bench.bytes_per_step(cfg, batch=4, prompt_len=100, new_tokens=50)
    kv = 2 * 12 * 4 * 125 * 12 * 64 * 2  # k and v, layers, batch, mean slots, heads, dims, bf16
    assert got == pytest.approx(count_params(cfg) * 2 + kv)
