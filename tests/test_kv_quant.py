"""int8 KV cache entries against a numpy reference: per-element error bound, zeros, the stored grid."""

import ml_dtypes
import numpy as np
import pytest

from cla_jax import kv_quant
from cla_jax.errors import UserError


def _numpy_quantize(x):
  """The definition: scale = max|x| / 127 stored in bfloat16, q = clip(round(x / scale), -127, 127)."""
  scale = (np.abs(x).max(-1) / 127).astype(ml_dtypes.bfloat16).astype(np.float64)
  safe = np.where(scale > 0, scale, 1.0)
  return np.clip(np.rint(x / safe[..., None]), -127, 127), scale


def test_round_trip_error_is_half_a_step_per_element():
  rng = np.random.default_rng(0)
  # Rows of very different magnitudes, an outlier channel, and an all-zero row.
  x = rng.standard_normal((3, 5, 2, 64)) * np.exp(rng.uniform(-6, 6, (3, 5, 2, 1)))
  x[0, 0, 0, 7] *= 40
  x[1, 2, 1] = 0
  q, scale = kv_quant.quantize(x.astype(np.float32))
  assert q.dtype == np.int8 and scale.dtype == kv_quant.SCALE_DTYPE and scale.shape == x.shape[:-1]
  q_ref, scale_ref = _numpy_quantize(x.astype(np.float32).astype(np.float64))
  np.testing.assert_array_equal(np.asarray(scale, np.float64), scale_ref)
  # Rounding ties may fall either way in float32 vs float64: at most one step apart, and rarely.
  assert np.abs(np.asarray(q, np.int64) - q_ref).max() <= 1 and np.mean(np.asarray(q) != q_ref) < 1e-3
  back = np.asarray(kv_quant.dequantize(q, scale), np.float64)
  # Half a step, plus what storing the scale in bfloat16 can push the largest element past 127 steps.
  bound = scale_ref[..., None] * (0.5 + 1e-3) + 1e-6 * np.abs(x)
  assert np.all(np.abs(back - x) <= bound)
  np.testing.assert_array_equal(back[1, 2, 1], 0.0)
  assert np.abs(np.asarray(q)).max() <= 127


@pytest.mark.parametrize("bad", ["fp8", "INT8", "bfloat16", 8, ""])
def test_bad_kv_cache_dtype_is_one_line(bad):
  with pytest.raises(UserError, match=r"kv_cache_dtype must be one of \('auto', 'int8'\)") as e:
    kv_quant.check_kv_cache_dtype(bad)
  assert "\n" not in str(e.value)
