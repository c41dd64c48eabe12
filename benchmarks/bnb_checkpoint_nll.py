"""Per-token NLL of an 8-bit checkpoint run by transformers + bitsandbytes alone, in a process without llm_int8.

The checkpoint (``save_pretrained`` of an llm-int8 model, e.g. ``llm-int8 quantize --calibrate --save DIR``)
declares itself a bitsandbytes 8-bit checkpoint; here transformers loads it with bitsandbytes' own
``Linear8bitLt`` (llm_int8 is never imported, and the script checks that). The windows (int64
[n_windows, seq_len], ``torch.save``-d by the caller) are scored as ``llm_int8.eval.perplexity`` does:
token t predicted from the tokens before it in its window; the float64 NLLs [n_windows, seq_len - 1]
are ``torch.save``-d to OUT.

    python benchmarks/bnb_checkpoint_nll.py CHECKPOINT_DIR WINDOWS.pt OUT.pt
"""

from __future__ import annotations

import logging
import sys

import torch
from transformers import AutoModelForCausalLM


def main() -> None:
    if len(sys.argv) != 4:
        sys.exit(__doc__.strip().splitlines()[-1].strip())
    checkpoint, windows_path, out = sys.argv[1:]
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, device_map="cpu").eval()
    import bitsandbytes as bnb

    if "llm_int8" in sys.modules:
        sys.exit("llm_int8 was imported: this check must run without it")
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    if not layers or any(m.weight.dtype != torch.int8 for m in layers):
        sys.exit("the checkpoint did not load into bitsandbytes' int8 Linear8bitLt layers")
    windows = torch.load(windows_path)
    nll = []
    with torch.inference_mode():
        for window in windows:
            logits = model(input_ids=window.unsqueeze(0)).logits.float()[0, :-1]
            nll.append(torch.nn.functional.cross_entropy(logits, window[1:], reduction="none").double())
    nll = torch.stack(nll)
    torch.save(nll, out)
    print(f"bitsandbytes {bnb.__version__}: {len(layers)} Linear8bitLt layers, perplexity {float(nll.mean().exp()):.4f} "
          f"on {nll.numel()} tokens; llm_int8 imported: {'llm_int8' in sys.modules}")


if __name__ == "__main__":
    main()
