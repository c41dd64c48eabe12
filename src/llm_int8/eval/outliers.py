"""Outlier features (the paper's §4.1): statistics of every linear layer's input, gathered by hooks.

A *site* is one distinct linear-layer input (:mod:`.hooks`: layers fed the same tensor, q/k/v or
gate/up, form one site, so one hidden state is not counted three times). A *layer* is a transformer block: the module-name prefix up to its last numeric component
(``model.layers.12``), or the site alone when the name has none. Following the paper, a feature
dimension of the hidden width is an *outlier feature* when its magnitude reaches
``OUTLIER_MAGNITUDE`` (6.0)

* in at least ``MIN_LAYER_SHARE`` (25 %) of the layers having sites of that width, and
* at at least ``MIN_POSITION_SHARE`` (6 %) of the sequence positions (a position counts when the
  dimension reaches the magnitude there in any of those sites).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from ..reference import outlier_values
from .hooks import LinearInputHooks, Site, linear_layers

OUTLIER_MAGNITUDE = 6.0
MIN_LAYER_SHARE = 0.25
MIN_POSITION_SHARE = 0.06


def block_of(name: str) -> str:
    """The transformer block a layer belongs to: its name up to the last numeric component."""
    parts = name.split(".")
    numeric = [i for i, part in enumerate(parts) if part.isdigit()]
    return ".".join(parts[: numeric[-1] + 1]) if numeric else name


class InputTracker(LinearInputHooks):
    """Records, per site, the max |x| (``stats["max_abs"]``, float32 [K]) and the count of positions with
    |x| >= ``threshold`` (``stats["count_large"]``, int64 [K]) per dim, and the positions seen
    (``stats["n_positions"]``).

    Also records, per input width, at how many positions each dim reaches the threshold in any
    site (``union_count``, ``union_positions``): the paper's sequence-position share.
    """

    def __init__(self, model: nn.Module, threshold: float = OUTLIER_MAGNITUDE):
        if not threshold > 0:
            raise ValueError(f"threshold must be > 0, got {threshold}")
        super().__init__(model)
        self.threshold = float(threshold)
        self.union_count: dict[int, torch.Tensor] = {}
        self.union_positions: dict[int, int] = Counter()
        self._current: dict[int, torch.Tensor] = {}

    def site_input(self, site: Site, x: torch.Tensor) -> None:
        rows = x.reshape(-1, site.in_features)
        magnitude = rows.abs().float()
        large = outlier_values(magnitude, self.threshold)
        stats = site.stats
        if not stats:
            stats.update(max_abs=torch.zeros(site.in_features), count_large=torch.zeros(site.in_features, dtype=torch.int64),
                         n_positions=0)
        stats["max_abs"] = torch.maximum(stats["max_abs"], magnitude.amax(dim=0))
        stats["count_large"] += large.sum(dim=0)
        stats["n_positions"] += rows.shape[0]
        current = self._current.get(site.in_features)
        self._current[site.in_features] = large if current is None else current | large

    def forward_end(self) -> None:
        for width, large in self._current.items():
            count = large.sum(dim=0)
            self.union_count[width] = self.union_count.get(width, torch.zeros_like(count)) + count
            self.union_positions[width] += large.shape[0]
        self._current.clear()

    def hidden_width(self) -> int:
        """The most common input width among the sites (the model's hidden size)."""
        if not self.sites:
            raise ValueError("no statistics yet: run the model inside the tracker first")
        return Counter(site.in_features for site in self.sites).most_common(1)[0][0]


@dataclass
class OutlierReport:
    """The outlier feature dims of one width and the statistics behind them."""

    dims: list[int]
    width: int
    threshold: float
    layer_share: list[float]  # per dim of ``dims``
    position_share: list[float]  # per dim of ``dims``
    n_layers: int  # transformer blocks with sites of this width
    site_names: list[str]  # one label per site of this width
    large_dims_per_site: list[int]  # dims reaching the threshold anywhere, per site
    outliers_per_site: list[int]  # of ``dims``, how many reach the threshold, per site
    magnitudes: torch.Tensor = field(repr=False)  # float32 [n_sites, width]: max |x|

    @property
    def share_of_features(self) -> float:
        return len(self.dims) / self.width

    def by_block(self) -> tuple[list[str], list[tuple[str, dict[str, tuple[int, int]]]]]:
        """The per-site counts as a grid: (site kinds, [(block, {kind: (large dims, outlier dims)})]).

        A site's kind is its layer names without the block prefix and module path, e.g.
        ``q_proj/k_proj/v_proj``; kinds are listed in model order, blocks too.
        """
        kinds, rows = [], {}
        for names, large, outlier in zip(self.site_names, self.large_dims_per_site, self.outliers_per_site):
            layer_names = names.split("+")
            kind = "/".join(n.rsplit(".", 1)[-1] for n in layer_names)
            if kind not in kinds:
                kinds.append(kind)
            rows.setdefault(block_of(layer_names[0]), {})[kind] = (large, outlier)
        return kinds, list(rows.items())

    def summary(self) -> dict:
        """The §4.1 figures of one model: how many systematic outlier dims, the share of layers and of
        sequence positions they reach the threshold in (means over the dims), and the largest |x| seen
        at any linear-layer input of the hidden width (and where)."""
        site, dim = divmod(int(self.magnitudes.argmax()), self.width) if self.magnitudes.numel() else (0, 0)
        return {
            "n_dims": len(self.dims),
            "width": self.width,
            "share_of_features": self.share_of_features,
            "layer_share": sum(self.layer_share) / len(self.dims) if self.dims else 0.0,
            "position_share": sum(self.position_share) / len(self.dims) if self.dims else 0.0,
            "max_abs": float(self.magnitudes.max()) if self.magnitudes.numel() else 0.0,
            "max_abs_site": self.site_names[site] if self.site_names else "",
            "max_abs_dim": dim,
        }

    def to_dict(self) -> dict:
        return {
            "summary": self.summary(),
            "dims": self.dims,
            "width": self.width,
            "threshold": self.threshold,
            "share_of_features": self.share_of_features,
            "n_layers": self.n_layers,
            "layer_share": self.layer_share,
            "position_share": self.position_share,
            "sites": [
                {"names": n, "large_dims": a, "outlier_dims": b}
                for n, a, b in zip(self.site_names, self.large_dims_per_site, self.outliers_per_site)
            ],
        }


def find_outliers(
    tracker: InputTracker,
    width: int | None = None,
    min_layer_share: float = MIN_LAYER_SHARE,
    min_position_share: float = MIN_POSITION_SHARE,
) -> OutlierReport:
    """Apply the §4.1 criterion to the statistics of ``tracker`` for sites of ``width`` (default: hidden)."""
    width = tracker.hidden_width() if width is None else width
    sites = [s for s in tracker.sites if s.in_features == width]
    if not sites or tracker.union_positions[width] == 0:
        raise ValueError(f"no inputs of width {width} were recorded")
    present = torch.stack([s.stats["count_large"] > 0 for s in sites])  # [n_sites, width]
    blocks = sorted({block_of(s.names[0]) for s in sites})
    in_block = torch.stack(
        [present[[i for i, s in enumerate(sites) if block_of(s.names[0]) == b]].any(dim=0) for b in blocks]
    )
    layer_share = in_block.float().mean(dim=0)
    position_share = tracker.union_count[width].double() / tracker.union_positions[width]
    is_outlier = (layer_share >= min_layer_share) & (position_share >= min_position_share)
    dims = is_outlier.nonzero().view(-1)
    return OutlierReport(
        dims=dims.tolist(),
        width=width,
        threshold=tracker.threshold,
        n_layers=len(blocks),
        layer_share=layer_share[dims].tolist(),
        position_share=position_share[dims].tolist(),
        site_names=["+".join(s.names) for s in sites],
        large_dims_per_site=present.sum(dim=1).tolist(),
        outliers_per_site=present[:, dims].sum(dim=1).tolist(),
        magnitudes=torch.stack([s.stats["max_abs"] for s in sites]),
    )


@contextlib.contextmanager
def zero_input_dims(model: nn.Module, dims, width: int):
    """Within the block, every linear layer of input width ``width`` sees its input dims ``dims`` as 0."""
    index = torch.as_tensor(list(dims), dtype=torch.int64)
    if index.numel() and (index.min() < 0 or index.max() >= width):
        raise ValueError(f"dims must lie in [0, {width}), got {index.tolist()}")

    def hook(module, args):
        return (args[0].index_fill(-1, index.to(args[0].device), 0.0),) + tuple(args[1:])

    handles = [m.register_forward_pre_hook(hook) for _, m, w in linear_layers(model) if w == width]
    if not handles:
        raise ValueError(f"the model has no linear layer of input width {width}")
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()


def random_dims(width: int, count: int, exclude, seed: int = 0) -> list[int]:
    """``count`` distinct dims of [0, width) not in ``exclude``, drawn with a fixed seed."""
    pool = torch.tensor(sorted(set(range(width)) - set(exclude)), dtype=torch.int64)
    if count > pool.numel():
        raise ValueError(f"cannot draw {count} dims from the {pool.numel()} left")
    generator = torch.Generator().manual_seed(seed)
    return sorted(pool[torch.randperm(pool.numel(), generator=generator)[:count]].tolist())
