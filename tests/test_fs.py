"""Run files on cloud storage: every file a stage reads or writes goes through
``instructrl.fs`` (etils.epath). Here a ``gs://`` workdir is served from a local directory
by epath's own test double, so the stages' non-checkpoint files (world, JSONL, metrics, run
info, what the report reads) are written and read back through the code path a real bucket
takes; a static check keeps raw ``open``/``os`` file calls out of the stage modules."""

import ast
import json
import os

import pytest
from etils.epath import testing as epath_testing

from instructrl import fs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def bucket(tmp_path):
    """``gs://bucket/...`` paths served from tmp_path/bucket (epath's mock backend)."""
    local = lambda p: str(p).replace("gs://", str(tmp_path) + "/")  # noqa: E731

    def one(fn, path, *args, **kwargs):
        return fn(local(path), *args, **kwargs)

    def two(fn, src, dst, *args, **kwargs):
        return fn(local(src), local(dst), *args, **kwargs)

    names = ("exists", "glob", "isdir", "listdir", "makedirs", "mkdir", "open", "remove",
             "rmtree", "stat", "walk")  # fmt: skip
    mocks = {name: one for name in names} | {name: two for name in ("copy", "rename", "replace")}
    with epath_testing.mock_epath(**mocks):
        yield tmp_path / "bucket"


def test_local_files_atomic_writes_and_appends(tmp_path):
    path = str(tmp_path / "a" / "b.json")
    fs.makedirs(os.path.dirname(path))
    fs.write_atomic(path, "one\n")
    fs.append(path, "two\n")
    assert fs.read_text(path) == "one\ntwo\n" and fs.isfile(path) and not fs.isdir(path)
    assert fs.listdir(str(tmp_path / "a")) == ["b.json"]  # no temporary file left
    assert fs.absolute("gs://b/run") == "gs://b/run"
    assert fs.absolute("runs/x") == os.path.join(os.getcwd(), "runs/x")


def test_a_world_metrics_and_a_report_on_a_bucket(bucket):
    from instructrl import metrics, report, train
    from instructrl.world import World
    from instructrl.world.datasets import build_all, read_jsonl

    run = "gs://bucket/run"
    world = World.build(seed=0, scale=0.002, num_rm_prompts=8, num_pretrain_docs=40,
                        num_eval_prompts=4, num_heldout_per_family=1)  # fmt: skip
    build_all(world, f"{run}/world", tokenizer=False)
    assert (bucket / "run" / "world" / "world.json").is_file()
    assert World.from_dir(f"{run}/world").config == world.config
    assert len(read_jsonl(f"{run}/world/prompts_eval.jsonl")) == 4

    writer = metrics.MetricWriter(f"{run}/sft")
    for step in (1, 2, 3):
        writer.write(step, {"sft/loss": 1.0 / step})
    writer.close()
    metrics.truncate_jsonl(f"{run}/sft/metrics.jsonl", 2)  # a resumed run drops step 3
    lines = (bucket / "run" / "sft" / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["step"] for r in rows] == [1, 2]
    train.write_run_info(f"{run}/sft", _Config(), metrics.Timers(), stage="sft")
    train.mark_done(f"{run}/sft")
    assert train.is_done(f"{run}/sft") and not train.is_done(f"{run}/rm")

    built = report.build(run)  # what the report stage reads: every stage's files
    assert "sft" in built["time_breakdown"] and built["curves"]["ppo"] == {"step": []}


class _Config:
    def to_json_best_effort(self):
        return json.dumps({"stage": "sft"})


# Modules whose file calls are not a stage's: configs are Python files on the local disk,
# the CPU's flags come from /proc, converters and the chat read local model directories.
NOT_STAGE_IO = {"fs.py", "config_lib.py", "runtime.py", "__init__.py", "chat.py", "convert",
                "world/__main__.py"}  # fmt: skip
RAW = {("os", "makedirs"), ("os", "replace"), ("os", "listdir"), ("os", "remove"),
       ("os", "walk"), ("path", "exists"), ("path", "isfile"), ("path", "isdir"),
       ("path", "getsize"), ("shutil", "move"), ("shutil", "copy")}  # fmt: skip


def test_stage_modules_touch_files_only_through_fs():
    offenders = []
    package = os.path.join(ROOT, "instructrl")
    for directory, _, names in os.walk(package):
        for name in names:
            rel = os.path.relpath(os.path.join(directory, name), package)
            if not name.endswith(".py") or rel in NOT_STAGE_IO or rel.split("/")[0] in NOT_STAGE_IO:
                continue
            tree = ast.parse(open(os.path.join(directory, name)).read())
            for node in ast.walk(tree):
                if not isinstance(node, ast.Call):
                    continue
                f = node.func
                if isinstance(f, ast.Name) and f.id == "open":
                    offenders.append(f"{rel}:{node.lineno} open()")
                elif isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name | ast.Attribute):
                    owner = f.value.id if isinstance(f.value, ast.Name) else f.value.attr
                    if (owner, f.attr) in RAW:
                        offenders.append(f"{rel}:{node.lineno} {owner}.{f.attr}()")
    assert not offenders, offenders
