"""One table from the parts of a bench_fidelity.py measurement run in several processes (same model, windows).

Each folder is a bench_fidelity.py OUT/MODEL folder (results.json, nll.pt). Per corpus, the methods of
all folders are put side by side; fp32 must be the same in every folder that has it (its per-token
NLLs equal bit for bit: the same windows and model), and every change is recomputed from the per-token
NLLs against it, paired; top-1 agreement is taken from the folder that measured the method.

    python benchmarks/fidelity_table.py DIR/smollm2-135m DIR/kjv/smollm2-135m ... [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_fidelity import LABELS, ORDER, Record, external_result  # noqa: E402

from llm_int8.cli import _change_text, _ppl_table  # noqa: E402
from llm_int8.eval.perplexity import paired_change  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    merged: dict[str, dict] = {}
    top1: dict[tuple[str, str], float | None] = {}
    info = None
    for folder in map(Path, args.folders):
        results = json.loads((folder / "results.json").read_text())
        info = info or results
        nll = torch.load(folder / "nll.pt")
        for corpus, methods in nll.items():
            for name, token_nll in methods.items():
                have = merged.setdefault(corpus, {})
                if name in have:
                    if name == "fp32" and not torch.equal(have[name].token_nll, token_nll):
                        sys.exit(f"{folder}: fp32 on {corpus} differs from an earlier folder's: not the same windows")
                    continue
                seconds = results["results"][corpus][name]["median_seconds_per_window"]
                have[name] = external_result(token_nll, [seconds])
                top1[(corpus, name)] = results["results"][corpus][name].get("top1_agreement")
    record = Record(Path("."), {"model": info["model"], "windows": info["windows"], "seq_len": info["seq_len"]})
    payload = {"model": info["model"], "corpora": {}}
    for corpus, results in merged.items():
        for name, result in results.items():
            result.change = paired_change(result, results["fp32"])
            result.top1_agreement = top1[(corpus, name)]
        record.results[corpus] = results
        ordered = {n: results[n].to_dict() for n in ORDER if n in results}
        print(f"\n{info['model']}, {corpus}: {info['windows']} windows x {info['seq_len']} tokens")
        print(_ppl_table(ordered, LABELS))
        extra = record.extra_changes(corpus)
        for name, change in extra.items():
            print(f"  {name}: {_change_text(change)}")
        payload["corpora"][corpus] = {"methods": ordered, "paired": extra}
    if args.json:
        Path(args.json).write_text(json.dumps(payload, indent=1))


if __name__ == "__main__":
    main()
