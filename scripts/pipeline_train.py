#!/usr/bin/env python
"""Train the stages of a converted tiny T5 with torch.distributed.pipelining; compare with one process.

    PYTHONPATH=. python scripts/pipeline_train.py --stages 2                    # GPipe and 1F1B, 3 steps
    PYTHONPATH=. python scripts/pipeline_train.py --stages 4 --microbatches 4 --control --json out.json

A thin wrapper of `python -m fxconvert.train --self-check` (see `fxconvert.pipeline_check`).
"""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # `python scripts/pipeline_train.py` works without PYTHONPATH too

from fxconvert.pipeline_check import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
