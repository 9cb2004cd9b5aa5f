"""The HF tensor table: each layout against index arithmetic written out by hand, and export/import as inverses."""

import numpy as np
import pytest

from cla_jax import hf_layout

SIZES = {"d": 6, "n": 3, "k": 2, "h": 4, "f": 5, "v": 7}
ALL = (hf_layout.EMBED, hf_layout.FINAL_NORM, hf_layout.LM_HEAD, *hf_layout.LAYER, *hf_layout.KV, hf_layout.KV_NORM)


def test_query_and_out_follow_transformers_row_order():
  """q_proj row `head * h + j` is query[:, head, j]; o_proj column `head * h + j` is out[head, j, :]."""
  d, n, h = SIZES["d"], SIZES["n"], SIZES["h"]
  query = np.random.default_rng(0).normal(size=(d, n, h))
  out = np.random.default_rng(1).normal(size=(n, h, d))
  q_tensor, o_tensor = hf_layout.LAYER[1], hf_layout.LAYER[2]
  assert (q_tensor.hf_name, o_tensor.hf_name) == ("self_attn.q_proj.weight", "self_attn.o_proj.weight")
  q_proj, o_proj = hf_layout.to_hf(q_tensor, query), hf_layout.to_hf(o_tensor, out)
  for head in range(n):
    for j in range(h):
      np.testing.assert_array_equal(q_proj[head * h + j, :], query[:, head, j])
      np.testing.assert_array_equal(o_proj[:, head * h + j], out[head, j, :])


@pytest.mark.parametrize("tensor", ALL, ids=lambda t: t.hf_name)
def test_from_hf_inverts_to_hf_and_shapes_agree(tensor):
  x = np.random.default_rng(2).normal(size=hf_layout.shape(tensor, SIZES))
  w = hf_layout.to_hf(tensor, x)
  assert w.shape == hf_layout.hf_shape(tensor, SIZES)
  np.testing.assert_array_equal(hf_layout.from_hf(tensor, w, SIZES), x)


def test_put_and_get_address_the_same_entry():
  tree: dict = {}
  hf_layout.put(tree, hf_layout.KV_NORM, "scale")
  assert tree == {"norm": {"scale": "scale"}} and hf_layout.get(tree, hf_layout.KV_NORM) == "scale"
