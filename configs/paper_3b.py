"""The paper's 3B models (tuned-LR table, sets a and b): `--config=configs/paper_3b.py:H128-MQA-CLA2`."""

import ml_collections

from cla_jax import paper
from configs import default


def get_config(row: str = "H128-MQA-CLA2") -> ml_collections.ConfigDict:
  """Default config with the 3B family and the named row; set-b rows end in `-setb`."""
  config = default.get_config()
  paper.apply_row(config, "3b", row)
  return config
