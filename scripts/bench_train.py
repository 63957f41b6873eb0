"""Benchmark one LM train step (the SFT / pretraining step): tokens/s, MFU and peak memory.

  python scripts/bench_train.py --preset gpt2-small --batch 32 --seq 1024 --dtype bfloat16
  python scripts/bench_train.py --preset tiny --steps 5 --peak-tflops 1   # CPU smoke run
  python scripts/bench_train.py --preset small --batch 16 --seq 256 --dtype float32 --hf

With ``--hf`` the ``transformers`` model of the same shape (GPT-2 or Llama) trains on the same
tokens in the same process, eager PyTorch, float32 on the CPU (the dtype asked for on a GPU):
AdamW with the same betas, epsilon, weight decay and gradient clipping, dropout off, SDPA
attention; both tokens/s and their ratio are printed.

MFU = achieved model FLOP/s over the device's peak, with model FLOPs per token
6 * N + 12 * L * H * Q * T (PaLM, Chowdhery et al. 2022, appendix B): N the parameters used in
matmuls (the position table excluded, the tied output projection included), L layers, H heads of
size Q, T the sequence length. Data is random tokens: the step, not the input pipeline, is timed.
"""

from __future__ import annotations

import os

# With --hf the two frameworks take turns on the same cores: PyTorch's OpenMP threads must not
# spin after their turn (the default) and slow the other framework's (measured: 0.71x with
# spinning threads, 1.01x without, at the same build).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import resource
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from instructrl import runtime, sharding
from instructrl.model import Transformer, count_params, matmul_params
from instructrl.optim import make_optimizer
from instructrl.presets import preset
from instructrl.sft import lm_step
from instructrl.train import init_train_state

# Dense bf16 peak TFLOP/s by device kind (vendor datasheets).
PEAK_TFLOPS = {
    "NVIDIA H100": 989.0,
    "NVIDIA H200": 989.0,
    "NVIDIA A100": 312.0,
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,
    "TPU v5e": 197.0,
    "TPU v5p": 459.0,
    "TPU v6 lite": 918.0,
    "TPU v6e": 918.0,
}


def peak_tflops_for(device) -> float | None:
    kind = device.device_kind
    for name, tflops in PEAK_TFLOPS.items():
        if kind.startswith(name):
            return tflops
    return None


def flops_per_token(cfg, seq_len: int) -> float:
    n = matmul_params(cfg)
    attention = 12 * cfg.num_layers * cfg.num_heads * cfg.head_size * seq_len
    return 6.0 * n + attention


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--batch", type=int, default=8, help="global batch size (sequences)")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=10, help="timed steps (after 2 warm-up steps)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--matmul-dtype", default="", help="model.matmul_dtype (e.g. bfloat16)")
    p.add_argument("--remat", default="none")
    p.add_argument("--attention", default=None, help="None (auto), cudnn or xla")
    p.add_argument("--no-scan", action="store_true", help="unrolled layers")
    p.add_argument("--scan", action="store_true", help="nn.scan over layers (else the preset's)")
    p.add_argument("--mesh", default="data=-1", help="e.g. data=1,fsdp=8,tensor=1")
    p.add_argument("--peak-tflops", type=float, default=None, help="per-device peak; else known")
    p.add_argument("--json", default=None, help="also write the result to this file")
    p.add_argument("--hf", action="store_true", help="also time transformers in PyTorch")
    p.add_argument("--rounds", type=int, default=5, help="with --hf: turns the two take")
    p.add_argument("--hf-dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="with --hf: PyTorch's products; auto = bfloat16 autocast when "
                   "--matmul-dtype is bfloat16, else float32")  # fmt: skip
    p.add_argument("--default-malloc", action="store_true", help="skip runtime.tune_host_allocator")
    args = p.parse_args(argv)

    if not args.default_malloc:
        runtime.tune_host_allocator()
    jax.config.update("jax_threefry_partitionable", True)
    cfg = preset(
        args.preset,
        dtype=args.dtype,
        matmul_dtype=args.matmul_dtype,
        remat=args.remat,
        attention=args.attention,
        **({"scan_layers": False} if args.no_scan else {"scan_layers": True} if args.scan else {}),
        max_len=max(args.seq, preset(args.preset).max_len),
    )
    model = Transformer(cfg)
    mesh_shape = {k: int(v) for k, v in (kv.split("=") for kv in args.mesh.split(","))}
    mesh = sharding.make_mesh(mesh_shape)
    rules = sharding.LOGICAL_RULES
    opt = ml_collections.ConfigDict(
        dict(
            lr=1e-4,
            warmup_steps=0,
            total_steps=1000,
            final_frac=0.1,
            weight_decay=0.1,
            grad_clip=1.0,
        )
    )
    tx, _ = make_optimizer(opt)
    example = {"tokens": jax.ShapeDtypeStruct((args.batch, args.seq), jnp.int32)}
    state, shardings, _ = init_train_state(model, tx, jax.random.key(0), example, mesh, rules)
    rng = np.random.default_rng(0)
    toks = rng.integers(0, cfg.vocab_size, size=(args.batch, args.seq + 1)).astype(np.int32)
    host = {
        "inputs": toks[:, :-1],
        "targets": toks[:, 1:],
        "loss_mask": np.ones((args.batch, args.seq), np.int32),
    }
    batch = sharding.shard_batch(host, mesh)
    batch_sh = {k: v.sharding for k, v in batch.items()}
    step = jax.jit(
        lambda s, b, r: lm_step(model, tx, rules, s, b, r),
        in_shardings=(shardings, batch_sh, sharding.replicated(mesh)),
        out_shardings=(shardings, sharding.replicated(mesh)),
        donate_argnums=(0,),
    )
    key = jax.random.key(1)
    hf_bf16 = {"auto": cfg.matmul_dtype == "bfloat16", "bfloat16": True}.get(args.hf_dtype, False)
    hf_step = hf_stepper(cfg, toks, autocast_bf16=hf_bf16) if args.hf else None
    t0 = time.perf_counter()
    for _ in range(2):
        state, metrics = step(state, batch, key)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    # The two frameworks take turns, a few steps each, so a machine whose speed drifts (shared
    # cores, clock changes) slows both alike and the ratio stays fair.
    rounds = max(1, min(args.rounds, args.steps))
    per_round = [args.steps // rounds + (i < args.steps % rounds) for i in range(rounds)]
    elapsed = hf_elapsed = 0.0
    faults = 0
    for n in per_round:
        faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        for _ in range(n):
            state, metrics = step(state, batch, key)
        jax.block_until_ready(metrics)
        elapsed += time.perf_counter() - t0
        faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0
        if hf_step is not None:
            t0 = time.perf_counter()
            for _ in range(n):
                hf_step()
            hf_elapsed += time.perf_counter() - t0
    faults /= args.steps

    tokens = args.batch * args.seq * args.steps
    tokens_per_s = tokens / elapsed
    device = jax.devices()[0]
    peak = args.peak_tflops or peak_tflops_for(device)
    achieved = flops_per_token(cfg, args.seq) * tokens_per_s
    mfu = achieved / (peak * 1e12 * jax.device_count()) if peak else None
    stats = device.memory_stats() or {}
    peak_mem = stats.get("peak_bytes_in_use")
    result = {
        "preset": args.preset,
        "device": device.device_kind,
        "devices": jax.device_count(),
        "batch": args.batch,
        "seq": args.seq,
        "dtype": args.dtype,
        "matmul_dtype": cfg.matmul_dtype or args.dtype,
        "params": count_params(cfg),
        "step_ms": 1000 * elapsed / args.steps,
        "tokens_per_s": tokens_per_s,
        "model_tflops_per_s": achieved / 1e12,
        "mfu": mfu,
        "peak_device_memory_gib": peak_mem / 2**30 if peak_mem else None,
        "host_max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "warmup_s": compile_s,
        "minor_page_faults_per_step": faults,
        "loss": float(metrics["loss"]),
    }
    if args.hf:
        import torch  # optional: the parity reference (the test extra)

        result["hf_torch"] = torch.__version__
        result["hf_products"] = "bfloat16 autocast" if hf_bf16 else "float32"
        result["hf_tokens_per_s"] = args.batch * args.seq * args.steps / hf_elapsed
        result["ratio_vs_hf"] = tokens_per_s / result["hf_tokens_per_s"]
    print(json.dumps(result, indent=2))
    mfu_text = f"{100 * mfu:.1f}%" if mfu is not None else "n/a (pass --peak-tflops)"
    mem = f"{result['peak_device_memory_gib']:.2f} GiB" if peak_mem else "n/a"
    print(
        f"{args.preset} {device.device_kind} x{jax.device_count()}: "
        f"{tokens_per_s:,.0f} tokens/s, MFU {mfu_text}, peak device memory {mem}"
    )
    if args.hf:
        print(
            f"transformers (PyTorch {result['hf_torch']}, {result['hf_products']}) same shape: "
            f"{result['hf_tokens_per_s']:,.0f} tokens/s; instructrl / transformers = "
            f"{result['ratio_vs_hf']:.2f}x"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


def hf_model(cfg):
    """A ``transformers`` model of ``cfg``'s shape (GPT-2 for the gpt family, else Llama),
    dropout off."""
    import transformers  # optional: the parity reference (the test extra)

    if cfg.family == "gpt":
        hf_cfg = transformers.GPT2Config(
            vocab_size=cfg.vocab_size, n_positions=cfg.max_len, n_embd=cfg.d_model,
            n_layer=cfg.num_layers, n_head=cfg.num_heads, n_inner=cfg.hidden_dim,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=cfg.norm_eps,
            activation_function="gelu_new", attn_implementation="sdpa",
        )  # fmt: skip
        return transformers.GPT2LMHeadModel(hf_cfg)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.hidden_dim,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.kv_heads, max_position_embeddings=cfg.max_len,
        rope_theta=cfg.rope_theta, rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tied,
        attn_implementation="sdpa",
    )  # fmt: skip
    return transformers.LlamaForCausalLM(hf_cfg)


def hf_stepper(cfg, tokens: np.ndarray, warmup: int = 2, autocast_bf16: bool = False):
    """One eager train step of the transformers model on ``tokens`` (B, T + 1), as a callable
    (warmed up ``warmup`` times); ``autocast_bf16``: the forward under torch.autocast
    bfloat16 (PyTorch's mixed precision: bf16 products, float32 weights and optimizer), the
    counterpart of model.matmul_dtype=bfloat16."""
    import torch  # optional: the parity reference (the test extra)

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float32 if device == "cpu" else getattr(torch, cfg.dtype)
    model = hf_model(cfg).to(device=device, dtype=dtype).train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    rest = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
        lr=1e-4, betas=(0.9, 0.95), eps=1e-8,
    )  # fmt: skip
    inputs = torch.from_numpy(tokens[:, :-1].astype(np.int64)).to(device)
    targets = torch.from_numpy(tokens[:, 1:].astype(np.int64)).to(device)

    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=bool(autocast_bf16))

    def step():
        with autocast:
            logits = model(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        return loss

    for _ in range(warmup):
        step()
    return step


if __name__ == "__main__":
    main()
