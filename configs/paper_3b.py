"""The paper's 3B models (tuned-LR table, sets a and b): `--config=configs/paper_3b.py:H128-MQA-CLA2`."""

import pathlib

import ml_collections

from cla_jax import config_lib, paper

# Loaded by path, like every config file: the same line works in a checkout and installed (cla_jax.configs).
_DEFAULT = str(pathlib.Path(__file__).with_name("default.py"))


def get_config(row: str = "H128-MQA-CLA2") -> ml_collections.ConfigDict:
  """Default config with the 3B family and the named row; set-b rows end in `-setb`."""
  config = config_lib.load(_DEFAULT)
  paper.apply_row(config, "3b", row)
  return config
