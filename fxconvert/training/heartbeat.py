"""Which rank failed: a heartbeat and a failure register in the launcher's key-value store.

When one rank of a pipeline dies, its neighbours learn it from a broken connection or a
timed-out collective, which names an address at best. So every rank of `fxconvert.train`
keeps a counter in the rendezvous store (torchrun's TCPStore at MASTER_ADDR:MASTER_PORT,
which lives in the launcher, not in a worker) and bumps it twice a second from a daemon
thread. A rank that fails:

- first reads the register: if another rank recorded its own failure, that rank is named;
- else a rank that never started its heartbeat (it registers `ready/<rank>` when its
  checks, stages and data are done, before joining the process group) is named as late,
  by a rank whose own error is a timeout it hit waiting (the rank that waited for it used
  to report the timeout as its own), never by one the launcher stopped;
- else watches the counters for `STALE_SECONDS`: a rank whose counter stands still died
  or hangs (SIGKILL, out of memory, SIGSTOP), and is named, and registered as failed for
  the ranks still watching (a rank that reported and exited meanwhile stands still too, and
  was named by a rank that watched longer);
- else the failure is its own: it records it, for the others to name.

The store is reached through a client connection of its own, so nothing here takes part
in the process group's collectives, and every store call has a short timeout: a launcher
that is already gone costs a few seconds, never a hang.

A worker must not outlive its launcher (a SIGKILLed torchrun used to leave its workers
training to the end, writing checkpoints and an export nobody asked for any more):

- `die_with_launcher` asks the kernel for SIGTERM when the parent (torchrun's agent on
  this machine) exits (Linux `prctl(PR_SET_PDEATHSIG)`);
- the heartbeat thread also watches: a parent that changed (the launcher is gone), or a
  failed beat followed by `LOST_BEATS - 1` beats' worth of refused connections (the
  store, in the first machine's launcher, is gone: this covers workers on the other
  machines), make it stop beating and send SIGTERM to its own process, which the trainer
  turns into a one-line stop.

Once the launcher is gone nothing here calls the store again: every failed store call
makes torch log a C++ stack trace (`TCPStore.cpp: recvValue failed`, a warning from
c10's logging, which only TORCH_CPP_LOG_LEVEL set before torch loads can silence), and
those traces, from this thread, were the hundreds of lines a killed torchrun left
behind. Now a worker on the launcher's machine makes no failed call at all, and one on
another machine makes one (then probes with plain connections, which torch does not log).
"""

import ctypes
import os
import signal
import socket
import threading
import time
from datetime import timedelta

import torch.distributed as dist

INTERVAL_SECONDS = 0.5
STALE_SECONDS = 2.0
LOST_BEATS = 3
PREFIX = "fxconvert.train/"
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
NOT_READY_FIX = "raise --timeout, which also bounds the wait for the slowest rank to be ready"

_launcher: int | None = None  # the parent's pid, once `die_with_launcher` watches it


def prefix() -> str:
    """The keys of this attempt of the run: torchrun restarts its workers (`--max-restarts`) with the
    same store, where the last attempt's `ready/`, `failed/` and `failures/` keys would otherwise name
    a rank that failed before the restart, or hide one that is not ready yet."""
    return f"{PREFIX}{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"


def die_with_launcher() -> None:
    """Have the kernel send SIGTERM to this process when its parent exits; send it now if it already has.

    Call it first thing in a worker: a parent that died before this call cannot be told
    from an adopting one. Does nothing where prctl is missing (not Linux).
    """
    global _launcher
    parent = os.getppid()
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return
    if prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        return
    _launcher = parent
    if launcher_gone():  # it died between getppid and prctl: no signal will come
        os.kill(os.getpid(), signal.SIGTERM)


def launcher_gone() -> bool:
    """Whether the parent `die_with_launcher` watches has exited, or is exiting.

    The kernel sends the signal when the parent's thread that started this process dies,
    which under SIGKILL is before the parent's last thread: this process is adopted (its
    parent pid changes) only a moment later, while the parent's main thread is already a
    zombie. Both count.
    """
    if _launcher is None:
        return False
    if os.getppid() != _launcher:
        return True
    try:
        with open(f"/proc/{_launcher}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False  # no /proc: the parent pid is the only sign
    return state in (b"Z", b"X")


def first_to_claim(key: str) -> bool | None:
    """Whether this process is the first of this attempt to claim `key` in torchrun's store (an atomic
    counter, so exactly one process of all that ask gets True), or None when no launcher's store can be
    reached (no torchrun, or one that does not share its store with the workers)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or "MASTER_PORT" not in os.environ:
        return None
    try:
        store = dist.PrefixStore(prefix(), dist.TCPStore(os.environ.get("MASTER_ADDR", "127.0.0.1"),
                                                         int(os.environ["MASTER_PORT"]), is_master=False,
                                                         timeout=timedelta(seconds=5)))
        return store.add(key, 1) == 1
    except (RuntimeError, ValueError, OSError):  # the launcher is gone or the address is not one
        return None


class Heartbeat:
    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size
        self.address = (os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]))
        self.store = dist.PrefixStore(prefix(), dist.TCPStore(*self.address, is_master=False,
                                                            timeout=timedelta(seconds=5)))
        self.stopped = threading.Event()
        self.lost = False  # the launcher (or its store) is gone: the store is not called again
        self.store.set(f"ready/{rank}", "1")  # this rank's checks, stages and data are done
        self.thread = threading.Thread(target=self._beat, name="fxconvert-heartbeat", daemon=True)
        self.thread.start()

    def _beat(self) -> None:
        failed = 0
        while not self.stopped.is_set():
            if launcher_gone():
                return self._lose()
            if failed == 0 or self._reachable():
                try:
                    self.store.add(f"beat/{self.rank}", 1)
                    failed = 0
                except Exception:
                    failed = 1
            else:  # after a failed call, plain connections probe the store: torch logs nothing for those
                failed += 1
                if failed >= LOST_BEATS:
                    return self._lose()
            self.stopped.wait(INTERVAL_SECONDS)

    def _reachable(self) -> bool:
        try:
            socket.create_connection(self.address, timeout=INTERVAL_SECONDS * 4).close()
            return True
        except OSError:
            return False

    def _lose(self) -> None:
        """The launcher is gone: stop beating, and stop this process as the launcher would have."""
        self.lost = True
        self.stopped.set()
        os.kill(os.getpid(), signal.SIGTERM)

    @property
    def launcher_lost(self) -> bool:
        return self.lost or launcher_gone()

    def stop(self, *, finished: bool = False) -> None:
        self.stopped.set()
        if finished and not self.launcher_lost:  # a rank that is done stops beating; not to be taken for a dead one
            try:
                self.store.set(f"done/{self.rank}", "1")
            except Exception:
                pass

    def _counters(self) -> dict[int, int]:
        return {r: self.store.add(f"beat/{r}", 0) for r in range(self.world_size) if r != self.rank}

    def culprit(self, *, waiting: bool = True) -> tuple[int, str] | None:
        """(rank, what happened to it) for the rank that failed first, or None if none did (that we can see).

        A rank not ready yet is named only by one `waiting` for it (this rank's own error is a
        timeout it hit): one stopped by a signal was stopped because another rank failed, often
        the one not ready, in its checks (it said so itself), and a rank that never beat is no
        stale one either.
        """
        if self.launcher_lost:
            return None
        try:
            if self.store.check(["failures/1"]):
                rank = int(self.store.get("failures/1"))
                return rank, self.store.get(f"failed/{rank}").decode("utf-8", "replace")
            late = [r for r in range(self.world_size) if r != self.rank and not self.store.check([f"ready/{r}"])]
            if late and not waiting:
                return None
            if late:
                return late[0], (f"was still preparing (its checks, stages or data: {NOT_READY_FIX}) when this "
                                 f"rank stopped waiting for it")
            last = self._counters()
            since = {r: time.monotonic() for r in last}
            deadline = time.monotonic() + STALE_SECONDS + INTERVAL_SECONDS
            while time.monotonic() < deadline:
                time.sleep(INTERVAL_SECONDS / 2)
                now = self._counters()
                for r, value in now.items():
                    if value != last[r]:
                        last[r], since[r] = value, time.monotonic()
                if self.store.check(["failures/1"]):
                    return self.culprit()
            stale = sorted(r for r, t in since.items() if time.monotonic() - t >= STALE_SECONDS
                           and not self.store.check([f"done/{r}"]))
            if stale:  # registered for the ranks still looking: one that stops after this one is not named
                what = f"stopped responding (no heartbeat for {STALE_SECONDS:g} s: killed or hung)"
                self.record_failure(what, rank=stale[0])
                return stale[0], what
        except Exception:
            return None
        return None

    def record_failure(self, message: str, *, rank: int | None = None) -> None:
        """Register this rank's own failure, or `rank`'s, found stale (the first one registered is the one named)."""
        if self.launcher_lost:
            return
        rank = self.rank if rank is None else rank
        try:
            self.store.set(f"failed/{rank}", message)
            order = self.store.add("failures", 1)
            self.store.set(f"failures/{order}", str(rank))
        except Exception:
            pass


__all__ = ["Heartbeat", "INTERVAL_SECONDS", "STALE_SECONDS", "LOST_BEATS", "die_with_launcher", "launcher_gone",
           "prefix", "first_to_claim"]
