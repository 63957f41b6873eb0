"""Configs own their defaults; overrides are strict and typed; derived values resolve after them;
the command line prints user errors as one line."""

import json
import os
import subprocess
import sys

import pytest

from instructrl import config_lib, pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pipeline(*overrides, arg="runlocal"):
    c = config_lib.load_config(f"pipeline:{arg}").unlock()
    config_lib.apply_overrides(c, [o.split("=", 1) for o in overrides])
    return pipeline.resolve(c.lock(), "/tmp/instructrl-config-test")


def test_ptx_coef_reaches_ppo_ptx_and_only_it():
    resolved = _pipeline("ptx_coef=0.37")
    assert resolved["ppo_ptx"].ptx.coef == 0.37
    assert resolved["ppo"].ptx.coef == 0.0


def test_one_rl_override_changes_both_rl_stages():
    resolved = _pipeline("rl.ppo.kl_coef=0.05", "rl.optimizer.lr=3e-5")
    for stage in ("ppo", "ppo_ptx"):
        assert resolved[stage].ppo.kl_coef == 0.05
        assert resolved[stage].optimizer.lr == 3e-5


def test_shared_values_reach_every_stage_after_overrides():
    resolved = _pipeline("seed=3", "model.preset=llama-tiny", "model.max_len=128")
    for name in ("pretrain", "sft", "rm", "ppo", "ppo_ptx"):
        assert resolved[name].seed == 3
        assert (resolved[name].model.preset, resolved[name].model.max_len) == ("llama-tiny", 128)
    assert resolved["world"].seed == 3 and resolved["evaluate"].world.seed == 3
    assert resolved["rankings"].seed == 3
    # Wiring: each stage reads the directory of the stage before it.
    assert resolved["sft"].init_from.endswith("/pretrain")
    assert resolved["ppo"].ppo.reward_model.endswith("/rm")
    assert resolved["evaluate"].models["ppo_ptx"].endswith("/ppo_ptx")


def test_sequences_override_from_text():
    resolved = _pipeline("stages=world,pretrain,sft")
    assert list(resolved) == ["world", "pretrain", "sft"]
    resolved = _pipeline("stages=[world, pretrain]", "pretrain.data.text_files=a.txt,b.txt")
    assert list(resolved) == ["world", "pretrain"]  # wiring replaces text_files; parsing held
    c = config_lib.load_config("sft:runlocal").unlock()
    config_lib.apply_overrides(c, [("data.length_buckets", "[32, 64]")])
    assert list(c.data.length_buckets) == [32, 64]


@pytest.mark.parametrize(
    "override,message",
    [
        ("ppo.ppo.kl_coef=0.05", r"no field 'ppo'.*did you mean 'rl.ppo'"),
        ("rl.ppo.kl_cof=0.05", r"no field 'rl.ppo.kl_cof'.*did you mean 'rl.ppo.kl_coef'"),
        ("rl.ppo.kl_coef=abc", r"rl.ppo.kl_coef.*is float; 'abc' is not a float"),
        ("seed=1.5", r"seed.*is int; '1.5' is not an int"),
        ("rl.ptx.coef=0.3", r"no field 'rl.ptx.coef'"),
        ("sft.train.progress=maybe", r"is bool; 'maybe' is not a bool"),
    ],
)
def test_bad_overrides_name_the_field(override, message):
    with pytest.raises(config_lib.ConfigError, match=message):
        _pipeline(override)


def test_unknown_stage_and_config_argument_name_the_nearest():
    with pytest.raises(config_lib.ConfigError, match=r"unknown stage 'ppo_ptxx'.*'ppo_ptx'"):
        _pipeline("stages=world,ppo_ptxx")
    with pytest.raises(config_lib.ConfigError, match=r"'modle' is unknown.*did you mean 'model'"):
        config_lib.load_config("sft:modle=llama-small")
    with pytest.raises(config_lib.ConfigError, match=r"'seed'.*is int"):
        config_lib.load_config("pipeline:seed=one")


def test_parse_value_types():
    assert config_lib.parse_value("3", 1, "x") == 3
    assert config_lib.parse_value("3", 1.0, "x") == 3.0 and isinstance(
        config_lib.parse_value("3", 1.0, "x"), float
    )
    assert config_lib.parse_value("off", True, "x") is False
    assert config_lib.parse_value("none", None, "x", int) is None
    assert config_lib.parse_value("7", None, "x", int) == 7
    assert config_lib.parse_value("1,2", [0], "x") == [1, 2]
    assert config_lib.parse_value("", ["a"], "x") == []


def _cli(*args, cwd=ROOT):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "-m", "instructrl.main", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=300,
    )


def test_print_config_without_config_flag(tmp_path):
    """``instructrl pipeline --workdir DIR --config.ptx_coef=0.37 --print_config`` (no
    --config: configs/pipeline.py) prints every resolved stage and runs nothing."""
    workdir = str(tmp_path / "p")
    out = _cli("pipeline", "--workdir", workdir, "--config.ptx_coef=0.37",
               "--config.rl.ppo.kl_coef", "0.05", "--print_config")  # fmt: skip
    assert out.returncode == 0, out.stderr
    sections = out.stdout.split("# ---- ")[1:]
    by_stage = {s.split()[0]: s for s in sections}
    assert tuple(by_stage) == pipeline.STAGE_NAMES
    assert "coef: 0.37" in by_stage["ppo_ptx"] and "coef: 0.0" in by_stage["ppo"]
    assert by_stage["ppo"].count("kl_coef: 0.05") == by_stage["ppo_ptx"].count("kl_coef: 0.05") == 1
    assert not os.path.exists(workdir)


def test_user_errors_are_one_line_without_traceback(tmp_path):
    typo = _cli("pipeline", "--workdir", str(tmp_path), "--config.rl.ppo.kl_cof=0.1")
    assert typo.returncode == 2
    assert typo.stderr.strip().splitlines() == [
        "instructrl: error: --config.rl.ppo.kl_cof: no field 'rl.ppo.kl_cof' in this config "
        "(did you mean 'rl.ppo.kl_coef'?)"
    ]
    # A bad record with skip_invalid=False: one line naming file, line and field.
    data = tmp_path / "demos.jsonl"
    data.write_text('{"prompt": "p", "response": "r"}\n{"prompt": "q", "response": 7}\n')
    bad = _cli("train", "--config", "configs/sft.py:runlocal", "--workdir", str(tmp_path / "s"),
               f"--config.data.path={data}", "--config.data.skip_invalid=false")  # fmt: skip
    assert bad.returncode == 2, bad.stderr[-2000:]
    lines = [
        line for line in bad.stderr.strip().splitlines() if "Traceback" in line or "error" in line
    ]
    assert lines == [f"instructrl: error: {data}:2: field 'response' must be str, got int"]


def test_rerun_a_stage_from_its_run_info(tmp_path):
    """A workdir's run_info.json is a config: ``--config runs/x/run_info.json``."""
    info = tmp_path / "run_info.json"
    c = config_lib.load_config("sft:runlocal")
    info.write_text(json.dumps({"stage": "sft", "config": json.loads(c.to_json_best_effort())}))
    again = config_lib.load_config(str(info))
    assert again.to_dict() == json.loads(c.to_json_best_effort())


def test_skipped_records_are_counted_on_the_console(tmp_path):
    data = tmp_path / "demos.jsonl"
    good = [json.dumps({"prompt": f"p{i}", "response": "r" * (i + 1)}) for i in range(10)]
    data.write_text(
        "\n".join([*good, '{"prompt": "q"}', json.dumps({"prompt": "x", "response": "y" * 500})])
    )
    workdir = tmp_path / "s"
    out = _cli("train", "--config", "configs/sft.py:runlocal", "--workdir", str(workdir),
               f"--config.data.path={data}", "--config.train.steps=2",
               "--config.train.batch_size=8", "--config.data.eval_examples=1",
               "--config.data.seq_len=64", "--config.evals.samples.every_steps=0")  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "sft: skipped 1 invalid, 1 too long records (see run_info.json)" in out.stderr
    info = json.loads((workdir / "run_info.json").read_text())
    assert info["skipped_examples"] == {"invalid": 1, "too_long": 1}
    assert (workdir / "DONE").exists()
