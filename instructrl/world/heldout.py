"""Held-out "public NLP" task families: never prompted or rewarded in RL, only used to measure
the alignment tax (paper section 4.2, table 14; "PPO-ptx" should recover what "PPO" loses).

  read_qa        ~ SQuAD: answer a question from a passage (token F1).
  count_qa       ~ DROP: count over a passage (exact match).
  story_ending   ~ HellaSwag: pick the ending that follows (accuracy, by log-likelihood).
  translate      ~ WMT Fr->En: the invented "Elvish" language to English (BLEU-2).

The pretraining corpus contains these formats, so a base model learns them; an item is a dict
{"id", "family", "prompt", "answer", "choices" (list[str], empty unless multiple choice),
"label" (int index of the right choice, -1 if none), "metric"}. ``fewshot_prompt`` prefixes
solved items of the same family, the format of the paper's few-shot evaluations.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np

from instructrl.world import lexicon, text
from instructrl.world.knowledge import PERSON_RELATIONS, QUESTIONS, Fact
from instructrl.world.seeding import as_rng

HELDOUT_FAMILIES = ("read_qa", "count_qa", "story_ending", "translate")
METRICS = {"read_qa": "f1", "count_qa": "exact", "story_ending": "accuracy", "translate": "bleu"}

_EN_ADJECTIVES = ("big", "small", "red", "blue", "green", "old", "new", "happy", "sad")
_EN_NOUNS = ("cat", "dog", "house", "river", "hill", "boat", "friend", "market")


def _pick(rng, items):
    return items[int(rng.integers(len(items)))]


def _noun_phrase(rng) -> list[str]:
    words = [_pick(rng, ("the", "a", "my", "your"))]
    if rng.random() < 0.5:
        words.append(_pick(rng, _EN_ADJECTIVES))
    return words + [_pick(rng, ("cat", "dog", "friend"))]


def elvish_pair(rng: np.random.Generator) -> tuple[str, str]:
    """(Elvish sentence, English sentence). Elvish puts adjectives after nouns."""
    english = _noun_phrase(rng)
    verb = _pick(rng, ("sees", "goes", "eats", "is", "lives"))
    if verb == "sees":
        english += ["sees", "the", _pick(rng, ("boat", "river", "hill", "house"))]
    elif verb == "goes":
        english += ["goes", "to", "the", "market"]
    elif verb == "eats":
        english += ["eats", _pick(rng, ("bread", "fish"))]
    elif verb == "is":
        english += ["is", _pick(rng, ("big", "small", "happy", "sad", "old"))]
    else:
        english += ["lives", "in", "the", _pick(rng, ("house", "hill"))]
    return to_elvish(english), " ".join(english)


def to_elvish(english: list[str]) -> str:
    out, i = [], 0
    while i < len(english):
        word = english[i]
        nxt = english[i + 1] if i + 1 < len(english) else None
        if word in _EN_ADJECTIVES and nxt in _EN_NOUNS:
            out += [lexicon.ELVISH[nxt], lexicon.ELVISH[word]]
            i += 2
            continue
        out.append(lexicon.ELVISH[word])
        i += 1
    return " ".join(out)


def read_qa(world, rng):
    kb = world.kb
    a, b = (str(p) for p in rng.choice(kb.people, 2, replace=False))
    relations = [str(r) for r in rng.permutation(PERSON_RELATIONS)[:2]]
    facts = [Fact(p, r, kb.value(p, r)) for p in (a, b) for r in relations]
    target = facts[int(rng.integers(len(facts)))]
    passage = " ".join(kb.sentence(f, int(rng.integers(2))) for f in facts)
    question = QUESTIONS[target.relation][0].format(s=target.subject)
    return f"Passage: {passage}\nQuestion: {question}\nAnswer:", target.value, [], -1


def count_qa(world, rng):
    """How many people of a passage have a job; the passage states true facts only."""
    kb = world.kb
    holders = {j: [p for p in kb.people if kb.value(p, "job") == j] for j in lexicon.JOBS}
    job = _pick(rng, [j for j in lexicon.JOBS if holders[j]])
    count = int(rng.integers(1, min(3, len(holders[job])) + 1))
    others = [p for p in kb.people if p not in holders[job]]
    people = [str(p) for p in rng.choice(holders[job], count, replace=False)]
    people += [str(p) for p in rng.choice(others, int(rng.integers(1, 4)), replace=False)]
    passage = " ".join(
        f"{people[i]} works as a {kb.value(people[i], 'job')}."
        for i in rng.permutation(len(people))
    )
    question = f"How many people in the passage work as a {job}?"
    return f"Passage: {passage}\nQuestion: {question}\nAnswer:", str(count), [], -1


def story_context(person: str, job: str) -> str:
    return f"{person} works as a {job}. Every morning {person}"


def story_ending(world, rng):
    person = _pick(rng, world.kb.people)
    job = world.kb.value(person, "job")
    wrong = [str(j) for j in rng.choice([j for j in lexicon.JOBS if j != job], 3, replace=False)]
    choices = [" " + lexicon.JOB_ACTIVITIES[j] + "." for j in [job] + wrong]
    order = [int(i) for i in rng.permutation(4)]
    choices = [choices[i] for i in order]
    return story_context(person, job), choices[order.index(0)].strip(), choices, order.index(0)


def translate(world, rng):
    elvish, english = elvish_pair(rng)
    return f"Elvish: {elvish}\nEnglish:", english, [], -1


# family -> maker(world, rng) -> (prompt, answer, choices, label)
_MAKERS = {
    "read_qa": read_qa,
    "count_qa": count_qa,
    "story_ending": story_ending,
    "translate": translate,
}


def heldout_tasks(world, num_per_family: int, seed=None, families=HELDOUT_FAMILIES) -> list[dict]:
    """``num_per_family`` items of each held-out family (see the module docstring)."""
    rng = as_rng(world.config.seed if seed is None else seed, "heldout")
    items = []
    for family in families:
        for i in range(num_per_family):
            prompt, answer, choices, label = _MAKERS[family](world, rng)
            items.append(
                {
                    "id": f"{family}-{i:05d}",
                    "family": family,
                    "prompt": prompt,
                    "answer": answer,
                    "choices": choices,
                    "label": label,
                    "metric": METRICS[family],
                }
            )
    return items


def fewshot_prompt(world, item: dict, num_shots: int, seed=None) -> str:
    """``num_shots`` solved items of the item's family, blank-line separated, then the item."""
    rng = as_rng(world.config.seed if seed is None else seed, f"heldout-shots/{item['id']}")
    shots = []
    for _ in range(num_shots):
        prompt, answer, _, _ = _MAKERS[item["family"]](world, rng)
        shots.append(f"{prompt} {answer}")
    return "\n\n".join(shots + [item["prompt"]])


def bleu(prediction: str, reference: str, max_order: int = 2) -> float:
    """Sentence BLEU up to ``max_order``-grams with add-one smoothing and brevity penalty."""
    pred, ref = text.words(prediction), text.words(reference)
    if not pred:
        return 0.0
    log_precision = 0.0
    for n in range(1, max_order + 1):
        p_ngrams = Counter(tuple(pred[i : i + n]) for i in range(len(pred) - n + 1))
        r_ngrams = Counter(tuple(ref[i : i + n]) for i in range(len(ref) - n + 1))
        overlap = sum(min(c, r_ngrams[g]) for g, c in p_ngrams.items())
        if n == 1 and overlap == 0:
            return 0.0
        smooth = 0 if n == 1 else 1
        log_precision += math.log((overlap + smooth) / (sum(p_ngrams.values()) + smooth))
    log_precision /= max_order
    brevity = min(0.0, 1 - len(ref) / len(pred))
    return math.exp(brevity + log_precision)


def score_prediction(item: dict, prediction: str | int) -> float:
    """The item's metric in [0, 1]; for "accuracy" items ``prediction`` is a choice index.

    Free-form predictions are cut at the first newline (a base model keeps going).
    """
    if item["metric"] == "accuracy":
        return float(int(prediction) == item["label"])
    prediction = str(prediction).strip().split("\n")[0]
    if item["metric"] == "f1":
        return text.token_f1(prediction, item["answer"])
    if item["metric"] == "exact":
        return float(text.normalize(prediction) == text.normalize(item["answer"]))
    return bleu(prediction, item["answer"])
