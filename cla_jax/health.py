"""The divergence guard: is this step's loss / gradient norm healthy, and which checkpoint is known good.

A checkpoint at step s holds the params after s updates; the loss logged for step s+1 is the first one
computed from them. So a checkpoint is only *verified* once the next step's metrics pass the check, and
a run that diverges names (and keeps) the newest verified checkpoint, never one it merely saved.
"""

from __future__ import annotations

import collections
import math
import statistics

import ml_collections

from cla_jax.errors import UserError

# A dead model: (near) zero gradients while the loss sits at the uniform-prediction value ln(vocab).
DEAD_GRAD_NORM = 1e-6
DEAD_LOSS_TOLERANCE = 1e-3
# A spike must also be this many nats above the median: a nearly memorised corpus (loss 0.05) can wobble
# by several times its value without diverging.
SPIKE_MIN_NATS = 1.0


class DivergenceError(UserError):
  """The loss or gradients went bad; the run stops without saving the bad state."""


class HealthCheck:
  """Judges each step's (loss, grad_norm); remembers recent losses for the running median."""

  def __init__(self, train: ml_collections.ConfigDict, vocab_size: int):
    self.enabled = bool(train.divergence_check)
    self.spike_factor = float(train.divergence_spike_factor)
    self.max_grad_norm = float(train.divergence_max_grad_norm)
    self.uniform_loss = math.log(vocab_size)
    self.recent: collections.deque[float] = collections.deque(maxlen=int(train.divergence_window))

  def problem(self, loss: float, grad_norm: float) -> str | None:
    """None when the step is healthy, else what is wrong (and which setting decided it)."""
    bad = [
        f"{name} is {value}"
        for name, value in (("loss", loss), ("gradient norm", grad_norm))
        if not math.isfinite(value)
    ]
    if bad:  # always on: a non-finite gradient poisons the update even when the loss was still finite
      return " and ".join(bad)
    if not self.enabled:
      return None
    if grad_norm == 0.0 or (grad_norm < DEAD_GRAD_NORM and abs(loss - self.uniform_loss) < DEAD_LOSS_TOLERANCE):
      return (
          f"the model is dead: gradient norm {grad_norm:.3g} with the loss {loss:.4f} at ln(vocab_size) = "
          f"{self.uniform_loss:.4f} (train.divergence_check)"
      )
    if self.max_grad_norm > 0 and grad_norm > self.max_grad_norm:
      return f"gradient norm {grad_norm:.4g} is above train.divergence_max_grad_norm={self.max_grad_norm:g}"
    if self.spike_factor > 0 and self.recent:
      median = statistics.median(self.recent)
      if loss > self.spike_factor * median and loss > median + SPIKE_MIN_NATS:
        return (
            f"loss {loss:.4g} is above train.divergence_spike_factor={self.spike_factor:g} x its running "
            f"median {median:.4g}"
        )
    self.recent.append(loss)
    return None
