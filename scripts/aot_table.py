"""The README's "will it fit" table: `instructrl compile` for PPO at several model sizes, TPU
slices and meshes, on this CPU host (libtpu's compiler; no TPU), one row per compile.

  JAX_PLATFORMS=cpu .venv/bin/python scripts/aot_table.py --out runs/aot   # ~15 min on 2 cores

Each row runs ``instructrl compile --config configs/ppo.py:model=M --topology T`` with the
row's mesh and remat overrides in a fresh process (--json), then prints the markdown table.
A row already in --out is not compiled again.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

GiB = 1024**3
# (model, topology, mesh data/fsdp/tensor, remat): each model on the smallest slices it might
# fit, with the mesh `instructrl compile` suggests and remat where activations need it.
ROWS = [
    ("gpt3-1.3b", "v5e:4x4", (16, 1, 1), "none"),
    ("gpt3-1.3b", "v5e:4x4", (1, 16, 1), "none"),
    ("gpt3-1.3b", "v5e:4x4", (1, 16, 1), "full"),
    ("gpt3-6.7b", "v5e:4x4", (1, 16, 1), "full"),
    ("gpt3-6.7b", "v5p:4x4x4", (1, 32, 2), "full"),
    ("gpt3-175b", "v5p:4x4x4", (1, 32, 2), "full"),
    ("gpt3-175b", "v5p:8x8x8", (1, 32, 16), "full"),
]


def _name(model, topology, mesh, remat):
    return f"{model}_{topology.replace(':', '-')}_{'x'.join(map(str, mesh))}_{remat}"


def compile_row(out, model, topology, mesh, remat) -> dict:
    path = os.path.join(out, _name(model, topology, mesh, remat) + ".json")
    if not os.path.exists(path):
        data, fsdp, tensor = mesh
        cmd = [sys.executable, "-m", "instructrl.main", "compile", "--config",
               f"configs/ppo.py:model={model}", "--topology", topology, "--json", path,
               f"--config.mesh.data={data}", f"--config.mesh.fsdp={fsdp}",
               f"--config.mesh.tensor={tensor}", f"--config.model.remat={remat}"]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            return {"error": done.stderr.strip().splitlines()[-1][:200]}
    with open(path) as f:
        return json.load(f)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/aot")
    a = p.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    print(
        "| model | slice | mesh data/fsdp/tensor | remat | state GiB/chip | peak live GiB/chip "
        "| HBM GiB | fits | roofline ms / iteration | compile s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for model, topology, mesh, remat in ROWS:
        r = compile_row(a.out, model, topology, mesh, remat)
        head = f"| {model} | {topology} | {'/'.join(map(str, mesh))} | {remat} |"
        if "error" in r:
            print(f"{head} - | - | - | error: {r['error']} | - | - |")
            continue
        print(
            f"{head} {r['resident_bytes']['state'] / GiB:.2f} | {r['peak_live_bytes'] / GiB:.2f}"
            f" | {r['hbm_bytes_per_device'] / GiB:.0f} | {'fits' if r['fits'] else 'does not fit'}"
            f" | {r['roofline_seconds'] * 1e3:.0f} | {r['compile_seconds']:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
