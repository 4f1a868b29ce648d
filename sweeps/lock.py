"""One writer per results root: a lock file with the holder's pid, host and a heartbeat.

    python -c "from sweeps.lock import RootLock; help(RootLock)"

``ROOT/_lock.json`` = ``{"launch", "pid", "host", "started", "heartbeat"}``. A launch creates it exclusively
(``O_EXCL`` on a local root; on an object store: write, then read back to confirm), refreshes ``heartbeat``
every ``HEARTBEAT_S`` from a daemon thread (which also calls ``on_beat``, e.g. to refresh the manifest) and
deletes it when it ends. A second launch refuses with one line naming the holder, unless the lock is stale:
its host is this one and its pid is gone, or its heartbeat is older than ``STALE_S``. Then it takes over.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable

from attrpatch.errors import ResultsError
from attrpatch.results import ResultsRoot

log = logging.getLogger(__name__)

LOCK = "_lock.json"
HEARTBEAT_S = 5.0  # how often a live launch proves it is alive
STALE_S = 60.0  # a heartbeat older than this belongs to a dead launch (several missed beats)


class RootInUse(ResultsError):
    """Another live launch holds the results root."""


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_stale(holder: dict, now: float | None = None) -> bool:
    """A lock whose holder is certainly gone: same host and dead pid, or a heartbeat older than STALE_S."""
    now = time.time() if now is None else now
    if holder.get("host") == socket.gethostname() and not pid_alive(int(holder.get("pid", -1))):
        return True
    return now - float(holder.get("heartbeat", 0)) > STALE_S


class RootLock:
    """The lock of one launch on one root (see the module docstring)."""

    def __init__(self, root: ResultsRoot, launch: str | None = None):
        self.root = root
        self.launch = launch or uuid.uuid4().hex[:12]
        self.record = {"launch": self.launch, "pid": os.getpid(), "host": socket.gethostname(),
                       "started": time.time(), "heartbeat": time.time()}
        self.taken_over: dict | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ acquire / release
    def acquire(self) -> RootLock:
        """Take the lock or raise ``RootInUse`` naming the live holder; a stale lock is taken over."""
        for _ in range(3):
            if self._create():
                return self
            holder = self.holder()
            if holder is None:
                continue  # released between our attempt and our read: try again
            if not is_stale(holder):
                age = time.time() - float(holder.get("heartbeat", 0))
                raise RootInUse(
                    f"results root {self.root.display()} is in use by launch {holder.get('launch')} (pid "
                    f"{holder.get('pid')} on {holder.get('host')}, heartbeat {age:.0f} s ago): wait for it to end, "
                    "or launch under another name")
            log.warning("taking over the lock of launch %s (pid %s on %s): it is no longer alive",
                        holder.get("launch"), holder.get("pid"), holder.get("host"))
            self.taken_over = holder
            self.root.delete(LOCK)
        raise RootInUse(f"could not take the lock of {self.root.display()} (another launch keeps taking it): retry")

    def _create(self) -> bool:
        data = json.dumps(self.record).encode()
        if self.root.local:
            path = self.root.path(LOCK)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return True
        if self.root.exists(LOCK):  # object stores have no exclusive create: write, then confirm
            return False
        self.root.write_bytes(LOCK, data)
        time.sleep(0.2)
        return (self.holder() or {}).get("launch") == self.launch

    def holder(self) -> dict | None:
        try:
            return self.root.read_json(LOCK)
        except (FileNotFoundError, OSError, ValueError):
            return None

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=HEARTBEAT_S + 1)
        if (self.holder() or {}).get("launch") == self.launch:
            self.root.delete(LOCK)

    # ------------------------------------------------------------------ heartbeat
    def beat(self) -> None:
        self.record["heartbeat"] = time.time()
        data = json.dumps(self.record).encode()
        if self.root.local:  # an in-place rewrite: the lock must never be absent
            tmp = self.root.path(f".{LOCK}.{self.launch}.tmp")
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, self.root.path(LOCK))
        else:
            self.root.write_bytes(LOCK, data)

    def start_heartbeat(self, on_beat: Callable[[], None] | None = None) -> None:
        def loop() -> None:
            while not self._stop.wait(HEARTBEAT_S):
                with contextlib.suppress(Exception):  # a missed beat is retried; a dead root ends the launch
                    self.beat()
                    if on_beat is not None:
                        on_beat()

        self._thread = threading.Thread(target=loop, name="attrpatch-heartbeat", daemon=True)
        self._thread.start()
