"""The paper's 1B models (Table 1 and the tuned-LR rows): `--config=configs/paper_1b.py:H128-MQA-CLA2`."""

import ml_collections

from cla_jax import paper
from configs import default


def get_config(row: str = "H128-MQA-CLA2") -> ml_collections.ConfigDict:
  """Default config with the 1B family and the named row; `H128-MQA-tuned` etc. for tuned LRs."""
  config = default.get_config()
  paper.apply_row(config, "1b", row)
  return config
