"""Evaluation of LLM.int8() on real models: perplexity (the paper's Table 1), outlier features (§4.1),
calibration of systematic outlier dims, plots.

Pure, importable functions; the ``llm-int8`` CLI (``llm_int8.cli``) only parses, calls and prints.
Optional dependencies live in one module each: transformers in ``models.py``, matplotlib in
``plots.py``, bitsandbytes in ``methods.py`` (only for the ``bitsandbytes`` method).
"""

from .calibrate import CalibrationPlan, calibration_plan, quantize_calibrated, quantize_with_plan
from .data import load_corpus, split_tokens, token_windows
from .methods import METHODS, build_method
from .outliers import InputTracker, OutlierReport, find_outliers, zero_input_dims
from .perplexity import PerplexityResult, perplexity, tokens_per_second

__all__ = [
    "METHODS",
    "CalibrationPlan",
    "InputTracker",
    "OutlierReport",
    "PerplexityResult",
    "build_method",
    "calibration_plan",
    "find_outliers",
    "load_corpus",
    "perplexity",
    "quantize_calibrated",
    "quantize_with_plan",
    "split_tokens",
    "token_windows",
    "tokens_per_second",
    "zero_input_dims",
]
