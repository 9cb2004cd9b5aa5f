"""Local paths vs bucket URLs (gs://, s3://): the one place that tells them apart."""

from __future__ import annotations

import os

from cla_jax.errors import UserError


def is_remote(path: str | os.PathLike) -> bool:
  """True for a URL such as gs://bucket/dir (no `~` expansion or os.path calls apply to it)."""
  return "://" in os.fspath(path)


def check_output_dir(path: str | os.PathLike, flag: str) -> None:
  """UserError, before any work, when local directory `path` (given as `flag`) cannot be created or written.

  Writes nothing: a file in the way, or a nearest existing ancestor that is not a writable directory,
  is named with its fix instead of surfacing later as FileExistsError or EROFS from deep in a save.
  """
  if is_remote(path):
    return
  path = os.path.abspath(os.path.expanduser(os.fspath(path)))
  if os.path.exists(path) and not os.path.isdir(path):
    raise UserError(f"{flag}={path} is a file, not a directory; pass a directory path.")
  existing = path
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise UserError(f"cannot create {flag}={path}: {existing} is a file; pass a directory path.")
  if not os.access(existing, os.W_OK | os.X_OK) or _read_only_mount(existing):
    raise UserError(f"cannot write to {flag}={path} ({existing} is not writable); pass a writable directory.")


def _read_only_mount(path: str) -> bool:
  """True when `path` lies on a read-only file system (os.access ignores that for root)."""
  try:
    return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
  except OSError:
    return False
