"""The one K/V block of a converted CLA group, initialised from the K/V projections of the group's layers.

A Llama layer j computes its keys from its own input x_j: K_j = rmsnorm(x_j) * g_j @ W_j (g_j: its
`input_layernorm` gain). A CLA group computes one K (and V) from the group input x_i (i: the group's first
layer) with its own norm gain and projection, and every layer of the group attends to it. The methods:

  first  keep layer i's gain and projection (the group's first layer is unchanged; the others now see
         layer i's keys). No calibration needed.
  mean   the average of the layers' linear maps with the gain folded in, mean_j(diag(g_j) W_j), and a unit
         KV gain: applied to the group input it gives the mean of what each layer's own projection would
         produce from that input (mean-pooling, as GQA uptraining does across heads). No calibration needed.
  lsq    the projection that, on a calibration batch, best reproduces every layer's original K (resp. V)
         from the group input: argmin_W sum_j ||rmsnorm(x_i) W - K_j||^2 = the least-squares fit to
         mean_j K_j, with a unit KV gain. It minimises exactly the error `relative_errors` reports.

RoPE rotates each position's key by an orthogonal map that every layer shares, so fits and errors on the
pre-RoPE keys equal those on the rotated keys. Groups of one layer always keep that layer's K/V (exact).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cla_jax import model as model_lib

KV_INITS = ("first", "mean", "lsq")
NEEDS_CALIBRATION = ("lsq",)
# Ridge on the normal equations, relative to their mean diagonal: keeps the fit defined when the calibration
# batch has fewer tokens than d_model (or collinear inputs) and barely moves a well-posed one.
RIDGE = 1e-6

LayerKV = dict[str, Any]  # {"norm": {"scale": [d]}, "key": [d, k, h], "value": [d, k, h]} (float32 numpy)


def layer_inputs(params: Any, cfg: model_lib.ModelConfig, tokens: np.ndarray) -> list[np.ndarray]:
  """The residual stream entering each layer of an unshared (pattern 'none') model: num_layers x [N, d] fp32.

  `params` are that model's scanned params; `tokens` [b, t] the calibration batch (N = b * t rows).
  """
  if any(size != 1 for size in cfg.group_sizes):
    raise ValueError(f"layer_inputs needs the unshared model (pattern 'none'), got pattern {cfg.pattern!r}.")
  # Unscanned and unshared, each layer is its own group module whose output is captured by name.
  flat = dataclasses.replace(cfg, scan_layers=False, remat="none", dtype="float32")
  unstacked = model_lib.unstack_params(params, flat)

  def capture(p, t):
    is_group = lambda module, _: isinstance(module, model_lib.LayerGroup)  # noqa: E731
    _, state = model_lib.Transformer(flat).apply({"params": p}, t, capture_intermediates=is_group, mutable=True)
    return state["intermediates"]

  captured = jax.jit(capture)(unstacked, jnp.asarray(tokens, jnp.int32))
  d = cfg.d_model
  inputs = [np.asarray(params["embed"], np.float32)[np.asarray(tokens)].reshape(-1, d)]
  for s, (_, num_groups) in enumerate(flat.segments):
    for g in range(num_groups):
      (out,) = captured[model_lib.group_name(s, g)]["__call__"]
      inputs.append(np.asarray(out, np.float32).reshape(-1, d))
  return inputs[: cfg.num_layers]  # the last layer's output feeds no layer


def rms_normalize(x: np.ndarray, eps: float) -> np.ndarray:
  """x / rms(x) over the last axis, in float64 (the norm without its gain)."""
  x = x.astype(np.float64)
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def projected(x: np.ndarray, kv: LayerKV, which: str, eps: float) -> np.ndarray:
  """rmsnorm(x) * gain @ W for W = kv[which] ('key' or 'value'), pre-RoPE: [N, k * h] float64."""
  w = np.asarray(kv[which], np.float64)
  h = rms_normalize(x, eps) * np.asarray(kv["norm"]["scale"], np.float64)
  return h @ w.reshape(w.shape[0], -1)


def shared_kv(layers: Sequence[LayerKV], method: str) -> LayerKV:
  """'first' or 'mean' (no calibration): the group's K/V block from its layers' own (`layers[0]` first)."""
  if method not in ("first", "mean"):
    raise ValueError(f"shared_kv takes 'first' or 'mean', got {method!r}.")
  first = layers[0]
  if method == "first" or len(layers) == 1:
    return first
  d = first["key"].shape[0]
  # diag(g_j) W_j: the gain scales W's input rows; the KV norm then keeps a unit gain.
  fold = lambda kv, w: np.asarray(kv["norm"]["scale"], np.float64)[:, None, None] * kv[w]  # noqa: E731
  mean = {w: np.mean([fold(kv, w) for kv in layers], axis=0).astype(np.float32) for w in ("key", "value")}
  return {"norm": {"scale": np.ones((d,), np.float32)}, **mean}


def shared_kv_lsq(layers: Sequence[LayerKV], inputs: Sequence[np.ndarray], eps: float) -> LayerKV:
  """'lsq': the K/V projections fitted on the group input to the mean of the layers' original K/V.

  `inputs[j]` [N, d] is the residual stream entering layer j of the group (of the original model) on the
  calibration batch; layer j's original keys are projected(inputs[j], layers[j], 'key').
  """
  if len(layers) == 1:
    return layers[0]
  k_shape = layers[0]["key"].shape
  d = k_shape[0]
  h = rms_normalize(inputs[0], eps)  # [N, d]
  gram = h.T @ h
  gram += np.eye(d) * RIDGE * max(np.trace(gram) / d, 1e-12)
  fitted = {}
  for w in ("key", "value"):
    target = np.mean([projected(x, kv, w, eps) for x, kv in zip(inputs, layers)], axis=0)  # [N, k*h]
    fitted[w] = np.linalg.solve(gram, h.T @ target).reshape(k_shape).astype(np.float32)
  return {"norm": {"scale": np.ones((d,), np.float32)}, **fitted}


def relative_errors(
    shared: LayerKV, layers: Sequence[LayerKV], inputs: Sequence[np.ndarray], eps: float
) -> list[dict[str, float]]:
  """Per layer j of the group: ||K_shared - K_j||_F / ||K_j||_F (and for V) on the calibration batch.

  K_shared is the shared block applied to the group input (inputs[0]); K_j is layer j's original K on its
  own input (inputs[j]). 0 for the first layer under 'first'.
  """
  out = []
  for x, kv in zip(inputs, layers):
    errors = {}
    for w in ("key", "value"):
      original = projected(x, kv, w, eps)
      diff = projected(inputs[0], shared, w, eps) - original
      errors[w] = float(np.linalg.norm(diff) / max(np.linalg.norm(original), 1e-30))
    out.append(errors)
  return out


def init_group(
    layers: Sequence[LayerKV], method: str, eps: float, inputs: Sequence[np.ndarray] | None
) -> tuple[LayerKV, list[dict[str, float]] | None]:
  """(the group's K/V block, per-layer relative errors or None without a calibration batch)."""
  if method == "lsq":
    if inputs is None:
      raise ValueError("kv_init='lsq' needs a calibration batch.")
    shared = shared_kv_lsq(layers, inputs, eps)
  else:
    shared = shared_kv(layers, method)
  errors = relative_errors(shared, layers, inputs, eps) if inputs is not None else None
  return shared, errors
