"""Benchmark the KV-cache sampler: new tokens/s by batch size, beside Hugging Face ``generate``.

  python scripts/bench_sample.py --preset gpt2-small --batch 1 8 32 128 --hf     # GPU
  python scripts/bench_sample.py --preset small --batch 8 32 --new-tokens 64     # CPU smoke run

Every row decodes exactly ``--new-tokens`` tokens after a ``--prompt-len`` prompt (no EOS can
stop it early), sampling at temperature 1 as PPO rollouts do; the time covers the whole
``generate`` call (prefill and decode), median of ``--repeats`` after a warm-up call. With
``--hf`` and torch + transformers importable, a randomly initialized ``transformers`` model of
the same shape (GPT-2 for the gpt family, Llama for llama) is timed on the same batch with
``generate(do_sample=True)``, on CUDA when torch sees a GPU. The issue's target on a GPU is at
least 30x the Hugging Face figure.

Decoding is memory-bound: each step reads every parameter and the filled part of the KV cache.
The floor printed beside the measurement is (parameter bytes + mean KV-cache bytes read per
step) / device bandwidth, i.e. the tokens/s no implementation can beat on that device.
"""

from __future__ import annotations

import os

# With --hf the two frameworks take turns on the same cores: PyTorch's OpenMP threads must not
# spin after their turn (the default) and slow the other framework's (measured: 0.71x with
# spinning threads, 1.01x without, at the same build).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import functools
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from instructrl import sharding
from instructrl.model import DTYPES, Transformer, count_params
from instructrl.presets import preset
from instructrl.sampler import generate

# HBM bandwidth in GB/s by device kind (vendor datasheets; SXM parts).
BANDWIDTH_GBS = {
    "NVIDIA H100": 3350.0,
    "NVIDIA H200": 4800.0,
    "NVIDIA A100-SXM4-80GB": 2039.0,
    "NVIDIA A100": 1555.0,
    "NVIDIA L4": 300.0,
    "TPU v4": 1200.0,
    "TPU v5 lite": 819.0,
    "TPU v5e": 819.0,
    "TPU v5p": 2765.0,
    "TPU v6 lite": 1640.0,
    "TPU v6e": 1640.0,
}


def bandwidth_for(device) -> float | None:
    kind = device.device_kind
    for name, gbs in BANDWIDTH_GBS.items():
        if kind.startswith(name):
            return gbs
    return None


def bytes_per_step(cfg, batch: int, prompt_len: int, new_tokens: int) -> float:
    """Bytes a decode step must read: every parameter, plus the KV cache up to the current
    slot, averaged over the decode (prompt_len + new_tokens / 2 slots)."""
    params = count_params(cfg) * jnp.dtype(cfg.weight_dtype).itemsize
    slots = prompt_len + new_tokens / 2
    kv = 2 * cfg.num_layers * batch * slots * cfg.kv_heads * cfg.head_size
    return params + kv * jnp.dtype(cfg.compute_dtype).itemsize


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up (compilation, autotuning)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_jax(cfg, params, mesh, batch: int, prompt_len: int, new_tokens: int, repeats: int):
    model = Transformer(cfg)
    gen = jax.jit(
        functools.partial(
            generate,
            model,
            max_new_tokens=new_tokens,
            eos_id=cfg.vocab_size,  # never sampled: every row decodes new_tokens tokens
            pad_id=0,
            temperature=1.0,
            rules=sharding.LOGICAL_RULES,
        )
    )
    rng = np.random.default_rng(batch)
    host = {
        "tokens": rng.integers(0, cfg.vocab_size, (batch, prompt_len)).astype(np.int32),
        "mask": np.ones((batch, prompt_len), np.int32),
    }
    data = sharding.shard_batch(host, mesh)
    key = jax.random.key(0)

    def run():
        with mesh:
            out = gen(params, data["tokens"], data["mask"], key)
        return jax.block_until_ready(out)

    seconds = _median_seconds(run, repeats)
    out = run()
    assert int(np.asarray(out.mask).sum()) == batch * new_tokens
    return seconds


def hf_model(cfg):
    """A randomly initialized ``transformers`` model of the same shape, or None (with a reason)."""
    try:
        import torch
        import transformers
    except ImportError:
        return None, "torch/transformers not installed"
    if cfg.num_heads * cfg.head_size != cfg.d_model:
        return None, "head_dim * num_heads != d_model has no transformers equivalent"
    if cfg.family == "gpt":
        hf_cfg = transformers.GPT2Config(
            vocab_size=cfg.vocab_size,
            n_positions=cfg.max_len,
            n_embd=cfg.d_model,
            n_layer=cfg.num_layers,
            n_head=cfg.num_heads,
            n_inner=cfg.hidden_dim,
            bos_token_id=None,
            eos_token_id=None,  # no EOS: every row decodes exactly max_new_tokens
        )
        model = transformers.GPT2LMHeadModel(hf_cfg)
    else:
        hf_cfg = transformers.LlamaConfig(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.d_model,
            intermediate_size=cfg.hidden_dim,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            num_key_value_heads=cfg.kv_heads,
            max_position_embeddings=cfg.max_len,
            bos_token_id=None,
            eos_token_id=None,
        )
        model = transformers.LlamaForCausalLM(hf_cfg)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    return model.to(device=device, dtype=dtype[cfg.dtype]).eval(), device


def time_hf(model, device, cfg, batch: int, prompt_len: int, new_tokens: int, repeats: int):
    import torch

    gen = torch.Generator().manual_seed(batch)
    ids = torch.randint(0, cfg.vocab_size, (batch, prompt_len), generator=gen).to(device)
    mask = torch.ones_like(ids)

    def run():
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=new_tokens,
                do_sample=True,
                top_k=0,
                top_p=1.0,
                temperature=1.0,
                pad_token_id=0,
                use_cache=True,
            )
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    return _median_seconds(run, repeats)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--dtype", default=None, help="compute dtype; default bfloat16 off CPU")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per batch (median)")
    p.add_argument("--no-scan", action="store_true")
    p.add_argument("--mesh", default="data=-1", help="e.g. data=1,fsdp=1,tensor=8")
    p.add_argument("--hf", action="store_true", help="also time transformers generate")
    p.add_argument("--bandwidth-gbs", type=float, default=None, help="else known by device")
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args(argv)

    jax.config.update("jax_threefry_partitionable", True)
    device = jax.devices()[0]
    dtype = args.dtype or ("float32" if device.platform == "cpu" else "bfloat16")
    if dtype not in DTYPES:
        p.error(f"--dtype must be one of {sorted(DTYPES)}")
    total = args.prompt_len + args.new_tokens
    cfg = preset(
        args.preset,
        dtype=dtype,
        param_dtype=dtype,
        scan_layers=not args.no_scan,
        max_len=max(total, preset(args.preset).max_len),
    )
    mesh_shape = {k: int(v) for k, v in (kv.split("=") for kv in args.mesh.split(","))}
    mesh = sharding.make_mesh(mesh_shape)
    model = Transformer(cfg)
    with mesh:
        params, _, _ = sharding.create_sharded(
            lambda r: model.init(r, jnp.zeros((1, 8), jnp.int32))["params"],
            mesh,
            sharding.LOGICAL_RULES,
            jax.random.key(0),
        )

    hf, hf_device = (None, "not requested")
    if args.hf:
        hf, hf_device = hf_model(cfg)
    bandwidth = args.bandwidth_gbs or bandwidth_for(device)
    rows = []
    for batch in args.batch:
        seconds = time_jax(cfg, params, mesh, batch, args.prompt_len, args.new_tokens, args.repeats)
        row = {
            "batch": batch,
            "seconds": seconds,
            "tokens_per_s": batch * args.new_tokens / seconds,
            "ms_per_token_step": 1000 * seconds / args.new_tokens,
        }
        if bandwidth:
            step_bytes = bytes_per_step(cfg, batch, args.prompt_len, args.new_tokens)
            row["floor_tokens_per_s"] = batch / (step_bytes / (bandwidth * 1e9))
            row["fraction_of_floor"] = row["tokens_per_s"] / row["floor_tokens_per_s"]
        if hf is not None:
            hf_s = time_hf(
                hf, hf_device, cfg, batch, args.prompt_len, args.new_tokens, args.repeats
            )
            row["hf_tokens_per_s"] = batch * args.new_tokens / hf_s
            row["speedup_vs_hf"] = row["tokens_per_s"] / row["hf_tokens_per_s"]
        rows.append(row)

    result = {
        "preset": args.preset,
        "device": device.device_kind,
        "devices": jax.device_count(),
        "dtype": dtype,
        "params": count_params(cfg),
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "bandwidth_gbs": bandwidth,
        "hf": hf_device if hf is not None else f"skipped ({hf_device})",
        "rows": rows,
    }
    _print_table(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


def _print_table(result):
    print(
        f"{result['preset']} ({result['params'] / 1e6:.1f}M params, {result['dtype']}) on "
        f"{result['device']} x{result['devices']}: prompt {result['prompt_len']}, "
        f"{result['new_tokens']} new tokens; HF: {result['hf']}"
    )
    header = f"{'batch':>6} {'new tokens/s':>14} {'ms/step':>9} {'floor tok/s':>13} {'of floor':>9}"
    header += f" {'HF tokens/s':>13} {'vs HF':>7}"
    print(header)
    for r in result["rows"]:
        floor = r.get("floor_tokens_per_s")
        frac = r.get("fraction_of_floor")
        hf = r.get("hf_tokens_per_s")
        ratio = r.get("speedup_vs_hf")
        print(
            f"{r['batch']:>6} {r['tokens_per_s']:>14,.0f} {r['ms_per_token_step']:>9.2f} "
            + (f"{floor:>13,.0f} {100 * frac:>8.1f}%" if floor else f"{'n/a':>13} {'n/a':>9}")
            + (f" {hf:>13,.0f} {ratio:>6.1f}x" if hf else f" {'n/a':>13} {'n/a':>7}")
        )


if __name__ == "__main__":
    main()
