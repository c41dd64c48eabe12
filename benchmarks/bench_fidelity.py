"""How much perplexity do the int8 methods lose against fp32, with 95 % intervals, on two corpora of different genres?

For each model: the GPTQ rounding of the int8 codes (llm_int8.eval.rounding) is calibrated once on
held-out windows of Shakespeare (the last 5 % of the plays; never an evaluation window), then every
method is scored on evaluation windows of Shakespeare (the first 95 %) and of the King James Bible
(a genre the calibration never saw), all on the same tokens as fp32. Printed per model and corpus:
perplexity, the change against fp32 with the 95 % interval of the paired per-window NLL differences,
the per-token interval, top-1 agreement. With ``--save DIR`` the GPTQ int8 model is also written as a
checkpoint (``save_pretrained``) and scored by transformers + bitsandbytes in a separate process
without llm_int8 (benchmarks/bnb_checkpoint_nll.py): the row "bitsandbytes loading our checkpoint".

    python benchmarks/bench_fidelity.py --model smollm2-135m [--windows 16] [--seq-len 512] [--save DIR]
"""

from __future__ import annotations

import argparse
import gc
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from llm_int8 import _memory
from llm_int8.cli import _ppl_table
from llm_int8.eval import experiments as ex
from llm_int8.eval.data import KJV, SHAKESPEARE, load_corpus, split_tokens, token_windows
from llm_int8.eval.methods import METHODS
from llm_int8.eval.models import bos_token_id, load_model, tokenize
from llm_int8.eval.perplexity import PerplexityResult, paired_change
from llm_int8.eval.rounding import gptq_rounding
from llm_int8.eval.speed import cpu_name

METHODS_RUN = ["fp32", "w8_only", "w8_gptq", "llm_int8", "llm_int8_gptq", "bitsandbytes", "bitsandbytes_gptq"]
HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", default=None)
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--calib-windows", type=int, default=ex.GPTQ_WINDOWS)
    parser.add_argument("--corpus", nargs="+", default=[SHAKESPEARE, KJV])
    parser.add_argument("--methods", nargs="+", default=METHODS_RUN)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--save", default=None, metavar="DIR", help="write the GPTQ checkpoint here and score it with bitsandbytes alone")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, load average {load} "
          "(shared with other jobs)")
    for model_name in args.model or ["smollm2-135m"]:
        start = time.perf_counter()
        lm, tokenizer = load_model(model_name)
        bos = bos_token_id(model_name, tokenizer)
        texts = {corpus: split_tokens(tokenize(tokenizer, load_corpus(corpus))) for corpus in set(args.corpus) | {SHAKESPEARE}}
        calibration = token_windows(texts[SHAKESPEARE][1], args.calib_windows, args.seq_len, bos)
        rounding = gptq_rounding(lm, calibration)
        errs = sorted(rounding.error_gptq[n] / rounding.error_rtn[n] for n in rounding.error_rtn if rounding.error_rtn[n] > 0)
        print(f"\n{model_name}: BOS {bos}; GPTQ on {rounding.n_positions} held-out Shakespeare tokens in {rounding.seconds:.0f} s; "
              f"per-layer output error GPTQ / RTN on them: median {errs[len(errs) // 2]:.3f}, range {errs[0]:.3f}-{errs[-1]:.3f}")
        for corpus in args.corpus:
            windows = token_windows(texts[corpus][0], args.windows, args.seq_len, bos)
            work = ex.Workload(lm, tokenizer, windows, calibration, bos)
            results = ex.compare_methods(work, args.methods, rounding=rounding)
            labels = {n: METHODS[n].label for n in results}
            if args.save and corpus == args.corpus[0]:
                results["bnb_checkpoint"] = bnb_checkpoint(model_name, rounding, windows, Path(args.save) / model_name, results["fp32"])
                labels["bnb_checkpoint"] = "bitsandbytes (own process) loading our GPTQ checkpoint"
            print(f"\n{model_name}, {corpus}: {windows.shape[0]} windows x {windows.shape[1]} tokens (evaluation part; "
                  "calibration: Shakespeare's held-out tail)")
            print(_ppl_table({n: r.to_dict() for n, r in results.items()}, labels))
        print(f"{model_name}: {time.perf_counter() - start:.0f} s")
        del lm, rounding
        gc.collect()
        _memory.trim_heap()


def bnb_checkpoint(model_name, rounding, windows, folder: Path, fp32: PerplexityResult) -> PerplexityResult:
    ex.quantize_to_disk(model_name, None, str(folder), rounding=rounding)
    torch.save(windows, folder / "windows.pt")
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # the checker must not see llm_int8 (it is installed editable too: it checks)
    proc = subprocess.run([sys.executable, str(HERE / "bnb_checkpoint_nll.py"), str(folder), str(folder / "windows.pt"),
                           str(folder / "nll.pt")], capture_output=True, text=True, env=env, check=False)
    print(proc.stdout.strip())
    if proc.returncode != 0:
        raise RuntimeError(f"bitsandbytes failed on the checkpoint:\n{proc.stderr[-3000:]}")
    nll = torch.load(folder / "nll.pt")
    result = PerplexityResult(float(nll.mean().exp()), float(nll.mean()), nll.numel(), [0.0], token_nll=nll)
    result.change = paired_change(result, fp32)
    return result


if __name__ == "__main__":
    main()
