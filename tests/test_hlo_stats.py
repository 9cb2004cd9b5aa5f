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


# An all-gather as XLA:TPU writes an async collective fusion, inside a loop of 5 trips: the start fusion, a
# continuation and the done fusion each hold the same all-gather (channel 7); one more (channel 8) is plain.
_ASYNC_GATHER_LOOP = """
%start_gather (a.1: bf16[8,64]) -> bf16[128,64] {
  %a.1 = bf16[8,64]{1,0} parameter(0)
  ROOT %all-gather.1 = bf16[128,64]{1,0} all-gather(%a.1), channel_id=7, replica_groups=[1,16]<=[16], dimensions={0}
}

%continue_gather (a.2: bf16[8,64]) -> bf16[128,64] {
  %a.2 = bf16[8,64]{1,0} parameter(0)
  ROOT %all-gather.2 = bf16[128,64]{1,0} all-gather(%a.2), channel_id=7, replica_groups=[1,16]<=[16], dimensions={0}
}

%done_gather (a.3: bf16[8,64], g.3: bf16[128,64]) -> bf16[128,64] {
  %a.3 = bf16[8,64]{1,0} parameter(0)
  %g.3 = bf16[128,64]{1,0} parameter(1)
  ROOT %all-gather.3 = bf16[128,64]{1,0} all-gather(%a.3), channel_id=7, replica_groups=[1,16]<=[16], dimensions={0}
}

%body (p: (u32[], bf16[8,64])) -> (u32[], bf16[8,64]) {
  %p = (u32[], bf16[8,64]) parameter(0)
  %i = u32[] get-tuple-element(%p), index=0
  %a = bf16[8,64]{1,0} get-tuple-element(%p), index=1
  %async-collective-start = bf16[128,64]{1,0} fusion(%a), kind=kCustom, calls=%start_gather
  %async_collective_fusion = bf16[128,64]{1,0} fusion(%a), kind=kCustom, calls=%continue_gather
  %async-collective-done = bf16[128,64]{1,0} fusion(%a, %async-collective-start), kind=kCustom, calls=%done_gather
  %all-gather.4 = bf16[128,64]{1,0} all-gather(%a), channel_id=8, replica_groups=[1,16]<=[16], dimensions={0}
  %one = u32[] constant(1)
  %next = u32[] add(%i, %one)
  ROOT %out = (u32[], bf16[8,64]) tuple(%next, %a)
}

%cond (q: (u32[], bf16[8,64])) -> pred[] {
  %q = (u32[], bf16[8,64]) parameter(0)
  %j = u32[] get-tuple-element(%q), index=0
  %bound = u32[] constant(5)
  ROOT %lt = pred[] compare(%j, %bound), direction=LT
}

ENTRY %main (x: bf16[8,64]) -> bf16[8,64] {
  %x = bf16[8,64]{1,0} parameter(0)
  %zero = u32[] constant(0)
  %t = (u32[], bf16[8,64]) tuple(%zero, %x)
  %w = (u32[], bf16[8,64]) while(%t), condition=%cond, body=%body
  ROOT %r = bf16[8,64]{1,0} get-tuple-element(%w), index=1
}
"""


def test_an_async_collective_fusion_counts_its_collective_once_per_trip():
  # Each loop trip runs two all-gathers of a [128, 64] bf16 result (16 KiB): channel 7 (held by the start,
  # continuation and done fusions) and channel 8. Counting each fused copy read 4 a trip.
  assert hlo_stats.collectives(_ASYNC_GATHER_LOOP) == {"all-gather": {"count": 2 * 5, "bytes": 2 * 5 * 128 * 64 * 2}}
