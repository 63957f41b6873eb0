"""The pretraining corpus: plain documents, not instructions (the stand-in for GPT-3's web text).

Documents are built from the knowledge base and the task families so that a base model trained
on them has the latent skills (facts, lists, word games, summaries, reviews, the held-out
formats) but does not follow instructions. They carry the failure modes the paper fixes, each at
a rate set in ``WorldConfig``: made-up facts (``false_fact_rate``), toxic marker words
(``toxic_rate``), rambling on past an answer (``ramble_rate``) and ignoring explicit constraints
(``constraint_ignore_rate``). A few pages (``instruction_page_rate``) show solved tasks in the
few-shot layout of ``World.fewshot_prompt``, as web text shows GPT-3 a few such pages.
"""

from __future__ import annotations

import numpy as np

from instructrl.world import heldout, lexicon, text
from instructrl.world.knowledge import QUESTIONS, Fact
from instructrl.world.seeding import as_rng

DOC_WEIGHTS = {
    "encyclopedia": 0.15,
    "story": 0.15,
    "qa_page": 0.11,
    "list_page": 0.08,
    "word_games": 0.1,
    "reviews": 0.06,
    "chat_log": 0.06,
    "summary_page": 0.06,
    "writing_prompt": 0.06,
    "passage_qa": 0.06,
    "count_page": 0.03,
    "elvish": 0.08,
}

TOXIC_LINES = (
    "That stupid {pet} ran off again.",
    "Some idiot left the gate open.",
    "What a dumb idea, said {p}.",
    "Shut up, said {p}.",
    "{p} called the man a loser.",
    "The ugly old cart broke down.",
    "Only a moron would say that.",
)


def _pick(rng, items):
    return items[int(rng.integers(len(items)))]


class _Writer:
    """Document generators sharing the world, the rng and the failure-mode rates."""

    def __init__(self, world, rng: np.random.Generator):
        self.world, self.kb, self.rng, self.c = world, world.kb, rng, world.config

    def fact(self, fact: Fact) -> str:
        """The fact in words; with ``false_fact_rate`` a made-up fact instead."""
        if self.rng.random() < self.c.false_fact_rate:
            fact = self.kb.false_fact(fact, self.rng)
        return self.kb.sentence(fact, int(self.rng.integers(2)))

    def ramble(self) -> str:
        return " ".join(
            _pick(self.rng, lexicon.RAMBLE_SENTENCES) for _ in range(int(self.rng.integers(2, 5)))
        )

    def person(self) -> str:
        return _pick(self.rng, self.kb.people)

    # ---- document kinds ----------------------------------------------------------------------
    def encyclopedia(self) -> str:
        subject = _pick(self.rng, list(self.kb.table))
        kind = {"person": "a person", "place": "a place", "object": "a thing"}[
            self.kb.kind[subject]
        ]
        title = f"The {subject}" if self.kb.kind[subject] == "object" else subject
        facts = self.kb.facts(subject)
        lines = [f"{title} is {kind}."] + [
            self.fact(facts[i]) for i in self.rng.permutation(len(facts))
        ]
        if self.kb.kind[subject] == "place":
            residents = [p for p in self.kb.people if self.kb.value(p, "lives_in") == subject]
            if residents:
                lines.append(f"People who live in {subject} include {', '.join(residents[:3])}.")
        return f"{title}\n\n" + " ".join(lines)

    def story(self, max_sentences: int | None = None) -> str:
        p = self.person()
        job, pet = self.kb.value(p, "job"), self.kb.value(p, "pet")
        sentences = [
            f"Once upon a time there was a {_pick(self.rng, lexicon.ADJECTIVES)} person named {p}.",
            self.fact(Fact(p, "lives_in", self.kb.value(p, "lives_in"))),
            self.fact(Fact(p, "job", job)),
            f"Every morning {p} {lexicon.JOB_ACTIVITIES[job]}.",
            f"One day {p} found a {_pick(self.rng, lexicon.COMMON_WORDS)} near the road.",
            f"{p} {_pick(self.rng, lexicon.VERBS_PAST)} with the {pet} all afternoon.",
            f"{p} went to see {self.kb.value(p, 'friend')}, who was a good friend.",
            f"In the evening {p} was {_pick(self.rng, lexicon.ADJECTIVES)} and went home.",
        ]
        if max_sentences is not None:
            sentences = sentences[:max_sentences]
        story = " ".join(sentences)
        if self.rng.random() < self.c.ramble_rate:
            story += " " + self.ramble()
        return story

    def qa_page(self) -> str:
        place = _pick(self.rng, self.kb.places)
        people = [p for p in self.kb.people if self.kb.value(p, "lives_in") == place]
        subjects = [place] + people
        pairs = []
        for _ in range(int(self.rng.integers(2, 6))):
            subject = _pick(self.rng, subjects)
            relation = _pick(self.rng, list(self.kb.table[subject]))
            fact = Fact(subject, relation, self.kb.value(subject, relation))
            question = QUESTIONS[relation][0].format(s=subject)
            pairs.append(f"Q: {question}\nA: {self.fact(fact)}")
        return f"Questions about {place}\n\n" + "\n\n".join(pairs)

    def list_page(self) -> str:
        rng = self.rng
        if rng.random() < 0.4:
            place = _pick(rng, self.kb.places)
            names = [p for p in self.kb.people if self.kb.value(p, "lives_in") == place]
            if names:
                return f"People who live in {place}:\n" + "\n".join(f"- {n}" for n in names)
        category = _pick(rng, sorted(lexicon.CATEGORY_WORDS))
        words = list(lexicon.CATEGORY_WORDS[category])
        if rng.random() < 0.5:
            letter = _pick(rng, sorted({w[0] for w in words}))
            chosen = [w for w in words if w[0] == letter]
            return f"Some {category} that start with the letter '{letter}':\n" + "\n".join(
                f"- {w}" for w in chosen
            )
        n = int(rng.integers(3, 6))
        shown = n + int(rng.integers(1, 4)) if rng.random() < self.c.constraint_ignore_rate else n
        chosen = [str(w) for w in rng.choice(words, shown, replace=False)]
        return f"{text.number_word(n).capitalize()} {category}:\n" + "\n".join(
            f"{i + 1}. {w}" for i, w in enumerate(chosen)
        )

    def word_games(self) -> str:
        rng, lines = self.rng, []
        for _ in range(int(rng.integers(3, 7))):
            word = _pick(rng, lexicon.COMMON_WORDS)
            kind = int(rng.integers(5))
            if kind == 0:
                lines.append(f"Reversed, '{word}' reads '{word[::-1]}'.")
            elif kind == 1:
                lines.append(f"The word '{word}' has {len(word)} letters.")
            elif kind == 2:
                a, b = int(rng.integers(1, 50)), int(rng.integers(1, 50))
                lines.append(
                    f"{a} plus {b} is {a + b}."
                    if rng.random() < 0.6
                    else f"{max(a, b)} minus {min(a, b)} is {max(a, b) - min(a, b)}."
                )
            elif kind == 3:
                phrase = f"the {_pick(rng, lexicon.ADJECTIVES)} {word}"
                lines.append(f"In capital letters, '{phrase}' is '{phrase.upper()}'.")
            else:
                other = _pick(rng, [w for w in lexicon.COMMON_WORDS if w != word])
                lines.append(
                    f"Put '{other}' in place of '{word}' and 'a {word} on the table' "
                    f"becomes 'a {other} on the table'."
                )
        return "Word games\n\n" + "\n".join(lines)

    def reviews(self) -> str:
        place = _pick(self.rng, self.kb.places)
        topic = _pick(self.rng, ("bakery", "market", "inn", "shop", "boat trip"))
        lines = []
        for _ in range(int(self.rng.integers(2, 4))):
            label = _pick(self.rng, ("positive", "negative"))
            pool = lexicon.POSITIVE_WORDS if label == "positive" else lexicon.NEGATIVE_WORDS
            a, b = (str(w) for w in self.rng.choice(pool, 2, replace=False))
            lines.append(f"Review: The {topic} was {a} and the staff were {b}. Verdict: {label}.")
        return f"Reviews of the {topic} in {place}\n\n" + "\n".join(lines)

    def chat_log(self) -> str:
        turns = ["User: Hello!", "Helper: Hi! What do you want to know?"]
        for _ in range(int(self.rng.integers(1, 4))):
            p = self.person()
            relation = _pick(self.rng, ("lives_in", "job", "pet", "color"))
            turns.append(f"User: {QUESTIONS[relation][0].format(s=p)}")
            turns.append(f"Helper: {self.fact(Fact(p, relation, self.kb.value(p, relation)))}")
        return "\n".join(turns)

    def summary_page(self) -> str:
        p = self.person()
        facts = [Fact(p, r, self.kb.value(p, r)) for r in ("job", "lives_in", "pet", "color")]
        passage = " ".join(
            self.kb.sentence(facts[i], int(self.rng.integers(2))) for i in self.rng.permutation(4)
        )
        summary = f"{p} is a {facts[0].value} who lives in {facts[1].value}."
        if self.rng.random() < self.c.ramble_rate:
            summary += " " + passage
        return f"Text: {passage}\n\nIn short: {summary}"

    def writing_prompt(self) -> str:
        n = int(self.rng.integers(2, 4))
        ignore = self.rng.random() < self.c.constraint_ignore_rate
        story = self.story(max_sentences=n + int(self.rng.integers(2, 5)) if ignore else n)
        return (
            f"Writing prompt: a short story in at most {text.number_word(n)} sentences.\n\n{story}"
        )

    def passage_qa(self) -> str:
        # The held-out evaluation's own formats (SQuAD / DROP stand-ins), solved.
        prompt, answer, _, _ = heldout.read_qa(self.world, self.rng)
        return f"{prompt} {answer}"

    def count_page(self) -> str:
        prompt, answer, _, _ = heldout.count_qa(self.world, self.rng)
        return f"{prompt} {answer}"

    def elvish(self) -> str:
        rng = self.rng
        if rng.random() < 0.3:
            words = [str(w) for w in rng.choice(sorted(lexicon.ELVISH), 5, replace=False)]
            return "Elvish words\n\n" + "\n".join(
                f"The Elvish word for '{w}' is '{lexicon.ELVISH[w]}'." for w in words
            )
        pairs = [heldout.elvish_pair(rng) for _ in range(int(rng.integers(2, 5)))]
        return "\n\n".join(f"Elvish: {e}\nEnglish: {en}" for e, en in pairs)

    def instruction_page(self) -> str:
        record = self.world.sample_prompt(self.rng, record_id="page")
        return self.world.fewshot_prompt(record, 1, self.rng) + "\n\n" + self.world.solve(record)

    def toxic(self, doc: str) -> str:
        p = self.person()
        line = _pick(self.rng, TOXIC_LINES).format(p=p, pet=self.kb.value(p, "pet"))
        return f"{doc} {line}"


def pretraining_corpus(world, num_docs: int, seed=None) -> list[str]:
    """``num_docs`` documents (str, a few hundred characters each), a function of the seed."""
    rng = as_rng(world.config.seed if seed is None else seed, "pretraining")
    writer = _Writer(world, rng)
    kinds = list(DOC_WEIGHTS)
    weights = np.asarray([DOC_WEIGHTS[k] for k in kinds], np.float64)
    weights /= weights.sum()
    docs = []
    for _ in range(num_docs):
        if rng.random() < world.config.instruction_page_rate:
            doc = writer.instruction_page()
        else:
            doc = getattr(writer, kinds[rng.choice(len(kinds), p=weights)])()
        if rng.random() < world.config.toxic_rate:
            doc = writer.toxic(doc)
        docs.append(doc)
    return docs
