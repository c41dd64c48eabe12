"""The config that asks ``from_pretrained`` for LLM.int8(), and how it reads and writes ``config.json``.

:class:`LLMInt8Config` registers the ``llm_int8`` quantization method's config with transformers; the
quantizer that acts on it is :mod:`llm_int8.integrations.hf`, which imports this module (importing either
registers both). The saved form is bitsandbytes' 8-bit config plus an ``"llm_int8"`` field (see
:meth:`LLMInt8Config.to_dict` and ``docs/hf.md``).
"""

from __future__ import annotations

from . import transformers_problem

if (_problem := transformers_problem()) is not None:
    raise ImportError(_problem)

from transformers.quantizers import register_quantization_config  # noqa: E402
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING  # noqa: E402
from transformers.utils.quantization_config import BitsAndBytesConfig, QuantizationConfigMixin  # noqa: E402

from .. import functional as F  # noqa: E402
from ..convert import Int8Config  # noqa: E402

QUANT_METHOD = "llm_int8"


@register_quantization_config(QUANT_METHOD)
class LLMInt8Config(QuantizationConfigMixin):
    """LLM.int8() quantization for ``from_pretrained``; saved in ``config.json`` as ``quantization_config``.

    threshold: the outlier threshold alpha (0 disables the decomposition; the paper uses 6.0).
    skip_modules: module names kept in float (matched as in :class:`llm_int8.Int8Config`). ``None``
        skips the output head and every layer whose weight is tied to an embedding.
    quantize_head: also convert the output head, and turn an input embedding tied to it into an
        ``Embedding8bit`` sharing the head's int8 weight (as :class:`llm_int8.Int8Config`). Default False:
        the head stays float, as bitsandbytes keeps it. A model whose *untied* head is int8 saves as a
        bitsandbytes 8-bit checkpoint like any other (bitsandbytes converts its head too); one whose
        embedding is int8 cannot be saved (``save_pretrained`` raises, see ``docs/hf.md``).

    Saved, it declares itself in bitsandbytes' 8-bit format (see :meth:`to_dict`), whose tensors it
    shares, so that a process which has not imported llm_int8 loads the checkpoint correctly through
    bitsandbytes, or fails loudly when bitsandbytes is missing, instead of reading int8 codes as float
    weights. With llm_int8 imported, the same file loads through llm_int8, calibrated columns included.
    """

    #: The field of the saved dict that says llm-int8 wrote it (and holds this config's own fields).
    SAVED_FIELD = "llm_int8"
    #: Version of the saved layout; 1: bitsandbytes' 8-bit fields plus SAVED_FIELD.
    SAVED_VERSION = 1

    def __init__(
        self, threshold: float = 6.0, skip_modules: list[str] | None = None, quantize_head: bool = False, **kwargs
    ):
        quant_method = kwargs.pop("quant_method", QUANT_METHOD)
        if quant_method != QUANT_METHOD:
            raise ValueError(f"LLMInt8Config has quant_method '{QUANT_METHOD}', got {quant_method!r}")
        if kwargs:
            raise TypeError(
                f"LLMInt8Config got unknown fields {sorted(kwargs)}; it takes threshold, skip_modules and quantize_head. "
                "For a bitsandbytes 8-bit config use LLMInt8Config.from_bitsandbytes(config)."
            )
        threshold = F._check_threshold(threshold, "LLMInt8Config.threshold")  # (the error names the class used)
        core = Int8Config(threshold=threshold, skip_modules=skip_modules, quantize_head=quantize_head)  # validates
        self.quant_method = QUANT_METHOD
        self.threshold = core.threshold
        self.skip_modules = core.skip_modules
        self.quantize_head = core.quantize_head
        # The float layers of the model this config quantized (set by the quantizer): written out as
        # bitsandbytes' skip list, so that bitsandbytes converts exactly the layers that hold int8 weights.
        self.unconverted_modules: list[str] | None = None

    def to_int8_config(self) -> Int8Config:
        return Int8Config(threshold=self.threshold, skip_modules=self.skip_modules, quantize_head=self.quantize_head)

    def to_dict(self) -> dict:
        """The saved form: bitsandbytes' 8-bit config, plus a ``"llm_int8"`` field with ours.

        transformers without llm_int8 reads it as a bitsandbytes LLM.int8() checkpoint (the tensors,
        ``weight`` int8 / ``SCB`` float32 / ``weight_format``, are bitsandbytes' own), with the same
        threshold and the same float layers. With llm_int8 imported, the ``"llm_int8"`` field routes
        it back here (:func:`_bitsandbytes_or_llm_int8`).
        """
        skip = self.unconverted_modules if self.unconverted_modules is not None else self.skip_modules
        ours = {
            "version": self.SAVED_VERSION,
            "threshold": self.threshold,
            "skip_modules": self.skip_modules,
            "unconverted_modules": self.unconverted_modules,
        }
        if self.quantize_head:  # (written only when set, so default checkpoints read as they always did)
            ours["quantize_head"] = True
        return {
            "quant_method": "bitsandbytes",
            "load_in_8bit": True,
            "load_in_4bit": False,
            "llm_int8_threshold": self.threshold,
            "llm_int8_skip_modules": None if skip is None else list(skip),
            "llm_int8_has_fp16_weight": False,
            "llm_int8_enable_fp32_cpu_offload": False,
            self.SAVED_FIELD: ours,
        }

    def __iter__(self):
        yield from self.to_dict().items()

    def __repr__(self):
        head = ", quantize_head=True" if self.quantize_head else ""
        return f"LLMInt8Config(threshold={self.threshold}, skip_modules={self.skip_modules}{head})"

    @classmethod
    def from_dict(cls, config_dict, return_unused_kwargs=False, **kwargs):
        """Read a saved config: the bitsandbytes form with an ``"llm_int8"`` field (what :meth:`to_dict`
        writes), or the plain ``{"quant_method": "llm_int8", ...}`` that llm-int8 0.1.0 wrote before."""
        fields = dict(config_dict)
        if cls.SAVED_FIELD in fields:
            ours = dict(fields[cls.SAVED_FIELD])
            version = ours.pop("version", None)
            if version != cls.SAVED_VERSION:
                raise ValueError(
                    f"this checkpoint's quantization_config was written by a newer llm-int8 (saved format {version}, "
                    f"this one reads {cls.SAVED_VERSION}); upgrade: pip install -U llm-int8"
                )
            unconverted = ours.pop("unconverted_modules", None)
            config = cls(**ours)
            config.unconverted_modules = unconverted
        else:
            config = cls(**fields)
        for key in [key for key in kwargs if hasattr(config, key)]:
            setattr(config, key, kwargs.pop(key))
        return (config, kwargs) if return_unused_kwargs else config

    @classmethod
    def from_bitsandbytes(cls, quantization_config) -> "LLMInt8Config":
        """The config that loads a checkpoint written by transformers + bitsandbytes in 8-bit.

        ``quantization_config`` is a ``BitsAndBytesConfig`` or its dict (``config.json``'s
        ``quantization_config``). The threshold and the skipped modules carry over; the weights
        (int8 ``weight``, float32 ``SCB``) load unchanged, since the state-dict keys are the same.
        """
        qc = quantization_config.to_dict() if hasattr(quantization_config, "to_dict") else dict(quantization_config)
        if not qc.get("load_in_8bit", False):
            raise ValueError(
                "only bitsandbytes 8-bit checkpoints (load_in_8bit=True) can be loaded as LLM.int8(); "
                f"this config is {'4-bit' if qc.get('load_in_4bit') else 'not 8-bit'}"
            )
        if qc.get("llm_int8_has_fp16_weight", False):
            raise ValueError(
                "this bitsandbytes checkpoint keeps float weights (llm_int8_has_fp16_weight=True); load it as a "
                "plain float model with quantization_config=LLMInt8Config() instead, which quantizes it on load"
            )
        return cls(threshold=qc.get("llm_int8_threshold", 6.0), skip_modules=qc.get("llm_int8_skip_modules"))


class _BitsAndBytesOrLLMInt8(BitsAndBytesConfig):
    """transformers' entry for saved bitsandbytes 8-bit configs, while llm_int8 is imported.

    A ``config.json`` written by llm-int8 declares itself as a bitsandbytes 8-bit checkpoint (see
    :meth:`LLMInt8Config.to_dict`) and carries an ``"llm_int8"`` field: that one is read as an
    :class:`LLMInt8Config`, so it loads through llm-int8's quantizer. Any other (a checkpoint written by
    bitsandbytes) stays bitsandbytes' own ``BitsAndBytesConfig``, exactly as without llm_int8.
    """

    @classmethod
    def from_dict(cls, config_dict, return_unused_kwargs=False, **kwargs):
        target = LLMInt8Config if LLMInt8Config.SAVED_FIELD in config_dict else BitsAndBytesConfig
        return target.from_dict(config_dict, return_unused_kwargs=return_unused_kwargs, **kwargs)


# transformers picks the config class of a saved "bitsandbytes" + load_in_8bit dict from this table.
AUTO_QUANTIZATION_CONFIG_MAPPING["bitsandbytes_8bit"] = _BitsAndBytesOrLLMInt8
