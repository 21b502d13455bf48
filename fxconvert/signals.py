"""`deferred()`: hold SIGINT and SIGTERM while a commit or a cleanup runs, then deliver them.

Every writer of a directory that must never be left half done (a conversion's output
(`fxconvert.save`), a training checkpoint (`fxconvert.training.checkpoint`), the exported `run/hf`
(`fxconvert.export`)) swaps a finished temporary directory into place with one or two
renames. A Ctrl-C, or torchrun's SIGTERM after another rank failed, that lands between
two renames (the old output moved aside, the new one not yet in place) would otherwise
run the error path that removes the temporary directory, and lose both. So the renames,
and the removal of what they replaced, run inside `deferred()`: a signal that arrives
meanwhile is recorded and raised again, to whatever handler was there before, once the
block ends. Only the main thread receives signals, so elsewhere this does nothing.
"""

import contextlib
import signal
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def deferred():
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
    if caught:
        signal.raise_signal(caught[0])  # now, to whatever handler was there


__all__ = ["deferred"]
