"""TPU slice names -> chips, HBM and compile-only devices (libtpu, no TPU needed)."""

import pytest

from cla_jax import topology
from cla_jax.errors import UserError


@pytest.mark.parametrize(
    "name, chips, jax_name, hbm_gib",
    [
        # Cloud TPU docs: v5e-N has N chips (16 GiB each); v4-N and v5p-N count TensorCores, two per chip.
        ("v5e-16", 16, "v5e:4x4", 16),
        ("v5e-256", 256, "v5e:16x16", 16),
        ("v5litepod-8", 8, "v5e:2x4", 16),
        ("v5p-64", 32, "v5p:2x4x4", 95),
        ("v5p-128", 64, "v5p:4x4x4", 95),
        ("v4-32", 16, "v4:2x2x4", 32),
        ("v6e-8", 8, "v6e:2x4", 32),
        ("v5e:2x2", 4, "v5e:2x2", 16),
    ],
)
def test_parse(name, chips, jax_name, hbm_gib):
  t = topology.parse(name)
  assert (t.chips, t.jax_name, t.hbm_per_chip_bytes) == (chips, jax_name, hbm_gib * 2**30)


@pytest.mark.parametrize("name", ["v5e-3", "v9-8", "v5p-6", "v5e:3x3", "tpu", "v4:2x2", "v5p:1x2x2"])
def test_unknown_topology_is_one_line(name):
  with pytest.raises(UserError, match=r"unknown TPU topology .*valid: v5e-") as e:
    topology.parse(name)
  assert "\n" not in str(e.value)


@pytest.mark.parametrize("bad", [0, -1, 1.5])
def test_bad_num_slices(bad):
  with pytest.raises(UserError, match="num_slices"):
    topology.parse("v5e-16", bad)


@pytest.mark.parametrize("name, slices, count, kind", [("v5e-4", 2, 8, "TPU v5 lite"), ("v5p-8", 1, 4, "TPU v5")])
def test_compile_only_devices(name, slices, count, kind):
  devices = topology.compile_only_devices(name, num_slices=slices)
  assert len(devices) == count and devices[0].device_kind == kind
  assert len({getattr(d, "slice_index", 0) for d in devices}) == slices
