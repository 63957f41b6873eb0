"""Print a SkyPilot task YAML as SkyPilot's own loader reads it, as JSON (tests/test_sky.py
runs this with the Python that has SkyPilot: .venv-sky, which `make test` builds).

argv: YAML [KEY=VALUE ...] (env overrides, as `sky launch --env`)
"""

import json
import sys

import sky
import yaml

path, *pairs = sys.argv[1:]
with open(path) as f:
    config = yaml.safe_load(f)
task = sky.Task.from_yaml_config(config, env_overrides=[tuple(p.split("=", 1)) for p in pairs])
(resources,) = task.resources
print(
    json.dumps(
        {
            "name": task.name,
            "num_nodes": task.num_nodes,
            "cloud": str(resources.cloud),
            "accelerators": resources.accelerators,
            "accelerator_args": resources.accelerator_args,
            "envs": task.envs,
            "storage": {
                dst: {"name": s.name, "mode": str(s.mode.value)}
                for dst, s in task.storage_mounts.items()
            },
            "workdir": task.workdir,
            "setup": task.setup,
            "run": task.run,
        }
    )
)
