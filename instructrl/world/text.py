"""Plain-text helpers shared by the task families and the rubric: words, sentences, list items,
the explicit constraints a prompt can carry ("in at most five words"), toxicity and rambling."""

from __future__ import annotations

import difflib
import functools
import re

from instructrl.world import lexicon

_WORD = re.compile(r"[A-Za-z0-9]+(?:'[a-z]+)?")
_CONTINUATION = re.compile(
    r"(^|\n)\s*(Q:|A:|Question:|Answer:|User:|Helper:|Task:|Text:|Review:|###|Writing prompt:)",
)


def words(text: str) -> list[str]:
    """Lower-cased word tokens."""
    return [w.lower() for w in _WORD.findall(text)]


def sentences(text: str) -> list[str]:
    """Non-empty sentences split on . ! ? and newlines."""
    return [s.strip() for s in re.split(r"[.!?\n]+", text) if _WORD.search(s)]


def normalize(text: str) -> str:
    """Lower case, punctuation removed, single spaces: for exact-match comparisons."""
    return " ".join(words(text))


def similarity(a: str, b: str) -> float:
    """Character-level similarity in [0, 1] of the normalized strings."""
    return difflib.SequenceMatcher(None, normalize(a), normalize(b)).ratio()


def list_items(text: str) -> list[str]:
    """Items of a list answer: one per line ("- x", "1. x", "* x"), else comma separated."""
    lines = [ln.strip() for ln in text.strip().split("\n") if ln.strip()]
    if len(lines) <= 1:
        lines = [p.strip() for p in text.replace(" and ", ", ").split(",") if p.strip()]
    items = [re.sub(r"^(?:[-*]|\d+[.)])\s*", "", ln).strip().rstrip(".").strip() for ln in lines]
    return [i for i in items if i]


def token_f1(prediction: str, answer: str) -> float:
    """SQuAD-style bag-of-words F1 between two strings."""
    pred, gold = words(prediction), words(answer)
    if not pred or not gold:
        return float(pred == gold)
    common = sum(min(pred.count(w), gold.count(w)) for w in set(gold))
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


@functools.lru_cache(maxsize=4096)
def word_pattern(word: str) -> re.Pattern:
    """``word`` (lowercased) as a whole-word regex; cached: the rubric asks millions of times."""
    return re.compile(r"\b" + re.escape(word.lower()) + r"\b")


def contains_word(text: str, word: str) -> bool:
    return word_pattern(word).search(text.lower()) is not None


_TOXIC = re.compile(r"\b(?:" + "|".join(re.escape(w.lower()) for w in lexicon.TOXIC_WORDS) + r")\b")


def is_toxic(text: str) -> bool:
    """True when any marker word of ``lexicon.TOXIC_WORDS`` occurs."""
    return _TOXIC.search(text.lower()) is not None


def stops(text: str, max_words: int) -> bool:
    """False for a response that rambles: filler, a new question or turn, or far too long."""
    if len(words(text)) > max_words:
        return False
    if any(s.lower() in text.lower() for s in lexicon.RAMBLE_SENTENCES):
        return False
    body = text.strip()
    return _CONTINUATION.search(body, 1) is None


def number_word(n: int) -> str:
    return lexicon.NUMBER_WORDS[n] if 0 <= n < len(lexicon.NUMBER_WORDS) else str(n)


# ---- explicit constraints -------------------------------------------------------------------
# A constraint is a small JSON-able dict {"type": ..., ...}; ``describe`` words it for the prompt
# and ``satisfied`` checks a response against it.


def describe(constraint: dict) -> str:
    kind = constraint["type"]
    if kind == "max_words":
        n = constraint["n"]
        return "Answer in one word." if n == 1 else f"Answer in at most {number_word(n)} words."
    if kind == "max_sentences":
        n = constraint["n"]
        return "Use one sentence." if n == 1 else f"Use at most {number_word(n)} sentences."
    if kind == "include_word":
        return f"Use the word '{constraint['word']}'."
    if kind == "exclude_word":
        return f"Do not use the word '{constraint['word']}'."
    if kind == "num_items":
        return f"Give exactly {number_word(constraint['n'])} items, one per line."
    if kind == "items_start_with":
        return f"Start every item with the letter '{constraint['letter']}'."
    if kind == "greeting":
        return "Start with a greeting."
    if kind == "comma_separated":
        return "Write only the names, separated by commas."
    if kind == "digits_only":
        return "Answer with digits only."
    if kind == "only_result":
        return "Write only the result."
    raise ValueError(f"unknown constraint type {kind!r}")


def satisfied(constraint: dict, response: str) -> bool:
    kind = constraint["type"]
    if kind == "max_words":
        return 0 < len(words(response)) <= constraint["n"]
    if kind == "max_sentences":
        return 0 < len(sentences(response)) <= constraint["n"]
    if kind == "include_word":
        return contains_word(response, constraint["word"])
    if kind == "exclude_word":
        return not contains_word(response, constraint["word"])
    if kind == "num_items":
        return len(list_items(response)) == constraint["n"]
    if kind == "items_start_with":
        items = list_items(response)
        return bool(items) and all(i.lower().startswith(constraint["letter"]) for i in items)
    if kind == "greeting":
        first = words(response)[:2]
        return bool(first) and first[0] in ("hello", "hi", "good", "greetings", "hey")
    if kind == "comma_separated":
        parts = [p.strip().rstrip(".") for p in response.strip().split(",")]
        return "\n" not in response.strip() and all(
            re.fullmatch(r"[A-Z][a-z]+(?: [a-z]+)?", p) for p in parts
        )
    if kind == "digits_only":
        return re.fullmatch(r"\s*\d+\.?\s*", response) is not None
    if kind == "only_result":
        return len(words(response)) <= constraint["n"]
    raise ValueError(f"unknown constraint type {kind!r}")
