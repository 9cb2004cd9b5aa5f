"""hlo_stats: matmul FLOPs of a compiled module with each loop body times its trips, against hand counts."""

import jax
import jax.numpy as jnp
import pytest

from cla_jax import hlo_stats

# A loop as XLA:TPU writes a bidirectional windowed einsum: the counter starts at 0 and steps by 2 against a
# bound of 8, so the body (one [4,8] x [8,16] dot: 2 * 4 * 16 * 8 = 1,024 FLOPs) runs 4 times, not 8.
_STEPPED_LOOP = """
%body (p: (u32[], f32[4,8], f32[8,16], f32[4,16])) -> (u32[], f32[4,8], f32[8,16], f32[4,16]) {
  %p = (u32[], f32[4,8], f32[8,16], f32[4,16]) parameter(0)
  %i = u32[] get-tuple-element(%p), index=0
  %a = f32[4,8]{1,0} get-tuple-element(%p), index=1
  %b = f32[8,16]{1,0} get-tuple-element(%p), index=2
  %acc = f32[4,16]{1,0} get-tuple-element(%p), index=3
  %dot.1 = f32[4,16]{1,0} dot(%a, %b), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %sum = f32[4,16]{1,0} add(%acc, %dot.1)
  %two = u32[] constant(STEP)
  %next = u32[] add(%i, %two)
  ROOT %out = (u32[], f32[4,8], f32[8,16], f32[4,16]) tuple(%next, %a, %b, %sum)
}

%cond (q: (u32[], f32[4,8], f32[8,16], f32[4,16])) -> pred[] {
  %q = (u32[], f32[4,8], f32[8,16], f32[4,16]) parameter(0)
  %j = u32[] get-tuple-element(%q), index=0
  %bound = u32[] constant(8)
  ROOT %lt = pred[] compare(%j, %bound), direction=LT
}

ENTRY %main (x: f32[4,8], y: f32[8,16]) -> f32[4,16] {
  %x = f32[4,8]{1,0} parameter(0)
  %y = f32[8,16]{1,0} parameter(1)
  %zero = u32[] constant(0)
  %init = f32[4,16]{1,0} constant(0)
  %t = (u32[], f32[4,8], f32[8,16], f32[4,16]) tuple(%zero, %x, %y, %init)
  %w = (u32[], f32[4,8], f32[8,16], f32[4,16]) while(%t), condition=%cond, body=%body
  ROOT %r = f32[4,16]{1,0} get-tuple-element(%w), index=3
}
"""


@pytest.mark.parametrize("copied", [False, True])
@pytest.mark.parametrize("step,trips", [(1, 8), (2, 4), (3, 3)])
def test_a_loop_counts_its_body_once_per_trip_of_its_stepped_counter(step, trips, copied):
  hlo = _STEPPED_LOOP.replace("STEP", str(step))
  if copied:  # as XLA:TPU writes it at fsdp 32: the counter is copied, and the copy stepped
    hlo = hlo.replace("%next = u32[] add(%i, %two)", "%i.copy = u32[] copy(%i)\n  %next = u32[] add(%i.copy, %two)")
  assert hlo_stats.step_flops(hlo) == trips * 2 * 4 * 16 * 8


def test_a_compiled_scan_counts_every_trip():
  # 6 trips of a [32, 64] x [64, 48] matmul, plus one [32, 48] x [48, 16] after the loop.
  def f(x, w, v):
    y, _ = jax.lax.scan(lambda c, _: (jnp.tanh(c @ w) @ w.T, None), x, None, length=6)
    return (y @ w) @ v

  x, w, v = jnp.ones((32, 64)), jnp.ones((64, 48)), jnp.ones((48, 16))
  hlo = jax.jit(f).lower(x, w, v).compile().as_text()
  in_loop = 6 * 2 * (2 * 32 * 64 * 48)  # c @ w and (.) @ w.T, each 2 * 32 * 64 * 48
  after = 2 * 32 * 64 * 48 + 2 * 32 * 48 * 16
  assert hlo_stats.step_flops(hlo) == in_loop + after
