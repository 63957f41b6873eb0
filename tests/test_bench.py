import importlib.util
import os

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load():
    spec = importlib.util.spec_from_file_location(
        "bench_train", os.path.join(ROOT, "scripts", "bench_train.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_train_reports_throughput_and_mfu(capsys):
    bench = _load()
    result = bench.main(
        [
            "--preset",
            "tiny",
            "--batch",
            "8",
            "--seq",
            "64",
            "--steps",
            "3",
            "--dtype",
            "float32",
            "--peak-tflops",
            "1.0",
        ]
    )
    assert result["tokens_per_s"] > 0 and 0 < result["mfu"] < 1
    assert np.isfinite(result["loss"])
    assert "tokens/s" in capsys.readouterr().out


def test_flops_per_token_matches_hand_count():
    bench = _load()
    from instructrl.presets import preset

    cfg = preset("gpt2-small")
    # 124M GPT-2 with tied embeddings; minus the 1024 x 768 position table; 6N + 12 L H Q T.
    n = 12 * (12 * 768**2 + 13 * 768) + 2 * 768 + 50304 * 768
    expected = 6 * n + 12 * 12 * 12 * 64 * 1024
    assert abs(bench.flops_per_token(cfg, 1024) - expected) / expected < 1e-3
