"""Eval-mode ``nn.Sequential`` encoders upstream of every tracked layer, run as fewer steps.

In eval mode a BatchNorm is a fixed per-channel affine map, so it folds into a neighbouring
convolution: after it (``w * g``, ``(b - mean) * g + beta``, ``g = gamma / sqrt(var + eps)``) or, when
the convolution has no padding, before it (``w * a`` per input channel, ``b + sum(w * shift)``).
Dropout is the identity, and a ReLU can overwrite its input when that input is this encoder's own
intermediate. ConvE's ``hr2d`` (BatchNorm2d, Dropout, Conv2d, BatchNorm2d, ReLU, Dropout2d) becomes one
convolution and an in-place ReLU instead of three passes over its 10,368 floats per row, a large share of
the exact re-rank's model work.

Only modules that run before every tracked module use it (the probe of :mod:`tracin_index.plan`
finds them), so no gradient the tracer takes flows through them, and they run under ``no_grad``.
Folding changes float rounding only (checked against the unfolded module in ``tests/test_exact.py``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from . import backend

__all__ = ["FoldedSequential", "fold"]

PATCHES_PER_OUTPUT = 4  # relu_batch_last: at most (taps + 1) / output channels (ConvE: 10 / 32)
_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout, nn.Identity)


def _bn_affine(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a, c)`` with ``bn(x) = a * x + c`` per channel (eval mode, running statistics)."""
    assert bn.running_mean is not None and bn.running_var is not None
    a = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        a = a * bn.weight
    c = -bn.running_mean * a
    if bn.bias is not None:
        c = c + bn.bias
    return a.detach(), c.detach()


def _foldable_bn(m: nn.Module) -> bool:
    return isinstance(m, nn.BatchNorm2d) and not m.training and m.running_mean is not None


def _plain_conv(m: nn.Module) -> bool:
    """A convolution ``F.conv2d`` reproduces: one group, numeric padding, zeros padded (or none)."""
    return (isinstance(m, nn.Conv2d) and m.groups == 1 and isinstance(m.padding, tuple) and not m.training
            and (m.padding_mode == "zeros" or all(p == 0 for p in m.padding)))


class _Conv:
    """One convolution with the BatchNorms around it folded in (weights made once per module state)."""

    def __init__(self, mods: list[nn.Module]) -> None:
        conv = next(m for m in mods if isinstance(m, nn.Conv2d))
        at = mods.index(conv)
        w = conv.weight.detach()
        b = conv.bias.detach() if conv.bias is not None else torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
        for bn in mods[:at]:  # before the convolution (no padding): scale its input channels, shift its bias
            a, c = _bn_affine(bn)  # type: ignore[arg-type]
            b = b + (w * c[None, :, None, None]).sum((1, 2, 3))
            w = w * a[None, :, None, None]
        for bn in mods[at + 1 :]:  # after it: scale its output channels
            a, c = _bn_affine(bn)  # type: ignore[arg-type]
            w = w * a[:, None, None, None]
            b = b * a + c
        self.w, self.b = w.contiguous(), b.contiguous()
        self.stride = [int(x) for x in conv.stride]
        self.padding = [int(x) for x in conv.padding]  # type: ignore[union-attr]
        self.dilation = [int(x) for x in conv.dilation]
        self._packed: torch.Tensor | None = None
        self._index: dict[tuple[int, int, int], tuple[torch.Tensor, int, int]] = {}
        self._wb: torch.Tensor | None = None  # (C, taps + 1): the weights as a matrix, the bias as a last column

    def __call__(self, x: torch.Tensor, own: bool) -> torch.Tensor:
        return F.conv2d(x, self.w, self.b, self.stride, self.padding, self.dilation)

    def _patch_index(self, cin: int, h: int, w: int) -> tuple[torch.Tensor, int, int]:
        """Rows of the batch-last patch matrix as indices into the input's features: for each (input channel,
        kernel row, kernel column) tap and output position, ``c * h * w + i * w + j``, or ``cin * h * w`` (a
        row of zeros) where the tap falls in the padding; then one more tap, the bias's, reading
        ``cin * h * w + 1`` (a row of ones) at every position. Returns the index and the output size."""
        key = (cin, h, w)
        if key not in self._index:
            kh, kw = self.w.shape[2:]
            (sh, sw), (ph, pw), (dh, dw) = self.stride, self.padding, self.dilation
            ho, wo = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
            rows = (torch.arange(kh) * dh)[:, None, None, None] + (torch.arange(ho) * sh - ph)[None, None, :, None]
            cols = (torch.arange(kw) * dw)[None, :, None, None] + (torch.arange(wo) * sw - pw)[None, None, None, :]
            inside = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)  # (kh, kw, ho, wo)
            chans = torch.arange(cin)[:, None, None, None, None] * (h * w)
            taps = torch.where(inside[None], chans + (rows * w + cols)[None], cin * h * w)  # (cin, kh, kw, ho, wo)
            ones = torch.full((ho * wo,), cin * h * w + 1)
            self._index[key] = (torch.cat([taps.reshape(-1), ones]).to(self.w.device), ho, wo)
        return self._index[key]

    def relu_batch_last(self, x: torch.Tensor) -> torch.Tensor | None:
        """``relu(conv(x))`` written with the batch innermost: memory ``(C, H', W', N)``, returned as its
        ``(N, C, H', W')`` view (values and feature order as ``F.conv2d``'s, only the strides differ).

        One GEMM of the folded weights and bias ``(C, taps + 1)`` against the input's patches gathered
        batch-last ``(taps + 1, H' * W' * N)`` (the last row ones), then the ReLU in place. A consumer that
        flattens the features (``view(N, -1)``) gets rows with stride 1 between triples: a Linear reads
        them as a transposed operand at the same speed, and the CountSketch of its input becomes a sparse
        x dense product over contiguous rows. None off the CPU, or
        where the patches would take more than ``PATCHES_PER_OUTPUT`` times the output's memory.
        """
        if x.device.type != "cpu" or x.dim() != 4 or x.dtype != self.w.dtype:
            return None
        n, cin, h, w = x.shape
        cout, taps = int(self.w.shape[0]), int(self.w[0].numel())
        if taps + 1 > PATCHES_PER_OUTPUT * cout or n == 0:
            return None
        index, ho, wo = self._patch_index(cin, h, w)
        if self._wb is None:
            self._wb = torch.cat([self.w.reshape(cout, taps), self.b[:, None]], dim=1)
        feats = cin * h * w
        src = x.new_empty(feats + 2, n)
        src[:feats].copy_(x.reshape(n, feats).T)
        src[feats].zero_()
        src[feats + 1].fill_(1.0)
        patches = src.index_select(0, index)  # (taps + 1) * H' * W' rows of N
        out = torch.mm(self._wb, patches.view(taps + 1, ho * wo * n))
        out.relu_()
        return out.view(cout, ho, wo, n).permute(3, 0, 1, 2)

    def relu_any_layout(self, x: torch.Tensor) -> torch.Tensor | None:
        """``relu(conv(x))`` in one oneDNN call with the weight packed once, in whatever memory format oneDNN
        picks (channels-last here, which skips a reorder to NCHW); None where that kernel is not available
        (:func:`tracin_index.backend.conv_relu`): the caller then runs the convolution and the ReLU."""
        if x.device.type != "cpu":
            return None
        if self._packed is None:
            self._packed = backend.conv_relu_prepack(self.w, self.padding, self.stride, self.dilation, list(x.shape))
            if self._packed is None:
                return None
        return backend.conv_relu(x, self._packed, self.b, self.padding, self.stride, self.dilation)


def _call(mod: nn.Module) -> Callable[[torch.Tensor, bool], torch.Tensor]:
    def step(x: torch.Tensor, own: bool) -> torch.Tensor:
        out: torch.Tensor = mod(x)
        return out
    return step


class FoldedSequential:
    """The steps of one eval-mode ``nn.Sequential``: convolutions with their BatchNorms folded in, in-place
    ReLUs, everything else called as is. Weights are folded again whenever a parameter or buffer of the
    module changed (a checkpoint loaded), so the steps always match the module's state.

    ``layout`` (per call): ``"canonical"``, the module's own output; ``"any"``, the caller only takes inner
    products of the output rows with rows it permutes the same way (the exact re-rank, whose consumer
    layer is replaced by stored outputs), so a final convolution + ReLU runs as one oneDNN call and its
    channels-last memory comes back as is, viewed with the module's output shape, with the permutation
    (row ``j`` of the flattened output holds canonical feature ``perm[j]``); ``"batch_last"``, a final
    convolution + ReLU writes its output with the batch innermost (:meth:`_Conv.relu_batch_last`),
    canonical feature order, other strides, for a consumer that only views the output and feeds it to a
    Linear (ConvE's ``hr1d``).
    """

    LAYOUTS = ("canonical", "any", "batch_last")

    def __init__(self, module: nn.Sequential, plan: list[tuple[str, list[nn.Module]]]) -> None:
        self.module = module
        self.plan = plan
        self._key: tuple[tuple[int, int], ...] | None = None
        self._steps: list[Callable[[torch.Tensor, bool], torch.Tensor]] = []
        self._tail: _Conv | None = None  # a final convolution followed by a ReLU
        self._perms: dict[tuple[int, ...], torch.Tensor] = {}

    def _state_key(self) -> tuple[tuple[int, int], ...]:
        tensors = list(self.module.parameters()) + list(self.module.buffers())
        return tuple((id(t), t._version) for t in tensors)

    def _build(self) -> None:
        steps: list[Callable[[torch.Tensor, bool], torch.Tensor]] = []
        for kind, mods in self.plan:
            if kind == "conv":
                steps.append(_Conv(mods))
            elif kind == "relu":
                steps.append(lambda x, own: torch.relu_(x) if own else torch.relu(x))
            else:
                steps.append(_call(mods[0]))
        self._steps = steps
        kinds = [k for k, _ in self.plan]
        tail = steps[-2] if kinds[-2:] == ["conv", "relu"] else None
        self._tail = tail if isinstance(tail, _Conv) else None

    def _perm(self, c: int, h: int, w: int) -> torch.Tensor:
        """Canonical (C, H, W) feature index of each position of a channels-last (H, W, C) row."""
        if (c, h, w) not in self._perms:
            self._perms[(c, h, w)] = torch.arange(c * h * w).reshape(c, h, w).permute(1, 2, 0).reshape(-1)
        return self._perms[(c, h, w)]

    def _as_canonical_shape(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """oneDNN's output viewed with the module's output shape, and its permutation when it is channels-last."""
        if out.dim() != 4 or out.is_contiguous():
            return out, None
        if out.is_contiguous(memory_format=torch.channels_last):
            n, c, h, w = out.shape
            return out.permute(0, 2, 3, 1).reshape(n, c, h, w), self._perm(c, h, w)  # a view of the same memory
        return out.contiguous(), None

    def __call__(self, x: torch.Tensor, layout: str = "canonical") -> tuple[torch.Tensor, torch.Tensor | None]:
        """The module's output for ``x`` in ``layout``, and the feature permutation (None: canonical order)."""
        key = self._state_key()
        if key != self._key:
            self._build()
            self._key = key
        own = False
        steps = self._steps
        with torch.no_grad():
            tail = self._tail if layout != "canonical" else None
            if tail is not None:
                for step in steps[:-2]:
                    x = step(x, own)
                    own = True
                out = tail.relu_any_layout(x) if layout == "any" else tail.relu_batch_last(x)
                if out is not None:
                    return self._as_canonical_shape(out) if layout == "any" else (out, None)
                steps = steps[-2:]
            for step in steps:
                x = step(x, own)
                own = True  # from here on, x is this encoder's own intermediate
        return x, None


def fold(module: nn.Module) -> FoldedSequential | None:
    """The folded form of an eval-mode ``nn.Sequential``, or None when there is nothing to fold."""
    if not isinstance(module, nn.Sequential) or module.training:
        return None
    plan: list[tuple[str, list[nn.Module]]] = []
    pending_bn: list[nn.Module] = []  # BatchNorms waiting for the convolution they come before
    folded = False
    for child in module:
        if isinstance(child, _DROPOUT):
            continue
        if _foldable_bn(child) and plan and plan[-1][0] == "conv" and not pending_bn:
            plan[-1][1].append(child)  # convolution, then its BatchNorm
            folded = True
            continue
        if _foldable_bn(child):
            pending_bn.append(child)
            continue
        if pending_bn and not (_plain_conv(child) and all(p == 0 for p in child.padding)):  # type: ignore[union-attr]
            plan.extend(("call", [bn]) for bn in pending_bn)  # padded zeros would be shifted: not into this one
            pending_bn = []
        if _plain_conv(child):
            plan.append(("conv", [*pending_bn, child]))
            folded = folded or bool(pending_bn)
            pending_bn = []
            continue
        if isinstance(child, nn.ReLU):
            plan.append(("relu", [child]))
            folded = True
        else:
            plan.append(("call", [child]))
    plan.extend(("call", [bn]) for bn in pending_bn)
    return FoldedSequential(module, plan) if folded else None
