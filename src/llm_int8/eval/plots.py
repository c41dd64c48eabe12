"""PNG figures; the only module importing matplotlib (Agg backend, no display needed)."""

from __future__ import annotations

import importlib
import importlib.util
import math
import textwrap
from pathlib import Path

import torch


def _pyplot():
    if importlib.util.find_spec("matplotlib") is None:
        raise ImportError("plots need matplotlib; install the extra: pip install 'llm-int8[eval]'")
    matplotlib = importlib.import_module("matplotlib")
    matplotlib.use("Agg")
    return importlib.import_module("matplotlib.pyplot")


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    fig.clf()
    return path


def outlier_heatmap(report, path: Path) -> Path:
    """Sites x hidden dims, colour = log10 max |x| (outlier dims marked)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(11, 6))
    image = ax.imshow(report.magnitudes.clamp_min(1e-3).log10().numpy(), aspect="auto", cmap="magma", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="log10 max |x|")
    for dim in report.dims:
        ax.axvline(dim, color="cyan", lw=0.6, ls="--")
    ax.set_xlabel(f"hidden dim (outlier dims dashed: {report.dims})")
    ax.set_ylabel("linear-layer input (site), first layer at top")
    ax.set_title(f"Max |activation| per site and dim; threshold {report.threshold:g}")
    return _save(fig, path)


def outliers_per_layer(report, path: Path) -> Path:
    """Per transformer block, one bar per layer input (site kind): dims reaching the threshold anywhere,
    and how many of them are outlier features."""
    plt = _pyplot()
    kinds, blocks = report.by_block()
    width = 0.8 / len(kinds)
    fig, ax = plt.subplots(figsize=(11, 4))
    for k, kind in enumerate(kinds):
        x = [b + (k - (len(kinds) - 1) / 2) * width for b in range(len(blocks))]
        large = [cells.get(kind, (0, 0))[0] for _, cells in blocks]
        outlier = [cells.get(kind, (0, 0))[1] for _, cells in blocks]
        ax.bar(x, large, width, color=f"C{k}", label=f"{kind}: dims with |x| >= {report.threshold:g}")
        ax.bar(x, outlier, width, color=f"C{k}", hatch="////", edgecolor="black", lw=0.3)
    handles, labels = ax.get_legend_handles_labels()
    handles.append(importlib.import_module("matplotlib.patches").Patch(facecolor="white", hatch="////", edgecolor="black"))
    labels.append("hatched: of which outlier features (§4.1)")
    ax.set_xticks(range(len(blocks)))
    ax.set_xticklabels([name.rsplit(".", 1)[-1] for name, _ in blocks])
    ax.set_xlabel("transformer block")
    ax.set_ylabel("dims")
    ax.legend(handles, labels)
    ax.set_title("Large-magnitude dims per layer input")
    return _save(fig, path)


def sweep_plot(rows: list[dict], fp32_perplexity: float | None, path: Path) -> Path:
    """Perplexity and decomposed-column share vs alpha (inf drawn at the right end)."""
    plt = _pyplot()
    labels = ["inf" if math.isinf(r["alpha"]) else f"{r['alpha']:g}" for r in rows]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(labels, [r["perplexity"] for r in rows], "o-", color="tab:blue", label="LLM.int8() perplexity")
    if fp32_perplexity is not None:
        ax.axhline(fp32_perplexity, color="black", ls=":", label="fp32")
    ax.set_xlabel("threshold alpha")
    ax.set_ylabel("perplexity")
    twin = ax.twinx()
    twin.plot(labels, [100 * r["decomposed_share"] for r in rows], "s--", color="tab:orange", label="columns decomposed")
    twin.set_ylabel("columns decomposed (%)")
    lines = ax.get_legend_handles_labels()
    more = twin.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], loc="upper right")
    ax.set_title("Outlier threshold sweep")
    return _save(fig, path)


def weight_histograms(
    versions: dict[str, torch.Tensor], errors: dict[str, float], title: str, path: Path, bins: int = 200
) -> Path:
    """Histogram of the original weight against each dequantized version (log counts); ``errors`` maps
    each version to its relative error, shown in its panel's title."""
    plt = _pyplot()
    original = versions["original"].flatten()
    others = [k for k in versions if k != "original"]
    fig, axes = plt.subplots(1, len(others), figsize=(5 * len(others), 4), sharey=True)
    lo, hi = float(original.min()), float(original.max())
    for ax, key in zip(axes, others):
        ax.hist(original.numpy(), bins=bins, range=(lo, hi), color="tab:gray", alpha=0.6, label="original")
        ax.hist(versions[key].flatten().numpy(), bins=bins, range=(lo, hi), histtype="step", color="tab:red", label=key)
        ax.set_yscale("log")
        ax.set_title(f"{key} (relative error {errors[key]:.4f})")
        ax.set_xlabel("weight value")
        ax.legend()
    axes[0].set_ylabel("count")
    fig.suptitle(title)
    return _save(fig, path)


SCALE_PLOT_METHODS = {  # method -> (label, marker, colour); fp32 is the reference, not drawn
    "absmax_tensor": ("absmax per-tensor", "v", "tab:gray"),
    "zeropoint_tensor": ("zero-point per-tensor", "^", "tab:olive"),
    "absmax_vector": ("vector-wise (alpha=0)", "s", "tab:orange"),
    "bitsandbytes": ("bitsandbytes 0.50.2", "D", "tab:red"),
    "bnb_emulated": ("bitsandbytes semantics (emulated)", "D", "tab:red"),
    "llm_int8": ("LLM.int8() (alpha=6)", "o", "tab:blue"),
    "llm_int8_calibrated": ("LLM.int8() + calibrated 16-bit cols", "*", "tab:purple"),
}


SCALE_PLOT_FLOOR = 0.01  # %: values at or below are drawn on the floor of the log axes (said in the labels)


def scale_plot(rows: list[dict], note: str, path: Path) -> Path:
    """Degradation vs model size, one line per int8 method, models on a log axis of parameters: the
    perplexity increase over fp32 and the share of next-token predictions that differ from fp32's (both %,
    log axes; values <= ``SCALE_PLOT_FLOOR`` drawn on the floor). ``note`` (where the models came from)
    is printed under the title."""
    plt = _pyplot()
    rows = sorted(rows, key=lambda r: r["parameters"])
    sizes = [r["parameters"] / 1e9 for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5.6))
    for method, (label, marker, colour) in SCALE_PLOT_METHODS.items():
        if not all(method in r["perplexity"] for r in rows):
            continue
        base = [r["perplexity"]["fp32"]["perplexity"] for r in rows]
        delta = [100 * (r["perplexity"][method]["perplexity"] / b - 1) for r, b in zip(rows, base)]
        differ = [100 * (1 - r["perplexity"][method]["top1_agreement"]) for r in rows]
        style = dict(marker=marker, color=colour, label=label, lw=2.2 if method.startswith("llm_int8") else 1.2)
        left.plot(sizes, [max(d, SCALE_PLOT_FLOOR) for d in delta], **style)
        right.plot(sizes, [max(d, SCALE_PLOT_FLOOR) for d in differ], **style)
    plain = importlib.import_module("matplotlib.ticker").FuncFormatter(lambda value, _: f"{value:g}")
    for ax in (left, right):
        ax.set_xscale("log")
        ax.set_xticks(sizes)
        ax.set_xticklabels([f"{r['model']}\n{s:.2f} B" for r, s in zip(rows, sizes)], fontsize=8)
        ax.minorticks_off()
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(plain)
        ax.grid(alpha=0.3)
        ax.set_xlabel("model (parameters)")
    left.set_ylabel(f"perplexity increase over fp32 (%; <= {SCALE_PLOT_FLOOR:g} on the floor)")
    left.set_title("Perplexity degradation vs model size")
    right.yaxis.set_minor_formatter(plain)  # this axis spans about a decade: label its 2..9 ticks too
    right.set_ylabel("next-token argmax unlike fp32's (%)")
    right.set_title("Disagreement with fp32's next-token choice")
    fig.legend(*left.get_legend_handles_labels(), loc="lower center", ncol=3, fontsize=8.5, frameon=False)
    fig.suptitle("\n".join(textwrap.wrap(note, 150)), fontsize=8.5)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    fig.clf()
    return path
