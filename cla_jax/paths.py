"""Local paths vs bucket URLs (gs://, s3://): the one place that tells them apart."""

from __future__ import annotations

import os


def is_remote(path: str | os.PathLike) -> bool:
  """True for a URL such as gs://bucket/dir (no `~` expansion or os.path calls apply to it)."""
  return "://" in os.fspath(path)
