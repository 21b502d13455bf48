import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

# The tests run tiny models whose ops take microseconds. On a small, shared CI machine,
# intra-op thread hand-offs made each forward hundreds of times slower; one thread keeps
# the suite fast and its timings steady.
torch.set_num_threads(1)
