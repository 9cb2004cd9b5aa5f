"""The paper's 1B models (Table 1 and the tuned-LR rows): `--config=configs/paper_1b.py:H128-MQA-CLA2`."""

import pathlib

import ml_collections

from cla_jax import config_lib, paper

# Loaded by path, like every config file: the same line works in a checkout and installed (cla_jax.configs).
_DEFAULT = str(pathlib.Path(__file__).with_name("default.py"))


def get_config(row: str = "H128-MQA-CLA2") -> ml_collections.ConfigDict:
  """Default config with the 1B family and the named row; `H128-MQA-tuned` etc. for tuned LRs."""
  config = config_lib.load(_DEFAULT)
  paper.apply_row(config, "1b", row)
  return config
