"""Rewrite the message tables of docs/bad-inputs.md from the tests that check them.

    .venv/bin/python scripts/update_bad_inputs_doc.py

Runs every entry of tests/test_bad_inputs.py (``CATALOGUE``, ``GAPS``, the checkpoint cases, the model
folder / GGUF / command-line cases) and every invalid layer of tests/helpers.py (``LAYER_DEFECTS``, as a
file given to ``load_checkpoint``), and replaces the exception and message of each table row whose call
and "what is wrong" match. A command-line entry's "exception" is its exit code (``exit 2``) and its
message what it printed on stderr. Rows for entries the page does not have yet are appended to the
table of their section; rows whose entry is gone are reported (delete them by hand: the prose around
them may need an edit too).
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import safetensors.torch  # noqa: E402
import torch  # noqa: E402

import test_bad_inputs as catalogue  # noqa: E402
from helpers import LAYER_DEFECTS, layer_state  # noqa: E402
from llm_int8 import Linear8bitLt  # noqa: E402
from llm_int8.checkpoint import load_checkpoint  # noqa: E402

DOC = ROOT / "docs" / "bad-inputs.md"
ROW = re.compile(r"^\| `(?P<api>[^`]+)` \| (?P<what>.+?) \| `(?P<exc>[^`]+)` \| (?P<msg>.*) \|$")


def _section(api: str) -> str:
    if api.startswith("llm-int8"):
        return "## The `llm-int8` command"
    if api.startswith(("from_pretrained", "quantize_model")):
        return "## transformers: `from_pretrained` and `quantize_model`"
    if api.startswith("load_gguf"):
        return "## GGUF files: `llm_int8.integrations.gguf.load_gguf`"
    if api.startswith(("load_", "save_")):
        return "## `llm_int8.checkpoint`"
    if api.startswith("Linear8bitLt"):
        return "## `llm_int8.Linear8bitLt`"
    if api.startswith(("Int8Config", "quantize_(")):
        return "## `llm_int8.Int8Config` and `llm_int8.quantize_`"
    if api.startswith(("absmax_quantize", "zeropoint_quantize")):
        return "## `llm_int8.eval.baselines` (the paper's per-tensor baselines)"
    return "## `llm_int8.functional`"


def _outcome(call, tmp: Path) -> tuple[str, str]:
    try:
        call()
    except Exception as err:  # noqa: BLE001 - recording what each bad input raises is the point
        message = " ".join(str(err).split()).replace(str(tmp), "<dir>")
        if isinstance(err, catalogue.CliExit):  # its last line: argparse prints the usage above the error
            return f"exit {err.code}", str(err).strip().splitlines()[-1].replace(str(tmp), "<dir>")
        return type(err).__name__, message
    raise AssertionError("the call did not raise")


def collect(tmp: Path) -> dict[tuple[str, str], tuple[str, str]]:
    entries = list(catalogue.CATALOGUE) + list(catalogue._checkpoint_cases(tmp)) + list(catalogue.GAPS)
    entries += catalogue._file_cases(tmp)
    rows = {(e.api, e.what): _outcome(e.call, tmp) for e in entries}
    for name, (edit, _) in LAYER_DEFECTS.items():
        state = layer_state()
        edit(state)
        path = tmp / f"{name.replace(' ', '_')}.safetensors"
        safetensors.torch.save_file(state, path)
        rows[("load_checkpoint(module, path)", f"file with {name}")] = _outcome(
            lambda path=path: load_checkpoint(Linear8bitLt(8, 4), path), tmp)
    return rows


def main() -> int:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        rows = collect(Path(tmp))
    lines = DOC.read_text().splitlines()
    seen, out = set(), []
    for line in lines:
        match = ROW.match(line)
        key = (match["api"], match["what"]) if match else None
        if key in rows:
            exc, msg = rows[key]
            line = f"| `{key[0]}` | {key[1]} | `{exc}` | {msg} |"
            seen.add(key)
        elif match and match["api"] != "Input":
            print(f"no longer in the catalogue (delete by hand): {key}")
        out.append(line)
    for key in [k for k in rows if k not in seen]:  # append to the end of its section's first table
        heading = _section(key[0])
        start = out.index(heading)
        end = start + 1
        while end < len(out) and not out[end].startswith("## "):
            end += 1
        # after its last row, or, in a table with none yet, after its |---| line
        last_row = max(i for i in range(start, end) if out[i].startswith(("| `", "|---")))
        exc, msg = rows[key]
        out.insert(last_row + 1, f"| `{key[0]}` | {key[1]} | `{exc}` | {msg} |")
        print(f"added: {key}")
    DOC.write_text("\n".join(out) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
