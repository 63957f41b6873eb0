"""Sources: every real format in ../shared/data, the backends, and bad input."""

import collections
import gzip
import json
import os

import pytest

from instructrl.data import sources
from instructrl.data.lm import DataError

HH = ("preferences", "hh-rlhf-harmless-base-test.jsonl.gz")
OASST = ("preferences", "oasst-en-100-trees.jsonl")


def _jsonl(path):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def test_hh_rlhf_splits_real_transcripts_into_prompt_and_final_turns(shared_data):
    path = os.path.join(shared_data, *HH)
    raw = _jsonl(path)
    rankings, skipped = sources.read_rankings(path)
    assert len(rankings) == len(raw) == 2312 and skipped == 0
    simple, empty, repeated_role = 0, 0, 0
    for r, row in zip(rankings, raw, strict=True):
        chosen, rejected = r["responses"]
        assert r["ranks"] == [0, 1]
        # Lossless: prompt + reply gives back each transcript.
        assert r["prompt"] + chosen == row["chosen"] and r["prompt"] + rejected == row["rejected"]
        assert r["prompt"].startswith("\n\nHuman:") and r["prompt"].endswith("\n\nAssistant:")
        assert chosen != rejected
        empty += not chosen.strip()
        # Reference split for ordinary pairs: at the last "Assistant:" of each transcript.
        a, b = row["chosen"].rfind("\n\nAssistant:"), row["rejected"].rfind("\n\nAssistant:")
        if row["chosen"][:a] == row["rejected"][:b]:
            simple += 1
            assert r["prompt"] == row["chosen"][: a + len("\n\nAssistant:")]
        roles = [m["role"] for m in r["messages"]]
        assert roles[0] == "user" and roles[-1] == "user"
        repeated_role += any(x == y for x, y in zip(roles, roles[1:], strict=False))
    # 5 transcripts carry "Assistant:" / "Human:" text inside the final reply; 4 labelers
    # preferred an empty final turn (a real preference, kept); 4 prompts have two assistant
    # turns in a row.
    assert simple == 2312 - 5 and empty == 4 and repeated_role == 4
    first = rankings[0]
    assert first["messages"][0] == {
        "role": "user",
        "content": "what are some pranks with a pen i can do?",
    }
    assert first["responses"][0].startswith(" No, sorry!  All of these involve a pen")
    prompts, _ = sources.read_prompts(path)
    assert prompts == [r["prompt"] for r in rankings]


def _walk_groups(message, thread, out):
    """Independent reference: (thread texts, [(rank, text)]) of ranked assistant groups."""
    thread = [*thread, message["text"]]
    ranked = [(m["rank"], m["text"]) for m in message["replies"] if m.get("rank") is not None]
    if len(ranked) >= 2:
        out.append((thread, ranked))
    for m in message["replies"]:
        _walk_groups(m, thread, out)


def test_oasst_trees_become_k_way_rankings_and_best_replies(shared_data):
    path = os.path.join(shared_data, *OASST)
    reference = []
    for tree in _jsonl(path):
        _walk_groups(tree["prompt"], [], reference)
    rankings, skipped = sources.read_rankings(path)
    assert skipped == 0 and len(rankings) == len(reference) == 212
    ks = collections.Counter(len(r["responses"]) for r in rankings)
    assert ks == collections.Counter(len(g) for _, g in reference)
    assert min(ks) == 2 and max(ks) == 9  # K varies per prompt
    got = {(tuple(m["content"] for m in r["messages"]), tuple(r["responses"])) for r in rankings}
    want = {(tuple(t), tuple(text for _, text in g)) for t, g in reference}
    assert got == want
    for r in rankings:
        assert sorted(r["ranks"]) == list(range(len(r["ranks"])))
        if len(r["messages"]) == 1:
            assert r["prompt"] == r["messages"][0]["content"]
        else:
            assert r["prompt"].startswith("User: ") and "\n\nAssistant: " in r["prompt"]
    demos, _ = sources.read_demonstrations(path)
    assert len(demos) == 212
    best = {(tuple(t), min(g)[1]) for t, g in reference}
    assert {(tuple(m["content"] for m in d["messages"]), d["response"]) for d in demos} == best


def test_alpaca_5000(shared_data):
    path = os.path.join(shared_data, "demonstrations", "alpaca-5000.json")
    raw = json.load(open(path))
    # Two real records have an empty output: an error by default, counted when skipped.
    with pytest.raises(DataError, match=r"alpaca-5000.json: record \d+: field 'output' is empty"):
        sources.read_demonstrations(path)
    demos, invalid = sources.read_demonstrations(path, skip_invalid=True)
    assert len(demos) == 4998 and invalid == 2 and len(raw) == 5000
    kept = [r for r in raw if r["output"].strip()]
    for d, r in zip(demos, kept, strict=True):
        want = r["instruction"] + (f"\n\n{r['input']}" if r["input"].strip() else "")
        assert d == {"prompt": want, "response": r["output"]}


def test_self_instruct_seed_tasks_and_prompt_sets(shared_data):
    path = os.path.join(shared_data, "demonstrations", "self-instruct-seed-tasks.jsonl")
    raw = _jsonl(path)
    demos, skipped = sources.read_demonstrations(path)
    assert skipped == 0 and len(raw) == 175
    assert len(demos) == sum(len(t["instances"]) for t in raw)
    task = next(t for t in raw if t["instances"][0]["input"])
    inst = task["instances"][0]
    assert {
        "prompt": f"{task['instruction']}\n\n{inst['input']}",
        "response": inst["output"],
    } in demos
    prompts, _ = sources.read_prompts(
        os.path.join(shared_data, "prompts", "self-instruct-user-oriented.jsonl")
    )
    assert len(prompts) == 252
    farm = os.path.join(shared_data, "prompts", "alpacafarm-eval-805.json")
    prompts, _ = sources.read_prompts(farm)
    first = json.load(open(farm))[0]
    assert len(prompts) == 805 and prompts[0] == sources.join_input(
        first["instruction"], first["input"]
    )


def test_local_backends_read_the_same_records(tmp_path):
    import datasets

    records = [
        {"prompt": "p1", "response": "r1"},
        {"prompt": "p2", "response": "r2"},
    ]
    want = [{"prompt": r["prompt"], "response": r["response"]} for r in records]
    jsonl = tmp_path / "d.jsonl.gz"
    with gzip.open(jsonl, "wt") as f:
        f.write("\n".join(json.dumps(r) for r in records))
    ds = datasets.Dataset.from_list(records)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "d.json").write_text(json.dumps(records))
    for name in ("d.jsonl.gz", "d.parquet", "saved", "d.json"):
        got, skipped = sources.read_demonstrations(str(tmp_path / name))
        assert got == want and skipped == 0, name
    datasets.Dataset.from_list([{"prompt": "p", "response": ""}]).to_parquet(
        str(tmp_path / "bad.parquet")
    )
    with pytest.raises(DataError, match=r"bad.parquet: record 1: field 'response' is empty"):
        sources.read_demonstrations(str(tmp_path / "bad.parquet"))


def test_comparisons_tldr_and_rankings_formats(tmp_path):
    path = tmp_path / "tldr.jsonl"
    row = {
        "info": {"post": "My cat hates mornings.", "title": "Cat", "subreddit": "cats"},
        "summaries": [{"text": " cat sleeps"}, {"text": " cat wakes"}],
        "choice": 1,
    }
    path.write_text(json.dumps(row) + "\n")
    (r,), _ = sources.read_rankings(str(path))
    assert r["prompt"] == "SUBREDDIT: r/cats\nTITLE: Cat\nPOST: My cat hates mornings.\nTL;DR:"
    assert r["responses"] == [" cat wakes", " cat sleeps"] and r["ranks"] == [0, 1]
    pairs, _ = sources.read_comparisons(str(path))
    assert pairs == [{"prompt": r["prompt"], "chosen": " cat wakes", "rejected": " cat sleeps"}]
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n")
    assert sources.read_rankings(str(path))[0] == [
        {"prompt": "q", "responses": ["a", "b"], "ranks": [0, 1]}
    ]
    path = tmp_path / "ranks.jsonl"
    path.write_text(
        json.dumps({"prompt": "q", "responses": ["a", "b", "c"], "ranks": [2, 0, 1], "labeler": 7})
        + "\n"
    )
    (r,), _ = sources.read_rankings(str(path))
    assert r["ranks"] == [2, 0, 1] and r["labeler_id"] == "7"


@pytest.mark.parametrize(
    "lines, fmt, message",
    [
        # A JSONL line cut short (a truncated download).
        (['{"prompt": "p", "response": "r"}', '{"prompt": "p", "re'], "auto", r":2: malformed"),
        (['{"prompt": "p"}'], "prompt_response", r":1: missing field 'response'"),
        (['{"prompt": "p", "response": 3}'], "auto", r":1: field 'response' must be str, got int"),
        (['{"prompt": "p", "response": " "}'], "auto", r":1: field 'response' is empty"),
        (['{"instruction": "i", "instances": [{"input": "", "output": 5}]}'], "auto",
         r":1: field 'instances\[0\].output' must be str"),
        (['{"prompt": {"text": "q", "role": "prompter", "replies": '
          '[{"text": 1, "role": "assistant", "rank": 0, "replies": []}]}}'],
         "oasst", r":1: field 'prompt.replies\[0\].text' must be str"),
        (['{"chosen": "\\n\\nHuman: a", "rejected": "\\n\\nHuman: b"}'], "auto",
         r":1: field 'chosen' shares no"),
        (['{"prompt": "p", "responses": ["a", "b"], "ranks": [0, "1"]}'], "auto",
         r":1: field 'ranks\[1\]' must be int, got str"),
        (['{"prompt": "p", "responses": ["a"], "ranks": [0]}'], "auto", r":1: field 'ranks' needs"),
    ],
)  # fmt: skip
def test_bad_input_names_file_line_and_field_or_is_counted(tmp_path, lines, fmt, message):
    path = tmp_path / "bad.jsonl"
    good = lines[0] if len(lines) > 1 else None
    path.write_text("\n".join(lines) + "\n")
    kind = "rankings" if "ranks" in lines[-1] or "chosen" in lines[-1] else "demonstrations"
    if "replies" in lines[-1]:
        kind = "rankings"
    read = sources.read_rankings if kind == "rankings" else sources.read_demonstrations
    with pytest.raises(DataError, match="bad.jsonl" + message):
        read(str(path), format=fmt)
    items, skipped = read(str(path), format=fmt, skip_invalid=True)
    assert skipped == 1 and len(items) == (1 if good else 0)


def test_undetectable_format_names_the_record(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"foo": 1}\n')
    with pytest.raises(DataError, match=r"x.jsonl:1: cannot detect .* \(set data.format\)"):
        sources.read_demonstrations(str(path))
    with pytest.raises(ValueError, match="holds no demonstrations"):
        sources.read_demonstrations(str(path), format="hh_rlhf")
