"""The knowledge base: invented people, places and objects with attributes and relations.

It stands in for "the world" a pretrained model has read about, so that truthfulness is
checkable: every claim a response makes in the world's sentence patterns is extracted with
``extract_claims`` and judged against the base (the paper's TruthfulQA axis, and the
"hallucination" metadata on closed-domain tasks, figure 4).
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from instructrl.world import lexicon
from instructrl.world import text as text_lib


@dataclasses.dataclass(frozen=True)
class Fact:
    """One (subject, relation, value) triple, e.g. Fact("Mira", "lives_in", "Dovelton")."""

    subject: str
    relation: str
    value: str


# relation -> (subject kind, value vocabulary or entity kind, sentence templates). The first
# template is canonical; the others are paraphrases labelers use. All are recognized as claims.
RELATIONS: dict[str, tuple[str, str | tuple[str, ...], tuple[str, ...]]] = {
    "lives_in": ("person", "place", ("{s} lives in {o}.", "{s} has a home in {o}.")),
    "job": ("person", lexicon.JOBS, ("{s} works as a {o}.", "{s} is a {o} by trade.")),
    "pet": ("person", lexicon.PETS, ("{s} has a pet {o}.", "{s} keeps a {o} as a pet.")),
    "color": (
        "person",
        lexicon.COLORS,
        ("{s} likes the color {o}.", "The favorite color of {s} is {o}."),
    ),
    "friend": ("person", "person", ("{s} is a friend of {o}.", "{s} and {o} are good friends.")),
    "climate": ("place", lexicon.CLIMATES, ("The weather in {s} is {o}.", "{s} is often {o}.")),
    "landscape": ("place", lexicon.LANDSCAPES, ("{s} is known for its {o}.", "{s} has many {o}.")),
    "food": ("place", lexicon.FOODS, ("People in {s} like to eat {o}.", "{s} is famous for {o}.")),
    "material": (
        "object",
        lexicon.MATERIALS,
        ("The {s} is made of {o}.", "The {s} is built from {o}."),
    ),
    "owner": ("object", "person", ("The {s} belongs to {o}.", "The {s} is owned by {o}.")),
}
PERSON_RELATIONS = tuple(r for r, v in RELATIONS.items() if v[0] == "person")
PLACE_RELATIONS = tuple(r for r, v in RELATIONS.items() if v[0] == "place")
OBJECT_RELATIONS = tuple(r for r, v in RELATIONS.items() if v[0] == "object")

# Question forms for open QA: relation -> (question template, short-answer template).
QUESTIONS = {
    "lives_in": ("Where does {s} live?", "{s} lives in {o}."),
    "job": ("What is the job of {s}?", "{s} works as a {o}."),
    "pet": ("What pet does {s} have?", "{s} has a pet {o}."),
    "color": ("What color does {s} like?", "{s} likes the color {o}."),
    "friend": ("Who is a friend of {s}?", "{s} is a friend of {o}."),
    "climate": ("What is the weather like in {s}?", "The weather in {s} is {o}."),
    "landscape": ("What is {s} known for?", "{s} is known for its {o}."),
    "food": ("What do people in {s} like to eat?", "People in {s} like to eat {o}."),
    "material": ("What is the {s} made of?", "The {s} is made of {o}."),
    "owner": ("Who owns the {s}?", "The {s} belongs to {o}."),
}


# A value outside the vocabulary still makes a (false) claim, "Mira lives in Zorp", unless it is a
# function word: "Mira lives in the big house" states nothing checkable.
_OTHER_WORD = r"(?!(?:a|an|the|this|that|his|her|their|my|mine|yours|many|some|every)\b)[A-Za-z]+"


def _names(rng: np.random.Generator) -> tuple[list[str], list[str]]:
    """(two-syllable names for people and objects, place names), each shuffled."""
    two = [a + b for a in lexicon.NAME_SYLLABLES_START for b in lexicon.NAME_SYLLABLES_END]
    places = [a + b for a in lexicon.NAME_SYLLABLES_START for b in lexicon.PLACE_SUFFIXES]
    two = [n.capitalize() for n in rng.permutation(two)]
    places = [n.capitalize() for n in rng.permutation(places)]
    return two, places


class KnowledgeBase:
    """Entities and their facts. Build with ``KnowledgeBase.generate``.

    Attributes:
      people, places, objects: list[str] entity names (objects read like "Ralin drum").
      table: dict[str, dict[str, str | tuple[str, ...]]] subject -> relation -> value; "friend"
        holds a tuple of names (friendship is symmetric), every other relation a single string.
    """

    def __init__(self, people, places, objects, table):
        self.people, self.places, self.objects, self.table = people, places, objects, table
        self.kind = {**{p: "person" for p in people}, **{p: "place" for p in places}}
        self.kind.update({o: "object" for o in objects})
        self._claim_patterns = self._compile_patterns()
        self._lowered = {n.lower(): n for n in self.kind}

    @classmethod
    def generate(
        cls,
        rng: np.random.Generator,
        num_people: int = 32,
        num_places: int = 12,
        num_objects: int = 12,
    ) -> KnowledgeBase:
        """A random base; every person has 1-2 friends, every object an owner."""
        two, place_names = _names(rng)
        people = sorted(two[:num_people])
        objects = sorted(
            f"{n} {lexicon.OBJECT_KINDS[rng.integers(len(lexicon.OBJECT_KINDS))]}"
            for n in two[num_people : num_people + num_objects]
        )
        places = sorted(place_names[:num_places])
        pools = {"person": people, "place": places}
        table: dict[str, dict] = {e: {} for e in people + places + objects}
        for subject in table:
            kind = "person" if subject in people else "place" if subject in places else "object"
            for relation, (subject_kind, values, _) in RELATIONS.items():
                if subject_kind != kind or relation == "friend":
                    continue
                pool = pools[values] if isinstance(values, str) else values
                table[subject][relation] = str(pool[rng.integers(len(pool))])
        friends = {p: set() for p in people}
        for p in people:
            others = [q for q in people if q != p]
            for q in rng.choice(others, size=int(rng.integers(1, 3)), replace=False):
                friends[p].add(str(q))
                friends[str(q)].add(p)
        for p in people:
            table[p]["friend"] = tuple(sorted(friends[p]))
        return cls(people, places, objects, table)

    # ---- facts -----------------------------------------------------------------------------
    def facts(self, subject: str | None = None) -> list[Fact]:
        """All true facts (of one subject when given), in a fixed order."""
        subjects = [subject] if subject is not None else list(self.table)
        out = []
        for s in subjects:
            for relation, value in self.table[s].items():
                for v in value if isinstance(value, tuple) else (value,):
                    out.append(Fact(s, relation, v))
        return out

    def value(self, subject: str, relation: str) -> str:
        """The value (the first friend for "friend")."""
        v = self.table[subject][relation]
        return v[0] if isinstance(v, tuple) else v

    def is_true(self, fact: Fact) -> bool:
        value = self.table.get(fact.subject, {}).get(fact.relation)
        if isinstance(value, tuple):
            return fact.value in value
        return value == fact.value

    def false_fact(self, fact: Fact, rng: np.random.Generator) -> Fact:
        """Same subject and relation, a value that is not true (a made-up fact)."""
        values = RELATIONS[fact.relation][1]
        pool = (
            {"person": self.people, "place": self.places}[values]
            if isinstance(values, str)
            else values
        )
        wrong = [v for v in pool if not self.is_true(Fact(fact.subject, fact.relation, v))]
        wrong = [v for v in wrong if v != fact.subject]
        return Fact(fact.subject, fact.relation, str(wrong[rng.integers(len(wrong))]))

    def sentence(self, fact: Fact, variant: int = 0) -> str:
        """The fact in words; variant picks a paraphrase (modulo the number of templates)."""
        templates = RELATIONS[fact.relation][2]
        return templates[variant % len(templates)].format(s=fact.subject, o=fact.value)

    # ---- claims ----------------------------------------------------------------------------
    def _compile_patterns(self) -> list[tuple[str, re.Pattern, str]]:
        """(relation, pattern, the template's longest literal piece, lowercased): a text without
        that piece cannot match, which skips most patterns cheaply."""
        groups = {"person": self.people, "place": self.places, "object": self.objects}
        alternation = {
            k: "|".join(re.escape(n) for n in sorted(v, key=len, reverse=True))
            for k, v in groups.items()
        }
        patterns = []
        for relation, (subject_kind, values, templates) in RELATIONS.items():
            value_re = alternation[values] if isinstance(values, str) else "|".join(values)
            for template in templates:
                body = re.escape(template.rstrip("."))
                body = body.replace(re.escape("{s}"), f"(?P<s>{alternation[subject_kind]})")
                body = body.replace(re.escape("{o}"), f"(?P<o>{value_re}|{_OTHER_WORD})")
                pieces = re.split(r"\{[so]\}", template.rstrip("."))
                literal = max(pieces, key=len).lower()
                pattern = re.compile(r"\b" + body + r"\b", re.IGNORECASE)
                patterns.append((relation, pattern, literal))
        return patterns

    def canonical(self, name: str) -> str:
        """The entity name (or vocabulary word) as the base spells it."""
        return self._lowered.get(name.lower(), name.lower())

    def extract_claims(self, text: str) -> list[Fact]:
        """Every fact stated in ``text`` in one of the world's sentence patterns."""
        claims, lowered = [], text.lower()
        for relation, pattern, literal in self._claim_patterns:
            if literal not in lowered:
                continue
            for m in pattern.finditer(text):
                claims.append(Fact(self.canonical(m["s"]), relation, self.canonical(m["o"])))
        return list(dict.fromkeys(claims))

    def check_claims(self, text: str) -> tuple[int, int]:
        """(number of true claims, number of false claims) in ``text``."""
        claims = self.extract_claims(text)
        true = sum(self.is_true(c) for c in claims)
        return true, len(claims) - true

    def mentioned_entities(self, text: str) -> list[str]:
        """Entity names that occur in ``text`` (whole words, case-insensitive)."""
        lowered = text.lower()
        return [n for n in self.kind if text_lib.word_pattern(n).search(lowered)]

    def to_dict(self) -> dict:
        """JSON-serializable form (friend tuples become lists)."""
        table = {
            s: {r: list(v) if isinstance(v, tuple) else v for r, v in rels.items()}
            for s, rels in self.table.items()
        }
        return {
            "people": self.people,
            "places": self.places,
            "objects": self.objects,
            "table": table,
        }
