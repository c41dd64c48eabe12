"""``llm-int8 serve``: an int8 model behind transformers' own OpenAI-compatible server.

transformers 5 ships ``transformers serve`` (FastAPI + uvicorn: ``/v1/chat/completions``,
``/v1/completions``, ``/v1/responses``, ``/v1/models``, ``/health``, streaming). It loads models by
name itself and knows bitsandbytes' 8-bit but not llm-int8. This module builds the model first (a
named model through the streaming GGUF loader, a local transformers directory quantized on load, a
saved llm-int8 checkpoint as it was saved) and hands it to transformers' serving classes unchanged:
its ``ModelManager`` (pinned to our model, which it never loads itself), its request handlers, its
generation managers and its FastAPI app, run by uvicorn. What is ours: loading, request checks the
engine lacks (a bad ``max_tokens``, a prompt longer than the context, malformed messages: 400 with
a message instead of a 500 or a hang), the start-up line, and exiting cleanly on Ctrl-C / SIGTERM.

Generation runs one request at a time by default (transformers' ``GenerateManager``: each request
is a ``model.generate()`` call on one inference thread), so a ``temperature=0`` reply is exactly the
offline greedy ``generate()`` of the same model, whatever else the server is doing. Continuous
batching (``continuous_batching=True``: transformers' paged-attention ``ContinuousBatchingManager``)
works on the CPU with our layers, but its replies depend on the traffic (see docs/serve.md): the
int8 input of a batched step decomposes the union of its rows' outlier columns, and the paged
attention sums in another order, which int8 rounding can turn into another token; and in
transformers 5.24 the sampling settings of the first request hold for every later one.

This module imports fastapi / uvicorn / openai through transformers' serving package; they are the
``serve`` extra (``pip install 'llm-int8[serve]'``).
"""

from __future__ import annotations

import importlib.util
import json
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

SERVE_PIP = "pip install 'llm-int8[serve]'"
for _module in ("fastapi", "uvicorn", "openai", "transformers"):
    if importlib.util.find_spec(_module) is None:
        raise ImportError(f"llm-int8 serve needs {_module}; install the extra: {SERVE_PIP}")

import torch
import uvicorn
from fastapi import HTTPException
from transformers import ContinuousBatchingConfig
from transformers.cli.serving.chat_completion import ChatCompletionHandler
from transformers.cli.serving.completion import CompletionHandler
from transformers.cli.serving.model_manager import ModelManager
from transformers.cli.serving.response import ResponseHandler
from transformers.cli.serving.server import build_server
from transformers.cli.serving.systemone import SystemOneHandler
from transformers.cli.serving.transcription import TranscriptionHandler
from transformers.cli.serving.utils import GenerationState
from transformers.utils import logging as hf_logging

from .. import _memory
from ..convert import memory_footprint
from ..eval import models as named_models
from ..nn import Embedding8bit, set_batch_invariant
from .hf import LLMInt8Config

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
LLM_INT8 = "llm-int8"
FP32 = "fp32"
BNB_8BIT = "bnb-8bit"
QUANTIZATIONS = (LLM_INT8, FP32, BNB_8BIT)  # fp32 and bnb-8bit: the baselines bench_serve.py compares against
GRACEFUL_SHUTDOWN_SECONDS = 5  # open streams get this long to finish after Ctrl-C / SIGTERM
MAX_TEMPERATURE = 2.0  # OpenAI's range for temperature is [0, 2]
MiB = 2**20
# --continuous-batching: KV cache capacity in blocks of 256 tokens (64: 16,384 tokens, e.g. 740 MiB for SmolLM2-135M,
# 390 MiB for Qwen2.5-0.5B in float32) and tokens per batched forward.
CB_NUM_BLOCKS = 64
CB_MAX_BATCH_TOKENS = 1024


@dataclass
class ServedModel:
    """A model ready to serve: what clients call it, the model and its tokenizer, how it was built."""

    name: str  # the `model` field clients send and /v1/models lists
    model: torch.nn.Module
    tokenizer: object
    quantization: str
    memory_bytes: int  # parameters and buffers (llm_int8.convert.memory_footprint)
    load_seconds: float
    options: tuple[str, ...] = ()  # how the int8 model differs from the default ("head int8", "batch-invariant")

    @property
    def context_length(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)


# ------------------------------------------------------------------------------------------------
# Loading


def _saved_quantization(directory: Path) -> dict | None:
    config = directory / "config.json"
    if not config.is_file():
        return None
    return json.loads(config.read_text()).get("quantization_config")


def load_for_serving(
    model: str = named_models.DEFAULT_MODEL,
    quantization: str = LLM_INT8,
    *,
    gguf_file: str | None = None,
    threshold: float = 6.0,
    progress: Callable | None = None,
    name: str | None = None,
    quantize_head: bool = False,
    int8_embedding: bool = False,
    batch_invariant: bool = False,
) -> ServedModel:
    """Build the model to serve.

    model: a named model (:data:`llm_int8.eval.models.MODEL_NAMES`; the Qwen ones through the
        streaming GGUF loader, never whole in float) or a local transformers directory: a float
        checkpoint is quantized as it loads, a saved llm-int8 checkpoint (``save_pretrained`` of an
        int8 model) loads as saved.
    quantization: ``"llm-int8"`` (ours, the default), or the baselines ``"fp32"`` and ``"bnb-8bit"``
        (bitsandbytes 0.50.2's ``Linear8bitLt`` with the paper's threshold, in place of the same layers).
    progress: wraps the loader's iteration over tensors (e.g. a tqdm factory ``desc -> iterable -> iterable``).
    name: the model id clients use (default: the named model, or the directory's name).
    quantize_head: llm-int8 only: the output head in int8 too, and an input embedding tied to it as
        ``Embedding8bit`` sharing its codes (``LLMInt8Config(quantize_head=True)``; docs/serve.md says what
        it costs).
    int8_embedding: llm-int8 only: an input embedding that is not tied to an int8 head (Qwen2.5's GGUF files
        carry their own head) stored as vector-wise int8 rows too (``Embedding8bit``: a lookup dequantizes the
        rows it reads), for the memory of a server; a tied one needs ``quantize_head``, which shares the head's codes.
    batch_invariant: llm-int8 only: every int8 layer in the batch-invariant decomposition
        (:func:`llm_int8.set_batch_invariant`), for continuous batching.
    """
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {quantization!r}")
    options = tuple(o for o, on in (("head int8", quantize_head), ("embedding int8", int8_embedding),
                                    ("batch-invariant", batch_invariant)) if on)
    if options and quantization != LLM_INT8:
        raise ValueError(f"{' and '.join(options)} apply to llm-int8 only, not to {quantization}")
    start = time.perf_counter()
    canonical = named_models.canonical_name(model)
    directory = Path(model)
    saved = None if canonical in named_models.MODEL_NAMES else _saved_quantization(directory)
    if saved is not None:
        if LLMInt8Config.SAVED_FIELD not in saved:
            raise ValueError(
                f"{model} is a {saved.get('quant_method', 'quantized')} checkpoint, not one llm-int8 saved; serve its float "
                "original, or load it yourself (see docs/hf.md for a bitsandbytes 8-bit checkpoint)"
            )
        if quantization != LLM_INT8:
            raise ValueError(f"{model} is a saved llm-int8 checkpoint; it serves as llm-int8 only, not {quantization}")
        if quantize_head or int8_embedding:
            raise ValueError(f"{model} is a saved llm-int8 checkpoint, served as it was saved; quantize_head and "
                             "int8_embedding apply when quantizing (serve the float original with them)")
        lm, tokenizer = _load_saved(directory)
    elif quantization == LLM_INT8:
        config = LLMInt8Config(threshold=threshold, quantize_head=quantize_head)
        lm, tokenizer = named_models.load_int8_model(model, gguf_file, config, progress=progress)
    else:
        lm, tokenizer = named_models.load_model(model, gguf_file, progress=progress)
        if quantization == BNB_8BIT:
            from ..eval.methods import METHODS

            lm = METHODS["bitsandbytes"].build(lm, {})  # swaps the layers in place
            # bitsandbytes quantizes a CPU layer's weight at its first forward: run one, so that the server
            # starts (and reports its memory) with int8 weights, the float ones freed.
            with torch.inference_mode():
                lm(input_ids=torch.zeros(1, 1, dtype=torch.long))
            _memory.trim_heap()
    lm.eval().requires_grad_(False)
    if int8_embedding:
        _int8_input_embedding(lm)
    if batch_invariant:
        set_batch_invariant(lm)
    if name is None:
        name = canonical if canonical in named_models.MODEL_NAMES else directory.resolve().name
    return ServedModel(name, lm, tokenizer, quantization, memory_footprint(lm), time.perf_counter() - start, options)


def _int8_input_embedding(lm) -> None:
    """Replace ``lm``'s float input embedding by an ``Embedding8bit`` quantized from it (each row with its own
    absmax), and free the float table. One tied to an int8 head is int8 already (``quantize_head``)."""
    embedding = lm.get_input_embeddings()
    if isinstance(embedding, Embedding8bit):
        return
    if not isinstance(embedding, torch.nn.Embedding):
        raise ValueError(f"int8_embedding: the input embedding is a {type(embedding).__name__}, not an nn.Embedding")
    head = lm.get_output_embeddings()
    if head is not None and getattr(head, "weight", None) is embedding.weight:
        raise ValueError("int8_embedding: the input embedding is tied to a float head; add quantize_head, which puts "
                         "both in int8 with one copy of the codes")
    lm.set_input_embeddings(Embedding8bit.from_embedding(embedding))
    del embedding
    _memory.trim_heap()


def _load_saved(directory: Path):
    """A saved llm-int8 checkpoint, loaded as saved (transformers routes it to llm-int8: docs/hf.md)."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    lm = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    return lm, tokenizer


# ------------------------------------------------------------------------------------------------
# Request checks the engine lacks


def _bad_request(message: str) -> HTTPException:
    return HTTPException(status_code=400, detail=message)


def _check_common(body: dict, served: ServedModel, count_prompt_tokens: Callable[[dict], int]) -> None:
    """400 with a message for what transformers' handlers would turn into a 500, a hang or a silent
    default: bad token limits, temperature or top_p, a non-boolean ``stream``, a prompt that does
    not leave room for one new token in the context."""
    limit_key = next((k for k in ("max_completion_tokens", "max_tokens") if body.get(k) is not None), None)
    max_new = body.get(limit_key) if limit_key else None
    if max_new is not None and (isinstance(max_new, bool) or not isinstance(max_new, int) or max_new < 1):
        raise _bad_request(f"{limit_key} must be a positive integer, got {max_new!r}")
    temperature = body.get("temperature")
    if temperature is not None and (
        isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature <= MAX_TEMPERATURE
    ):
        raise _bad_request(f"temperature must be a number in [0, {MAX_TEMPERATURE:g}], got {temperature!r}")
    top_p = body.get("top_p")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise _bad_request(f"top_p must be a number in (0, 1], got {top_p!r}")
    if body.get("stream") is not None and not isinstance(body["stream"], bool):
        raise _bad_request(f"stream must be true or false, got {body['stream']!r}")
    n_prompt = count_prompt_tokens(body)
    context = served.context_length
    if context is not None and n_prompt + (max_new or 1) > context:
        raise _bad_request(
            f"the prompt has {n_prompt} tokens and {max_new or 1} new ones were asked for: more than the model's context of "
            f"{context} tokens; shorten the prompt or lower max_tokens"
        )


def _chat_prompt_tokens(served: ServedModel) -> Callable[[dict], int]:
    def count(body: dict) -> int:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _bad_request("messages must be a non-empty list of {role, content} objects")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise _bad_request(f"messages[{i}] must be an object with a string 'role', got {message!r}")
            content = message.get("content")
            if content is not None and not isinstance(content, (str, list)):
                raise _bad_request(f"messages[{i}].content must be a string or a list of content parts")
        try:
            ids = served.tokenizer.apply_chat_template(
                [{"role": m["role"], "content": _text_of(m.get("content"))} for m in messages],
                add_generation_prompt=True, tokenize=True, return_dict=True,
            )["input_ids"]
        except (TypeError, ValueError, KeyError) as err:
            raise _bad_request(f"the chat template cannot render these messages: {err}") from err
        return len(ids)

    return count


def _text_of(content) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for part in content:
        if not isinstance(part, dict) or part.get("type") not in ("text", "input_text") or not isinstance(part.get("text"), str):
            raise _bad_request(f"this model takes text only; got the content part {part!r}")
        parts.append(part["text"])
    return " ".join(parts)


def _completion_prompt_tokens(served: ServedModel) -> Callable[[dict], int]:
    def count(body: dict) -> int:
        prompt = body.get("prompt", "")
        if not isinstance(prompt, str):
            raise _bad_request("prompt must be a string (lists of prompts or of token ids are not supported)")
        return len(served.tokenizer(prompt)["input_ids"])

    return count


class _CheckedChatHandler(ChatCompletionHandler):
    def __init__(self, served: ServedModel, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._served = served
        self._count = _chat_prompt_tokens(served)

    async def handle_request(self, body: dict, request_id: str):
        self._validate_request(body)
        _check_common(body, self._served, self._count)
        return await super().handle_request(body, request_id)


class _CheckedCompletionHandler(CompletionHandler):
    def __init__(self, served: ServedModel, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._served = served
        self._count = _completion_prompt_tokens(served)

    async def handle_request(self, body: dict, request_id: str):
        self._validate_request(body)
        _check_common(body, self._served, self._count)
        return await super().handle_request(body, request_id)


# ------------------------------------------------------------------------------------------------
# The engine


class _PinnedModelManager(ModelManager):
    """transformers' ModelManager serving one model built beforehand: it never loads one itself.

    With ``force_model`` set, its handlers answer for that name alone (another name gets a 400) and
    ``/v1/models`` lists it alone; loading it is asking these two methods for the prebuilt objects.
    """

    def __init__(self, served: ServedModel, continuous_batching: bool):
        self._served = served
        super().__init__(device="cpu", dtype="auto", continuous_batching=continuous_batching, force_model=served.name)

    @staticmethod
    def process_model_name(model_id: str) -> str:
        return model_id  # replies name the model as clients do, not "<name>@main" (a Hub revision it has not)

    def _load_processor(self, model_id_and_revision, gguf_file=None):
        return self._served.tokenizer

    def _load_model(self, model_id_and_revision, tqdm_class=None, progress_callback=None, gguf_file=None):
        return self._served.model


class _Server(uvicorn.Server):
    """uvicorn's server, telling ``on_started`` its URL once the socket is bound, and exiting
    normally (not by re-raising the signal) after a graceful shutdown on SIGINT / SIGTERM."""

    def __init__(self, config: uvicorn.Config, on_started: Callable[[str], None]):
        super().__init__(config)
        self._on_started = on_started
        self.stop_signal: int | None = None

    async def startup(self, sockets=None):
        await super().startup(sockets)
        if self.started:
            port = self.servers[0].sockets[0].getsockname()[1] if self.servers else self.config.port
            host = self.config.host
            self._on_started(f"http://{f'[{host}]' if ':' in host else host}:{port}")

    def handle_exit(self, sig, frame):
        super().handle_exit(sig, frame)
        self.stop_signal = sig
        self._captured_signals.clear()  # shut down gracefully and return; do not kill the process afterwards


def build_app(served: ServedModel, continuous_batching: bool = False):
    """(FastAPI app, GenerationState) of transformers' serving engine, pinned to ``served``."""
    manager = _PinnedModelManager(served, continuous_batching)
    # transformers sizes the paged KV cache from the device's free memory (60-90 % of it); on the CPU that is
    # the machine's RAM: a 12 GB cache for SmolLM2 got the server OOM-killed at its first request. Bounded:
    cb_config = ContinuousBatchingConfig(num_blocks=CB_NUM_BLOCKS, max_batch_tokens=CB_MAX_BATCH_TOKENS)
    state = GenerationState(continuous_batching=continuous_batching, cb_config=cb_config if continuous_batching else None)
    app = build_server(
        manager,
        _CheckedChatHandler(served, model_manager=manager, generation_state=state),
        completion_handler=_CheckedCompletionHandler(served, model_manager=manager, generation_state=state),
        response_handler=ResponseHandler(model_manager=manager, generation_state=state),
        transcription_handler=TranscriptionHandler(manager, state),
        systemone_handler=SystemOneHandler(model_manager=manager, generation_state=state),
        generation_state=state,
    )
    return app, state


def run_server(
    served: ServedModel,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    continuous_batching: bool = False,
    on_started: Callable[[str], None] = print,
    log_level: str = "warning",
) -> int | None:
    """Serve ``served`` until Ctrl-C / SIGTERM; returns the signal that stopped it (None otherwise).

    ``port=0`` takes a free port; ``on_started`` gets the URL (with the real port) once it is bound.
    """
    # transformers' serving code logs every request at warning level ("[Request received] ..."): shown from
    # --log-level info on, like uvicorn's access log.
    hf_logging.set_verbosity(hf_logging.log_levels["error" if log_level in ("warning", "error", "critical") else log_level])
    app, state = build_app(served, continuous_batching)
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
    )
    server = _Server(config, on_started)
    try:
        server.run()
    finally:
        state.shutdown()  # the continuous-batching worker, if one was started
    return server.stop_signal


def signal_name(sig: int | None) -> str:
    return "" if sig is None else signal.Signals(sig).name


def startup_text(served: ServedModel, url: str, continuous_batching: bool, rss_bytes: int) -> str:
    """What `llm-int8 serve` prints once it listens."""
    return (
        f"serving {served.name} ({served.quantization}) at {url}/v1  (OpenAI-compatible: /v1/chat/completions, "
        f"/v1/completions, /v1/models; {url}/health)\n"
        + (f"  {', '.join(served.options)}\n" if served.options else "")
        + f"  model memory {served.memory_bytes / MiB:.0f} MiB (parameters + buffers), process RSS {rss_bytes / MiB:.0f} MiB; "
        f"loaded in {served.load_seconds:.1f} s; continuous batching {'on' if continuous_batching else 'off'}; "
        f"context {served.context_length} tokens\n"
        "  Ctrl-C or SIGTERM stops it"
    )


def rss_bytes() -> int:
    """This process's resident set now, in bytes (Linux ``VmRSS``; 0 where unavailable)."""
    return _memory.status_bytes("VmRSS")


__all__ = [
    "QUANTIZATIONS", "ServedModel", "build_app", "load_for_serving", "run_server", "startup_text", "DEFAULT_HOST",
    "DEFAULT_PORT",
]
