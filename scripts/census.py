#!/usr/bin/env python
"""Which transformers model types fxconvert converts: each type's tiny model against eager transformers.

    PYTHONPATH=. python scripts/census.py                        # every causal-LM type (a few minutes)
    PYTHONPATH=. python scripts/census.py --types opt,xglm,mpt   # some types
    PYTHONPATH=. python scripts/census.py --mapping masked --json census.json

For each model type of the chosen auto mapping (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES by default),
the type's config is built with its defaults shrunk (`fxconvert.families.derived.tiny_config`:
two layers, width 32, vocabulary 97) and the mapping's class built from it with random weights.
A type whose config or model does not build that way is left out of the ratio (listed apart).
Every other type is converted with `fxconvert.convert` and its loss compared with eager
transformers' on a padded batch at 1e-5; the census prints the ratio that converts and equals
eager, and the refusals grouped by cause (the construct named in fxconvert's one-line error),
each with its types and source lines.
"""

import argparse
import json
import os
import re
import signal
import sys
import warnings
from collections import defaultdict

MAPPINGS = {
    "causal": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "masked": "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
    "seq2seq": "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
}
# The cause of a refusal, from fxconvert's one-line error (first match wins); "other" otherwise.
CAUSES = (
    ("a module that must run as a leaf holds a shared weight", r"must run as a leaf .* shared weight"),
    ("Python control flow on a traced value (a tensor's or a size's)", r"decides Python control flow"),
    ("an operation that meta tensors cannot compute", r"could not compute .* on meta tensors"),
    ("an operation whose output shape depends on values", r"nonzero|data-dependent"),
    ("the family record refuses it", r"^cannot trace \w+: "),
    ("an error inside the model's code while tracing", r"cannot trace .*(Error|Exception)"),
    ("a class fxconvert does not trace", r"is not supported"),
    ("the output differs from eager", r"^differs from eager"),
)
SOURCE = re.compile(r" at ((?:[\w.-]+/)*[\w.-]+\.py:\d+)")
MAX_PARAMETERS = 20_000_000  # a tiny model of any type has far fewer (most about 100k)
TIMEOUT = 120  # seconds for one type; a type past it is counted as refused (a hang is a failure)


class _TimedOut(Exception):
    pass


def _alarm(signum, frame):
    raise _TimedOut()


def check(model_type: str, cls_name: str) -> tuple[str, str]:
    """("ok", ""), ("skip", why the tiny model does not build) or ("refused", the one-line reason)."""
    import torch
    import transformers

    import fxconvert
    from fxconvert.errors import first_line
    from fxconvert.families import derived

    try:
        config = derived.tiny_config(model_type)
        cls = getattr(transformers, cls_name)
        with torch.device("meta"):  # a part the shrinking missed would make it large: counted first
            count = sum(p.numel() for p in cls._from_config(config).parameters())
        if count > MAX_PARAMETERS:
            return "skip", f"its tiny config still has {count:,} parameters"
        torch.manual_seed(0)
        model = cls._from_config(config).eval()
    except Exception as e:
        return "skip", f"{type(e).__name__}: {first_line(e)}"
    try:
        conversion = fxconvert.convert(model)
        names = conversion.input_names
        g = torch.Generator().manual_seed(0)
        vocab = config.get_text_config().vocab_size
        feed = {"input_ids": torch.randint(3, vocab, (2, 7), generator=g)}
        feed["attention_mask"] = torch.ones_like(feed["input_ids"])
        feed["attention_mask"][0, -2:] = 0
        feed["decoder_input_ids"] = torch.randint(3, vocab, (2, 5), generator=g)
        feed["labels"] = feed["decoder_input_ids" if "decoder_input_ids" in names else "input_ids"].clone()
        feed = {k: v for k, v in feed.items() if k in names}
        with torch.no_grad():
            kwargs = {"use_cache": False} if "use_cache" in derived._forward_parameters(cls) else {}
            expected = model(**feed, **kwargs)[conversion.output_name]
            actual = conversion.module(**feed)
        diff = float((expected - actual).abs().max())
        if not diff <= 1e-5:
            return "refused", f"differs from eager by {diff:.3g}"
        return "ok", ""
    except _TimedOut:
        return "refused", f"took over {TIMEOUT} s"
    except Exception as e:
        return "refused", first_line(e)


def cause_of(reason: str) -> str:
    return next((name for name, pattern in CAUSES if re.search(pattern, reason)), "other")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mapping", choices=MAPPINGS, default="causal", help="which auto mapping's types")
    parser.add_argument("--types", help="comma-separated model types (default: every type of the mapping)")
    parser.add_argument("--json", metavar="FILE", help="also write the census as JSON")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore")
    import torch
    from transformers.models.auto import modeling_auto
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.set_num_threads(1)
    mapping = getattr(modeling_auto, MAPPINGS[args.mapping])
    types = args.types.split(",") if args.types else sorted(mapping)
    signal.signal(signal.SIGALRM, _alarm)
    results = {}
    for model_type in types:
        signal.alarm(TIMEOUT)
        try:
            status, reason = check(model_type, mapping[model_type])
        except _TimedOut:
            status, reason = "refused", f"took over {TIMEOUT} s"
        finally:
            signal.alarm(0)
        results[model_type] = {"class": mapping[model_type], "status": status, "reason": reason}
        print(f"{model_type:28} {status:8} {reason[:160]}", flush=True)
    counted = {t: r for t, r in results.items() if r["status"] != "skip"}
    ok = [t for t, r in counted.items() if r["status"] == "ok"]
    groups = defaultdict(list)
    for t, r in counted.items():
        if r["status"] == "refused":
            where = SOURCE.search(r["reason"])
            groups[cause_of(r["reason"])].append(f"{t} ({where.group(1)})" if where else t)
    print()
    print(f"{len(ok)} of {len(counted)} {args.mapping} types convert and equal eager "
          f"({100 * len(ok) / max(len(counted), 1):.0f}%); {len(results) - len(counted)} left out: their tiny "
          f"config or model does not build")
    for cause, members in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        print(f"  {len(members):3}  {cause}: {', '.join(members)}")
    skipped = [f"{t} ({r['reason'][:80]})" for t, r in results.items() if r["status"] == "skip"]
    if skipped:
        print(f"  left out: {'; '.join(skipped)}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"mapping": args.mapping, "ok": len(ok), "counted": len(counted), "types": results}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
