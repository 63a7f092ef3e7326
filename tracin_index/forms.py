"""Gradient forms: how one tracked parameter's per-triple gradients are held for a batch of triples.

Each form is one class that implements everything the package asks of a block: inner products, pair
products, squared norms, the flat vectors, joins and selections, its byte size, and its sketch under
each projection. Adding a form means adding a class here; nothing outside this module asks a block
for its type.

- :class:`DenseGrad`: ``values (B, D)``, the flattened per-triple gradient (biases, BatchNorm, Conv, and
  any parameter computed by the per-triple fallback);
- :class:`RowsGrad`: the looked-up rows of an ``nn.Embedding`` table, ``index (B, R)``, ``values (B, R, d)``;
- :class:`OuterGrad`: an ``nn.Linear`` weight, ``g_b = sum_r u[r, b] v[r, b]^T``, never materialised;
- :class:`SharedOuterGrad`: the same with ``v`` held once per distinct input row (rows with the same
  encoder input share it);
- :class:`DenseOuterGrad`: a Linear weight's gradient held dense (a test gradient times a diagonal
  preconditioner), sketched as the outer-product forms are and multiplied with them as ``u^T X v``.

The outer-product forms live in :mod:`tracin_index.outer` and are re-exported here.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .projection import GaussianProjector, SketchProjector

__all__ = ["DenseGrad", "DenseOuterGrad", "GradBlock", "OuterGrad", "Pairs", "RowsGrad", "SharedOuterGrad", "TrackedParam",
           "concat", "densify", "inner", "inner_pairs", "select", "sq_norms"]


DENSE_PAIRS = 16  # pair products take the dense product when the pairs fill at least 1/16 of the Na x Nb matrix


@dataclass(frozen=True)
class TrackedParam:
    """A tracked parameter: its name, owning module, gradient form and shape."""

    name: str
    module: str
    kind: str  # "outer" | "rows" | "dense"
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


class GradBlock:
    """Per-triple gradients of one tracked parameter for a batch of ``B`` triples."""

    def tensors(self) -> list[torch.Tensor]:
        """The tensors that define the block's values (for comparisons)."""
        raise NotImplementedError

    @property
    def num_triples(self) -> int:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return self.tensors()[0].device

    @property
    def nbytes(self) -> int:
        return sum(int(t.nbytes) for t in vars(self).values() if isinstance(t, torch.Tensor))

    def batch_sum(self, shape: tuple[int, ...]) -> torch.Tensor:
        """The gradient of the batch's summed loss, shaped as the parameter."""
        raise NotImplementedError

    def densify(self) -> torch.Tensor:
        """Flat per-triple gradients ``(B, D) float32``."""
        raise NotImplementedError

    def sq_norms(self) -> torch.Tensor:
        """Exact squared norms ``(B,) float32``."""
        raise NotImplementedError

    def inner(self, other: GradBlock) -> torch.Tensor:
        """Exact inner products ``(Na, Nb) float32`` with the same parameter's block ``other``."""
        raise NotImplementedError

    def pair_products(self, other: GradBlock, pairs: Pairs) -> torch.Tensor:
        """Exact ``<self[sa[p]], other[sb[p]]>`` for ``pairs`` (CSR order): ``(P,) float32``."""
        raise NotImplementedError

    def select(self, index: torch.Tensor) -> GradBlock:
        """The block restricted to the triples at ``index``."""
        raise NotImplementedError

    @classmethod
    def concat(cls, parts: list[GradBlock]) -> GradBlock:
        """Blocks of consecutive batches joined along the triple axis."""
        raise NotImplementedError

    def reordered(self, perm: torch.Tensor) -> GradBlock:
        """The block with its input features in ``perm``'s order (only forms with an input side change)."""
        return self

    def scaled(self, factor: torch.Tensor) -> GradBlock:
        """Each triple's gradient multiplied elementwise by ``factor`` (shaped as the parameter): a diagonal
        preconditioner. A form that cannot hold the product in its own shape gives it dense."""
        return DenseGrad(self.densify() * factor.reshape(1, -1))

    def dense_pairs(self, x: torch.Tensor, pairs: Pairs) -> torch.Tensor:
        """Exact ``<x[sa[p]], self[sb[p]]>`` for flat gradients ``x (Na, D)`` of the same parameter (a dense
        block's pair products with this form): ``(P,) float32``. Forms override it to stay factored."""
        return DenseGrad(x).pair_products(DenseGrad(self.densify()), pairs)

    def dense_inner(self, x: torch.Tensor) -> torch.Tensor:
        """Exact ``<x[a], self[b]>`` ``(Na, B) float32`` for flat gradients ``x (Na, D)``: :meth:`dense_pairs`
        over every pair."""
        na, nb = int(x.shape[0]), self.num_triples
        ia = torch.arange(na, device=x.device).repeat_interleave(nb)
        ib = torch.arange(nb, device=x.device).repeat(na)
        pairs = Pairs(ia, ib, na, nb)
        out = torch.empty(na * nb, device=x.device)
        out[pairs.order] = self.dense_pairs(x, pairs)
        return out.reshape(na, nb)

    def countsketch(self, sk: SketchProjector, j: int) -> torch.Tensor:
        """The CountSketch ``(B, k)`` of each triple's gradient, as parameter ``j`` of ``sk``."""
        raise NotImplementedError

    def gaussian(self, gp: GaussianProjector, j: int) -> torch.Tensor:
        """The dense Gaussian projection ``(B, k)`` of each triple's gradient, as parameter ``j`` of ``gp``."""
        raise NotImplementedError


class Pairs:
    """Pairs ``(ia[p], ib[p])`` of rows of two blocks, sorted into CSR order (by ``a``'s row, then ``b``'s).

    ``dense``: the pairs fill at least ``1 / DENSE_PAIRS`` of the ``Na x Nb`` matrix, so the full product
    and a gather cost less than a sampled product.
    """

    def __init__(self, ia: torch.Tensor, ib: torch.Tensor, na: int, nb: int) -> None:
        self.order = torch.argsort(ia * nb + ib)
        self.sa, self.sb = ia[self.order], ib[self.order]
        self.na, self.nb, self.n = na, nb, int(ia.shape[0])
        self.crow = torch.zeros(na + 1, dtype=torch.long, device=ia.device)
        self.crow[1:] = torch.cumsum(torch.bincount(self.sa, minlength=na), 0)
        self.dense = na * nb <= DENSE_PAIRS * self.n

    def dots(self, x: torch.Tensor, y: torch.Tensor, per: int = 1) -> torch.Tensor:
        """Dots ``x[r, sa] . y[j * nb + sb]`` for ``x (R, Na, f)``, ``y (per * Nb, f)``: ``(R, P, per)``.

        The ``per`` rows of ``y`` that belong to one triple (its directions) share one pass over ``x``'s
        row. Dense pairs: one GEMM of all ``R * Na`` rows against ``y``, then the asked entries.
        """
        r_, na_, f = x.shape
        sa, sb, nb = self.sa, self.sb, self.nb
        if self.dense:
            full = (x.reshape(r_ * na_, f) @ y.T).reshape(r_, na_, per, nb)
            return full.permute(1, 3, 0, 2)[sa, sb].permute(1, 0, 2)
        cols = (sb[:, None] + nb * torch.arange(per, device=sb.device)[None, :]).reshape(-1)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            pattern = torch.sparse_csr_tensor(self.crow * per, cols, torch.zeros(self.n * per, dtype=x.dtype, device=x.device),
                                              (self.na, per * nb), check_invariants=False)
            return torch.stack([torch.sparse.sampled_addmm(pattern, x[r].contiguous(), y.T, beta=0.0).values()
                                .reshape(self.n, per) for r in range(r_)])


# ---------------------------------------------------------------------------------------------- dense


@dataclass
class DenseGrad(GradBlock):
    """``values (B, D) float32``: the flattened per-triple gradient."""

    values: torch.Tensor

    def tensors(self) -> list[torch.Tensor]:
        return [self.values]

    @property
    def num_triples(self) -> int:
        return int(self.values.shape[0])

    def batch_sum(self, shape: tuple[int, ...]) -> torch.Tensor:
        return self.values.sum(0).reshape(shape)

    def densify(self) -> torch.Tensor:
        return self.values

    def sq_norms(self) -> torch.Tensor:
        return (self.values * self.values).sum(1)

    def inner(self, other: GradBlock) -> torch.Tensor:
        if not isinstance(other, DenseGrad):  # a preconditioned test gradient against a factored form
            return other.dense_inner(self.values)
        return self.values @ other.values.T

    def pair_products(self, other: GradBlock, pairs: Pairs) -> torch.Tensor:
        if not isinstance(other, DenseGrad):
            return other.dense_pairs(self.values, pairs)
        x, y = self.values, other.values
        if pairs.dense:  # one small GEMM instead of gathering both sides per pair
            return (x @ y.T)[pairs.sa, pairs.sb]
        if x.shape[1] <= 1024:
            return (x[pairs.sa] * y[pairs.sb]).sum(1)
        return pairs.dots(x[None], y)[0, :, 0]

    def select(self, index: torch.Tensor) -> GradBlock:
        return DenseGrad(self.values[index])

    def scaled(self, factor: torch.Tensor) -> GradBlock:
        return replace(self, values=self.values * factor.reshape(1, -1))

    @classmethod
    def concat(cls, parts: list[GradBlock]) -> GradBlock:
        return DenseGrad(torch.cat([p.values for p in parts]))  # type: ignore[attr-defined]

    def countsketch(self, sk: SketchProjector, j: int) -> torch.Tensor:
        return sk.countsketch(self.values, j, 0)

    def gaussian(self, gp: GaussianProjector, j: int) -> torch.Tensor:
        rows, cols, n = gp.layout(j)
        out = sum(self.values[:, c * n * cols : (c + 1) * n * cols] @ gp.chunk(j, c).T for c in range((rows + n - 1) // n))
        assert isinstance(out, torch.Tensor)
        return out


# ---------------------------------------------------------------------------------------------- rows


@dataclass
class RowsGrad(GradBlock):
    """Per-triple sparse rows of an ``(E, d)`` table: ``index (B, R) int64``, ``values (B, R, d) float32``.

    Repeated indices add up.
    """

    index: torch.Tensor
    values: torch.Tensor
    num_rows: int

    def tensors(self) -> list[torch.Tensor]:
        return [self.index, self.values]

    @property
    def num_triples(self) -> int:
        return int(self.index.shape[0])

    def batch_sum(self, shape: tuple[int, ...]) -> torch.Tensor:
        out = torch.zeros(self.num_rows, self.values.shape[-1], device=self.values.device)
        out.index_add_(0, self.index.reshape(-1), self.values.reshape(-1, self.values.shape[-1]))
        return out.reshape(shape)

    def densify(self) -> torch.Tensor:
        b, r, d = self.values.shape
        out = torch.zeros(b, self.num_rows, d, device=self.values.device)
        out.scatter_add_(1, self.index.unsqueeze(-1).expand(b, r, d), self.values)
        return out.reshape(b, -1)

    def sq_norms(self) -> torch.Tensor:
        same = self.index[:, :, None] == self.index[:, None, :]
        return (torch.einsum("brd,bsd->brs", self.values, self.values) * same).sum((1, 2))

    def inner(self, other: GradBlock) -> torch.Tensor:
        assert isinstance(other, RowsGrad)
        same = self.index[:, :, None, None] == other.index[None, None, :, :]
        dots = torch.einsum("ard,bsd->arbs", self.values, other.values)
        return (dots * same).sum(dim=(1, 3))

    def pair_products(self, other: GradBlock, pairs: Pairs) -> torch.Tensor:
        assert isinstance(other, RowsGrad)
        sa, sb = pairs.sa, pairs.sb
        same = self.index[sa][:, :, None] == other.index[sb][:, None, :]
        return (torch.einsum("prd,psd->prs", self.values[sa], other.values[sb]) * same).sum((1, 2))

    def select(self, index: torch.Tensor) -> GradBlock:
        return RowsGrad(self.index[index], self.values[index], self.num_rows)

    def scaled(self, factor: torch.Tensor) -> GradBlock:
        """Only the looked-up rows change: a diagonal factor keeps the other rows' gradients zero."""
        return RowsGrad(self.index, self.values * factor.reshape(self.num_rows, -1)[self.index], self.num_rows)

    def dense_pairs(self, x: torch.Tensor, pairs: Pairs) -> torch.Tensor:
        """The dense rows at this block's looked-up rows only: ``sum_r <x[a, index[b, r]], values[b, r]>``."""
        mats = x.reshape(x.shape[0], self.num_rows, -1)
        sa, sb = pairs.sa, pairs.sb
        return (mats[sa[:, None], self.index[sb]] * self.values[sb]).sum((1, 2))

    @classmethod
    def concat(cls, parts: list[GradBlock]) -> GradBlock:
        first = parts[0]
        assert isinstance(first, RowsGrad)
        return RowsGrad(torch.cat([p.index for p in parts]), torch.cat([p.values for p in parts]),  # type: ignore[attr-defined]
                        first.num_rows)

    def countsketch(self, sk: SketchProjector, j: int) -> torch.Tensor:
        b, _, d = self.values.shape
        coords = self.index.unsqueeze(-1) * d + torch.arange(d, device=self.index.device)
        bucket, sign = sk.hashes(j, 0, coords)
        part = torch.zeros(b, sk.k, device=self.values.device)
        part.scatter_add_(1, bucket.reshape(b, -1), (self.values * sign).reshape(b, -1))
        return part

    def gaussian(self, gp: GaussianProjector, j: int) -> torch.Tensor:
        _, d, n = gp.layout(j)
        b, r, _ = self.values.shape
        out = torch.zeros(b, gp.k, device=self.values.device)
        which = self.index // n
        for c in torch.unique(which).tolist():
            pc = gp.chunk(j, int(c))
            rows_c = pc.shape[1] // d
            mask = which == c
            local = torch.zeros(b, rows_c, d, device=out.device)
            idx = torch.where(mask, self.index - c * n, 0)
            local.scatter_add_(1, idx.unsqueeze(-1).expand(b, r, d), self.values * mask.unsqueeze(-1))
            out += local.reshape(b, -1) @ pc.T
        return out


# ---------------------------------------------------------------------------------------------- over parameters


def _total(parts: list[torch.Tensor]) -> torch.Tensor:
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total


def inner(a: list[GradBlock], b: list[GradBlock]) -> torch.Tensor:
    """Exact inner products ``(Na, Nb) float32`` between two gradient sets over the same parameters."""
    return _total([x.inner(y) for x, y in zip(a, b, strict=True)])


def inner_pairs(a: list[GradBlock], b: list[GradBlock], ia: torch.Tensor, ib: torch.Tensor) -> torch.Tensor:
    """Exact ``<a[ia[p]], b[ib[p]]>`` for each pair ``p``: ``(P,) float32``, without the ``(Na, Nb)`` matrix.

    A re-rank needs a few hundred pairs per test out of ``Na x Nb``: each form computes only the asked
    products (:class:`Pairs`), or the dense product where the pairs fill much of the matrix.
    """
    dev = a[0].device
    ia, ib = ia.to(dev, torch.long), ib.to(dev, torch.long)
    if int(ia.shape[0]) == 0:
        return torch.zeros(0, device=dev)
    pairs = Pairs(ia, ib, a[0].num_triples, b[0].num_triples)
    total = torch.zeros(pairs.n, device=dev)
    for x, y in zip(a, b, strict=True):
        total += x.pair_products(y, pairs)
    out = torch.empty_like(total)
    out[pairs.order] = total
    return out


def sq_norms(blocks: list[GradBlock]) -> torch.Tensor:
    """Exact squared norms ``(B,) float32`` of each triple's gradient."""
    return _total([blk.sq_norms() for blk in blocks])


def densify(blocks: list[GradBlock]) -> torch.Tensor:
    """Flat per-triple gradients ``(B, D) float32`` (D = total tracked size), in tracked order."""
    return torch.cat([blk.densify() for blk in blocks], dim=1)


def concat(parts: list[list[GradBlock]]) -> list[GradBlock]:
    """Blocks of consecutive batches joined along the triple axis (same parameters, same R)."""
    if len(parts) == 1:
        return parts[0]
    return [type(group[0]).concat(list(group)) for group in zip(*parts, strict=True)]


def select(blocks: list[GradBlock], index: torch.Tensor) -> list[GradBlock]:
    """The same blocks restricted to the triples at ``index``."""
    return [blk.select(index) for blk in blocks]


from .outer import DenseOuterGrad, OuterGrad, SharedOuterGrad  # noqa: E402 - the outer forms build on the base class above
