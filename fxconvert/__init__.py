"""fxconvert: Hugging Face T5-family models as clean torch.fx graphs, ready for pipeline partitioning.

The data path reads as the package: load -> trace -> passes -> convert -> codegen/save -> report.
Importing fxconvert imports torch but not transformers, so generated code that needs
`fxconvert.runtime` runs where transformers is not installed.
"""

from fxconvert.errors import FxConvertError, PassError, TraceError
from fxconvert.trace import trace  # noqa: E402  (the function shadows its module's name on purpose)
from fxconvert.convert import Conversion, ConvertedModule, PassRecord, convert  # noqa: E402
from fxconvert.stages import Stages, SplitError, split_stages  # noqa: E402

__version__ = "0.1.0"
__all__ = ["trace", "convert", "split_stages", "Conversion", "ConvertedModule", "PassRecord", "Stages",
           "FxConvertError", "TraceError", "PassError", "SplitError"]
