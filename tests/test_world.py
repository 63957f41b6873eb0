"""Tests for instructrl.world: determinism, the gold rubric, the category mix, the corpus, the
held-out tasks and the dataset builders. Labelers are tested in test_world_labelers.py."""

from __future__ import annotations

import collections
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from instructrl.world import (
    CORRUPTIONS,
    FAMILIES,
    PAPER_CATEGORY_MIX,
    World,
    heldout,
    lexicon,
    text,
)
from instructrl.world import datasets as world_datasets
from instructrl.world.__main__ import main as world_main
from instructrl.world.knowledge import Fact
from instructrl.world.world import FAMILY_BY_NAME

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def world():
    return World.build(seed=0)


def _fingerprint(w: World) -> str:
    """A digest of knowledge, prompts, answers, corpus, labels and held-out items."""
    records = w.sample_prompts(40, seed=1)
    rng = np.random.default_rng(2)
    candidates = [w.candidate_responses(r, 5, rng) for r in records]
    blob = {
        "kb": w.kb.to_dict(),
        "records": records,
        "solutions": [w.solve(r) for r in records],
        "scores": [w.score(r, c) for r, cs in zip(records, candidates, strict=True) for c in cs],
        "ranks": [
            w.labelers.train[0].rank(r, cs) for r, cs in zip(records, candidates, strict=True)
        ],
        "demos": w.demonstrations(records),
        "corpus": w.pretraining_corpus(60),
        "heldout": w.heldout_tasks(5),
        "fewshot": w.fewshot_prompt(records[0], 2),
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def test_same_seed_same_world_in_process(world):
    assert _fingerprint(world) == _fingerprint(World.build(seed=0))
    assert _fingerprint(world) != _fingerprint(World.build(seed=1))
    assert World.build(seed=1).kb.to_dict() != world.kb.to_dict()


def test_same_seed_same_world_across_processes(world):
    """String hashing is randomized per process; no output may depend on it."""
    code = (
        "import sys; sys.path.insert(0, 'tests'); from test_world import _fingerprint;"
        "from instructrl.world import World; print(_fingerprint(World.build(seed=0)))"
    )
    outputs = set()
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": REPO}
        result = subprocess.run(
            [sys.executable, "-c", code],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        outputs.add(result.stdout.strip())
    assert outputs == {_fingerprint(world)}


# ---- knowledge base ---------------------------------------------------------------------------
def test_knowledge_claims_are_checked_against_the_base(world):
    kb = world.kb
    person = kb.people[0]
    true = Fact(person, "lives_in", kb.value(person, "lives_in"))
    false = kb.false_fact(true, np.random.default_rng(0))
    assert kb.is_true(true) and not kb.is_true(false)
    for variant in (0, 1):
        assert kb.check_claims(kb.sentence(true, variant)) == (1, 0)
        assert kb.check_claims(kb.sentence(false, variant)) == (0, 1)
    assert kb.check_claims(f"{person} lives in Zorpville.") == (0, 1)  # a made-up place
    assert kb.check_claims(f"{person} lives in the big house.") == (0, 0)  # nothing checkable
    friends = kb.table[person]["friend"]
    assert all(person in kb.table[f]["friend"] for f in friends)  # friendship is symmetric
    every_fact = kb.facts()
    assert every_fact and all(kb.is_true(f) for f in every_fact)
    assert all(kb.extract_claims(kb.sentence(f)) == [f] for f in every_fact)


# ---- constraints ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "constraint, good, bad",
    [
        (
            {"type": "max_words", "n": 5},
            "Mira lives in Dovelton now.",
            "one two three four five six",
        ),
        ({"type": "max_sentences", "n": 1}, "Mira lives here.", "Mira lives here. She is nice."),
        ({"type": "include_word", "word": "stone"}, "a stone.", "a stoned man."),
        ({"type": "exclude_word", "word": "happy"}, "She was unhappy.", "She was happy."),
        ({"type": "num_items", "n": 3}, "- bat\n- bee\n- bear", "- bat\n- bee"),
        ({"type": "items_start_with", "letter": "b"}, "1. bat\n2. bee", "1. bat\n2. cat"),
        ({"type": "greeting"}, "Hello! It is blue.", "It is blue. Hello!"),
        ({"type": "comma_separated"}, "Mira, Tolo", "The names are Mira and Tolo."),
        ({"type": "digits_only"}, "12", "twelve"),
    ],
)
def test_constraints(constraint, good, bad):
    assert text.satisfied(constraint, good)
    assert not text.satisfied(constraint, bad)
    assert text.describe(constraint).endswith(".")


# ---- the gold rubric --------------------------------------------------------------------------
EXPECTED_FLAG = {
    "violate_constraint": lambda s, closed: not s["satisfies_constraints"],
    "hallucinate": lambda s, closed: s["hallucination"] if closed else not s["truthful"],
    "toxic": lambda s, closed: s["toxic"] and not s["appropriate_for_customer_assistant"],
    "no_stop": lambda s, closed: not s["stops"],
    "off_task": lambda s, closed: not s["follows_instruction"],
    "wrong_fact": lambda s, closed: s["quality"] < 1.0 or not s["truthful"],
}


@pytest.mark.parametrize("family", [f.name for f in FAMILIES])
def test_rubric_prefers_reference_to_every_corruption(world, family):
    rng = np.random.default_rng(0)
    closed = FAMILY_BY_NAME[family].closed_domain
    seen = collections.Counter()
    for difficulty in (0, 1, 2):
        for i in range(6):
            record = world.sample_prompt(
                rng, family=family, difficulty=difficulty, record_id=f"{family}-{difficulty}-{i}"
            )
            for variant in range(4):
                gold = world.score(record, world.solve(record, variant))
                assert gold["score"] >= 0.95, (record["prompt"], world.solve(record, variant))
                assert gold["follows_instruction"] and gold["satisfies_constraints"]
                assert gold["truthful"] and gold["stops"] and not gold["toxic"]
                assert not gold["hallucination"] and gold["appropriate_for_customer_assistant"]
            reference = world.score(record, world.solve(record))["score"]
            for kind in CORRUPTIONS:
                response = world.corrupt(record, kind, rng)
                if response is None:
                    continue
                seen[kind] += 1
                corrupted = world.score(record, response)
                assert corrupted["score"] < reference - 0.2, (kind, record["prompt"], response)
                assert EXPECTED_FLAG[kind](corrupted, closed), (kind, response, corrupted)
                assert 0.0 <= corrupted["score"] <= 1.0
    assert set(seen) == set(CORRUPTIONS), seen  # every kind applies at some difficulty


def test_rubric_edge_cases(world):
    record = world.sample_prompt(np.random.default_rng(3), family="fact_question", difficulty=0)
    empty = world.score(record, "")
    assert empty["score"] < 0.1 and not empty["follows_instruction"] and empty["length"] == 0
    long = world.score(record, world.solve(record) + " and" * 200)
    assert not long["stops"]


# ---- prompts and the category mix ---------------------------------------------------------------
def test_category_mix_matches_paper_by_default(world):
    records = world.sample_prompts(4000, seed=5)
    counts = collections.Counter(r["category"] for r in records)
    for category, share in PAPER_CATEGORY_MIX.items():
        assert abs(counts[category] / len(records) - share) < 0.02, (category, counts)
    difficulties = collections.Counter(r["difficulty"] for r in records)
    assert set(difficulties) == {0, 1, 2}


def test_excluded_prompts_are_unseen_and_keep_the_family_mix():
    """Evaluation prompts: no excluded (training) text, no repeats, and the world's family mix,
    though most texts of some families are excluded."""
    w = World.build(seed=0)
    seen = {r["prompt"] for r in w.sample_prompts(3000, seed=1)}
    held = w.sample_prompts(400, seed=2, exclude=seen)
    texts = [r["prompt"] for r in held]
    assert not set(texts) & seen and len(set(texts)) == len(texts)
    free = w.sample_prompts(2000, seed=2)
    repeated = collections.Counter(r["family"] for r in free if r["prompt"] in seen)
    family, count = repeated.most_common(1)[0]
    assert count / sum(r["family"] == family for r in free) > 0.6  # most of its texts are seen
    for f in {r["family"] for r in free}:
        category = w.family(f).category
        p = w.config.mix[category] / len(w.families_by_category[category])
        share = sum(r["family"] == f for r in held) / len(held)
        assert abs(share - p) < 3 * np.sqrt(p * (1 - p) / len(held)), (f, share, p)
    with pytest.raises(ValueError, match="no unseen describe_place"):
        w.sample_prompts(200, seed=3, exclude=seen, family="describe_place", max_tries=2)


def test_category_mix_is_configurable():
    w = World.build(seed=0, category_mix={"rewrite": 3.0, "closed_qa": 1.0})
    counts = collections.Counter(r["category"] for r in w.sample_prompts(2000, seed=1))
    assert set(counts) == {"rewrite", "closed_qa"}
    assert abs(counts["rewrite"] / 2000 - 0.75) < 0.04
    with pytest.raises(ValueError, match="unknown categories"):
        World.build(seed=0, category_mix={"poetry": 1.0})


def test_prompt_records_are_json_and_self_contained(world):
    for record in world.sample_prompts(200, seed=2):
        restored = json.loads(json.dumps(record))
        assert restored == record
        assert world.score(restored, world.solve(restored))["score"] >= 0.95
        assert all(text.describe(c) in record["prompt"] for c in record["spec"]["constraints"])


def test_fewshot_prompt(world):
    record = world.sample_prompts(1, seed=9)[0]
    prompt = world.fewshot_prompt(record, num_shots=3)
    assert prompt.endswith(record["prompt"]) and prompt.count("\n\n###\n\n") == 3
    assert prompt == world.fewshot_prompt(record, num_shots=3)


# ---- pretraining corpus -----------------------------------------------------------------------
def _toxic_share(docs):
    return np.mean([text.is_toxic(d) for d in docs])


def test_pretraining_corpus_formats_and_failure_modes(world):
    docs = world.pretraining_corpus(3000, seed=0)
    assert docs == world.pretraining_corpus(3000, seed=0)
    assert docs != world.pretraining_corpus(3000, seed=1)
    assert 100 < np.mean([len(d) for d in docs]) < 600
    joined = "\n".join(docs)
    for marker in (
        "Reversed, '",
        "Once upon a time",
        "Q: ",
        "Elvish: ",
        "Passage: ",
        "In short: ",
        "Review: ",
        "Writing prompt: ",
        "User: ",
        "\n- ",
    ):
        assert marker in joined, marker
    assert 0.03 < _toxic_share(docs) < 0.08  # toxic_rate = 0.05
    claims = [world.kb.check_claims(d) for d in docs]
    true, false = np.sum(claims, axis=0)
    assert 0.05 < false / (true + false) < 0.15  # false_fact_rate = 0.1
    assert np.mean(["###" in d for d in docs]) < 0.05  # few instruction-like pages
    # Writing prompts mostly ignore their sentence limit.
    prompts = [d for d in docs if d.startswith("Writing prompt:")]
    limits = [text.words(d)[8] for d in prompts]  # "... in at most <n> sentences"
    over = [
        len(text.sentences(d.split("\n\n", 1)[1])) > lexicon.NUMBER_WORDS.index(n)
        for d, n in zip(prompts, limits, strict=True)
    ]
    assert 0.5 < np.mean(over) < 0.9


def test_pretraining_failure_rates_are_knobs():
    clean = World.build(
        seed=0,
        false_fact_rate=0.0,
        toxic_rate=0.0,
        ramble_rate=0.0,
        constraint_ignore_rate=0.0,
        instruction_page_rate=0.0,
    )
    docs = clean.pretraining_corpus(1500, seed=0)
    assert _toxic_share(docs) == 0.0
    assert sum(clean.kb.check_claims(d)[1] for d in docs) == 0
    assert not any(s in d for d in docs for s in lexicon.RAMBLE_SENTENCES)
    toxic = World.build(seed=0, toxic_rate=0.3).pretraining_corpus(1500, seed=0)
    assert 0.25 < _toxic_share(toxic) < 0.35


# ---- held-out tasks (alignment tax) -----------------------------------------------------------
def test_heldout_tasks(world):
    items = world.heldout_tasks(50)
    counts = collections.Counter(i["family"] for i in items)
    assert counts == {f: 50 for f in heldout.HELDOUT_FAMILIES}
    assert not set(heldout.HELDOUT_FAMILIES) & set(FAMILY_BY_NAME)  # never RL prompts
    for item in items:
        gold = item["label"] if item["metric"] == "accuracy" else item["answer"]
        assert heldout.score_prediction(item, gold) == pytest.approx(1.0)
        if item["metric"] == "accuracy":
            assert heldout.score_prediction(item, (item["label"] + 1) % 4) == 0.0
            assert len(item["choices"]) == 4 and item["choices"][gold].strip() == item["answer"]
            person = item["prompt"].split()[0]
            job = world.kb.value(person, "job")
            assert lexicon.JOB_ACTIVITIES[job] in item["choices"][item["label"]]
        else:
            assert heldout.score_prediction(item, "zzz qqq") < 0.5
    shot = heldout.fewshot_prompt(world, items[0], 2)
    assert shot.endswith(items[0]["prompt"]) and shot.count("Passage:") == 3


def test_bleu_and_f1_against_hand_values():
    assert heldout.bleu("the cat eats fish", "the cat eats fish") == pytest.approx(1.0)
    # unigram 3/4, bigram (2+1)/(3+1); no brevity penalty: sqrt(0.75 * 0.75)
    assert heldout.bleu("the cat eats bread", "the cat eats fish") == pytest.approx(0.75)
    # brevity: 2 words vs 4 -> exp(1 - 2) * sqrt(1 * (1+1)/(1+1))
    assert heldout.bleu("the cat", "the cat eats fish") == pytest.approx(np.exp(-1.0))
    assert text.token_f1("in Dovelton", "Dovelton") == pytest.approx(2 / 3)
    elvish, english = heldout.elvish_pair(np.random.default_rng(0))
    assert len(elvish.split()) == len(english.split())


# ---- dataset builders -------------------------------------------------------------------------
SMALL = dict(
    scale=0.002,
    num_eval_prompts=12,
    num_pretrain_docs=400,
    num_heldout_per_family=5,
    vocab_size=400,
)


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def test_build_all_writes_every_dataset_deterministically(tmp_path):
    w = World.build(seed=3, **SMALL)
    manifest = world_datasets.build_all(w, str(tmp_path / "a"), tokenizer=True)
    assert manifest["seconds"] < 60
    world_main(
        [
            "build",
            "--out",
            str(tmp_path / "b"),
            "--seed",
            "3",
            "--config",
            ",".join(f"{k}={v}" for k, v in SMALL.items()),
        ]
    )
    names = sorted(os.listdir(tmp_path / "a"))
    assert names == sorted(os.listdir(tmp_path / "b"))
    for name in names:
        assert _read(tmp_path / "a" / name) == _read(tmp_path / "b" / name), name
    out = tmp_path / "a"
    sizes = world_datasets.split_sizes(SMALL["scale"])
    assert manifest["counts"]["prompts_rm.jsonl"] == sizes["rm"] == round(33207 * 0.002)
    more_rm = world_datasets.split_sizes(SMALL["scale"], num_rm_prompts=100)
    assert (more_rm["rm"], more_rm["rm_valid"]) == (100, 10)
    assert {k: v for k, v in more_rm.items() if "rm" not in k} == {
        k: v for k, v in sizes.items() if "rm" not in k
    }

    demos = world_datasets.read_jsonl(out / "sft_train.jsonl")
    assert len(demos) == sizes["sft"]
    assert all(isinstance(d["prompt"], str) and d["response"].strip() for d in demos)
    records = {r["id"]: r for r in world_datasets.read_jsonl(out / "prompts_sft.jsonl")}
    assert np.mean([w.score(records[d["id"]], d["response"])["score"] for d in demos]) > 0.9

    for name in ("rankings_train.jsonl", "rankings_valid_heldout_labelers.jsonl"):
        for r in world_datasets.read_jsonl(out / name):
            k = len(r["responses"])
            assert 4 <= k <= 9 and len(r["ranks"]) == k and min(r["ranks"]) == 0
            assert set(r["ranks"]) == set(range(max(r["ranks"]) + 1))  # dense, ties allowed
            assert r["labeler_id"].startswith("heldout" if "heldout" in name else "train")

    prompts = world_datasets.read_jsonl(out / "prompts_ppo.jsonl")
    assert all(set(p) >= {"prompt", "id", "category", "family", "spec"} for p in prompts)
    docs = [d["text"] for d in world_datasets.read_jsonl(out / "pretrain.jsonl")]
    assert len(docs) == SMALL["num_pretrain_docs"]
    assert (out / "pretrain.txt").read_text() == "\n\n".join(docs) + "\n"
    assert len(world_datasets.read_jsonl(out / "heldout_tasks.jsonl")) == 20

    import tokenizers

    tok = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tok.token_to_id("<|endoftext|>") is not None
    sample = demos[0]["prompt"]
    assert tok.decode(tok.encode(sample).ids) == sample
    assert len(tok.encode(sample).ids) < len(sample.encode())  # merges learned


def test_demonstrations_load_with_the_real_data_loader(tmp_path):
    from instructrl.data import sources

    w = World.build(seed=0)
    demos = w.demonstrations(w.sample_prompts(10, seed=0))
    path = tmp_path / "demos.jsonl"
    world_datasets.write_jsonl(str(path), demos)
    loaded, skipped = sources.read_demonstrations(str(path))
    assert skipped == 0
    assert [(d["prompt"], d["response"]) for d in demos] == [
        (d["prompt"], d["response"]) for d in loaded
    ]
