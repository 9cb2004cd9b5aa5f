"""One trainer per workdir: an exclusive lock on DIR/lock held for the life of the run (process 0 only).

`fcntl.flock` is released by the kernel when its holder dies, however it dies (kill -9 included), so a
lock left by a dead process never blocks a resume; the file keeps the holder's pid and host for the
message a second trainer prints. Object-store workdirs (gs://...) cannot be flock'ed and are not locked.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time

import jax

from cla_jax.errors import UserError
from cla_jax.workdir import LOCK_FILE


class WorkdirBusyError(UserError):
  """Another live process trains in this workdir."""


class WorkdirLock:
  """`with WorkdirLock(dir):` or acquire()/release(); a no-op on processes other than 0 and on bucket paths."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self._file = None

  def acquire(self) -> WorkdirLock:
    """Takes the lock or raises WorkdirBusyError naming the holder (pid, host, start time)."""
    if jax.process_index() != 0 or "://" in self.workdir:
      return self
    path = os.path.join(self.workdir, LOCK_FILE)
    f = open(path, "a+", encoding="utf-8")  # pylint: disable=consider-using-with
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      holder = f.read().strip()
      f.close()
      try:
        info = json.loads(holder)
        who = f"pid {info['pid']} on host {info['host']} (since {info['started']})"
      except (ValueError, KeyError, TypeError):
        who = "another process"
      raise WorkdirBusyError(
          f"workdir {self.workdir} is in use by {who}; wait for it to finish or stop it, " f"or pass another --workdir."
      ) from None
    f.seek(0)
    f.truncate()
    f.write(
        json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")})
        + "\n"
    )
    f.flush()
    self._file = f
    return self

  def release(self) -> None:
    """Drops the lock (the file stays: an unlocked file blocks nobody)."""
    if self._file is not None:
      fcntl.flock(self._file, fcntl.LOCK_UN)
      self._file.close()
      self._file = None

  def __enter__(self) -> WorkdirLock:
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()
