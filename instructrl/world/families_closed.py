"""Closed-domain task families (the answer comes from text in the prompt): summarization,
extract, closed QA; and classification."""

from __future__ import annotations

import numpy as np

from instructrl.world import lexicon, text
from instructrl.world.knowledge import PERSON_RELATIONS, QUESTIONS, Fact
from instructrl.world.tasks import TaskFamily, fact_answer, grade_fact_answer, with_constraints

FILLER = (
    "The morning was calm.",
    "It had rained the night before.",
    "The market was busy that day.",
    "Birds sang in the trees.",
    "Nobody was in a hurry.",
)


def _pick(rng: np.random.Generator, items):
    return items[int(rng.integers(len(items)))]


def _passage(kb, facts: list[Fact], rng, num_filler: int) -> str:
    """Fact sentences (random paraphrases) with filler sentences mixed in."""
    sentences = [kb.sentence(f, int(rng.integers(2))) for f in facts]
    for _ in range(num_filler):
        sentences.insert(int(rng.integers(len(sentences) + 1)), _pick(rng, FILLER))
    return " ".join(sentences)


class SummarizeFamily(TaskFamily):
    """Summarize a short text about one person in one sentence. Knob: a word limit."""

    name, category, closed_domain, max_words = "summarize", "summarization", True, 45

    def sample_spec(self, kb, rng, difficulty):
        person = _pick(rng, kb.people)
        relations = ["job", "lives_in"] + [
            str(r) for r in rng.permutation(["pet", "color"])[: 1 + difficulty // 2]
        ]
        facts = [Fact(person, r, kb.value(person, r)) for r in relations]
        order = rng.permutation(len(facts))
        passage = _passage(kb, [facts[i] for i in order], rng, num_filler=1 + difficulty)
        constraints = [{"type": "max_sentences", "n": 1}]
        if difficulty >= 1:
            constraints.append({"type": "max_words", "n": 10 if difficulty == 1 else 7})
        return {
            "person": person,
            "key_values": [facts[0].value, facts[1].value],
            "passage": passage,
            "constraints": constraints,
        }

    def render(self, spec):
        head = with_constraints("Summarize the text below.", spec["constraints"])
        return f"{head}\n\nText: {spec['passage']}"

    def _summary(self, spec, job, place, variant):
        if variant % 2 == 0 and not any(
            c["type"] == "max_words" and c["n"] < 8 for c in spec["constraints"]
        ):
            return f"{spec['person']} is a {job} who lives in {place}."
        return f"{spec['person']}, a {job}, lives in {place}."

    def solve(self, kb, spec, variant=0):
        return self._summary(spec, *spec["key_values"], variant)

    def grade(self, kb, spec, response):
        if not text.contains_word(response, spec["person"]):
            return False, 0.0
        return True, sum(text.contains_word(response, v) for v in spec["key_values"]) / 2

    def wrong_answer(self, kb, spec, rng):
        job, place = spec["key_values"]
        wrong_job = _pick(rng, [j for j in lexicon.JOBS if j != job])
        return self._summary(spec, wrong_job, place, 0)

    def violate_constraint(self, kb, spec, rng):
        return spec["passage"]


class ExtractFamily(TaskFamily):
    """List the people (or towns) named in a text. Knob: comma-separated names only."""

    name, category, closed_domain, max_words = "extract_names", "extract", True, 30

    def sample_spec(self, kb, rng, difficulty):
        kind = _pick(rng, ("people", "towns"))
        people = [str(p) for p in rng.choice(kb.people, 2 + difficulty, replace=False)]
        towns = [str(t) for t in rng.choice(kb.places, 2, replace=False)]
        sentences = [
            f"{people[0]} met {people[1]} in {towns[0]}.",
            *(f"Later {p} came from {towns[1]} to join them." for p in people[2:]),
            f"They ate {_pick(rng, lexicon.FOODS)} by the {_pick(rng, lexicon.LANDSCAPES)}.",
        ]
        if len(people) == 2:
            sentences.append(f"Then they walked to {towns[1]}.")
        answers = people if kind == "people" else towns
        constraints = [{"type": "comma_separated"}] if difficulty >= 1 else []
        return {
            "kind": kind,
            "answers": answers,
            "passage": " ".join(sentences),
            "constraints": constraints,
        }

    def render(self, spec):
        what = "person" if spec["kind"] == "people" else "town"
        head = with_constraints(f"Name every {what} in the text below.", spec["constraints"])
        return f"{head}\n\nText: {spec['passage']}"

    def solve(self, kb, spec, variant=0):
        names = spec["answers"] if variant % 2 == 0 else spec["answers"][::-1]
        if spec["constraints"] or variant % 4 < 2:
            return ", ".join(names)
        return "\n".join(f"- {n}" for n in names)

    def grade(self, kb, spec, response):
        pool = kb.people if spec["kind"] == "people" else kb.places
        named = [n for n in kb.kind if text.contains_word(response, n)]
        if not named:
            return False, 0.0
        hits = sum(n in spec["answers"] for n in named)
        precision, recall = hits / len(named), hits / len(spec["answers"])
        on_task = any(n in pool for n in named)
        return on_task, 0.0 if hits == 0 else 2 * precision * recall / (precision + recall)

    def wrong_answer(self, kb, spec, rng):
        """Names of the wrong kind (towns for people, people for towns) from the text."""
        wrong_kind = [
            n
            for n in kb.kind
            if text.contains_word(spec["passage"], n) and n not in spec["answers"]
        ]
        return ", ".join(spec["answers"][:1] + wrong_kind)

    def violate_constraint(self, kb, spec, rng):
        if not spec["constraints"]:
            return None
        return "The names are " + " and ".join(spec["answers"]) + "."


class ClosedQAFamily(TaskFamily):
    """Answer a question from a given text only. Knob: a word limit, more distracting facts."""

    name, category, closed_domain, max_words = "read_and_answer", "closed_qa", True, 40

    def sample_spec(self, kb, rng, difficulty):
        a, b = (str(p) for p in rng.choice(kb.people, 2, replace=False))
        relations = [str(r) for r in rng.permutation(PERSON_RELATIONS)[: 2 + difficulty]]
        facts = [Fact(p, r, kb.value(p, r)) for p in (a, b) for r in relations]
        target = facts[int(rng.integers(len(relations)))]
        passage = _passage(kb, facts, rng, num_filler=1)
        constraints = []
        if difficulty >= 1:
            constraints.append({"type": "max_words", "n": int(rng.integers(2, 6))})
        return {
            "subject": a,
            "relation": target.relation,
            "answers": [target.value],
            "passage": passage,
            "constraints": constraints,
        }

    def render(self, spec):
        head = with_constraints(
            "Answer the question using only the text below.", spec["constraints"]
        )
        question = QUESTIONS[spec["relation"]][0].format(s=spec["subject"])
        return f"{head}\n\nText: {spec['passage']}\n\nQuestion: {question}"

    def solve(self, kb, spec, variant=0):
        return fact_answer(kb, spec, variant)

    def grade(self, kb, spec, response):
        return grade_fact_answer(kb, spec, response)

    def wrong_answer(self, kb, spec, rng):
        fact = kb.false_fact(Fact(spec["subject"], spec["relation"], spec["answers"][0]), rng)
        return kb.sentence(fact)

    def violate_constraint(self, kb, spec, rng):
        if not spec["constraints"]:
            return None
        fact = Fact(spec["subject"], spec["relation"], spec["answers"][0])
        return f"Based on the text, I can tell you that {kb.sentence(fact)}"


REVIEW_TOPICS = ("bakery", "market", "inn", "shop", "boat trip")


class ClassifyFamily(TaskFamily):
    """Review sentiment, or the kind of a named thing. Knob: one word; mixed reviews."""

    name, category, max_words = "classify", "classification", 20

    def sample_spec(self, kb, rng, difficulty):
        constraints = [{"type": "max_words", "n": 1}] if difficulty >= 1 else []
        if rng.random() < 0.35:
            entity = _pick(rng, list(kb.kind))
            label = {"person": "person", "place": "place", "object": "thing"}[kb.kind[entity]]
            return {
                "kind": "entity",
                "entity": entity,
                "labels": ["person", "place", "thing"],
                "answer": label,
                "constraints": constraints,
            }
        label = _pick(rng, ("positive", "negative"))
        major, minor = (
            (lexicon.POSITIVE_WORDS, lexicon.NEGATIVE_WORDS)
            if label == "positive"
            else (lexicon.NEGATIVE_WORDS, lexicon.POSITIVE_WORDS)
        )
        words = [str(w) for w in rng.choice(major, 2, replace=False)]
        review = f"The {_pick(rng, REVIEW_TOPICS)} was {words[0]} and the staff were {words[1]}."
        if difficulty >= 2:
            review = f"The seats were {_pick(rng, minor)}. " + review
        return {
            "kind": "review",
            "review": review,
            "labels": ["positive", "negative"],
            "answer": label,
            "constraints": constraints,
        }

    def render(self, spec):
        if spec["kind"] == "entity":
            question = f"Is {spec['entity']} a person, a place or a thing?"
            return with_constraints(question, spec["constraints"])
        head = with_constraints("Is this review positive or negative?", spec["constraints"])
        return f"{head}\n\nReview: {spec['review']}"

    def solve(self, kb, spec, variant=0):
        if spec["constraints"] or variant % 2 == 0:
            return spec["answer"].capitalize() + "."
        if spec["kind"] == "entity":
            return f"{spec['entity']} is a {spec['answer']}."
        return f"The review is {spec['answer']}."

    def grade(self, kb, spec, response):
        said = [label for label in spec["labels"] if text.contains_word(response, label)]
        if not said:
            return False, 0.0
        return True, 1.0 if said == [spec["answer"]] else 0.0

    def wrong_answer(self, kb, spec, rng):
        wrong = _pick(rng, [x for x in spec["labels"] if x != spec["answer"]])
        return wrong.capitalize() + "."

    def violate_constraint(self, kb, spec, rng):
        if not spec["constraints"]:
            return None
        subject = spec.get("entity", "The review")
        return f"{subject} is {'a ' if spec['kind'] == 'entity' else ''}{spec['answer']}."
