"""The embedded default corpus: the Python 3.11 documentation sources (reST) from Debian's python3.11-doc.

Nothing is committed: the corpus is read from the installed package (`dpkg -L python3.11-doc`), or from a
copy unpacked into the data dir with `apt-get download` + `dpkg-deb -x`. `CLAPythonDocs` is a TFDS
builder, so the corpus goes through the same path as every TFDS dataset (prepared as array_record, which
tensorflow-datasets reads without tensorflow). The train/validation split is fixed at the file level and
the sha256 of the source tree is recorded in the dataset's metadata and checked on every load.

  python -m cla_jax.cli.python_docs [--data_dir=~/.cache/cla_jax]   # make sure the corpus is ready (idempotent)
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import pathlib
import shutil
import subprocess
import tempfile
from collections.abc import Iterator

import tensorflow_datasets as tfds

from cla_jax.data import splits
from cla_jax.errors import UserError

NAME = "cla_python_docs"
PACKAGE = "python3.11-doc"
SOURCES_SUFFIX = "share/doc/python3.11/html/_sources"
EVAL_FRACTION = 0.05  # fixed: changing it would change the corpus
# sha256 (`tree_checksum`) of the source trees this corpus has been checked with; another one still works,
# with a warning, since loss figures are then not comparable with the documented ones.
KNOWN_CHECKSUMS = {
    "1490a211a9bef4e760f68eea582eee2b0b7b9fe43ebd3ce36364a5b7fb7de732": "python3.11-doc 3.11.2-6+deb12u9 (Debian 12)",
    # u8 lacks a few security-fix paragraphs in 4 train-split files (ssl, asyncio-eventloop, asyncio-stream,
    # urllib.request); the 25 validation files are byte-identical, so validation losses compare directly.
    "930d16cdb6d46cd5e1cdac239b15b9502c475b80e9bbf1740abe591e0e5edb95": "python3.11-doc 3.11.2-6+deb12u8 (Debian 12)",
}


def _dpkg_sources_dir() -> pathlib.Path | None:
  """The `_sources` directory of the installed python3.11-doc package, if dpkg knows it."""
  if not shutil.which("dpkg"):
    return None
  try:
    listing = subprocess.run(["dpkg", "-L", PACKAGE], capture_output=True, text=True, check=True).stdout
  except subprocess.CalledProcessError:
    return None
  for line in listing.splitlines():
    if line.rstrip("/").endswith(SOURCES_SUFFIX) and os.path.isdir(line):
      return pathlib.Path(line)
  return None


def _extracted_dir(data_dir: str) -> pathlib.Path:
  return pathlib.Path(os.path.expanduser(data_dir)) / "downloads" / PACKAGE


def find_sources(data_dir: str) -> pathlib.Path | None:
  """The reST sources: the installed package's, else a copy unpacked under data_dir; None when absent."""
  installed = _dpkg_sources_dir()
  if installed is not None:
    return installed
  extracted = _extracted_dir(data_dir) / "usr" / SOURCES_SUFFIX
  return extracted if extracted.is_dir() else None


def fetch_sources(data_dir: str) -> pathlib.Path:
  """Installs python3.11-doc (root with apt) or downloads and unpacks it into data_dir; returns `_sources`."""
  found = find_sources(data_dir)
  if found is not None:
    return found
  if not shutil.which("apt-get"):
    raise UserError(
        f"{PACKAGE} is not installed and apt-get is missing; install the package, or use "
        "--config.data.source=text with --config.data.text_glob='your/*.txt'."
    )
  if os.geteuid() == 0 and shutil.which("dpkg"):
    subprocess.run(
        ["apt-get", "install", "-y", "-q", PACKAGE],
        check=False,
        capture_output=True,
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
    )
    found = _dpkg_sources_dir()
    if found is not None:
      return found
  target = _extracted_dir(data_dir)
  with tempfile.TemporaryDirectory() as tmp:
    result = subprocess.run(["apt-get", "download", "-q", PACKAGE], cwd=tmp, capture_output=True, text=True)
    debs = glob.glob(os.path.join(tmp, "*.deb"))
    if result.returncode or not debs:
      raise UserError(
          f"could not download {PACKAGE} ({result.stderr.strip().splitlines()[-1:] or '?'}); "
          "run `apt-get update` first, or install it with `apt-get install python3.11-doc`."
      )
    target.mkdir(parents=True, exist_ok=True)
    subprocess.run(["dpkg-deb", "-x", debs[0], str(target)], check=True)
  return target / "usr" / SOURCES_SUFFIX


def list_files(sources: pathlib.Path) -> list[str]:
  """Relative paths of the reST sources, sorted."""
  return sorted(str(p.relative_to(sources)) for p in sources.rglob("*.txt") if p.is_file())


def tree_checksum(sources: pathlib.Path) -> str:
  """sha256 over the sorted relative paths and contents: identifies the corpus exactly."""
  digest = hashlib.sha256()
  for rel in list_files(sources):
    digest.update(rel.encode() + b"\0")
    digest.update((sources / rel).read_bytes() + b"\0")
  return digest.hexdigest()


class CLAPythonDocs(tfds.core.GeneratorBasedBuilder):
  """TFDS builder: one example per reST file of the Python 3.11 docs ({'text', 'path'})."""

  name = NAME
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Python 3.11 docs reST sources; 5% of files (by name hash) held out."}

  def __init__(self, *, source_dir: str | None = None, **kwargs):
    # source_dir only matters when preparing; tests point it at a small tree shaped like the real one.
    self._source_dir = source_dir
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  def _sources(self) -> pathlib.Path:
    if self._source_dir:
      return pathlib.Path(self._source_dir)
    found = find_sources(str(self._data_dir_root))
    if found is None:
      raise UserError(
          f"{PACKAGE} not found; run " f"`python -m cla_jax.cli.python_docs --data_dir={self._data_dir_root}`."
      )
    return found

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Python 3.11 documentation sources (reStructuredText), from Debian's python3.11-doc.",
        features=tfds.features.FeaturesDict({"text": tfds.features.Text(), "path": tfds.features.Text()}),
        homepage="https://docs.python.org/3.11/",
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # the corpus is a local package, nothing to download
    sources = self._sources()
    files = list_files(sources)
    if not files:
      raise UserError(f"no reST sources (*.txt) under {sources}.")
    checksum = tree_checksum(sources)
    self.info.metadata.update({"checksum": checksum, "num_files": len(files), "source_dir": str(sources)})
    if checksum not in KNOWN_CHECKSUMS and self._source_dir is None:
      logging.warning(
          "python docs checksum %s is not one this project was checked with; results may differ.", checksum[:12]
      )
    held_out = splits.held_out(files, EVAL_FRACTION)
    return {
        "train": self._generate_examples(sources, [f for f in files if f not in held_out]),
        "validation": self._generate_examples(sources, [f for f in files if f in held_out]),
    }

  def _generate_examples(self, sources: pathlib.Path, files: list[str]) -> Iterator[tuple[str, dict]]:
    for rel in files:
      yield rel, {"text": (sources / rel).read_text(encoding="utf-8", errors="replace"), "path": rel}


def builder(data_dir: str, source_dir: str | None = None) -> CLAPythonDocs:
  """The builder rooted at data_dir (expanded)."""
  return CLAPythonDocs(data_dir=os.path.expanduser(data_dir), source_dir=source_dir)


def prepare(data_dir: str, source_dir: str | None = None, quiet: bool = True) -> CLAPythonDocs:
  """Fetches the package if needed and prepares the TFDS dataset; verifies the checksum if already prepared."""
  b = builder(data_dir, source_dir)
  if not b.is_prepared():
    if source_dir is None:
      fetch_sources(data_dir)
    if quiet:
      tfds.display_progress_bar(False)
    b.download_and_prepare()
  verify(b)
  return b


def verify(b: CLAPythonDocs) -> None:
  """Raises if the source tree the dataset was built from has changed since (e.g. a package upgrade)."""
  metadata = b.info.metadata or {}
  recorded, source_dir = metadata.get("checksum"), metadata.get("source_dir")
  if not recorded or not source_dir or not os.path.isdir(source_dir):
    return  # the sources are gone (e.g. package removed after preparing): the prepared data stands alone
  current = tree_checksum(pathlib.Path(source_dir))
  if current != recorded:
    raise UserError(
        f"{NAME} in {b.data_dir} was built from a different {source_dir} (checksum {recorded[:12]}, "
        f"now {current[:12]}); delete {b.data_dir} and run `python -m cla_jax.cli.python_docs`."
    )
