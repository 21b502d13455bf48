"""Which rank failed: a heartbeat and a failure register in the launcher's key-value store.

When one rank of a pipeline dies, its neighbours learn it from a broken connection or a
timed-out collective, which names an address at best. So every rank of `fxconvert.train`
keeps a counter in the rendezvous store (torchrun's TCPStore at MASTER_ADDR:MASTER_PORT,
which lives in the launcher, not in a worker) and bumps it twice a second from a daemon
thread. A rank that fails:

- first reads the register: if another rank recorded its own failure, that rank is named;
- else watches the counters for `STALE_SECONDS`: a rank whose counter stands still died
  or hangs (SIGKILL, out of memory, SIGSTOP), and is named;
- else the failure is its own: it records it, for the others to name.

The store is reached through a client connection of its own, so nothing here takes part
in the process group's collectives, and every store call has a short timeout: a launcher
that is already gone costs a few seconds, never a hang.
"""

import os
import threading
import time
from datetime import timedelta

import torch.distributed as dist

INTERVAL_SECONDS = 0.5
STALE_SECONDS = 2.0
PREFIX = "fxconvert.train/"


class Heartbeat:
    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size
        self.store = dist.PrefixStore(PREFIX, dist.TCPStore(
            os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
            timeout=timedelta(seconds=5)))
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._beat, name="fxconvert-heartbeat", daemon=True)
        self.thread.start()

    def _beat(self) -> None:
        while not self.stopped.is_set():
            try:
                self.store.add(f"beat/{self.rank}", 1)
            except Exception:  # the launcher's store is gone: nothing left to tell
                return
            self.stopped.wait(INTERVAL_SECONDS)

    def stop(self, *, finished: bool = False) -> None:
        self.stopped.set()
        if finished:  # a rank that is done stops beating; it must not be taken for a dead one
            try:
                self.store.set(f"done/{self.rank}", "1")
            except Exception:
                pass

    def _counters(self) -> dict[int, int]:
        return {r: self.store.add(f"beat/{r}", 0) for r in range(self.world_size) if r != self.rank}

    def culprit(self) -> tuple[int, str] | None:
        """(rank, what happened to it) for the rank that failed first, or None if none did (that we can see)."""
        try:
            if self.store.check(["failures/1"]):
                rank = int(self.store.get("failures/1"))
                return rank, self.store.get(f"failed/{rank}").decode("utf-8", "replace")
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
            if stale:
                return stale[0], f"stopped responding (no heartbeat for {STALE_SECONDS:g} s: killed or hung)"
        except Exception:
            return None
        return None

    def record_failure(self, message: str) -> None:
        """Register this rank's own failure (the first one registered is the one named)."""
        try:
            self.store.set(f"failed/{self.rank}", message)
            order = self.store.add("failures", 1)
            self.store.set(f"failures/{order}", str(self.rank))
        except Exception:
            pass


__all__ = ["Heartbeat", "INTERVAL_SECONDS", "STALE_SECONDS"]
