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
