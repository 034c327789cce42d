"""One writer per run directory: an exclusive lease taken by every writer.

Two writers on one directory lose data: the one with an out-of-date step list
saves step N again and Orbax replaces the other's complete step N, and a new
writer's start-up cleanup deletes the other's save in flight. So a writer
(`lj.Checkpointer` without ``read_only``, `lj.save`) takes the directory's
lease first, and holds it until it is closed:

* ``<dir>/.lora_jax-writer.lock`` is locked with ``fcntl.flock`` for the
  writer's lifetime. The operating system drops the lock when the process
  dies, so a killed trainer never leaves a lease behind on its host.
* ``<dir>/.lora_jax-writer`` records who holds it (a random owner id, pid,
  host, start and last renewal time), for the error a second writer gets and
  for writers on *other* hosts, whose ``flock`` may not reach this one (NFS):
  a lease held by another host is refused unless ``force=True`` (the caller
  asserts that writer is gone). One on this host whose lock is free belonged
  to a dead process and is taken over.

Readers (`lj.restore`, `lj.restore_state`, `lj.checkpoint_info`, a
``read_only`` `lj.Checkpointer`) take no lease and never delete, rename or
clean up anything. In a multi-process run (``jax.distributed``) process 0
holds the lease for the run's one logical writer.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid

from lora_jax._checkpoint.record import CheckpointError
from lora_jax._core.errors import error

try:                       # POSIX; elsewhere the lease file alone decides
    import fcntl
except ImportError:        # pragma: no cover - Windows
    fcntl = None

__all__ = ["Lease", "acquire", "LEASE_FILE", "LOCK_FILE"]

LEASE_FILE = ".lora_jax-writer"
LOCK_FILE = ".lora_jax-writer.lock"


def _host() -> str:
    return socket.gethostname()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:      # exists, owned by someone else
        return True
    return True


def _read(path: str) -> dict | None:
    try:
        with open(path) as fh:
            data = json.load(fh)
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def _write(path: str, data: dict) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as fh:
        json.dump(data, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _describe(holder: dict) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
    renewed = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("renewed", 0)))
    return (f"process {holder.get('pid')} on host {holder.get('host')!r} (owner "
            f"{holder.get('owner')}, writing since {since}, last renewed {renewed})")


class Lease:
    """The writer lease of one directory, held until `release`."""

    def __init__(self, directory: str, fd: int | None, record: dict):
        self.directory, self._fd, self.record = directory, fd, record
        self._held = True

    @property
    def owner(self) -> str:
        return self.record["owner"]

    def renew(self) -> None:
        """Marks the lease alive (each save renews it); raises if it was taken away."""
        path = os.path.join(self.directory, LEASE_FILE)
        now = _read(path)
        if now is not None and now.get("owner") != self.owner:
            raise error(self.directory, f"this writer's lease was taken over by "
                                        f"{_describe(now)} (with force=True?); it must not "
                                        f"write any more", "close this Checkpointer; only one "
                                        "writer may use a run directory", kind=CheckpointError)
        self.record["renewed"] = time.time()
        _write(path, self.record)

    def release(self) -> None:
        """Gives the lease up (the lease file is removed, the lock dropped)."""
        if not self._held:
            return
        path = os.path.join(self.directory, LEASE_FILE)
        now = _read(path)
        if now is not None and now.get("owner") == self.owner:
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
        if self._fd is not None:
            if fcntl is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
        self._fd, self._held = None, False


def acquire(directory: str, *, force: bool = False, where: str = "lj.Checkpointer") -> Lease:
    """Takes ``directory``'s writer lease, or raises naming the current holder."""
    os.makedirs(directory, exist_ok=True)
    fd = os.open(os.path.join(directory, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = _read(os.path.join(directory, LEASE_FILE)) or {}
            raise error(directory, f"another writer holds this run directory: "
                                   f"{_describe(holder)}; two writers would overwrite each "
                                   f"other's steps", f"let that writer finish (or stop it) "
                                   f"first; read with a read-only lj.Checkpointer(dir, "
                                   f"read_only=True) or lj.restore meanwhile ({where})",
                        kind=CheckpointError) from None
    holder = _read(os.path.join(directory, LEASE_FILE))
    if holder is not None and not force:
        other_host = holder.get("host") != _host()
        if other_host or (fcntl is None and _alive(int(holder.get("pid", -1)))):
            os.close(fd)
            raise error(directory, f"the run directory is leased to {_describe(holder)}; "
                                   f"lora_jax can't tell from here whether that writer is "
                                   f"still running", "if it is gone, pass force=True to take "
                                   "the lease over; otherwise write to another directory",
                        kind=CheckpointError)
    now = time.time()
    record = {"owner": uuid.uuid4().hex, "pid": os.getpid(), "host": _host(), "since": now,
              "renewed": now}
    if holder is not None:
        record["took_over"] = holder.get("owner")
    _write(os.path.join(directory, LEASE_FILE), record)
    return Lease(directory, fd, record)
