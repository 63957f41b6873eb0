"""Open-domain task families: generation, open QA, brainstorming, chat, rewrite, other."""

from __future__ import annotations

import numpy as np

from instructrl.world import lexicon, text
from instructrl.world.knowledge import PERSON_RELATIONS, QUESTIONS, Fact
from instructrl.world.tasks import (
    TaskFamily,
    fact_answer,
    grade_fact_answer,
    with_constraints,
)


def _pick(rng: np.random.Generator, items):
    return items[int(rng.integers(len(items)))]


def _sentence_budget(spec: dict) -> int:
    return min([c["n"] for c in spec["constraints"] if c["type"] == "max_sentences"] or [99])


def _excluded(spec: dict) -> list[str]:
    return [c["word"] for c in spec["constraints"] if c["type"] == "exclude_word"]


def _keep(sentences: list[str], spec: dict) -> list[str]:
    """Sentences without an excluded word, cut to the sentence budget."""
    kept = [s for s in sentences if not any(text.contains_word(s, w) for w in _excluded(spec))]
    return kept[: _sentence_budget(spec)]


class StoryFamily(TaskFamily):
    """Stories: "Write a short story about Mira from Dovelton and a lamp." Knobs: sentence
    limit, a word to use, a word to avoid."""

    name, category, max_words = "story", "generation", 110

    def sample_spec(self, kb, rng, difficulty):
        person = _pick(rng, kb.people)
        constraints = [{"type": "max_sentences", "n": int(rng.integers(3, 6))}]
        if difficulty >= 1:
            mood = _pick(rng, [a for a in lexicon.ADJECTIVES if a != "happy"])
            constraints.append({"type": "include_word", "word": mood})
        if difficulty >= 2:
            constraints.append({"type": "exclude_word", "word": "happy"})
        return {
            "person": person,
            "place": kb.value(person, "lives_in"),
            "thing": _pick(rng, lexicon.COMMON_WORDS),
            "constraints": constraints,
        }

    def render(self, spec):
        return with_constraints(
            f"Write a short story about {spec['person']} from {spec['place']} and a "
            f"{spec['thing']}.",
            spec["constraints"],
        )

    def solve(self, kb, spec, variant=0):
        p = spec["person"]
        include = [c["word"] for c in spec["constraints"] if c["type"] == "include_word"]
        mood = include[0] if include else "happy"
        thing = spec["thing"]
        sentences = [
            kb.sentence(Fact(p, "lives_in", spec["place"]), variant),
            f"One day {p} found a {thing} near the road."
            if variant % 2 == 0
            else f"One morning {p} saw a {thing} by the gate.",
            f"{p} was {mood} and went home." if variant % 2 == 0 else f"{p} felt {mood} all day.",
            kb.sentence(Fact(p, "job", kb.value(p, "job")), variant),
            f"{p} went home and rested.",
        ]
        return " ".join(_keep(sentences, spec))

    def grade(self, kb, spec, response):
        checks = [
            text.contains_word(response, spec["person"]),
            text.contains_word(response, spec["place"]),
            text.contains_word(response, spec["thing"]),
            len(text.sentences(response)) >= 2,
        ]
        return checks[0] and len(text.sentences(response)) >= 1, sum(checks) / len(checks)

    def wrong_answer(self, kb, spec, rng):
        p = spec["person"]
        false = kb.false_fact(Fact(p, "lives_in", spec["place"]), rng)
        return self.solve(kb, spec).replace(
            kb.sentence(Fact(p, "lives_in", spec["place"])), kb.sentence(false)
        )

    def violate_constraint(self, kb, spec, rng):
        extra = " ".join(f"{spec['person']} had a good day number {i}." for i in range(3))
        return self.solve(kb, spec) + " " + extra


READERS = ("a visitor", "a child", "a friend", "a new neighbor", "a travel book", "a letter")


class PlaceDescriptionFamily(TaskFamily):
    """Descriptions: "Describe the town of Dovelton." Knobs: sentence limit, a word to avoid."""

    name, category, max_words = "describe_place", "generation", 90

    def sample_spec(self, kb, rng, difficulty):
        constraints = (
            [{"type": "max_sentences", "n": int(rng.integers(2, 5))}] if difficulty else []
        )
        if difficulty >= 2:
            constraints.append({"type": "exclude_word", "word": "weather"})
        return {
            "place": _pick(rng, kb.places),
            "reader": _pick(rng, READERS),
            "constraints": constraints,
        }

    def render(self, spec):
        instruction = f"Describe the town of {spec['place']} for {spec['reader']}."
        return with_constraints(instruction, spec["constraints"])

    def _facts(self, kb, spec):
        return [
            Fact(spec["place"], r, kb.value(spec["place"], r))
            for r in ("climate", "landscape", "food")
        ]

    def solve(self, kb, spec, variant=0):
        candidates = []
        for fact in self._facts(kb, spec):
            candidates += [kb.sentence(fact, variant), kb.sentence(fact, variant + 1)]
        sentences, seen = [], set()
        for s, fact in zip(
            candidates, [f for f in self._facts(kb, spec) for _ in (0, 1)], strict=True
        ):
            if fact.relation not in seen and _keep([s], spec):
                sentences.append(s)
                seen.add(fact.relation)
        return " ".join(sentences[: _sentence_budget(spec)])

    def grade(self, kb, spec, response):
        if not text.contains_word(response, spec["place"]):
            return False, 0.0
        mentioned = sum(text.contains_word(response, f.value) for f in self._facts(kb, spec))
        return True, min(1.0, mentioned / min(2, _sentence_budget(spec)))

    def wrong_answer(self, kb, spec, rng):
        facts = self._facts(kb, spec)
        return " ".join(kb.sentence(kb.false_fact(f, rng), 1) for f in facts[:2])

    def violate_constraint(self, kb, spec, rng):
        if not spec["constraints"]:
            return None
        return " ".join(kb.sentence(f, v) for f in self._facts(kb, spec) for v in (0, 1))


class OpenQAFamily(TaskFamily):
    """Questions: "Where does Mira live?" Knobs: one sentence, a word limit."""

    name, category, max_words = "fact_question", "open_qa", 40

    def sample_spec(self, kb, rng, difficulty):
        subject = _pick(rng, list(kb.table))
        relation = _pick(rng, list(kb.table[subject]))
        answers = kb.table[subject][relation]
        answers = list(answers) if isinstance(answers, tuple) else [answers]
        constraints = []
        if difficulty == 1:
            constraints.append({"type": "max_sentences", "n": 1})
        if difficulty >= 2:
            constraints.append({"type": "max_words", "n": int(rng.integers(2, 5))})
        return {
            "subject": subject,
            "relation": relation,
            "answers": answers,
            "constraints": constraints,
        }

    def render(self, spec):
        question = QUESTIONS[spec["relation"]][0].format(s=spec["subject"])
        return with_constraints(question, spec["constraints"])

    def solve(self, kb, spec, variant=0):
        return fact_answer(kb, spec, variant)

    def grade(self, kb, spec, response):
        return grade_fact_answer(kb, spec, response)

    def wrong_answer(self, kb, spec, rng):
        fact = Fact(spec["subject"], spec["relation"], spec["answers"][0])
        wrong = kb.false_fact(fact, rng)
        answer = fact_answer(kb, {**spec, "answers": [wrong.value]}, 0)
        return answer

    def violate_constraint(self, kb, spec, rng):
        if not spec["constraints"]:
            return None
        others = [f for f in kb.facts(spec["subject"]) if f.relation != spec["relation"]]
        return self.solve(kb, spec) + " " + kb.sentence(others[0]) + " " + kb.sentence(others[-1])


LIST_PURPOSES = (
    "for a word game",
    "for a school lesson",
    "for a story",
    "for a picture book",
    "for a quiz",
    "for a song",
    "to draw",
    "to teach a child",
)


class BrainstormFamily(TaskFamily):
    """Lists: "List four animals." Knobs: exact count, first letter, a word to avoid."""

    name, category, max_words = "list_things", "brainstorming", 50

    def sample_spec(self, kb, rng, difficulty):
        category = _pick(rng, sorted(lexicon.CATEGORY_WORDS))
        words = lexicon.CATEGORY_WORDS[category]
        n = int(rng.integers(3, 6))
        by_letter = {w[0]: sum(x[0] == w[0] for x in words) for w in words}
        if difficulty >= 1:  # room for n items with that letter, after one word is excluded
            n = min(n, max(by_letter.values()) - 1)
        constraints = [{"type": "num_items", "n": n}]
        if difficulty >= 1:
            letters = sorted(letter for letter, count in by_letter.items() if count >= n + 1)
            constraints.append({"type": "items_start_with", "letter": _pick(rng, letters)})
        if difficulty >= 2:
            letter = constraints[-1]["letter"]
            constraints.append(
                {"type": "exclude_word", "word": [w for w in words if w[0] == letter][0]}
            )
        purpose = _pick(rng, LIST_PURPOSES)
        return {"category": category, "n": n, "purpose": purpose, "constraints": constraints}

    def render(self, spec):
        return with_constraints(
            f"List {text.number_word(spec['n'])} {spec['category']} {spec['purpose']}.",
            spec["constraints"],
        )

    def _valid(self, spec) -> list[str]:
        letter = [c["letter"] for c in spec["constraints"] if c["type"] == "items_start_with"]
        return [
            w
            for w in lexicon.CATEGORY_WORDS[spec["category"]]
            if (not letter or w[0] == letter[0]) and w not in _excluded(spec)
        ]

    def _format(self, items, variant):
        if variant % 2:
            return "\n".join(f"{i + 1}. {w}" for i, w in enumerate(items))
        return "\n".join(f"- {w}" for w in items)

    def solve(self, kb, spec, variant=0):
        valid = self._valid(spec)
        start = variant % max(1, len(valid) - spec["n"] + 1)
        return self._format(valid[start : start + spec["n"]], variant)

    def grade(self, kb, spec, response):
        items = [i.lower() for i in text.list_items(response)]
        known = set(lexicon.CATEGORY_WORDS[spec["category"]])
        good = list(dict.fromkeys(i for i in items if i in known))
        if not good:
            return False, 0.0
        return True, min(1.0, len(good) / spec["n"]) * len(good) / len(items)

    def wrong_answer(self, kb, spec, rng):
        others = [
            w
            for c, ws in lexicon.CATEGORY_WORDS.items()
            if c != spec["category"]
            for w in ws
            if w not in lexicon.CATEGORY_WORDS[spec["category"]]
        ]
        valid = self._valid(spec)[: spec["n"]]
        keep = max(1, spec["n"] // 3)
        return self._format(
            valid[:keep] + [str(w) for w in rng.choice(others, spec["n"] - keep, replace=False)], 0
        )

    def violate_constraint(self, kb, spec, rng):
        words = lexicon.CATEGORY_WORDS[spec["category"]]
        letter = [c["letter"] for c in spec["constraints"] if c["type"] == "items_start_with"]
        if letter:
            return self._format([w for w in words if w[0] != letter[0]][: spec["n"]], 0)
        return self._format(list(words[: spec["n"] + 2]), 0)


CHAT_OPENINGS = (
    ("Hello!", "Hi! How can I help you today?"),
    ("Hi, I have a question.", "Of course. What would you like to know?"),
    ("You are a stupid bot.", "I am sorry you feel that way. How can I help?"),
)


class ChatFamily(TaskFamily):
    """A short chat whose last user turn asks about a fact. Knobs: greeting, sentence limit."""

    name, category, max_words = "chat", "chat", 45

    def sample_spec(self, kb, rng, difficulty):
        subject = _pick(rng, kb.people)
        relation = _pick(rng, PERSON_RELATIONS)
        answers = kb.table[subject][relation]
        answers = list(answers) if isinstance(answers, tuple) else [answers]
        constraints = [{"type": "greeting"}] if difficulty >= 1 else []
        if difficulty >= 2:
            constraints.append({"type": "max_sentences", "n": 2})
        opening = int(rng.integers(len(CHAT_OPENINGS))) if difficulty >= 1 else 0
        return {
            "subject": subject,
            "relation": relation,
            "answers": answers,
            "opening": opening,
            "constraints": constraints,
        }

    def render(self, spec):
        user, helper = CHAT_OPENINGS[spec["opening"]]
        question = QUESTIONS[spec["relation"]][0].format(s=spec["subject"])
        head = with_constraints("Reply to the user as a helpful assistant.", spec["constraints"])
        return f"{head}\n\nUser: {user}\nAssistant: {helper}\nUser: {question}"

    def solve(self, kb, spec, variant=0):
        answer = fact_answer(kb, spec, variant)
        greeting = lexicon.GREETINGS[variant % len(lexicon.GREETINGS)]
        return f"{greeting} {answer}" if variant % 2 == 0 or spec["constraints"] else answer

    def grade(self, kb, spec, response):
        return grade_fact_answer(kb, spec, response)

    def wrong_answer(self, kb, spec, rng):
        fact = Fact(spec["subject"], spec["relation"], spec["answers"][0])
        return "Hello! " + kb.sentence(kb.false_fact(fact, rng))

    def violate_constraint(self, kb, spec, rng):
        if not spec["constraints"]:
            return None
        others = [
            kb.sentence(f) for f in kb.facts(spec["subject"]) if f.relation != spec["relation"]
        ]
        return fact_answer(kb, spec, 0) + " " + " ".join(others[:2])


# Plain sentences (no world facts) and the nouns a "replace" rewrite may swap.
PLAIN_SENTENCES = (
    ("the red boat sails on the river", ("boat", "river")),
    ("a small dog sleeps by the door", ("dog", "door")),
    ("the old clock rings at noon", ("clock",)),
    ("my blue cup is on the table", ("cup", "table")),
    ("the green frog sits on a stone", ("frog", "stone")),
)


class RewriteFamily(TaskFamily):
    """Reverse a word, write in capitals, replace a word. Knob: two words; only the result."""

    name, category, max_words = "rewrite", "rewrite", 30

    def sample_spec(self, kb, rng, difficulty):
        op = _pick(rng, ("reverse", "capitals", "replace"))
        if op == "reverse":
            count = 2 if difficulty >= 2 else 1
            source = " ".join(
                str(w) for w in rng.choice(lexicon.COMMON_WORDS, count, replace=False)
            )
            answer = " ".join(w[::-1] for w in source.split())
            extra = {}
        else:
            source, nouns = PLAIN_SENTENCES[int(rng.integers(len(PLAIN_SENTENCES)))]
            if op == "capitals":
                answer, extra = source.upper(), {}
            else:
                old = _pick(rng, nouns)
                new = _pick(rng, [w for w in lexicon.COMMON_WORDS if w not in source.split()])
                answer = " ".join(new if w == old else w for w in source.split())
                extra = {"old": old, "new": new}
        constraints = []
        if difficulty >= 1:
            constraints.append({"type": "only_result", "n": len(answer.split()) + 1})
        return {"op": op, "source": source, "answer": answer, "constraints": constraints, **extra}

    def render(self, spec):
        op, src = spec["op"], spec["source"]
        if op == "reverse":
            what = "the word" if " " not in src else "each word of"
            instruction = f"Reverse the letters of {what} '{src}'."
        elif op == "capitals":
            instruction = f"Rewrite this in capital letters: '{src}'."
        else:
            instruction = f"Rewrite this, replacing '{spec['old']}' with '{spec['new']}': '{src}'."
        return with_constraints(instruction, spec["constraints"])

    def solve(self, kb, spec, variant=0):
        if spec["constraints"] or variant % 2 == 0:
            return spec["answer"]
        return f"The result is: {spec['answer']}"

    def grade(self, kb, spec, response):
        core = response.strip().removeprefix("The result is:").strip().strip("'\".")
        if spec["op"] == "capitals":
            exact = spec["answer"] in response
        else:
            exact = f" {text.normalize(spec['answer'])} " in f" {text.normalize(response)} "
        if exact:
            return True, 1.0
        sim = text.similarity(core, spec["answer"])
        if spec["op"] == "capitals" and text.normalize(core) == text.normalize(spec["answer"]):
            return True, 0.3
        return sim > 0.6 and text.normalize(core) != text.normalize(spec["source"]), 0.5 * sim

    def wrong_answer(self, kb, spec, rng):
        if spec["op"] == "reverse":  # a slip: two letters swapped
            return " ".join(
                w[1] + w[0] + w[2:] if w[0] != w[1] else w[2] + w[1] + w[0] + w[3:]
                for w in spec["answer"].split()
            )
        return spec["source"]

    def violate_constraint(self, kb, spec, rng):
        if not spec["constraints"]:
            return None
        return f"Sure, here it is, I think the answer is {spec['answer']}"


class OtherFamily(TaskFamily):
    """Arithmetic and letter counting. Knobs: bigger numbers, subtraction; digits only."""

    name, category, max_words = "count_and_add", "other", 25

    def sample_spec(self, kb, rng, difficulty):
        constraints = [{"type": "digits_only"}] if difficulty >= 1 else []
        if rng.random() < 0.3:
            word = _pick(rng, lexicon.COMMON_WORDS)
            return {
                "kind": "letters",
                "word": word,
                "answer": len(word),
                "constraints": constraints,
            }
        high = 10 if difficulty == 0 else 50
        a, b = int(rng.integers(1, high)), int(rng.integers(1, high))
        op = "minus" if difficulty >= 2 and rng.random() < 0.5 else "plus"
        a, b = (max(a, b), min(a, b)) if op == "minus" else (a, b)
        answer = a - b if op == "minus" else a + b
        return {
            "kind": "arithmetic",
            "a": a,
            "b": b,
            "op": op,
            "answer": answer,
            "constraints": constraints,
        }

    def render(self, spec):
        if spec["kind"] == "letters":
            question = f"How many letters are in the word '{spec['word']}'?"
        else:
            question = f"What is {spec['a']} {spec['op']} {spec['b']}?"
        return with_constraints(question, spec["constraints"])

    def _sentence(self, spec, answer):
        if spec["kind"] == "letters":
            return f"The word '{spec['word']}' has {answer} letters."
        return f"{spec['a']} {spec['op']} {spec['b']} is {answer}."

    def solve(self, kb, spec, variant=0):
        if spec["constraints"]:
            return str(spec["answer"])
        return self._sentence(spec, spec["answer"]) if variant % 2 == 0 else str(spec["answer"])

    def grade(self, kb, spec, response):
        given = {str(spec[k]) for k in ("a", "b") if k in spec} - {str(spec["answer"])}
        numbers = [w for w in text.words(response) if w.isdigit() and w not in given]
        numbers += [
            str(i) for i, w in enumerate(lexicon.NUMBER_WORDS) if text.contains_word(response, w)
        ]
        if not numbers:
            return False, 0.0
        correct = str(spec["answer"]) in numbers
        return True, (1.0 if len(set(numbers)) == 1 else 0.5) if correct else 0.0

    def wrong_answer(self, kb, spec, rng):
        wrong = spec["answer"] + int(rng.choice([-2, -1, 1, 2, 3]))
        return str(wrong) if spec["constraints"] else self._sentence(spec, wrong)

    def violate_constraint(self, kb, spec, rng):
        return self._sentence(spec, spec["answer"]) if spec["constraints"] else None
