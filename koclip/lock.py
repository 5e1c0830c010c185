"""A lease lock on a folder, local or gs://, that holds across machines: FOLDER/LOCK.

    with lock.hold(folder, what="jobs.reindex") as held:
        ...                      # the work; the lock is renewed in the background
        held.check()             # right before anything irreversible (publishing): LockLost if lost
        publish(...)

Acquiring creates FOLDER/LOCK only if nothing is there (koclip.fs.create_new: on gs:// GCS's
ifGenerationMatch=0, locally a flock-guarded rename), so of many processes racing for it, on one
machine or many, exactly one wins; the others get LockHeld, one line naming the holder. The file
is JSON: holder {host, pid, token, machine}, what, acquired, renewed, expires (UTC ISO times),
ttl_seconds.

It is a lease. While held, a daemon thread renews it every ttl/3: a replace guarded by the
generation it last wrote, moving `expires` on. A process that dies stops renewing; once `expires`
has passed, the next hold() breaks the lock (a delete guarded by the generation it read, so of two
breakers only one succeeds, and a holder that renewed in between keeps its lock) and takes it,
logging a warning that names the dead holder. A holder known dead sooner is broken at once: one
that ran on this machine (the same kernel boot and pid namespace, recorded as holder.machine) and
whose pid is gone, so a rerun right after a crash or a kill does not wait for the expiry. A renewal that finds the lock gone or replaced marks
it lost, and check() raises LockLost. check() is itself a renewal, so it proves the lock is still
this holder's and gives the step after it a whole ttl. Release deletes the lock only if it is
still at this holder's generation: a process never deletes another's lock.

Re-entrant per thread: hold() on a folder this thread already holds yields the same Lock without
acquiring again, and only the outermost hold releases it. So jobs.reindex can hold the index root's
lock and call build_index, which holds it too. Another thread or process gets LockHeld.

What a lease cannot promise: clocks are compared across machines (keep them within a small part of
ttl; NTP does), and a holder frozen for longer than ttl (a suspended VM) may wake after its lock
was broken; check() right before the irreversible step narrows that window to the step itself.
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import secrets
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from koclip import fs
from koclip.errors import LockHeld, LockLost

log = logging.getLogger("koclip.lock")

LOCK_NAME = "LOCK"
DEFAULT_TTL = 600.0  # seconds; renewed every ttl/3
Clock = Callable[[], datetime.datetime]


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _iso(moment: datetime.datetime) -> str:
    return moment.isoformat(timespec="milliseconds")


def _encode(record: dict) -> bytes:
    return (json.dumps(record, indent=2) + "\n").encode()


def _decode(data: bytes) -> dict | None:
    """A lock record, or None when the bytes are not one (a damaged or hand-written file)."""
    try:
        record = json.loads(data)
        expires = datetime.datetime.fromisoformat(record["expires"])
        if expires.tzinfo is None or not {"host", "pid"} <= set(record["holder"]):
            return None
    except (ValueError, KeyError, TypeError):
        return None
    return record


def _expires(record: dict) -> datetime.datetime:
    return datetime.datetime.fromisoformat(record["expires"])


def _this_machine() -> str | None:
    """This kernel's boot and pid namespace: two holders that share it see each other's pids. None
    where /proc does not say (then only expiry frees a lock)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f"{f.read().strip()} {os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return None


def _is_dead_here(holder: dict) -> bool:
    """True only when the holder ran on this machine, in this pid namespace, and its pid is gone (or a
    zombie). A reused pid looks alive: the lock then waits for its expiry, the safe side."""
    if _this_machine() is None or holder.get("machine") != _this_machine() or not isinstance(holder.get("pid"), int):
        return False
    try:
        with open(f"/proc/{holder['pid']}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] == "Z"
    except FileNotFoundError:
        return True
    except OSError:
        return False


def held_message(folder: str, record: dict | None) -> str:
    path = fs.join(folder, LOCK_NAME)
    if record is None:
        return (f"{folder} is locked by {path}, which is not a readable koclip lock: delete it if no job "
                "is using this folder")
    holder = record["holder"]
    return (f"{folder} is locked by {record.get('what', '?')} on {holder['host']} (pid {holder['pid']}) since "
            f"{record.get('acquired', '?')}, expiring {record['expires']} unless renewed: wait for it to "
            f"finish, or delete {path} if that process is surely dead")


def read_record(folder: str) -> dict | None:
    """FOLDER/LOCK's record as it is now, or None when the folder is not locked (or the file is not
    a lock record)."""
    found = fs.read_generation(fs.join(folder, LOCK_NAME))
    return _decode(found[0]) if found else None


class Lock:
    """A held lock, made by hold() or acquire(); `record` is what FOLDER/LOCK says now."""

    def __init__(self, folder: str, what: str, ttl: float, clock: Clock, generation: str, record: dict):
        self.folder, self.what, self.ttl, self.clock = folder, what, ttl, clock
        self.path = fs.join(folder, LOCK_NAME)
        self.generation, self.record = generation, record
        self.lost: str | None = None  # why, once lost (or "released")
        self.renewed = threading.Event()  # set after each renewal
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def expires(self) -> datetime.datetime:
        return _expires(self.record)

    def renew(self) -> bool:
        """Move the expiry to now + ttl, if the lock is still this holder's; False once it is lost."""
        with self._mutex:
            if self.lost is not None:
                return False
            now = self.clock()
            record = {**self.record, "renewed": _iso(now), "expires": _iso(now + datetime.timedelta(seconds=self.ttl))}
            generation = fs.replace_if(self.path, _encode(record), self.generation)
            if generation is None:
                self.lost = "another process broke or replaced it"
                log.error("lost the lock %s: %s", self.path, self.lost)
                return False
            self.generation, self.record = generation, record
        self.renewed.set()
        return True

    def check(self) -> None:
        """Raise LockLost unless the lock is still this holder's (a renewal: the next step has a whole ttl)."""
        if not self.renew():
            raise LockLost(f"lost the lock {self.path} ({self.lost}); {self.what} stops here, before its next "
                           "irreversible step: another process may hold the lock now")

    def release(self) -> None:
        """Stop renewing and delete the lock if it is still this holder's; safe to call twice."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        with self._mutex:
            try:
                if self.lost is None and not fs.delete_if(self.path, self.generation):
                    log.warning("%s was no longer this process's lock when released; left as it is", self.path)
            except Exception as e:  # never hide the error the block may be raising; the lease runs out anyway
                log.warning("could not release %s (%s: %s); it expires at %s", self.path, type(e).__name__, e,
                            self.record["expires"])
            self.lost = self.lost or "released"

    def _renew_every(self) -> None:
        interval = self.ttl / 3
        while not self._stop.wait(interval):
            try:
                if not self.renew():
                    return
            except Exception as e:  # a transient storage error: the next tick tries again, well before expiry
                log.warning("could not renew %s (%s: %s); trying again in %.0f s", self.path, type(e).__name__, e,
                            interval)


def acquire(folder: str, what: str, ttl: float = DEFAULT_TTL, *, clock: Clock = utc_now) -> Lock:
    """Take FOLDER/LOCK (breaking an expired one) and start renewing it; LockHeld when another holds
    it. The caller releases it (hold() does)."""
    if ttl <= 0:
        raise ValueError(f"ttl must be positive, got {ttl}")
    path = fs.join(folder, LOCK_NAME)
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "token": secrets.token_hex(8),
              "machine": _this_machine()}
    for _ in range(5):
        now = clock()
        record = {"holder": holder, "what": what, "acquired": _iso(now), "renewed": _iso(now),
                  "expires": _iso(now + datetime.timedelta(seconds=ttl)), "ttl_seconds": ttl}
        generation = fs.create_new(path, _encode(record))
        if generation is not None:
            return _renewing(Lock(folder, what, ttl, clock, generation, record))
        found = fs.read_generation(path)
        if found is None:  # released in between: try again
            continue
        data, generation = found
        other = _decode(data)
        if other is not None and other["holder"].get("token") == holder["token"]:
            # our own create, reported as refused after a retry in transit: it is ours
            return _renewing(Lock(folder, what, ttl, clock, generation, other))
        if other is None:
            raise LockHeld(held_message(folder, None))
        expired = _expires(other) <= clock()
        if not expired and not _is_dead_here(other["holder"]):
            raise LockHeld(held_message(folder, other))
        if fs.delete_if(path, generation):  # else another process broke it first, or its holder renewed
            why = f"which expired at {other['expires']}" if expired else "a process of this machine that is gone"
            log.warning("broke the lock %s of %s on %s (pid %s), %s", path, other.get("what"),
                        other["holder"]["host"], other["holder"]["pid"], why)
    raise LockHeld(f"{path} changed hands 5 times while this process tried to take it; try again")


def _renewing(lock: Lock) -> Lock:
    lock._thread = threading.Thread(target=lock._renew_every, name=f"renew {lock.path}", daemon=True)
    lock._thread.start()
    return lock


_HELD: dict[tuple[str, int, int], Lock] = {}  # (folder, pid, thread): a forked child holds nothing


def _identity(folder: str) -> str:
    return folder.rstrip("/") if fs.is_url(folder) else os.path.realpath(folder)


@contextmanager
def hold(folder: str | os.PathLike, what: str, ttl: float = DEFAULT_TTL, *, clock: Clock = utc_now) -> Iterator[Lock]:
    """Hold FOLDER/LOCK for the block (module docstring); re-entrant within one thread."""
    folder = os.fspath(folder)
    key = (_identity(folder), os.getpid(), threading.get_ident())
    if key in _HELD:
        yield _HELD[key]
        return
    lock = acquire(folder, what, ttl, clock=clock)
    _HELD[key] = lock
    try:
        yield lock
    finally:
        del _HELD[key]
        lock.release()
