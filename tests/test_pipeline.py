"""The whole pipeline on its runlocal config: stages hand off, rankings are of SFT samples,
the report has every key, finished stages are not recomputed, and a pipeline SIGKILLed inside
every training stage resumes to the same params, metrics and report; one SIGTERMed
(preempted) saves where it is and resumes from there."""

import dataclasses
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import pipeline_flags

from instructrl import best_of_n, evaluate, pipeline, report, stages
from instructrl.train import PAUSE_ENV

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Where the resume test kills each training stage: after this checkpoint, before DONE
# (conftest.PIPELINE_OVERRIDES sets the checkpoint steps).
KILL_AT = {"pretrain": 10, "sft": 4, "rm": 5, "ppo": 1, "ppo_ptx": 1}
TRAINED = ("pretrain", "sft", "rm", "ppo", "ppo_ptx")


REQUIRED = ("win_rate_vs_sft", "gold_score", "likert", "kl_to_sft", "pretrain_loss", "rm_score")


def _params(stage_dir, sub="checkpoints"):
    mngr = ocp.CheckpointManager(os.path.join(stage_dir, sub))
    out = mngr.restore(mngr.latest_step(), args=ocp.args.PyTreeRestore())["params"]
    mngr.close()
    return out


@pytest.fixture(scope="module")
def run(pipeline_run):
    """The session's pipeline (conftest.pipeline_run): stopped after the reward model, then
    resumed."""
    return pipeline_run


@pytest.fixture(scope="module")
def killed(run, tmp_path_factory):
    """The same pipeline through the command line, SIGKILLed after a checkpoint of every
    training stage (``KILL_AT``) and rerun each time until it finishes."""
    workdir = str(tmp_path_factory.mktemp("killed") / "run")
    overrides = pipeline_flags()
    cmd = [sys.executable, "-m", "instructrl.main", "pipeline", "--config",
           "configs/pipeline.py:runlocal", "--workdir", workdir, *overrides]  # fmt: skip
    env = {**os.environ, PAUSE_ENV: ",".join(f"{s}:{n}" for s, n in KILL_AT.items())}
    marked = lambda: {s for s, n in KILL_AT.items()  # noqa: E731
                      if os.path.exists(os.path.join(workdir, s, f"PAUSED_AT_{n}"))}  # fmt: skip
    kills = []
    for _ in range(len(KILL_AT) + 1):
        before = marked()  # pause points passed in earlier launches
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)  # fmt: skip
        deadline = time.time() + 600
        while proc.poll() is None and time.time() < deadline:
            # PPO and PPO-ptx run at once: either (or both) may be the one paused.
            paused = marked() - before
            if paused:
                assert not any(os.path.exists(os.path.join(workdir, s, "DONE")) for s in paused)
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                # Killed there: every stage that reached its pause point in this launch (the
                # other RL stage may have written its marker after the check above).
                kills.extend(sorted(marked() - before))
                break
            time.sleep(0.05)
        else:
            stderr = proc.stderr.read()
            assert proc.returncode == 0, stderr[-3000:]
            break
    assert sorted(kills) == sorted(KILL_AT), kills
    return workdir


def _rows(path, drop=("tokens_per_s",)):
    if not os.path.exists(path):
        return []
    rows = [json.loads(line) for line in open(path)]
    return [{k: v for k, v in r.items() if not k.endswith(drop)} for r in rows]


@pytest.mark.parametrize("stage", TRAINED)
def test_killed_stage_resumes_bitwise(run, killed, stage):
    """Each training stage, SIGKILLed after a checkpoint and rerun, ends with the params and
    the metrics (and samples) of the uninterrupted run."""
    ref_dir, got_dir = os.path.join(run[1], stage), os.path.join(killed, stage)
    with open(os.path.join(got_dir, "run_info.json")) as f:
        resumed = json.load(f)["resumed_from"]
    # PPO and PPO-ptx run at once: one may be killed again, at a later checkpoint, when the
    # other pauses (run_info keeps the last resume).
    if stage in ("ppo", "ppo_ptx"):
        assert resumed >= KILL_AT[stage]
    else:
        assert resumed == KILL_AT[stage]
    for sub in ("checkpoints", "export", "best"):
        if os.path.isdir(os.path.join(ref_dir, sub)):
            want, got = _params(ref_dir, sub), _params(got_dir, sub)
            for (path, a), (_, b) in zip(_leaves(want), _leaves(got), strict=True):
                np.testing.assert_array_equal(a, b, err_msg=f"{stage}/{sub}{path}")
    for name in ("metrics.jsonl", "samples.jsonl"):
        assert _rows(os.path.join(got_dir, name)) == _rows(os.path.join(ref_dir, name)), name


def test_killed_pipeline_resumes_to_the_same_report(run, killed):
    want, got = (json.load(open(os.path.join(d, "report.json"))) for d in (run[1], killed))
    for key in ("timings", "time_breakdown"):  # wall-clock, never equal
        want.pop(key), got.pop(key)
    assert got == want


def test_sigterm_saves_the_step_and_the_relaunch_resumes_exactly(run, tmp_path):
    """Preemption: the pipeline (PPO and PPO-ptx in child processes) gets SIGTERM in PPO after
    a step that is not a checkpoint step; that stage saves the step, the pipeline exits with
    status 143, and the relaunch ends with the uninterrupted run's params and metrics."""
    from instructrl.preemption import EXIT_CODE
    from instructrl.train import SIGTERM_ENV

    ref = run[1]
    workdir = str(tmp_path / "run")
    for stage in pipeline.STAGE_NAMES[:5]:  # world .. rm as the uninterrupted run left them
        shutil.copytree(os.path.join(ref, stage), os.path.join(workdir, stage))
    shutil.copy(os.path.join(ref, "timings.json"), workdir)
    overrides = pipeline_flags()
    overrides += ["--config.rl.checkpoint.every_steps=2",  # step 1 is not a checkpoint step
                  f"--config.stages={json.dumps(list(pipeline.STAGE_NAMES[:7]))}"]  # fmt: skip
    cmd = [sys.executable, "-m", "instructrl.main", "pipeline", "--config",
           "configs/pipeline.py:runlocal", "--workdir", workdir, *overrides]  # fmt: skip
    env = {**os.environ, SIGTERM_ENV: "ppo:1"}
    first = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == EXIT_CODE, first.stderr[-3000:]
    assert not os.path.exists(os.path.join(workdir, "ppo", "DONE"))
    with open(os.path.join(workdir, "ppo", "run_info.json")) as f:
        assert json.load(f)["preempted_at"] == 1
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    with open(os.path.join(workdir, "ppo", "run_info.json")) as f:
        assert json.load(f)["resumed_from"] == 1
    for stage in ("ppo", "ppo_ptx"):
        want, got = _params(os.path.join(ref, stage)), _params(os.path.join(workdir, stage))
        for (path, a), (_, b) in zip(_leaves(want), _leaves(got), strict=True):
            np.testing.assert_array_equal(a, b, err_msg=f"{stage}{path}")
        rows = [_rows(os.path.join(d, stage, "metrics.jsonl")) for d in (ref, workdir)]
        assert rows[0] == rows[1], stage


def _leaves(tree):
    return [(p, np.asarray(v)) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]]


def test_resumes_without_recomputing_finished_stages(run, caplog):
    """A rerun keeps finished stages; one run with other settings than the config's now sets
    is kept too, with a warning naming each changed setting (paths are wiring, not settings:
    the first call wired the same stages)."""
    config, workdir, stamps, timings = run
    for stage, stamp in stamps.items():
        assert os.path.getmtime(os.path.join(workdir, stage, "DONE")) == stamp, stage
    assert set(timings) == set(pipeline.STAGE_NAMES)  # the timings file keeps earlier stages
    with caplog.at_level("WARNING", logger="instructrl.pipeline"):
        again = pipeline.run(config, workdir)
    assert again == timings and not caplog.records
    for stage in pipeline.STAGE_NAMES:
        assert os.path.exists(os.path.join(workdir, stage, "DONE"))
    changed = config.copy_and_resolve_references()
    changed.rl.ppo.kl_coef = 0.5
    with caplog.at_level("WARNING", logger="instructrl.pipeline"):
        assert pipeline.run(changed, workdir) == timings
    warned = {r.getMessage().split()[1]: r.getMessage() for r in caplog.records}
    assert set(warned) == {"ppo", "ppo_ptx"}
    for message in warned.values():
        assert f"ppo.kl_coef: {float(config.rl.ppo.kl_coef)!r} -> 0.5" in message


def test_stages_hand_off_through_init_from(run):
    _, workdir, _, _ = run
    for stage, source in (("sft", "pretrain"), ("rm", "sft"), ("ppo", "sft"), ("ppo_ptx", "sft")):
        with open(os.path.join(workdir, stage, "run_info.json")) as f:
            assert json.load(f)["config"]["init_from"].endswith(source), stage
    # SFT started from the pretrained params: after a few steps it is still close to them.
    base, tuned = _params(os.path.join(workdir, "pretrain")), _params(os.path.join(workdir, "sft"))
    emb_base = np.asarray(base["embed"]["embedding"])
    emb_tuned = np.asarray(tuned["embed"]["embedding"])
    assert 0 < np.abs(emb_tuned - emb_base).max() < 0.5 * np.abs(emb_base).max()


def test_rankings_are_sft_samples_ranked_by_the_right_labelers(run):
    config, workdir, _, _ = run
    world = stages.build_world(config)
    train_ids = {lab.labeler_id for lab in world.labelers.train}
    heldout_ids = {lab.labeler_id for lab in world.labelers.heldout}
    rows = [json.loads(x) for x in open(os.path.join(workdir, "rankings", "rankings_train.jsonl"))]
    world_rows = [json.loads(x) for x in open(os.path.join(workdir, "world", "prompts_rm.jsonl"))]
    assert [r["prompt"] for r in rows] == [r["prompt"] for r in world_rows]
    references = {world.solve(r) for r in world_rows}
    for r in rows:
        k = len(r["responses"])
        assert config.rankings.min_responses <= k <= config.rankings.max_responses
        assert sorted(set(r["ranks"])) == list(range(len(set(r["ranks"]))))
        assert r["labeler_id"] in train_ids
    # Policy samples, not the world's reference answers.
    responses = [x for r in rows for x in r["responses"]]
    assert sum(x in references for x in responses) < 0.1 * len(responses)
    heldout = open(os.path.join(workdir, "rankings", "rankings_valid_heldout_labelers.jsonl"))
    assert all(json.loads(x)["labeler_id"] in heldout_ids for x in heldout)


def test_report_has_every_model_and_key(run):
    _, workdir, _, _ = run
    with open(os.path.join(workdir, "report.json")) as f:
        rep = json.load(f)
    # The default pipeline's models (an optional stage such as dpo is evaluated when run).
    evaluated = {m for m, stage in stages.EVALUATED.items() if stage in pipeline.STAGE_NAMES}
    assert set(rep["models"]) == evaluated and evaluated <= set(report.MODELS)
    for name, m in rep["models"].items():
        for key in REQUIRED + report.ATTRIBUTES:
            assert key in m, (name, key)
        w = m["win_rate_vs_sft"]
        assert 0 <= w["low"] <= w["mean"] <= w["high"] <= 1
        # The per-family split partitions the prompts: its n-weighted means are the totals.
        fam = m["by_family"].values()
        assert sum(f["n"] for f in fam) == w["n"]
        for key, total in (("win_rate_vs_sft", w["mean"]), ("gold_score", m["gold_score"])):
            np.testing.assert_allclose(sum(f["n"] * f[key] for f in fam) / w["n"], total)
    # SFT against itself: every comparison is a tie.
    assert rep["models"]["sft"]["win_rate_vs_sft"]["mean"] == 0.5
    assert rep["models"]["sft"]["kl_to_sft"] == 0.0
    assert "accuracy_heldout_labelers" in rep["reward_model"]
    assert rep["curves"]["ppo"]["step"] and rep["curves"]["ppo_ptx"]["ptx_loss"]
    md = open(os.path.join(workdir, "report.md")).read()
    assert "| ppo_ptx |" in md and "Alignment tax" in md and "By task family" in md
    for png in ("reward_kl_curves", "win_rates", "attributes", "alignment_tax"):
        assert os.path.getsize(os.path.join(workdir, "plots", png + ".png")) > 1000


def test_interval_matches_normal_approximation():
    rng = np.random.default_rng(0)
    x = rng.choice([0.0, 0.5, 1.0], size=200, p=[0.3, 0.2, 0.5])
    got = evaluate.interval(x)
    half = 1.96 * np.std(x, ddof=1) / np.sqrt(len(x))
    np.testing.assert_allclose([got["low"], got["high"]], [x.mean() - half, x.mean() + half])
    assert got["n"] == 200


def test_headline_table_lists_models_in_order():
    m = {
        "win_rate_vs_sft": {"mean": 0.6, "low": 0.5, "high": 0.7},
        "likert": 4.0,
        "gold_score": 0.5,
        "rm_score": 0.1,
        "kl_to_sft": 1.0,
        "pretrain_loss": 2.0,
        "fewshot_heldout": {"mean": 0.3},
    }
    table = report.headline({"models": {"ppo": m, "sft": m}})
    lines = table.splitlines()
    assert lines[2].startswith("| sft |") and lines[3].startswith("| ppo |")
    assert "0.600 [0.50, 0.70]" in lines[3]


@pytest.fixture(scope="module")
def experiments(run):
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "experiments"))
    import run as experiments_run

    return experiments_run, run[1]


@pytest.mark.parametrize(
    "name",
    [
        "kl_sweep",
        "ptx_sweep",
        "rm_batching",
        "size",
        "rm_generalization",
        "overoptimization",
        "signal",
        "departures",
        "methods",
    ],
)
def test_experiment_tiny_variant_writes_its_report(experiments, name):
    """Each experiment's --tiny variant on the session pipeline's stages (ptx_vs_ppo is the
    policy sweep kl_sweep and ptx_sweep run, on the two policies methods evaluates)."""
    module, workdir = experiments
    path = module.main([name, "--workdir", workdir, "--tiny"])
    results = json.load(open(path.replace(".md", ".json")))
    table = open(path).read()
    assert table.count("\n") >= 2
    if name in ("ptx_vs_ppo", "kl_sweep", "ptx_sweep", "departures"):
        names = [r["variant"] for r in results["rows"]]
        assert names[0] == "sft" and len(names) >= (2 if name == "kl_sweep" else 3)
        for row in results["rows"][1:]:
            assert 0 <= row["win_rate_vs_sft"]["mean"] <= 1
    if name == "rm_batching":
        rows = {r["pairs"]: r for r in results["rows"]}
        # Shuffled pairs take one step per C(K,2)/batch comparisons, and score each completion
        # K-1 times: many more steps and forward passes per epoch.
        assert rows["shuffled"]["steps"] > rows["all_in_one"]["steps"]
        assert rows["shuffled"]["forward_passes"] > rows["all_in_one"]["forward_passes"]
        assert rows["all_in_one"]["wall_s"] > 0
        # The compute-matched row scores about as many completions as shuffled pairs do.
        matched = next(r for r in results["rows"] if r["pairs"].endswith("epochs"))
        ratio = matched["forward_passes"] / rows["shuffled"]["forward_passes"]
        assert 0.5 < ratio < 2 and matched["steps"] > rows["all_in_one"]["steps"]
    if name == "overoptimization":
        curve = results["curve"]
        assert len(curve) >= 3
        # The first point is the SFT policy itself (eval_at_start): no KL to itself.
        assert curve[0]["step"] == 0 and abs(curve[0]["kl_to_sft"]) < 1e-5
        assert curve[-1]["step"] == results["overrides"]["ppo.iterations"]
    if name == "signal":
        overall = results["overall"]
        # The RM's accuracy against the file's own labels, recomputed from its scores here,
        # is the accuracy the RM stage logged on the same rankings.
        logged = [json.loads(x) for x in open(os.path.join(workdir, "rm", "metrics.jsonl"))]
        logged = [r for r in logged if "eval/accuracy_train_labelers" in r][-1]
        assert abs(overall["rm_vs_labels"] - logged["eval/accuracy_train_labelers"]) < 0.02
        for key in ("inter_train", "inter_heldout", "train_vs_gold", "rm_vs_gold"):
            assert 0.0 <= overall[key] <= 1.0 and overall[f"{key}_pairs"] > 0
        assert set(results["by_source_pair"]) and set(results["by_family"])
    if name == "methods":
        rows = {r["method"]: r for r in results["rows"]}
        trained = ["ppo", "ppo_ptx", "rloo", "dpo_pairwise"]
        assert list(rows) == ["sft", *trained, "best_of_4"]
        for method in trained:
            assert 0 <= rows[method]["win_rate_vs_sft"]["mean"] <= 1
            assert rows[method]["train_seconds"] > 0 and rows[method]["samples_per_answer"] == 1
            assert rows[method]["kl_to_sft"] != 0  # its own policy, not SFT's answers
        # Best-of-n: n answers per answer, the closed-form KL, SFT's own weights; the kept
        # answer's RM score cannot fall as n grows (the first n draws are nested).
        curve = results["best_of_n"]
        assert [c["n"] for c in curve] == [1, 2, 4] and curve[0]["kl_to_sft"] == 0.0
        assert rows["best_of_4"]["samples_per_answer"] == 4
        assert rows["best_of_4"]["pretrain_loss"] == rows["sft"]["pretrain_loss"]
        assert curve[0]["rm_score"] <= curve[1]["rm_score"] <= curve[2]["rm_score"]
        assert "| rloo |" in table and "Best-of-n" in table
    if name == "size":
        rows = {r["model"]: r for r in results["rows"]}
        assert rows["base_medium"]["params"] > 2 * rows["base_small"]["params"]
        # The larger base is its own model: different answers, a different held-out loss.
        assert rows["base_medium"]["pretrain_loss"] != rows["base_small"]["pretrain_loss"]
        assert rows["base_fewshot_medium"]["kl_to_sft"] is None


@pytest.mark.parametrize("stage", ["ppo_ptx", "rm"])
def test_trained_stage_exports_to_transformers(run, stage, tmp_path):
    """``python -m instructrl.convert --export`` turns a stage's workdir into a directory that
    transformers loads unchanged, with the same logits (PPO's EMA policy) or rewards (RM). The
    pipeline's RM averages over the response, which a HF classifier cannot: its export is
    refused, and its weights exported as a last-token RM must still score as ours."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from instructrl import convert
    from instructrl.convert.__main__ import main as convert_main
    from instructrl.model import Transformer
    from instructrl.policy_io import Toolkit

    _, workdir, _, _ = run
    stage_dir = os.path.join(workdir, stage)
    tk = Toolkit.from_workdir(stage_dir)
    head = "scalar" if stage == "rm" else "lm"
    params = tk.params(stage_dir, head=head)
    out = str(tmp_path / "hf")
    if head == "scalar":
        assert tk.cfg.reward_readout == "mean"
        with pytest.raises(ValueError, match="reward_readout='mean'"):
            convert_main(["--export", stage_dir, "--out", out])
        last = dataclasses.replace(tk.cfg, reward_readout="last")
        convert.export_hf(params, last, out, head="scalar", tokenizer_dir=None,
                          pad_token_id=tk.tokenizer.pad_id)  # fmt: skip
    else:
        out = convert_main(["--export", stage_dir, "--out", out])
    tokens = np.random.default_rng(0).integers(1, tk.tokenizer.vocab_size, (2, 12)).astype(np.int32)
    special = (tk.tokenizer.pad_id, tk.tokenizer.eos_id)  # HF's classifier stops at a pad id
    tokens[np.isin(tokens, special)] = next(i for i in range(1, 9) if i not in special)
    # The exported weights are the same; HF multiplies them in float32, so ours does here too
    # (the pipeline's "auto" matmul_dtype is bfloat16 on a CPU with AVX512-BF16).
    cfg = dataclasses.replace(tk.cfg, matmul_dtype="")
    ours = np.asarray(Transformer(cfg, head=head).apply({"params": params}, tokens))
    auto = (
        transformers.AutoModelForSequenceClassification
        if head == "scalar"
        else (transformers.AutoModelForCausalLM)
    )
    model = auto.from_pretrained(out).eval()
    with torch.no_grad():
        theirs = model(torch.tensor(tokens)).logits.float().numpy()
    if head == "scalar":  # HF scores the last token; our config.json bias is a constant shift
        bias = json.load(open(os.path.join(out, "config.json")))["instructrl_score_bias"]
        np.testing.assert_allclose(theirs[:, 0] + bias, ours[:, -1], atol=1e-4)
    else:
        np.testing.assert_allclose(theirs, ours[..., : theirs.shape[-1]], atol=1e-4)
        assert os.path.isfile(os.path.join(out, "tokenizer.json"))


# ---- the user surface on the pipeline's stages: sample, chat, evaluate ----------------------


def _stage(run, name):
    return os.path.join(run[1], name)


def _eval_records(run, n=None):
    rows = [json.loads(x) for x in open(os.path.join(_stage(run, "world"), "prompts_eval.jsonl"))]
    return rows[:n]


def test_sample_prints_and_writes_a_stage_s_answers(run, capsys, tmp_path):
    """``instructrl sample`` gives the stage's own answers (PPO-ptx: its EMA export) in the
    world's template, the same draws for the same seed, printed for one prompt and as JSONL
    for a prompts file. (Sampled at T=1: the tiny world's greedy answers are blank lines.)"""
    from instructrl import main
    from instructrl.policy_io import Toolkit

    stage = _stage(run, "ppo_ptx")
    records = _eval_records(run, 3)
    tk = Toolkit.from_workdir(stage, batch_size=8)
    flags = ["--temperature", "1", "--seed", "3", "--max_new_tokens", "16"]

    def want(prompts):
        return tk.sample(tk.params(stage), prompts, max_new_tokens=16, temperature=1.0, seed=3,
                         template=tk.template).texts  # fmt: skip

    one = want([records[0]["prompt"]])[0].strip()
    assert one  # a blank answer would make the comparison vacuous
    assert main.main(["sample", "--workdir", stage, "--prompt", records[0]["prompt"], *flags]) == 0
    assert capsys.readouterr().out == one + "\n"
    prompts, out = tmp_path / "prompts.jsonl", tmp_path / "answers.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in records))
    main.main(
        ["sample", "--workdir", stage, "--prompts", str(prompts), "--output", str(out), *flags]
    )
    rows = [json.loads(x) for x in open(out)]
    assert [r["id"] for r in rows] == [r["id"] for r in records]
    assert [r["response"] for r in rows] == [
        t.strip() for t in want([r["prompt"] for r in records])
    ]


def test_sample_rejects_a_reward_model_and_a_bad_prompt_file(run, tmp_path):
    from instructrl import main

    cmd = [sys.executable, "-m", "instructrl.main", "sample"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"text": "no prompt"}\n')
    for args, message in (
        (["--workdir", _stage(run, "rm"), "--prompt", "x"], "is a reward model"),
        (["--workdir", _stage(run, "sft"), "--prompts", str(bad)], "bad.jsonl:2"),
    ):
        with pytest.raises((main.config_lib.ConfigError, main.DataError), match=message):
            main.main(["sample", *args])
    proc = subprocess.run([*cmd, "--workdir", _stage(run, "rm"), "--prompt", "x"], cwd=ROOT,
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr


def test_chat_in_a_pseudo_terminal(run):
    """``instructrl chat`` driven through a pty: commands answer, the reply after /reset is
    the ``sample`` answer to the same prompt and seed, long histories drop their oldest turns, and
    Ctrl-D leaves with status 0."""
    import pty

    from instructrl.policy_io import Toolkit

    stage = _stage(run, "sft")
    prompt = _eval_records(run, 1)[0]["prompt"]
    tk = Toolkit.from_workdir(stage, batch_size=8)
    # T=1 (the tiny world's greedy answers are blank); seed 0 = a fresh conversation's draw.
    want = tk.sample(tk.params(stage), [prompt], max_new_tokens=24, temperature=1.0, seed=0,
                     template=tk.template).texts[0].strip()  # fmt: skip
    assert want
    # The command line on a pseudo-terminal: its stdin, stdout and controlling terminal.
    fd, tty = pty.openpty()
    cmd = [sys.executable, "-m", "instructrl.main", "chat", "--workdir", stage,
           "--max_new_tokens", "24", "--temperature", "0.5"]  # fmt: skip
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdin=tty,
        stdout=tty,
        stderr=tty,
        start_new_session=True,
        env={**os.environ, "TERM": "dumb"},
    )  # the terminal's own echo
    os.close(tty)
    transcript = ""

    def next_prompt(timeout=240):
        """Reads the terminal until the chat asks for the next line; returns what it wrote."""
        nonlocal transcript
        start, deadline = len(transcript), time.time() + timeout
        while "> " not in transcript[start:] and time.time() < deadline:
            try:
                transcript += os.read(fd, 4096).decode("utf-8", "replace")
            except OSError:
                break
        assert "> " in transcript[start:], transcript[-2000:]
        return transcript[start:]

    next_prompt()
    long = " ".join(["tell me more about that"] * 30)  # three of these overflow the context
    steps = [
        ("/temperature 1", "(temperature = 1.0)"),
        ("/top_k x", "needs a number"),
        ("/nope", "unknown command"),
        (long, ""),
        (long, ""),
        (long, ""),
        ("/reset", "(conversation cleared)"),
        (prompt, want.replace("\n", "\r\n") + "\r\n"),
    ]  # the terminal's newlines
    for line, marker in steps:
        os.write(fd, (line + "\n").encode())
        assert marker in next_prompt(), transcript[-2000:]
    assert "oldest messages no longer fit the context" in transcript
    os.write(fd, b"\x04")
    status = proc.wait(timeout=60)
    os.close(fd)
    assert status == 0, transcript[-2000:]


def test_evaluate_reproduces_the_pipeline_evaluation(run, tmp_path):
    """``instructrl evaluate`` of PPO-ptx against SFT on the world's evaluation prompts, at the
    pipeline's settings, gives the pipeline's own win rate, gold score, RM score and KL; the
    same prompts outside a world are judged by the reward model."""
    from instructrl import main

    config, workdir = run[0], run[1]
    e = config.evaluate
    prompts = os.path.join(_stage(run, "world"), "prompts_eval.jsonl")
    flags = ["--max_new_tokens", str(e.max_new_tokens), "--temperature", str(e.temperature),
             "--seed", str(config.seed), "--batch_size", str(e.batch_size)]  # fmt: skip
    common = ["evaluate", "--policy", _stage(run, "ppo_ptx"), "--reference", _stage(run, "sft"),
              "--reward_model", _stage(run, "rm"), *flags]  # fmt: skip
    main.main([*common, "--prompts", prompts, "--workdir", str(tmp_path / "world")])
    got = json.load(open(tmp_path / "world" / "evaluation.json"))
    want = json.load(open(os.path.join(workdir, "evaluate", "evaluation.json")))["models"]
    assert got["judge"] == "world held-out labelers"
    policy, reference = got["models"]["policy"], got["models"]["reference"]
    assert policy["win_rate_vs_reference"] == want["ppo_ptx"]["win_rate_vs_sft"]
    for key in ("gold_score", "likert", "rm_score"):
        assert policy[key] == pytest.approx(want["ppo_ptx"][key], rel=1e-6), key
    assert policy["kl_to_reference"] == pytest.approx(want["ppo_ptx"]["kl_to_sft"], abs=1e-5)
    assert reference["win_rate_vs_reference"]["mean"] == 0.5
    assert reference["kl_to_reference"] == 0.0
    assert "| policy |" in open(tmp_path / "world" / "report.md").read()

    plain = tmp_path / "prompts.jsonl"  # the same prompts, away from the world's directory
    plain.write_text(
        "".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in _eval_records(run))
    )
    main.main([*common, "--prompts", str(plain), "--workdir", str(tmp_path / "rm")])
    by_rm = json.load(open(tmp_path / "rm" / "evaluation.json"))
    assert by_rm["judge"] == "reward model"
    p = by_rm["models"]["policy"]
    assert p["win_rate_vs_reference"] == p["rm_win_rate_vs_reference"]
    assert p["rm_score"] == pytest.approx(policy["rm_score"], rel=1e-6)
    answers = [json.loads(x)["response"] for x in open(tmp_path / "rm" / "samples_policy.jsonl")]
    assert answers == [
        json.loads(x)["response"] for x in open(tmp_path / "world" / "samples_policy.jsonl")
    ]
    with pytest.raises(main.config_lib.ConfigError, match="--reward_model"):
        main.main(["evaluate", "--policy", _stage(run, "ppo"), "--reference", _stage(run, "sft"),
                   "--prompts", str(plain), "--workdir", str(tmp_path / "x")])  # fmt: skip


def test_evaluation_reuses_what_was_evaluated_in_the_same_context(run, tmp_path):
    """A model evaluated before (the same run of its stage, prompted the same way, at the same
    settings, world, SFT and RM) is taken as it was; a new one is judged against the reused SFT
    answers and gets exactly the numbers evaluating everything afresh gave (PPO-ptx here,
    left out of the earlier evaluation)."""
    config, workdir = run[0], run[1]
    section = pipeline.resolve(config, workdir)["evaluate"]
    before = json.load(open(os.path.join(workdir, "evaluate", "evaluation.json")))
    earlier = tmp_path / "earlier"  # the pipeline's evaluation without PPO-ptx
    shutil.copytree(os.path.join(workdir, "evaluate"), earlier)
    del before["provenance"]["models"]["ppo_ptx"]
    (earlier / "evaluation.json").write_text(json.dumps(before))
    models = {m: _stage(run, m) for m in ("sft", "ppo", "ppo_ptx")}
    got = evaluate.run(section, str(tmp_path / "now"), models=models, reuse=[str(earlier)])
    assert got["models"] == {m: before["models"][m] for m in models}
    for m in models:
        answers = (open(os.path.join(d, f"samples_{m}.jsonl")).read()
                   for d in (tmp_path / "now", os.path.join(workdir, "evaluate")))  # fmt: skip
        assert next(answers) == next(answers), m
    info = json.load(open(tmp_path / "now" / "run_info.json"))
    assert info["seconds"]["sampling"] > 0  # PPO-ptx was sampled: it was not reused
    # Another context (a setting, or the SFT stage trained again) reuses nothing.
    context = before["provenance"]["context"]
    assert evaluate._reusable([str(earlier)], context)
    assert not evaluate._reusable([str(earlier)], {**context, "settings": {}})
    sft = tmp_path / "sft"
    shutil.copytree(_stage(run, "sft"), sft)
    first = evaluate._fingerprint(str(sft))
    with open(sft / "run_info.json", "a") as f:
        f.write(" ")
    assert evaluate._fingerprint(str(sft)) != first


def test_best_of_n_scores_with_the_reward_model_s_own_readout(run, tmp_path):
    """Best-of-n of an SFT stage whose config reads rewards another way (an SFT from before the
    RM's readout, here its run_info.json says "last") ranks with the RM's own readout: the
    same picks, RM scores and judgements as the SFT of the RM's own run. It once loaded the RM
    with the SFT's config and refused it."""
    config, workdir = run[0], run[1]
    c = config.copy_and_resolve_references()
    c.stages = ["world", "pretrain", "sft", "rankings", "rm", "best_of_n"]
    section = pipeline.resolve(c, workdir)["best_of_n"]
    section.n = [1, 2]
    sft = tmp_path / "sft_last"
    shutil.copytree(_stage(run, "sft"), sft)
    info = json.load(open(sft / "run_info.json"))
    assert info["config"]["model"]["reward_readout"] == "mean"
    info["config"]["model"]["reward_readout"] = "last"
    (sft / "run_info.json").write_text(json.dumps(info))
    want = best_of_n.run(section, str(tmp_path / "own"))
    section.policy = str(sft)
    got = best_of_n.run(section, str(tmp_path / "last"))
    assert got == want
    assert want["models"]["best_of_1"]["rm_score"] <= want["models"]["best_of_2"]["rm_score"]


def test_variants_reuse_the_pipelines_own_policies_when_their_settings_match(experiments):
    """A variant with the settings of the pipeline's PPO or PPO-ptx is that stage, nothing
    retrained (the overrides once leaked into the pipeline's own PPO config before the match,
    so PPO-ptx's settings matched plain PPO and every sweep row reused PPO)."""
    module, workdir = experiments
    config = module.common.base_config(True)
    variant = functools.partial(module.common.ppo_variant, config, workdir, "v")
    assert variant({"ptx.coef": float(config.ptx_coef)}) == os.path.join(workdir, "ppo_ptx")
    assert variant({"ptx.coef": 0.0}) == os.path.join(workdir, "ppo")


def test_seeds_table_pools_the_seeds_reports(experiments, tmp_path):
    """The seeds experiment on one done pipeline (linked in as seed 0): one row per model, and
    the pooled interval over one seed is that seed's own."""
    module, workdir = experiments
    os.symlink(workdir, tmp_path / "seed_0")
    path = module.main(["seeds", "--seeds", "0", "--workdir", str(tmp_path), "--tiny"])
    results = json.load(open(path.replace(".md", ".json")))
    rep = json.load(open(os.path.join(workdir, "report.json")))
    rows = {(r["seed"], r["model"]): r for r in results["rows"]}
    assert rows[0, "ppo_ptx"]["win_rate_vs_sft"] == rep["models"]["ppo_ptx"]["win_rate_vs_sft"]
    assert rows[0, "sft"]["rm_acc_train"] == rep["reward_model"]["accuracy_train_labelers"]
    pooled = results["pooled"]["ppo_ptx"]
    own = rep["models"]["ppo_ptx"]["win_rate_vs_sft"]
    np.testing.assert_allclose([pooled[k] for k in ("mean", "low", "high")],
                               [own[k] for k in ("mean", "low", "high")], atol=1e-9)  # fmt: skip


def test_pooled_interval_is_the_interval_of_the_pooled_outcomes(experiments):
    module, _ = experiments
    rng = np.random.default_rng(3)
    sizes = ((50, [0.3, 0.2, 0.5]), (80, [0.5, 0.1, 0.4]), (31, [0.2, 0.6, 0.2]))
    samples = [rng.choice([0.0, 0.5, 1.0], size=n, p=p) for n, p in sizes]
    got = module.pooled_interval([evaluate.interval(x) for x in samples])
    want = evaluate.interval(np.concatenate(samples))
    for key in ("mean", "low", "high", "n"):
        np.testing.assert_allclose(got[key], want[key], rtol=1e-12)
