"""A synthetic instruction world: knowledge, tasks, a gold rubric and simulated labelers.

InstructGPT (Ouyang et al. 2022) rests on people and on GPT-3. This package stands in for both,
seeded and procedurally generated, pure Python + NumPy, so that the whole pipeline runs offline
in minutes and every stage is measured against a known gold standard (as AlpacaFarm simulates
annotators, and Gao et al. 2022 measure reward over-optimization against a gold reward).

What stands in for what:

  paper                                      here
  -----------------------------------------  -----------------------------------------------
  the world GPT-3 has read about             knowledge.KnowledgeBase: invented people, places,
                                             objects with attributes and relations
  GPT-3's pretraining data                   corpus.pretraining_corpus: stories, encyclopedia
                                             entries, Q&A pages, lists, word games, reviews...
                                             with made-up facts, toxic words, rambling and
                                             ignored constraints at set rates
  API prompts and their use-case mix         tasks.PAPER_CATEGORY_MIX (table 1), task families
  (table 1)                                  in families_open / families_closed; prompt records
  explicit constraints in prompts            text.describe / text.satisfied
  labeler judgments of figure 4 (metadata)   tasks.score_response / World.score: gold score in
                                             [0, 1] and follows_instruction,
                                             satisfies_constraints, hallucination, truthful,
                                             toxic, appropriate_for_customer_assistant, length
  the ~40 contractors; held-out labelers     labelers.LabelerPool: train / heldout groups with
                                             noise, length bias, constraint leniency
  demonstrations (SFT data)                  Labeler.write_demonstration, World.demonstrations
  rankings of K = 4..9 outputs (RM data)     Labeler.rank (Plackett-Luce with ties),
                                             datasets.build_rankings
  Likert 1-7 and pairwise preference         Labeler.likert, Labeler.compare
  inter-labeler agreement 72.6% / 77.3%      labelers.agreement_rate (defaults calibrated)
  "GPT-3 prompted" few-shot baseline         World.fewshot_prompt
  public NLP tasks (alignment tax, table 14) heldout: read_qa (SQuAD), count_qa (DROP),
                                             story_ending (HellaSwag), translate (Fr->En)
  TruthfulQA / RealToxicityPrompts axes      the truthful / toxic attributes of the rubric
  the datasets of table 6                    datasets.build_all, ``python -m instructrl.world
                                             build --out DIR``

Quick start::

  world = World.build(seed=0)
  record = world.sample_prompt(np.random.default_rng(0))
  world.score(record, world.solve(record))["score"]            # 1.0
  world.labelers.train[0].rank(record, ["...", "...", "..."])  # e.g. [0, 2, 1]
"""

from instructrl.world.knowledge import Fact, KnowledgeBase
from instructrl.world.labelers import Labeler, LabelerPool, agreement_rate
from instructrl.world.tasks import ATTRIBUTES, CATEGORIES, PAPER_CATEGORY_MIX
from instructrl.world.world import CORRUPTIONS, FAMILIES, World, WorldConfig, gold_scorer

__all__ = [
    "ATTRIBUTES",
    "CATEGORIES",
    "CORRUPTIONS",
    "FAMILIES",
    "PAPER_CATEGORY_MIX",
    "Fact",
    "KnowledgeBase",
    "Labeler",
    "LabelerPool",
    "World",
    "WorldConfig",
    "agreement_rate",
    "gold_scorer",
]
