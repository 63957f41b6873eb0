"""The whole pipeline on its small built-in default (``instructrl pipeline`` uses this).

  instructrl pipeline --config configs/pipeline.py --workdir runs/main
  instructrl pipeline --config configs/pipeline.py:runlocal --workdir /tmp/p \\
      --config.sft.train.steps=50
"""

from instructrl import pipeline


def get_config(arg=None):
    return pipeline.default_config(arg)
