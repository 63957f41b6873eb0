"""``World``: one seeded object that owns the knowledge base, the task families, the gold scorer
and the labeler population, and hands out prompts, reference answers and corrupted answers."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from instructrl import fs
from instructrl.world import corpus, families_closed, families_open, heldout, lexicon, tasks
from instructrl.world.knowledge import QUESTIONS, Fact, KnowledgeBase
from instructrl.world.labelers import LabelerPool
from instructrl.world.seeding import as_rng

FAMILIES: tuple[tasks.TaskFamily, ...] = (
    families_open.StoryFamily(),
    families_open.PlaceDescriptionFamily(),
    families_open.OpenQAFamily(),
    families_open.BrainstormFamily(),
    families_open.ChatFamily(),
    families_open.RewriteFamily(),
    families_closed.SummarizeFamily(),
    families_closed.ClassifyFamily(),
    families_open.OtherFamily(),
    families_closed.ClosedQAFamily(),
    families_closed.ExtractFamily(),
)
FAMILY_BY_NAME = {f.name: f for f in FAMILIES}

# The ways a response goes wrong that the paper's metadata measures (figure 4), used to build
# candidate responses and to test that the rubric ranks each below the reference.
CORRUPTIONS = ("wrong_fact", "violate_constraint", "hallucinate", "toxic", "no_stop", "off_task")

TOXIC_SENTENCES = (
    "What a stupid question.",
    "Only an idiot asks that.",
    "That is a dumb thing to ask.",
    "Shut up and go away.",
    "You are such a loser.",
    "Ask a moron instead.",
)


# The separator of few-shot examples (the corpus's layout): a few-shot answer ends at it.
FEWSHOT_STOP = "###"


@dataclasses.dataclass(frozen=True)
class WorldConfig:
    """Every knob of the world; ``World.build(seed, **overrides)`` fills it.

    Prompt counts follow the paper's dataset sizes (appendix A, table 6: SFT 12,725, RM 33,207,
    PPO 31,144 training prompts) times ``scale``.
    """

    seed: int = 0
    num_people: int = 32
    num_places: int = 12
    num_objects: int = 12
    category_mix: tuple[tuple[str, float], ...] = tuple(tasks.PAPER_CATEGORY_MIX.items())
    difficulty_weights: tuple[float, ...] = (0.4, 0.35, 0.25)
    # Pretraining corpus failure modes.
    false_fact_rate: float = 0.1
    toxic_rate: float = 0.05
    ramble_rate: float = 0.3
    constraint_ignore_rate: float = 0.7
    instruction_page_rate: float = 0.02
    # Labelers. The noise is calibrated so that inter-labeler agreement (appendix B.3) on the
    # default pipeline's comparison data is the paper's 72.6% (training) and 77.3% (held-out):
    # 0.728 / 0.771 on seed 0 (experiments/signal).
    num_train_labelers: int = 16
    num_heldout_labelers: int = 8
    train_noise: float = 0.105
    heldout_noise: float = 0.065
    length_bias_std: float = 0.05
    max_constraint_leniency: float = 0.5
    tie_margin: float = 0.01
    flag_error_rate: float = 0.05
    demo_error_rate: float = 0.03
    # Dataset sizes.
    scale: float = 0.05
    num_eval_prompts: int = 200
    # RM training prompts; 0 = the paper's 33,207 x scale. The small default ranks more prompts
    # than its scale gives: its reward model is data-bound (experiments/ptx_vs_ppo).
    num_rm_prompts: int = 0
    num_pretrain_docs: int = 20000
    num_heldout_per_family: int = 200
    min_responses: int = 4
    max_responses: int = 9
    vocab_size: int = 2048

    @property
    def mix(self) -> dict[str, float]:
        total = sum(w for _, w in self.category_mix)
        return {c: w / total for c, w in self.category_mix}


class World:
    """The synthetic instruction world. Build with ``World.build(seed, **config_overrides)``.

    Attributes:
      config: WorldConfig.
      kb: KnowledgeBase.
      labelers: labelers.LabelerPool (training and held-out groups).
    """

    def __init__(self, config: WorldConfig):
        self.config = config
        unknown = set(config.mix) - set(tasks.CATEGORIES)
        if unknown:
            raise ValueError(f"category_mix names unknown categories {sorted(unknown)}")
        self.kb = KnowledgeBase.generate(
            as_rng(config.seed, "knowledge"),
            config.num_people,
            config.num_places,
            config.num_objects,
        )
        self.families_by_category = {
            c: [f for f in FAMILIES if f.category == c] for c in tasks.CATEGORIES
        }
        self.labelers = LabelerPool(self)

    @classmethod
    def from_config(cls, section, **extra) -> World:
        """The world of a config section ``{seed, overrides}`` (``extra`` wins)."""
        overrides = dict(section.get("overrides") or {})
        return cls.build(int(section["seed"]), **{**overrides, **extra})

    @classmethod
    def from_dir(cls, directory: str) -> World:
        """The world whose files ``build_all`` wrote to ``directory`` (its world.json)."""
        path = os.path.join(directory, "world.json")
        if not fs.isfile(path):
            raise FileNotFoundError(f"{directory}: not a world directory (no world.json)")
        fields = dict(json.loads(fs.read_text(path))["config"])
        for name, value in fields.items():  # JSON lists back to the config's tuples
            if isinstance(value, list):
                fields[name] = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        return cls.build(**fields)

    @classmethod
    def build(cls, seed: int = 0, **overrides) -> World:
        if isinstance(overrides.get("category_mix"), dict):
            overrides["category_mix"] = tuple(overrides["category_mix"].items())
        return cls(WorldConfig(seed=seed, **overrides))

    # ---- prompts ---------------------------------------------------------------------------
    def family(self, record_or_name: dict | str) -> tasks.TaskFamily:
        name = record_or_name if isinstance(record_or_name, str) else record_or_name["family"]
        return FAMILY_BY_NAME[name]

    def draw_family(
        self, rng: np.random.Generator, category: str | None = None, family: str | None = None
    ) -> str:
        """A task family: the category from the mix unless given, the family uniform in it."""
        if family is None:
            if category is None:
                names, weights = zip(*self.config.mix.items(), strict=True)
                category = names[rng.choice(len(names), p=np.asarray(weights))]
            options = self.families_by_category[category]
            family = options[int(rng.integers(len(options)))].name
        return family

    def sample_prompt(
        self,
        rng: np.random.Generator,
        category: str | None = None,
        family: str | None = None,
        difficulty: int | None = None,
        record_id: str = "prompt",
    ) -> dict:
        """One prompt record (see ``tasks``); category drawn from the mix unless given."""
        family = self.draw_family(rng, category, family)
        if difficulty is None:
            weights = np.asarray(self.config.difficulty_weights, np.float64)
            difficulty = int(rng.choice(len(weights), p=weights / weights.sum()))
        return FAMILY_BY_NAME[family].make_record(self.kb, rng, difficulty, record_id)

    def sample_prompts(
        self,
        num: int,
        seed: int | np.random.Generator | None = None,
        prefix: str = "prompt",
        exclude: set[str] | None = None,
        max_tries: int = 1000,
        **kwargs,
    ) -> list[dict]:
        """``num`` prompt records with ids "{prefix}-000000", ...; kwargs as ``sample_prompt``.

        ``exclude``: prompt texts not to draw (e.g. the training prompts, so that evaluation
        prompts are unseen, as the paper holds out whole customers); the records are then also
        distinct. Each record's family is drawn from the mix first and its text (difficulty
        included) is redrawn within that family until unseen: rejecting seen texts outright
        would skew the set toward families with many distinct prompts (most describe_place
        prompts of the small default repeat a training prompt, few story prompts do) and away
        from the paper's category mix. Raises when a family has no unseen text left in
        ``max_tries`` draws.
        """
        rng = as_rng(self.config.seed if seed is None else seed, f"prompts/{prefix}")
        if exclude is None:
            return [
                self.sample_prompt(rng, record_id=f"{prefix}-{i:06d}", **kwargs) for i in range(num)
            ]
        out, seen = [], set(exclude)
        for i in range(num):
            family = self.draw_family(rng, kwargs.get("category"), kwargs.get("family"))
            for _ in range(max_tries):
                record = self.sample_prompt(
                    rng,
                    family=family,
                    difficulty=kwargs.get("difficulty"),
                    record_id=f"{prefix}-{i:06d}",
                )
                if record["prompt"] not in seen:
                    break
            else:
                raise ValueError(
                    f"no unseen {family} prompt in {max_tries} draws ({i} of {num} drawn); "
                    "shrink the set or enlarge the world"
                )
            seen.add(record["prompt"])
            out.append(record)
        return out

    # ---- answers and the gold rubric -------------------------------------------------------
    def solve(self, record: dict, variant: int = 0) -> str:
        """The reference answer (``variant`` picks a wording)."""
        return self.family(record).solve(self.kb, record["spec"], variant)

    def score(self, record: dict, response: str) -> dict:
        """Gold score in [0, 1] with attributes; see ``tasks.score_response``."""
        return tasks.score_response(self.kb, self.family(record), record, response)

    def corrupt(
        self, record: dict, kind: str, rng: np.random.Generator, base: str | None = None
    ) -> str | None:
        """A response with one failure of ``CORRUPTIONS``; None where it does not apply.

        ``base`` (default: the reference) is the response that toxic / no_stop / hallucinate
        corruptions are added to.
        """
        fam, spec = self.family(record), record["spec"]
        base = fam.solve(self.kb, spec, 0) if base is None else base
        if kind == "wrong_fact":
            return fam.wrong_answer(self.kb, spec, rng)
        if kind == "violate_constraint":
            return fam.violate_constraint(self.kb, spec, rng)
        if kind == "hallucinate":
            # Closed domain: a true fact the text does not support. Open domain: a made-up fact.
            mentioned = set(self.kb.mentioned_entities(record["prompt"]))
            subject = _pick(rng, [p for p in self.kb.people if p not in mentioned])
            fact = _pick(rng, self.kb.facts(subject))
            if not fam.closed_domain:
                fact = self.kb.false_fact(fact, rng)
            return f"{base} {self.kb.sentence(fact)}"
        if kind == "toxic":
            return f"{base} {_pick(rng, TOXIC_SENTENCES)}"
        if kind == "no_stop":
            subject = _pick(rng, self.kb.people)
            relation = _pick(rng, ("lives_in", "job", "pet"))
            question = QUESTIONS[relation][0].format(s=subject)
            answer = self.kb.sentence(Fact(subject, relation, self.kb.value(subject, relation)))
            ramble = " ".join(_pick(rng, lexicon.RAMBLE_SENTENCES) for _ in range(2))
            return f"{base}\n\nQuestion: {question}\nAnswer: {answer} {ramble}"
        if kind == "off_task":
            other = "count_and_add" if fam.name != "count_and_add" else "rewrite"
            other_record = FAMILY_BY_NAME[other].make_record(self.kb, rng, 0, "off-task")
            return self.solve(other_record)
        raise ValueError(f"unknown corruption {kind!r}; expected one of {CORRUPTIONS}")

    def candidate_responses(self, record: dict, num: int, rng: np.random.Generator) -> list[str]:
        """``num`` responses of mixed quality: a stand-in for policy samples to be ranked.

        About 35% are references in some wording, 50% carry one failure, 15% two.
        """
        out = []
        for _ in range(num):
            r = rng.random()
            response = None
            if r >= 0.35:
                response = self.corrupt(record, _pick(rng, CORRUPTIONS), rng)
                if response is not None and r >= 0.85:
                    second = _pick(rng, ("toxic", "no_stop", "hallucinate"))
                    response = self.corrupt(record, second, rng, base=response)
            if response is None:
                response = self.solve(record, int(rng.integers(4)))
            out.append(response)
        return out

    # ---- corpora and datasets (thin wrappers; see corpus.py, heldout.py, datasets.py) ------
    def pretraining_corpus(self, num_docs: int, seed: int | np.random.Generator | None = None):
        """list[str] of plain documents; see ``corpus.pretraining_corpus``."""
        return corpus.pretraining_corpus(self, num_docs, seed)

    def heldout_tasks(self, num_per_family: int, seed: int | np.random.Generator | None = None):
        """list[dict] of held-out "public NLP" items; see ``heldout.heldout_tasks``."""
        return heldout.heldout_tasks(self, num_per_family, seed)

    def fewshot_prompt(
        self, record: dict, num_shots: int = 3, seed: int | np.random.Generator | None = None
    ) -> str:
        """The paper's "GPT-3 prompted" format: solved examples of the same family, then the
        prompt, in the "{prompt}\\n\\n{response}\\n\\n###\\n\\n" layout the corpus teaches."""
        rng = as_rng(self.config.seed if seed is None else seed, f"fewshot/{record['id']}")
        shots = []
        for i in range(num_shots):
            example = self.sample_prompt(rng, family=record["family"], record_id=f"shot-{i}")
            shots.append(f"{example['prompt']}\n\n{self.solve(example, i)}\n\n{FEWSHOT_STOP}\n\n")
        return "".join(shots) + record["prompt"]

    def demonstrations(self, records: list[dict], seed: int | None = None) -> list[dict]:
        """[{prompt, response, id, labeler_id}]: each prompt answered by a training labeler."""
        rng = as_rng(self.config.seed if seed is None else seed, "demonstrations")
        out = []
        for record in records:
            labeler = _pick(rng, self.labelers.train)
            out.append(
                {
                    "prompt": record["prompt"],
                    "response": labeler.write_demonstration(record),
                    "id": record["id"],
                    "labeler_id": labeler.labeler_id,
                }
            )
        return out


def _pick(rng: np.random.Generator, items):
    return items[int(rng.integers(len(items)))]


def gold_scorer(section, records: list[dict]):
    """callable(texts) -> gold scores of responses to world prompt ``records``, for a config's
    ``world`` section ``{seed, overrides}``; None without a world or for non-world records."""
    if not section or not records or "spec" not in records[0]:
        return None
    world = World.from_config(section)
    return lambda texts: [world.score(r, t)["score"] for r, t in zip(records, texts, strict=True)]
