"""Simulated labelers: the stand-in for the paper's ~40 contractors (section 3.4, appendix B).

Each labeler sees a response through the gold rubric plus personal biases (a preference for
longer or shorter answers, leniency about explicit constraints) and noise, and

  * writes demonstrations (the reference solver in the labeler's wording, rarely with a slip),
  * ranks K = 4..9 responses to one prompt: a Plackett-Luce draw over perceived quality
    (Gumbel-max: sort utility + Gumbel noise), near-equal responses tied (ranks: 0 = best),
  * gives 1-7 Likert ratings and the metadata flags of figure 4,
  * makes pairwise judgments (for win rates).

Every judgment is a pure function of (world seed, labeler, inputs): asking again gives the same
answer, whatever else was asked before. Labelers are split into a training group (their rankings
train the reward model) and a held-out group (to test that the reward model generalizes, paper
figure 3 and section 4.1).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math

import numpy as np

from instructrl.world.tasks import ATTRIBUTES, PENALTY

LIKERT_FLAGS = ATTRIBUTES[:6]  # the labelers' metadata flags of figure 4 (not stops, length)


@dataclasses.dataclass(frozen=True)
class LabelerProfile:
    """One labeler's traits.

    noise: float, scale of the Gumbel noise on utilities (Plackett-Luce temperature).
    length_bias: float, utility added per unit of log(1 + words) / log(101); > 0 likes long.
    constraint_leniency: float in [0, 1], share of the constraint penalty the labeler ignores.
    tie_margin: float, utilities closer than this tie.
    flag_error_rate: float, chance of flipping each metadata flag.
    demo_error_rate: float, chance that a demonstration carries a slip.
    style: int, wording variant used in demonstrations.
    """

    labeler_id: str
    group: str
    noise: float
    length_bias: float
    constraint_leniency: float
    tie_margin: float
    flag_error_rate: float
    demo_error_rate: float
    style: int


class Labeler:
    """A labeler bound to a world (for the gold rubric)."""

    def __init__(self, world, profile: LabelerProfile):
        self.world, self.profile = world, profile

    @property
    def labeler_id(self) -> str:
        return self.profile.labeler_id

    def _rng(self, *parts) -> np.random.Generator:
        key = json.dumps([self.world.config.seed, self.profile.labeler_id, *parts])
        digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
        return np.random.default_rng(int.from_bytes(digest, "little"))

    def utility(self, gold: dict) -> float:
        """Perceived quality of a response from its gold score dict (no noise)."""
        p = self.profile
        u = gold["score"]
        if not gold["satisfies_constraints"]:
            u *= 1 + p.constraint_leniency * (1 / PENALTY["constraint"] - 1)
        return u + p.length_bias * math.log1p(gold["length"]) / math.log(101)

    def rank(
        self, record: dict, responses: list[str], golds: list[dict] | None = None
    ) -> list[int]:
        """Ranks (0 = best, equal ranks = tie) of ``responses``, a list of K strings.

        ``golds`` (optional) are the precomputed ``world.score`` dicts of the responses.
        """
        golds = golds or [self.world.score(record, r) for r in responses]
        utilities = np.array([self.utility(g) for g in golds])  # (K,)
        rng = self._rng("rank", record["prompt"], responses)
        perceived = utilities + self.profile.noise * rng.gumbel(size=len(responses))
        first_copy = {}
        for i, r in enumerate(responses):  # the same text always gets the same judgment
            perceived[i] = perceived[first_copy.setdefault(r, i)]
        order = np.argsort(-perceived, kind="stable")
        ranks = [0] * len(responses)
        rank = 0
        for prev, cur in itertools.pairwise(order):
            if perceived[prev] - perceived[cur] > self.profile.tie_margin:
                rank += 1
            ranks[cur] = rank
        return ranks

    def compare(self, record: dict, response_a: str, response_b: str) -> float:
        """1.0 if a is preferred, 0.0 if b, 0.5 for a tie."""
        rank_a, rank_b = self.rank(record, [response_a, response_b])
        return 0.5 if rank_a == rank_b else float(rank_a < rank_b)

    def likert(self, record: dict, response: str) -> int:
        """Overall quality on the paper's 1-7 scale."""
        u = self.utility(self.world.score(record, response))
        u += self.profile.noise * self._rng("likert", record["prompt"], response).normal()
        return int(1 + round(6 * min(1.0, max(0.0, u))))

    def flags(self, record: dict, response: str) -> dict[str, bool]:
        """The metadata flags of figure 4, each read wrongly with ``flag_error_rate``."""
        gold = self.world.score(record, response)
        flips = self._rng("flags", record["prompt"], response).random(len(LIKERT_FLAGS))
        return {
            k: bool(gold[k]) != bool(f < self.profile.flag_error_rate)
            for k, f in zip(LIKERT_FLAGS, flips, strict=True)
        }

    def write_demonstration(self, record: dict) -> str:
        """The labeler's answer: the reference in the labeler's wording, rarely with a slip."""
        rng = self._rng("demo", record["prompt"])
        if rng.random() < self.profile.demo_error_rate:
            slip = self.world.corrupt(record, "violate_constraint", rng)
            if slip is not None:
                return slip
        return self.world.solve(record, self.profile.style + int(rng.integers(2)))


class LabelerPool:
    """The labeler population: ``train`` and ``heldout`` lists of ``Labeler``."""

    def __init__(self, world):
        c = world.config
        rng = np.random.default_rng([c.seed, 7919])
        self.train = [
            self._make(world, rng, f"train-{i:02d}", "train", c.train_noise)
            for i in range(c.num_train_labelers)
        ]
        self.heldout = [
            self._make(world, rng, f"heldout-{i:02d}", "heldout", c.heldout_noise)
            for i in range(c.num_heldout_labelers)
        ]
        self.by_id = {lab.labeler_id: lab for lab in self.train + self.heldout}

    @staticmethod
    def _make(world, rng, labeler_id, group, noise) -> Labeler:
        c = world.config
        profile = LabelerProfile(
            labeler_id=labeler_id,
            group=group,
            noise=float(noise * rng.lognormal(0.0, 0.2)),
            length_bias=float(rng.normal(0.0, c.length_bias_std)),
            constraint_leniency=float(rng.uniform(0.0, c.max_constraint_leniency)),
            tie_margin=c.tie_margin,
            flag_error_rate=c.flag_error_rate,
            demo_error_rate=c.demo_error_rate,
            style=int(rng.integers(4)),
        )
        return Labeler(world, profile)

    def profiles(self) -> list[dict]:
        return [dataclasses.asdict(lab.profile) for lab in self.train + self.heldout]


def pair_agreement(ranks_a: list[int], ranks_b: list[int]) -> tuple[int, int]:
    """(agreeing pairs, compared pairs) over response pairs both labelers strictly order."""
    agree = total = 0
    for i, j in itertools.combinations(range(len(ranks_a)), 2):
        a, b = np.sign(ranks_a[i] - ranks_a[j]), np.sign(ranks_b[i] - ranks_b[j])
        if a != 0 and b != 0:
            total += 1
            agree += int(a == b)
    return agree, total


def agreement_rate(
    world, labelers: list[Labeler], records: list[dict], responses: list[list[str]]
) -> float:
    """Inter-labeler agreement (appendix B.3): the share of response pairs that two labelers
    order the same way, over every pair of ``labelers`` and every record."""
    agree = total = 0
    for record, candidates in zip(records, responses, strict=True):
        golds = [world.score(record, r) for r in candidates]
        all_ranks = [lab.rank(record, candidates, golds) for lab in labelers]
        for ra, rb in itertools.combinations(all_ranks, 2):
            a, t = pair_agreement(ra, rb)
            agree, total = agree + a, total + t
    return agree / max(total, 1)
