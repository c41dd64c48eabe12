"""Outlier features (the paper's §4.1): statistics of every linear layer's input, gathered by hooks.

A *site* is one distinct linear-layer input: layers fed the same tensor object (q/k/v
projections, the gate and up projections) form one site, so one hidden state is not counted three
times. A *layer* is a transformer block: the module-name prefix up to its last numeric component
(``model.layers.12``), or the site alone when the name has none. Following the paper, a feature
dimension of the hidden width is an *outlier feature* when its magnitude reaches
``OUTLIER_MAGNITUDE`` (6.0)

* in at least ``MIN_LAYER_SHARE`` (25 %) of the layers having sites of that width, and
* at at least ``MIN_POSITION_SHARE`` (6 %) of the sequence positions (a position counts when the
  dimension reaches the magnitude there in any of those sites).
"""

from __future__ import annotations

import contextlib
import weakref
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from ..convert import default_skip_modules, is_convertible
from ..nn import Linear8bitLt

OUTLIER_MAGNITUDE = 6.0
MIN_LAYER_SHARE = 0.25
MIN_POSITION_SHARE = 0.06


def linear_in_features(module: nn.Module) -> int | None:
    """The input width of a linear layer we know how to hook, else None."""
    if isinstance(module, (nn.Linear, Linear8bitLt)):
        return module.in_features
    if is_convertible(module):  # GPT-2 Conv1D: weight [in, out]
        return module.weight.shape[0]
    return None


def block_of(name: str) -> str:
    """The transformer block a layer belongs to: its name up to the last numeric component."""
    parts = name.split(".")
    numeric = [i for i, part in enumerate(parts) if part.isdigit()]
    return ".".join(parts[: numeric[-1] + 1]) if numeric else name


def linear_layers(model: nn.Module) -> list[tuple[str, nn.Module, int]]:
    """(name, module, in_features) of every linear layer except the output head and tied layers."""
    skip = set(default_skip_modules(model))
    found = []
    for name, module in model.named_modules():
        width = linear_in_features(module)
        if width is not None and name and name not in skip:
            found.append((name, module, width))
    return found


@dataclass
class Site:
    """Statistics of one distinct linear-layer input of width ``in_features``."""

    names: list[str]
    in_features: int
    max_abs: torch.Tensor  # float32 [K]: max |x| over every position seen
    count_large: torch.Tensor  # int64 [K]: positions with |x| >= threshold
    n_positions: int = 0


class InputTracker:
    """Context manager recording, per site, the max |x| and the count of |x| >= ``threshold`` per dim.

    Also records, per input width, at how many positions each dim reaches the threshold in any
    site (``union_count``, ``union_positions``): the paper's sequence-position share.
    """

    def __init__(self, model: nn.Module, threshold: float = OUTLIER_MAGNITUDE):
        if not threshold > 0:
            raise ValueError(f"threshold must be > 0, got {threshold}")
        self.model, self.threshold = model, float(threshold)
        self.sites: list[Site] = []
        self.union_count: dict[int, torch.Tensor] = {}
        self.union_positions: dict[int, int] = Counter()
        self._site_of: dict[str, Site] = {}
        self._last: tuple | None = None
        self._current: dict[int, torch.Tensor] = {}
        self._handles = []

    def __enter__(self) -> "InputTracker":
        layers = linear_layers(self.model)
        if not layers:
            raise ValueError("the model has no linear layers to track")
        for name, module, width in layers:
            self._handles.append(module.register_forward_pre_hook(self._hook(name, width)))
        self._handles.append(self.model.register_forward_pre_hook(lambda *_: self._current.clear()))
        self._handles.append(self.model.register_forward_hook(lambda *_: self._fold()))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, name: str, width: int):
        def hook(module, args):
            x = args[0]
            rows = x.detach().reshape(-1, width)
            site = self._site_of.get(name)
            if site is None:
                # A weak reference, not a data pointer: a freed input's memory may be reused.
                if self._last is not None and self._last[0]() is x:
                    site = self._last[1]
                    site.names.append(name)
                else:
                    site = Site([name], width, torch.zeros(width), torch.zeros(width, dtype=torch.int64))
                    self.sites.append(site)
                self._site_of[name] = site
            self._last = (weakref.ref(x), site)
            if site.names[0] != name:
                return None  # the same input as the site's first layer: already counted
            magnitude = rows.abs().float()
            large = magnitude >= self.threshold
            site.max_abs = torch.maximum(site.max_abs, magnitude.amax(dim=0))
            site.count_large += large.sum(dim=0)
            site.n_positions += rows.shape[0]
            current = self._current.get(width)
            self._current[width] = large if current is None else current | large
            return None

        return hook

    def _fold(self) -> None:
        for width, large in self._current.items():
            count = large.sum(dim=0)
            self.union_count[width] = self.union_count.get(width, torch.zeros_like(count)) + count
            self.union_positions[width] += large.shape[0]
        self._current.clear()
        self._last = None

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

    def to_dict(self) -> dict:
        return {
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
    present = torch.stack([s.count_large > 0 for s in sites])  # [n_sites, width]
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
        magnitudes=torch.stack([s.max_abs for s in sites]),
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
