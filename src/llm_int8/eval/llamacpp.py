"""llama.cpp as a speed anchor: the same GGUF file requantized to Q8_0 and F32, timed beside our models.

The only module importing ``llama_cpp`` (llama-cpp-python), an optional dependency that builds
llama.cpp from source (several minutes on 2 cores; not part of CI):

    bash scripts/setup.sh --bench     # CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python==0.3.36

``GGML_NATIVE=ON`` compiles for the CPU of the machine that builds it (AVX-512 VNNI where it has
it), as a llama.cpp user who builds it would.

:func:`requantize` writes ``Q8_0`` / ``F32`` versions of a GGUF file with llama.cpp's own quantizer
(``llama_model_quantize``, ``allow_requantize``: a 4-6-bit K-quant source is dequantized and
requantized, so ``F32`` holds exactly the float32 weights our loader dequantizes). :class:`LlamaCppModel`
runs greedy decoding and prefill on it with llama.cpp's own tokenizer, threads and KV cache.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import tempfile
import time
from pathlib import Path

from .models import cache_dir

VERSION = "0.3.36"  # the llama-cpp-python the figures were measured with
INSTALL = (
    "the llama.cpp anchor needs llama-cpp-python, which builds llama.cpp from source (several minutes): "
    f'bash scripts/setup.sh --bench   (or: CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python=={VERSION})'
)
#: The GGUF file types we requantize to, and llama.cpp's names for them (``enum llama_ftype``).
FILE_TYPES = {"Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "F32": "LLAMA_FTYPE_ALL_F32"}


def available() -> bool:
    """Whether llama-cpp-python is installed (it is not imported here)."""
    return importlib.util.find_spec("llama_cpp") is not None


def _llama_cpp():
    if not available():
        raise ImportError(INSTALL)
    return importlib.import_module("llama_cpp")


def describe() -> str:
    """llama-cpp-python's version and the CPU features its llama.cpp was built for."""
    llama_cpp = _llama_cpp()
    info = llama_cpp.llama_print_system_info().decode(errors="replace").strip()
    return f"llama-cpp-python {llama_cpp.__version__}; {info}"


def requantize(source: Path | str, file_type: str, threads: int, directory: Path | None = None) -> Path:
    """``source`` requantized by llama.cpp to ``file_type`` (one of :data:`FILE_TYPES`), cached.

    The result lives in ``directory`` (default: the model cache, where the named models' GGUF files
    are) under a name holding the source's name and a hash of its path, size and modification time,
    so a changed source gets a new file. llama.cpp writes a temporary file beside it, which is
    renamed (atomically) only once the quantizer returned success.
    """
    if file_type not in FILE_TYPES:
        raise ValueError(f"file_type must be one of {', '.join(FILE_TYPES)}, got {file_type!r}")
    source = Path(source).resolve()
    if not source.is_file():
        raise FileNotFoundError(f"no GGUF file {source}")
    llama_cpp = _llama_cpp()
    stat = source.stat()
    key = hashlib.sha256(f"{source}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    directory = cache_dir() if directory is None else Path(directory)
    target = directory / f"{source.stem}-{key}.{file_type}.gguf"
    if target.is_file():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, FILE_TYPES[file_type])
    params.allow_requantize = True
    params.nthread = threads
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{target.stem}-", suffix=".partial")
    os.close(fd)
    try:
        status = llama_cpp.llama_model_quantize(str(source).encode(), tmp.encode(), params)
        if status != 0:
            raise RuntimeError(f"llama.cpp could not requantize {source} to {file_type} (llama_model_quantize returned {status})")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


class LlamaCppModel:
    """A GGUF file loaded by llama.cpp, one sequence, ``threads`` threads for decoding and prefill.

    ``n_ctx`` must hold the longest prompt plus its new tokens; a prefill of up to ``n_batch`` tokens
    is one llama.cpp batch. Only the last position's logits are computed (llama.cpp's default, and
    what ``generate()`` asks of a transformers model), unless ``all_logits`` (for :meth:`window_nll`).
    """

    def __init__(self, path: Path | str, threads: int, n_ctx: int = 1024, n_batch: int = 512, all_logits: bool = False):
        llama_cpp = _llama_cpp()
        self._llama_cpp = llama_cpp
        self.path = Path(path)
        self.llm = llama_cpp.Llama(
            model_path=str(path), n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch, n_threads=threads,
            n_threads_batch=threads, logits_all=all_logits, verbose=False,
        )
        self.n_ctx, self.n_batch, self.n_vocab = n_ctx, n_batch, self.llm.n_vocab()
        self.all_logits = all_logits

    def tokenize(self, text: str) -> list[int]:
        """llama.cpp's token ids of ``text`` (no BOS, special tokens as text)."""
        return self.llm.tokenize(text.encode(), add_bos=False, special=False)

    def _next_token(self) -> int:
        import numpy as np

        logits = self._llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return int(np.ctypeslib.as_array(logits, shape=(self.n_vocab,)).argmax())

    def token_times(self, prompt: list[int], new_tokens: int) -> tuple[list[int], list[float]]:
        """Greedy decoding of ``new_tokens`` tokens after ``prompt`` from an empty KV cache: the new
        tokens, and the ``time.perf_counter()`` at which each was chosen (the first after the
        prompt's prefill, each later one after one decode step), preceded by the start time."""
        if not prompt or len(prompt) + new_tokens > self.n_ctx:
            raise ValueError(f"the prompt ({len(prompt)} tokens) plus {new_tokens} new tokens must fit n_ctx = {self.n_ctx}")
        llm = self.llm
        times = [time.perf_counter()]
        llm.reset()
        llm.eval(prompt)
        tokens = [self._next_token()]
        times.append(time.perf_counter())
        while len(tokens) < new_tokens:
            llm.eval(tokens[-1:])
            tokens.append(self._next_token())
            times.append(time.perf_counter())
        return tokens, times

    def prefill(self, tokens: list[int]) -> None:
        """One forward over ``tokens`` (at most ``n_batch``) from an empty KV cache."""
        if not tokens or len(tokens) > self.n_batch:
            raise ValueError(f"a prefill takes 1 to n_batch = {self.n_batch} tokens, got {len(tokens)}")
        self.llm.reset()
        self.llm.eval(tokens)

    def window_nll(self, tokens: list[int]):
        """float64 [len(tokens) - 1]: the NLL (nats) of each token after the first, predicted from the tokens
        before it, in one batch from an empty KV cache: how ``llm_int8.eval.perplexity`` scores a window,
        on the same token ids (needs ``all_logits=True`` and len(tokens) <= n_batch)."""
        import numpy as np
        import torch

        if not self.all_logits:
            raise ValueError("window_nll needs the logits of every position: load the model with all_logits=True")
        if len(tokens) < 2 or len(tokens) > min(self.n_batch, self.n_ctx):
            raise ValueError(f"a window takes 2 to {min(self.n_batch, self.n_ctx)} tokens, got {len(tokens)}")
        self.llm.reset()
        self.llm.eval(tokens)
        logits = torch.from_numpy(np.array(self.llm.scores[: len(tokens) - 1], dtype=np.float32))
        target = torch.tensor(tokens[1:], dtype=torch.int64)
        return torch.nn.functional.cross_entropy(logits, target, reduction="none").double()

    def close(self) -> None:
        self.llm.close()
