"""Error-compensating rounding of the int8 weight codes (GPTQ / OBQ at 8 bits), from calibration windows.

Round-to-nearest (RTN, what ``quantize_weight`` and bitsandbytes do) rounds every weight on its own:
``code = round(w * 127 / absmax_row)``. Each layer's output error on inputs x is then
``x @ (W - W^).T``, whose expected square over the calibration inputs is ``tr(dW H dW^T)`` with
``H = sum_t x_t x_t^T`` [K, K]. GPTQ (Frantar et al. 2022, after OBQ) rounds the columns of W one at
a time and moves each column's rounding error onto the columns not yet rounded, through ``H^-1``, so
that those absorb what the rounded ones lost on the calibration inputs:

    for k in order:  q_k = clamp(round(w_k / s), -127, 127);  e = (w_k - s q_k) / U_kk;
                     w_j -= e * U_kj  for the later columns j      (U: the upper Cholesky factor of H^-1)

The rows' scales stay the round-to-nearest ones (``SCB`` = each row's absmax of the float weight, so a
row's codes span [-127, 127] as before, clamped where an update pushes past); only which codes are
stored changes. The result is a plain int8 + ``SCB`` layer: the same kernels, speed and saved format,
and bitsandbytes' own ``Linear8bitLt`` runs it unchanged.

Details that follow the GPTQ reference: H gets ``damp`` x its mean diagonal added (the inverse must
exist and stay well conditioned with few tokens); columns are taken in order of decreasing H_kk
("act order": the columns carrying the most input energy are rounded first, when the most columns
are left to absorb their error); columns that never saw a nonzero input (H_kk = 0) are rounded to
nearest. Blocks of 128 columns apply the updates lazily (one GEMM per block).

Layers fed the same input (q/k/v, gate/up) share one H; H is accumulated in float32 over every
position of the calibration windows and solved in float64.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from .._ops import INT8_MAX
from ..convert import linear_weight
from ..reference import quantize_rows, row_absmax
from .hooks import LinearInputHooks, Site, linear_layers
from .perplexity import Progress, _identity

DAMP = 0.01  # share of the mean of diag(H) added to its diagonal
BLOCK = 128  # columns per lazy-update block
HESSIAN_BUDGET = 2 << 30  # bytes of float32 H held during one pass over the calibration windows


def rtn_codes(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest: (int8 codes [N, K], absmax float32 [N]), bit-identical to ``quantize_weight``."""
    w = weight.detach().float()
    absmax = row_absmax(w)
    return quantize_rows(w, absmax), absmax


def gptq_codes(
    weight: torch.Tensor, hessian: torch.Tensor, absmax: torch.Tensor | None = None, damp: float = DAMP,
    block: int = BLOCK, act_order: bool = True,
) -> torch.Tensor:
    """int8 codes [N, K] of ``weight`` [N, K] rounded against ``hessian`` [K, K] (sum of x x^T), row scales
    ``absmax / 127`` (default: each row's absmax, as round-to-nearest; kept, never changed here).

    With a diagonal ``hessian`` (uncorrelated inputs) there is nothing to compensate and the codes are
    exactly the round-to-nearest ones.
    """
    w_float = weight.detach().float()
    n, k = w_float.shape
    if hessian.shape != (k, k):
        raise ValueError(f"hessian must be [K, K] = [{k}, {k}] for a weight {tuple(weight.shape)}, got {tuple(hessian.shape)}")
    if absmax is None:
        absmax = row_absmax(w_float)
    inv_scale = torch.where(absmax > 0, INT8_MAX / absmax, torch.zeros_like(absmax)).float()  # as quantize_rows
    scale = torch.where(absmax > 0, absmax / INT8_MAX, torch.zeros_like(absmax)).float()
    h = hessian.float().clone()
    dead = torch.diagonal(h) <= 0
    h[dead, dead] = 1.0  # no input energy: its weight cannot be compensated, and moves nothing
    perm = torch.argsort(torch.diagonal(h), descending=True, stable=True) if act_order else torch.arange(k)
    h = h[perm][:, perm]
    h.diagonal().add_(damp * float(torch.diagonal(h).double().mean()))
    u = _inverse_upper_cholesky(h)
    del h
    w = w_float[:, perm].clone()
    codes = torch.empty((n, k), dtype=torch.float32)
    isc, sc = inv_scale.unsqueeze(1), scale.unsqueeze(1)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1, u1 = w[:, i1:i2], u[i1:i2, i1:i2]
        err1 = torch.empty((n, i2 - i1), dtype=torch.float32)
        for i in range(i2 - i1):
            col = w1[:, i : i + 1]
            q = (col * isc).round_().clamp_(-INT8_MAX, INT8_MAX)
            codes[:, i1 + i : i1 + i + 1] = q
            e = (col - q * sc) / u1[i, i]
            w1[:, i:].sub_(e * u1[i : i + 1, i:])
            err1[:, i : i + 1] = e
        if i2 < k:
            w[:, i2:].sub_(err1 @ u[i1:i2, i2:])
    out = torch.empty_like(codes)
    out[:, perm] = codes
    return out.to(torch.int8)


def _inverse_upper_cholesky(h: torch.Tensor) -> torch.Tensor:
    """Upper triangular U with H^-1 = U^T U, for symmetric positive definite H [K, K] (float32).

    H = V V^T with V upper triangular is the Cholesky factorization of H with rows and columns
    reversed (J H J = (J V J)(J V J)^T, J V J lower); then H^-1 = V^-T V^-1, so U = V^-1: one
    factorization and one triangular inverse, half the work of inverting H and factorizing again.
    """
    v = torch.linalg.cholesky(h.flip(0, 1)).flip(0, 1)
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    return torch.linalg.solve_triangular(v, eye, upper=True)


def output_error(weight: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor, hessian: torch.Tensor) -> float:
    """Relative output error on the calibration inputs: tr(dW H dW^T) / tr(W H W^T), dW = W - dequant(codes)."""
    w = weight.detach().double()
    dw = w - codes.double() * (absmax.double() / INT8_MAX).unsqueeze(1)
    h = hessian.double()
    signal = float(((w @ h) * w).sum())
    return float(((dw @ h) * dw).sum()) / signal if signal > 0 else 0.0


class HessianHooks(LinearInputHooks):
    """Accumulates H = sum_t x_t x_t^T (float32 [K, K]) for the sites whose first layer is in ``wanted``."""

    def __init__(self, model: nn.Module, wanted: set[str]):
        super().__init__(model)
        self.wanted = wanted
        self.n_positions: dict[int, int] = {}

    def site_input(self, site: Site, x: torch.Tensor) -> None:
        if site.names[0] not in self.wanted:
            return
        rows = x.reshape(-1, site.in_features).float()
        if "hessian" not in site.stats:
            site.stats["hessian"] = torch.zeros((site.in_features, site.in_features), dtype=torch.float32)
        site.stats["hessian"].addmm_(rows.T, rows)
        self.n_positions[id(site)] = self.n_positions.get(id(site), 0) + rows.shape[0]


@dataclass
class RoundingResult:
    """Per layer (qualified name): the GPTQ codes and the row absmax (unchanged from round-to-nearest),
    and the relative output error on the calibration inputs before (RTN) and after."""

    codes: dict[str, torch.Tensor] = field(repr=False)
    absmax: dict[str, torch.Tensor] = field(repr=False)
    error_rtn: dict[str, float]
    error_gptq: dict[str, float]
    n_positions: int
    seconds: float
    migration: object | None = None  # a smooth.Migration the codes were computed under (norms to migrate with them)
    threshold: float | None = None  # the alpha the codes were chosen for (None: any; the default 6)

    def to_dict(self) -> dict:
        return {
            "n_positions": self.n_positions, "seconds": self.seconds,
            "migration": None if self.migration is None else self.migration.to_dict(), "threshold": self.threshold,
            "layers": {name: {"rtn": self.error_rtn[name], "gptq": self.error_gptq[name]} for name in self.error_rtn},
        }


def _groups(layers: list[tuple[str, nn.Module, int]], budget: int) -> list[set[str]]:
    """Layer names in model order, cut into groups whose H (counted once per layer, K^2 float32) fit ``budget``."""
    groups, current, used = [], set(), 0
    for name, _module, width in layers:
        size = 4 * width * width
        if current and used + size > budget:
            groups.append(current)
            current, used = set(), 0
        current.add(name)
        used += size
    if current:
        groups.append(current)
    return groups


def _round_site(
    site: Site, hessian: torch.Tensor, modules: dict, damp: float, result: RoundingResult, scales: dict | None = None,
) -> None:
    """GPTQ codes and output errors of the layers fed one input (``site``), into ``result``. ``scales``: the
    migration's s per layer (:mod:`.smooth`): the weights are W s and their inputs x / s, so H becomes
    H / (s s^T)."""
    # GPTQ treats rows independently given H: the layers of one site (q/k/v, gate/up) are rounded as
    # one stacked weight, sharing H's factorization and the column loop.
    weights = [linear_weight(modules[name]).detach().float() for name in site.names]
    s = (scales or {}).get(site.names[0])
    if s is not None:
        if any((scales or {}).get(name) is not s for name in site.names):
            raise ValueError(f"the layers fed one input ({', '.join(site.names)}) must share one migration scale")
        weights = [w * s for w in weights]
        hessian = hessian / torch.outer(s, s)
    stacked = torch.cat(weights)
    rtn, absmax = rtn_codes(stacked)
    codes = gptq_codes(stacked, hessian, absmax, damp)
    row = 0
    for name, weight in zip(site.names, weights):
        rows = slice(row, row + weight.shape[0])
        row += weight.shape[0]
        result.codes[name], result.absmax[name] = codes[rows].clone(), absmax[rows].clone()
        result.error_rtn[name] = output_error(weight, rtn[rows], absmax[rows], hessian)
        result.error_gptq[name] = output_error(weight, codes[rows], absmax[rows], hessian)


class _Captured(Exception):
    """Raised by the hook that records the first block's inputs: the rest of the forward is not needed."""


def decoder_blocks(model: nn.Module, names: set[str]) -> list[tuple[str, nn.Module]] | None:
    """(name, block) of the model's blocks run one after another (the ``nn.ModuleList`` with the most
    children holding layers of ``names``: a transformer's decoder layers), if every one of ``names``
    lies in one of them; else None."""
    best = None
    for list_name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1:
            prefix = f"{list_name}." if list_name else ""
            blocks = [(f"{prefix}{i}", block) for i, block in enumerate(module)]
            inside = {n for n in names if any(n.startswith(f"{b}.") for b, _ in blocks)}
            if best is None or len(inside) > len(best[1]):
                best = (blocks, inside)
    if best is None or best[1] != names:
        return None
    return best[0]


def _block_inputs(model: nn.Module, first: nn.Module, windows, progress) -> list[tuple[tuple, dict]]:
    """(args, kwargs) of the first block's call for each window (the forward stops there)."""
    inputs = []

    def capture(_module, args, kwargs):
        inputs.append((args, kwargs))
        raise _Captured

    # transformers models would otherwise build a KV cache that the replayed block calls append to
    no_cache = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
    handle = first.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        for window in (progress or _identity)(list(windows)):
            try:
                model(input_ids=window.unsqueeze(0), **no_cache)
            except _Captured:
                pass
    finally:
        handle.remove()
    if len(inputs) != len(windows):
        raise RuntimeError("the first decoder block was not reached for every calibration window")
    return inputs


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


@torch.inference_mode()
def gptq_rounding(
    model: nn.Module, windows: torch.Tensor, damp: float = DAMP, budget: int = HESSIAN_BUDGET,
    progress: Progress | None = None, sequential: bool | None = None, migration=None,
) -> RoundingResult:
    """GPTQ codes for every linear layer ``quantize_`` converts in the float ``model``, from the calibration
    ``windows`` (int64 [n, seq_len]); the model is not changed.

    ``sequential`` (default: wherever the model's layers all lie in a list of decoder blocks,
    :func:`decoder_blocks`): the windows run once up to the first block, whose inputs are kept
    (n x seq_len x hidden floats); then each block in turn runs on them, its layers' H are accumulated
    and solved, and its float outputs become the next block's inputs. One pass over the windows and
    one block's H in memory. Otherwise H of at most ``budget`` bytes is held at a time and the whole
    model runs once per group of layers. Both see the same float inputs, so give the same codes.

    ``migration`` (a :class:`.smooth.Migration`): round W s against the inputs x / s of the migrated model
    (the float model itself is not changed; :func:`apply_rounding` migrates the norms with the codes)."""
    start = time.perf_counter()
    layers = linear_layers(model)
    if not layers:
        raise ValueError("the model has no linear layers to quantize")
    modules = {name: module for name, module, _ in layers}
    result = RoundingResult({}, {}, {}, {}, 0, 0.0, migration)
    scales = None if migration is None else migration.layer_scales()
    blocks = decoder_blocks(model, set(modules)) if sequential is not False else None
    if sequential and blocks is None:
        raise ValueError("sequential rounding needs every linear layer inside one list of decoder blocks")
    if blocks is not None:
        inputs = _block_inputs(model, blocks[0][1], windows, progress)
        for block_name, block in blocks:
            wanted = {name for name in modules if name.startswith(f"{block_name}.")}
            outputs = []
            with HessianHooks(model, wanted) as hooks:
                for args, kwargs in inputs:
                    out = block(*args, **kwargs)
                    outputs.append(_with_hidden(args, kwargs, out[0] if isinstance(out, tuple) else out))
            inputs = outputs
            _solve_sites(hooks, modules, damp, result, scales)
    else:
        for index, group in enumerate(_groups(layers, budget)):
            with HessianHooks(model, group) as hooks:
                for window in (progress or _identity)(list(windows)) if index == 0 else list(windows):
                    model(input_ids=window.unsqueeze(0))
            _solve_sites(hooks, modules, damp, result, scales)
    missing = [name for name in modules if name not in result.codes]
    if missing:
        raise RuntimeError(f"no calibration input reached {len(missing)} layers ({', '.join(missing[:3])}, ...)")
    result.seconds = time.perf_counter() - start
    return result


def _solve_sites(hooks: HessianHooks, modules: dict, damp: float, result: RoundingResult, scales=None) -> None:
    for site in hooks.sites:
        if "hessian" not in site.stats:
            continue
        hessian = site.stats.pop("hessian")
        result.n_positions = hooks.n_positions[id(site)]
        _round_site(site, hessian, modules, damp, result, scales)
        del hessian


def apply_rounding(model: nn.Module, rounding: RoundingResult) -> list[str]:
    """Write the GPTQ codes and their row absmax (``SCB``) into the model's ``Linear8bitLt`` layers of the
    same names, in place (the layers' bound kernels see the new tensors); every rounded layer must be
    found. Where the codes were computed under a migration (:mod:`.smooth`), the norms' weights are
    divided by its scales too. Returns the names written."""
    from ..nn import Linear8bitLt

    written = []
    for name, module in model.named_modules():
        if isinstance(module, Linear8bitLt) and name in rounding.codes:
            codes, absmax = rounding.codes[name], rounding.absmax[name]
            if codes.shape != module.weight.shape:
                raise ValueError(
                    f"{name}: the layer's weight is {tuple(module.weight.shape)}, the rounding's codes "
                    f"{tuple(codes.shape)}; quantize the model the rounding was computed on"
                )
            with torch.no_grad():
                module.weight.copy_(codes)
                module.SCB.copy_(absmax)
            written.append(name)
    missing = sorted(set(rounding.codes) - set(written))
    if missing:
        raise ValueError(f"{len(missing)} rounded layers are not int8 layers of this model ({', '.join(missing[:3])}, ...)")
    if rounding.migration is not None:
        from .smooth import migrate_norms

        migrate_norms(model, rounding.migration)
    return written
