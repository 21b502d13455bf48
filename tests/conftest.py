import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

# The tests run tiny models whose ops take microseconds. On a small, shared CI machine,
# intra-op thread hand-offs made each forward hundreds of times slower; one thread keeps
# the suite fast and its timings steady.
torch.set_num_threads(1)

# The interrupt tests send SIGINT to this process and to the programs it starts. A shell
# that starts pytest as a background job (`cmd &` without job control) makes SIGINT
# ignored, which fxconvert rightly keeps ignored (as under nohup); the tests need Ctrl-C
# to mean Ctrl-C, so an ignored SIGINT is put back to Python's default here.
import signal  # noqa: E402

if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


# The README runs the suite in two processes (pytest-xdist, `-n 2 --dist loadgroup`). A group's tests
# run in one process, one after another, so every test gets its own group unless it has one:
# - a test module is one group, so its module-scoped fixtures (a conversion, a training run) are built
#   once, not once in each process;
# - the tests that start torchrun or spawn ranks are the group "ranks", from whichever module: each run
#   already keeps both cores busy, and two at once (four to eight processes on two cores) only made
#   each one slower.
import pytest  # noqa: E402


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(items):
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
