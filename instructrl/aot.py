"""Ahead-of-time compilation for a TPU slice on any host: does a stage config fit, how fast?

  instructrl compile --config configs/ppo.py:model=gpt3-1.3b --topology v5e:4x4
  instructrl compile --config configs/sft.py:model=gpt3-6.7b --topology v5p:4x4x4 \\
      --config.mesh.data=1 --config.mesh.fsdp=-1 --json sft.json

``jax[tpu]``'s libtpu compiles for a named topology with no TPU present
(``jax.experimental.topologies``). This module builds a stage's state and batches as abstract
arrays with the shardings the config's mesh gives them over that topology's devices, lowers the
stage's *own* jitted functions (``train.jit_train_step`` of ``sft.lm_step`` / ``rm.rm_step``;
PPO's ``ppo.phases`` and the sampler's ``prefill`` and ``decode_step``) and compiles them with
XLA's TPU compiler. Nothing is materialized: no parameter is ever allocated on this host.

Per device it reports ``memory_analysis()`` (argument, output, aliased and temporary bytes)
and ``cost_analysis()`` (FLOPs and HBM bytes per call), and derives:

  live      what the device holds while the step runs: the bytes that persist between steps
            (the train state; PPO's frozen reference and reward model too) plus the step's
            transient arguments (the batch), its outputs less those aliased to donated inputs,
            and its temporaries. A stage fits when every step's live bytes fit the chip's HBM.
  roofline  max(FLOPs / peak bf16 FLOP/s, bytes / HBM bandwidth) per call: a lower bound on the
            step's time (float32 matmuls run several passes of the bf16 MXU, so the bound is
            loose for a float32 model); no interconnect term.

XLA's cost analysis counts the body of a loop once, so the sampler is costed as its prefill
plus ``max_new_tokens`` decode steps (each compiled alone) and PPO's update as its minibatch
scan body times the number of minibatch updates (``calls``); the ``generate`` row's memory is
the whole sampling loop's. Chip figures are Google's published per-chip numbers; a v4 chip
compiles as two devices (its two TensorCores), so its per-device HBM and peak are half a chip's.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import itertools
import json
import os
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from instructrl import config_lib, fs, ppo, presets, sampler, scoring, sharding
from instructrl.model import Transformer
from instructrl.optim import make_optimizer
from instructrl.rm import rm_step
from instructrl.sft import lm_step
from instructrl.tokenizer import make_tokenizer
from instructrl.train import jit_train_step, optimizer_config, train_state_init, with_lr

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """Published per-chip figures (cloud.google.com/tpu/docs/system-architecture-tpu-vm)."""

    name: str
    hbm_bytes: float
    peak_flops: float  # bf16 FLOP/s
    hbm_bandwidth: float  # bytes/s


CHIPS = {  # device_kind -> chip
    "TPU v4": Chip("v4", 32 * GiB, 275e12, 1228e9),
    "TPU v5 lite": Chip("v5e", 16 * GiB, 197e12, 819e9),
    "TPU v5": Chip("v5p", 95 * GiB, 459e12, 2765e9),
    "TPU v6 lite": Chip("v6e", 32 * GiB, 918e12, 1640e9),
}


@dataclasses.dataclass
class Step:
    """One compiled function, per device."""

    name: str
    compile_seconds: float
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    resident_in_args: int  # argument bytes that persist between steps (state, frozen params)
    flops: float  # per call
    bytes_accessed: float  # per call
    calls: float = 1.0  # calls per stage step (decode steps, minibatch updates)
    memory: bool = True  # whether its memory counts toward the peak (False: cost only)
    note: str = ""
    error: str = ""  # the compiler refused it (out of HBM); temp_bytes is what it asked for

    def live_bytes(self, resident: int) -> int:
        transient = self.argument_bytes - self.resident_in_args
        return resident + transient + self.output_bytes - self.alias_bytes + self.temp_bytes

    def roofline_seconds(self, chip: Chip, per_chip: int) -> float:
        flops_time = self.flops / (chip.peak_flops / per_chip)
        bytes_time = self.bytes_accessed / (chip.hbm_bandwidth / per_chip)
        return max(flops_time, bytes_time) * self.calls


def _quiet_libtpu() -> None:
    """libtpu reads the TPU VM's worker list when it loads; on a host without a TPU it would
    print a page of errors. These two values describe a lone compile-only host."""
    if not glob.glob("/dev/accel*") and not glob.glob("/dev/vfio/[0-9]*"):
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
        os.environ.setdefault("TPU_HOST_BOUNDS", "1,1,1")


def topology_devices(name: str) -> list:
    """The compile-only devices of a TPU topology such as "v5e:4x4" or "v5p:4x4x4"."""
    from jax.experimental import topologies

    _quiet_libtpu()
    try:
        return list(topologies.get_topology_desc(name, "tpu").devices)
    except (RuntimeError, ValueError) as e:  # jaxlib raises JaxRuntimeError (a RuntimeError)
        raise config_lib.ConfigError(
            f"--topology {name!r}: {str(e).splitlines()[0]} (names look like v5e:4x4, "
            "v5p:2x2x2, v4:2x2x1, v6e:8x8; libtpu comes with `pip install jax[tpu]`)"
        ) from e


def chip_of(devices) -> tuple[Chip, int]:
    """(the chip, devices per chip) of a topology's devices."""
    kind = devices[0].device_kind
    if kind not in CHIPS:
        raise config_lib.ConfigError(
            f"no chip figures for device kind {kind!r}; known: {list(CHIPS)}"
        )
    coords = [tuple(getattr(d, "coords", (d.id,))) for d in devices]
    return CHIPS[kind], len(devices) // len(set(coords))


def model_config(config):
    """(ModelConfig, where its vocabulary came from): ``model.vocab_size`` when set, else the
    preset's own (the GPT-3 rows and gpt2-small: GPT-2 BPE, padded), else the tokenizer's."""
    name = config.model.preset
    fields = {k: v for k, v in config.model.items() if k != "preset" and v is not None}
    if "vocab_size" in fields:
        source = "model.vocab_size"
    elif name in presets.GPT3_TABLE or name == "gpt2-small":
        source = "the preset's GPT-2 BPE, padded to 128"
    else:
        fields["vocab_size"] = presets.pad_vocab(make_tokenizer(config.tokenizer).vocab_size)
        source = f"the {config.tokenizer.kind} tokenizer's, padded to 128"
    return presets.preset(name, **fields), source


def _abstract(tree, shardings):
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def _outputs(compiled):
    return _abstract(compiled.out_info, compiled.output_shardings)


def _batch(mesh, shapes: dict[str, tuple[tuple[int, ...], Any]]) -> dict:
    return {
        k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape)))
        for k, (shape, dtype) in shapes.items()
    }


def _key(mesh):
    key = jax.eval_shape(lambda: jax.random.key(0))
    return jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=sharding.replicated(mesh))


_OOM = re.compile(
    r"required for (.*?) \(([\d.]+)([KMGT])\) exceeds available HBM \(([\d.]+)([KMGT])\)"
)


def _guess_shardings(tree, mesh, rows: int):
    """Shardings for the outputs of a step the compiler refused: leaves with ``rows`` leading
    rows split over (data, fsdp) as the stages' batches are, the rest replicated."""

    def guess(x):
        if x.ndim and x.shape[0] == rows:
            return jax.ShapeDtypeStruct(
                x.shape, x.dtype, sharding=sharding.batch_sharding(mesh, x.ndim)
            )
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding.replicated(mesh))

    return jax.tree.map(guess, tree)


def compile_one(name: str, fn, *args, rows: int = 0, resident_in_args: int = 0,
                **fields) -> tuple[Step, Any]:  # fmt: skip
    """Lower and compile ``fn(*args)`` (a jitted function, abstract args); returns its Step and
    its abstract outputs (with their shardings).

    When the compiler refuses the step for want of HBM, the Step records its message and the
    temporaries it asked for, and the outputs get the batch layout (``_guess_shardings``, rows
    ``rows``) so the steps after it still compile."""
    t0 = time.perf_counter()
    lowered = fn.lower(*args)
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        found = _OOM.search(str(e))
        if "RESOURCE_EXHAUSTED" not in str(e) or not found:
            raise
        scale = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
        step = Step(
            name=name,
            compile_seconds=time.perf_counter() - t0,
            argument_bytes=sharding.shard_bytes(args),
            output_bytes=0,
            alias_bytes=0,
            temp_bytes=int(float(found.group(2)) * scale[found.group(3)]),
            code_bytes=0,
            resident_in_args=resident_in_args,
            flops=0.0,
            bytes_accessed=0.0,
            error=f"the TPU compiler ran out of HBM: {found.group(1)} need "
            f"{found.group(2)}{found.group(3)}, {found.group(4)}{found.group(5)} available",
            **fields,
        )
        return step, _guess_shardings(lowered.out_info, _mesh_of(args), rows)
    seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    step = Step(
        name=name,
        compile_seconds=seconds,
        argument_bytes=int(mem.argument_size_in_bytes),
        output_bytes=int(mem.output_size_in_bytes),
        alias_bytes=int(mem.alias_size_in_bytes),
        temp_bytes=int(mem.temp_size_in_bytes),
        code_bytes=int(mem.generated_code_size_in_bytes),
        resident_in_args=resident_in_args,
        flops=float(cost.get("flops", 0.0)),
        bytes_accessed=float(cost.get("bytes accessed", 0.0)),
        **fields,
    )
    return step, _outputs(compiled)


def _mesh_of(args):
    for leaf in jax.tree.leaves(args):
        if getattr(leaf, "sharding", None) is not None:
            return leaf.sharding.mesh
    raise ValueError("no sharded argument")


def _divides(what: str, size: int, mesh) -> None:
    rows = mesh.shape["data"] * mesh.shape["fsdp"]
    if size % rows:
        raise config_lib.ConfigError(
            f"{what}={size} is not divisible by the mesh's data x fsdp = {rows} devices: "
            "choose another batch size or --config.mesh"
        )


def _lm_steps(config, mesh, rules, model_cfg) -> tuple[list[Step], int, dict]:
    """SFT / pretraining: ``sft.lm_step`` as ``train.jit_train_step`` runs it."""
    model = Transformer(model_cfg, head="lm")
    b, t = int(config.train.batch_size), int(config.data.seq_len)
    _divides("train.batch_size", b, mesh)
    tx, schedule = make_optimizer(optimizer_config(config.optimizer, 1000))
    example = {"tokens": jax.ShapeDtypeStruct((b, t), jnp.int32)}
    init = train_state_init(model, tx, example, rules)
    shardings, state = sharding.abstract_sharded(init, mesh, rules, jax.random.key(0))
    keys = ["inputs", "targets", "loss_mask"]
    if config.data.get("packing", False):
        keys += ["positions", "segment_ids"]
    batch = _batch(mesh, {k: ((b, t), jnp.int32) for k in keys})
    fn = with_lr(functools.partial(lm_step, model, tx, rules), schedule)
    batch_shardings = jax.tree.map(lambda x: x.sharding, batch)
    jitted = jit_train_step(fn, shardings, batch_shardings, mesh)
    resident = sharding.shard_bytes(state)
    step, _ = compile_one(
        "train_step", jitted, state, batch, _key(mesh), resident_in_args=resident,
        note=f"batch {b} x {t} tokens",
    )  # fmt: skip
    return [step], resident, {"state": resident, "params": sharding.shard_bytes(state.params)}


def _rm_steps(config, mesh, rules, model_cfg) -> tuple[list[Step], int, dict]:
    """The reward model: ``rm.rm_step`` on the padded layout (B, K, T), K = rm.max_responses:
    the bound of the packed layout, which holds the same responses in fewer rows."""
    model = Transformer(model_cfg, head="scalar")
    b, t, k = int(config.train.batch_size), int(config.data.seq_len), int(config.rm.max_responses)
    _divides("train.batch_size", b, mesh)
    tx, schedule = make_optimizer(optimizer_config(config.optimizer, 1000))
    example = {"tokens": jax.ShapeDtypeStruct((b * k, t), jnp.int32)}
    init = train_state_init(model, tx, example, rules)
    shardings, state = sharding.abstract_sharded(init, mesh, rules, jax.random.key(0))
    batch = _batch(
        mesh,
        {
            "tokens": ((b, k, t), jnp.int32),
            "last": ((b, k), jnp.int32),
            "ranks": ((b, k), jnp.int32),
            "mask": ((b, k), jnp.bool_),
        },
    )
    fn = with_lr(functools.partial(rm_step, model, tx, rules), schedule)
    jitted = jit_train_step(fn, shardings, jax.tree.map(lambda x: x.sharding, batch), mesh)
    resident = sharding.shard_bytes(state)
    step, _ = compile_one(
        "train_step", jitted, state, batch, _key(mesh), resident_in_args=resident,
        note=f"{b} prompts x {k} responses x {t} tokens",
    )  # fmt: skip
    return [step], resident, {"state": resident, "params": sharding.shard_bytes(state.params)}


def _ppo_steps(config, mesh, rules, model_cfg) -> tuple[list[Step], int, dict]:
    """One PPO iteration: ``ppo.phases`` (generate, score, advantages, update), and the
    sampler's prefill and decode step for its cost."""
    models = scoring.Models(
        Transformer(model_cfg, head="lm"), Transformer(model_cfg, head="scalar"), rules
    )
    hp = ppo.Hparams.from_config(config, make_tokenizer(config.tokenizer))
    b, p, n = int(config.ppo.batch_size), int(config.data.max_prompt_len), hp.max_new_tokens
    _divides("ppo.batch_size", b, mesh)
    updates = hp.epochs * hp.num_minibatches
    tx, _ = make_optimizer(optimizer_config(config.optimizer, 1000))
    value_tx, _ = make_optimizer(optimizer_config(config.value_optimizer, 1000))
    init = ppo.state_init(models, hp, tx, value_tx)
    _, state = sharding.abstract_sharded(init, mesh, rules, jax.random.key(0))
    ref = state.params  # frozen: sharded like the policy / the RM's scalar model
    rm = state.value_params if hp.critic else ppo.scalar_abstract(models, mesh, rules)
    sizes = {
        "state": sharding.shard_bytes(state),
        "policy": sharding.shard_bytes(state.params),
        "frozen": sharding.shard_bytes((ref, rm)),
    }
    resident = sizes["state"] + sizes["frozen"]
    phases = ppo.phases(models, hp, tx, value_tx)
    prompts = _batch(
        mesh, {"prompt_tokens": ((b, p), jnp.int32), "prompt_mask": ((b, p), jnp.int32)}
    )
    prompt_args = (prompts["prompt_tokens"], prompts["prompt_mask"])
    rng = _key(mesh)
    steps = []

    generate, samples = compile_one(
        "generate", phases["generate"], state.params, *prompt_args, rng, rows=b,
        resident_in_args=sizes["policy"], note=f"{b} prompts x ({p} + {n}) tokens; memory only",
    )  # fmt: skip
    generate.flops = generate.bytes_accessed = 0.0  # its loop is costed below, step by step
    steps.append(generate)

    # The sampler's pieces, for their cost: the layers unrolled as ``generate`` does.
    cfg = models.policy.cfg
    model = Transformer(dataclasses.replace(cfg, scan_layers=False), head="lm")
    unstack = jax.jit(lambda params: sampler.decoding_model(models.policy, params)[1])
    _, decode_params = compile_one("unstack", unstack, state.params)
    s = hp.sampling
    pre = jax.jit(functools.partial(sampler.prefill, model, max_new_tokens=n, pad_id=hp.pad_id,
                                    rules=rules))  # fmt: skip
    prefill, decoding = compile_one(
        "prefill", pre, decode_params, *prompt_args, rows=b, memory=False, note="cost only"
    )
    steps.append(prefill)
    dec = jax.jit(functools.partial(sampler.decode_step, model, eos_id=hp.eos_id, pad_id=hp.pad_id,
                                    temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                                    rules=rules), donate_argnums=(1,))  # fmt: skip
    decode, _ = compile_one(
        "decode_step", dec, decode_params, decoding, rng, rows=b, calls=n, memory=False,
        note=f"cost only; x {n} new tokens",
    )  # fmt: skip
    steps.append(decode)

    frozen_args = (state.params, state.value_params, ref, rm)
    score, rollout = compile_one(
        "score", phases["score"], *frozen_args, *prompt_args, samples, rows=b,
        resident_in_args=resident - sizes["state"] + sharding.shard_bytes(frozen_args[:2]),
        note="policy, reference, value and reward forward passes",
    )  # fmt: skip
    steps.append(score)
    kl = jax.ShapeDtypeStruct((), jnp.float32, sharding=sharding.replicated(mesh))
    advantages, rollout = compile_one("advantages", phases["advantages"], rollout, kl, rows=b)
    steps.append(advantages)
    ptx = None
    if hp.ptx_coef > 0:
        rows, t = b * int(config.ptx.multiplier), int(config.ptx.seq_len)
        _divides("ppo.batch_size x ptx.multiplier", rows, mesh)
        ptx = _batch(mesh, {k: ((rows, t), jnp.int32) for k in ("inputs", "targets", "loss_mask")})
    note = f"scan body x {updates} minibatch updates" + (
        f"; {b * int(config.ptx.multiplier)} ptx rows" if ptx is not None else ""
    )
    update, _ = compile_one(
        "update", phases["update"], state, rollout, ptx, rng,
        resident_in_args=sizes["state"], calls=updates, note=note,
    )  # fmt: skip
    steps.append(update)
    return steps, resident, sizes


STAGES = {"pretrain": _lm_steps, "sft": _lm_steps, "rm": _rm_steps, "ppo": _ppo_steps}


def compile_stage(config, topology: str) -> dict[str, Any]:
    """Compile the stage of ``config`` for ``topology``; the report as a dict (``format_report``
    prints it)."""
    stage = config.get("stage")
    if stage not in STAGES:
        raise config_lib.ConfigError(f"config.stage={stage!r}: compile knows {', '.join(STAGES)}")
    if int((config.get("lora") or {}).get("rank", 0)):
        raise config_lib.ConfigError(
            "config.lora.rank > 0: compile models full fine-tuning only (scripts/lora_memory.py "
            "counts LoRA's memory)"
        )
    devices = topology_devices(topology)
    chip, per_chip = chip_of(devices)
    try:
        mesh = sharding.make_mesh(config.mesh, devices)
    except ValueError as e:
        raise config_lib.ConfigError(f"config.mesh: {e}") from e
    rules = sharding.rules_from_config(config.get("logical_rules"))
    model_cfg, vocab_source = model_config(config)
    hbm = chip.hbm_bytes / per_chip
    steps, resident, sizes = STAGES[stage](config, mesh, rules, model_cfg)
    peak = max(s.live_bytes(resident) for s in steps if s.memory or s.error)
    refused = [s.name for s in steps if s.error]
    roofline = sum(s.roofline_seconds(chip, per_chip) for s in steps)
    params = _count_params(model_cfg)
    return {
        "stage": stage,
        "topology": topology,
        "chip": dataclasses.asdict(chip),
        "devices": len(devices),
        "devices_per_chip": per_chip,
        "hbm_bytes_per_device": hbm,
        "mesh": dict(mesh.shape),
        "model": {
            "preset": config.model.preset,
            "params": params,
            "vocab_size": model_cfg.vocab_size,
            "vocab_source": vocab_source,
            "dtype": model_cfg.dtype,
            "param_dtype": model_cfg.param_dtype,
            "remat": model_cfg.remat,
        },
        "resident_bytes": sizes,
        "steps": [
            {
                **dataclasses.asdict(s),
                "live_bytes": s.live_bytes(resident) if s.memory else None,
                "roofline_seconds": s.roofline_seconds(chip, per_chip),
            }
            for s in steps
        ],  # fmt: skip
        "peak_live_bytes": peak,
        "fits": bool(peak <= hbm and not refused),
        "refused": refused,
        "roofline_seconds": roofline,
        "compile_seconds": sum(s.compile_seconds for s in steps),
    }


def _count_params(model_cfg) -> int:
    model = Transformer(model_cfg, head="lm")
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(shapes)))


def suggest_meshes(config, topology: str, limit: int = 3) -> list[dict[str, int]]:
    """Meshes (data, fsdp, tensor) over the topology's devices under which the persistent
    state alone (no activations: a first filter, not a verdict) takes at most half a device's
    HBM, most data parallelism first. Heads must divide over tensor, rows over data x fsdp."""
    devices = topology_devices(topology)
    chip, per_chip = chip_of(devices)
    model_cfg, _ = model_config(config)
    rows = int(config.ppo.batch_size if config.stage == "ppo" else config.train.batch_size)
    out = []
    n = len(devices)
    for tensor, fsdp in itertools.product(_divisors(n), _divisors(n)):
        data, rest = divmod(n, tensor * fsdp)
        if rest or model_cfg.num_heads % tensor or rows % (data * fsdp):
            continue
        mesh_cfg = {"data": data, "fsdp": fsdp, "tensor": tensor}
        resident = _resident_bytes(config, model_cfg, sharding.make_mesh(mesh_cfg, devices))
        if resident <= chip.hbm_bytes / per_chip / 2:
            out.append((-data, tensor, mesh_cfg))
    return [m for *_, m in sorted(out, key=lambda x: x[:2])[:limit]]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _resident_bytes(config, model_cfg, mesh) -> int:
    rules = sharding.rules_from_config(config.get("logical_rules"))
    tx, _ = make_optimizer(optimizer_config(config.optimizer, 1000))
    head = {"rm": "scalar"}.get(config.stage, "lm")
    if config.stage == "ppo":
        models = scoring.Models(
            Transformer(model_cfg, head="lm"), Transformer(model_cfg, head="scalar"), rules
        )
        hp = ppo.Hparams.from_config(config, make_tokenizer(config.tokenizer))
        init = ppo.state_init(models, hp, tx, tx)
        _, state = sharding.abstract_sharded(init, mesh, rules, jax.random.key(0))
        return sharding.shard_bytes(state) + sharding.shard_bytes(
            (state.params, state.value_params)
        )
    example = {"tokens": jax.ShapeDtypeStruct((1, 8), jnp.int32)}
    init = train_state_init(Transformer(model_cfg, head=head), tx, example, rules)
    return sharding.shard_bytes(sharding.abstract_sharded(init, mesh, rules, jax.random.key(0))[1])


def _gib(x) -> str:
    return "-" if x is None else f"{x / GiB:.2f}"


def format_report(r: dict[str, Any]) -> str:
    chip, m = r["chip"], r["model"]
    per = r["devices_per_chip"]
    lines = [
        f"{r['stage']} on {r['topology']}: {r['devices']} devices ({chip['name']}"
        + (f", {per} per chip" if per > 1 else "")
        + f"); per device {r['hbm_bytes_per_device'] / GiB:.1f} GiB HBM, "
        f"{chip['peak_flops'] / per / 1e12:.0f} TFLOP/s bf16, "
        f"{chip['hbm_bandwidth'] / per / 1e9:.0f} GB/s",
        f"model {m['preset']}: {m['params'] / 1e9:.3f}B params, vocab {m['vocab_size']} "
        f"({m['vocab_source']}), dtype {m['dtype']}, params {m['param_dtype']}, "
        f"remat {m['remat']}",
        "mesh " + " ".join(f"{k}={v}" for k, v in r["mesh"].items()),
        "persistent per device: "
        + ", ".join(f"{k} {v / GiB:.2f} GiB" for k, v in r["resident_bytes"].items()),
        "",
        "| step | compile s | args GiB | out GiB | alias GiB | temp GiB | live GiB | GFLOP/call "
        "| GB/call | calls | roofline ms | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in r["steps"]:
        lines.append(
            f"| {s['name']} | {s['compile_seconds']:.1f} | {_gib(s['argument_bytes'])} | "
            f"{_gib(s['output_bytes'])} | {_gib(s['alias_bytes'])} | {_gib(s['temp_bytes'])} | "
            f"{_gib(s['live_bytes'])} | {s['flops'] / 1e9:.1f} | {s['bytes_accessed'] / 1e9:.2f}"
            f" | {s['calls']:g} | {s['roofline_seconds'] * 1e3:.1f} | {s['note']} |"
        )
    verdict = "fits" if r["fits"] else "does not fit"
    lines += [f"{s['name']}: {s['error']}" for s in r["steps"] if s["error"]]
    lines += [
        "",
        f"peak live per device: {r['peak_live_bytes'] / GiB:.2f} GiB of "
        f"{r['hbm_bytes_per_device'] / GiB:.1f} GiB: {verdict}",
        f"one {'iteration' if r['stage'] == 'ppo' else 'step'} at the roofline: "
        f"{r['roofline_seconds'] * 1e3:.1f} ms (compiled in {r['compile_seconds']:.1f} s)",
    ]
    return "\n".join(lines) + "\n"


def main(config, topology: str, json_path: str = "", require_fit: bool = False) -> int:
    """``instructrl compile``: print the report; 0 once compiled (1 with ``require_fit`` when it
    does not fit)."""
    report = compile_stage(config, topology)
    print(format_report(report), end="")
    if not report["fits"]:
        meshes = suggest_meshes(config, topology)
        shown = "; ".join(
            " ".join(f"--config.mesh.{k}={v}" for k, v in mesh.items()) for mesh in meshes
        )
        print(
            "meshes whose persistent state takes at most half of HBM (compile one to check): "
            + (shown or "none on this slice: a larger slice, remat or bfloat16 params")
        )
    if json_path:
        fs.makedirs(os.path.dirname(fs.absolute(json_path)))
        fs.write_atomic(json_path, json.dumps(report, indent=2))
    return 1 if require_fit and not report["fits"] else 0
