"""python -m instructrl.world build --out DIR [--seed 0] [--config scale=0.1,toxic_rate=0.02]
python -m instructrl.world show [--family story] [--num 3]"""

from __future__ import annotations

import argparse
import ast
import json
import os

from instructrl.world.datasets import build_all
from instructrl.world.world import FAMILY_BY_NAME, World, as_rng


def parse_overrides(arg: str | None) -> dict:
    """Overrides from "key=value,key=value" (Python literals) or a JSON file path."""
    if not arg:
        return {}
    if os.path.isfile(arg):
        with open(arg) as f:
            return json.load(f)
    out = {}
    for item in arg.split(","):
        key, _, value = item.partition("=")
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m instructrl.world")
    parser.add_argument("command", choices=("build", "show"))
    parser.add_argument("--out", default="data/world")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config", default=None, help="key=value,... or a JSON file")
    parser.add_argument("--no-tokenizer", action="store_true")
    parser.add_argument("--family", default=None, choices=sorted(FAMILY_BY_NAME))
    parser.add_argument("--num", type=int, default=3)
    args = parser.parse_args(argv)
    world = World.build(args.seed, **parse_overrides(args.config))
    if args.command == "build":
        manifest = build_all(world, args.out, tokenizer=not args.no_tokenizer)
        print(json.dumps(manifest, indent=1))
        return
    rng = as_rng(args.seed, "show")
    for i in range(args.num):
        record = world.sample_prompt(rng, family=args.family, record_id=f"show-{i}")
        print(f"--- {record['category']} / {record['family']}\n{record['prompt']}\n")
        print(world.solve(record), "\n", json.dumps(world.score(record, world.solve(record))))


if __name__ == "__main__":
    main()
