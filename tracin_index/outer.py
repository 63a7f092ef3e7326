"""The outer-product gradient forms of :mod:`tracin_index.forms`: an ``nn.Linear`` weight's per-triple gradient
``sum_r u[r] v[r]^T``, with ``v`` held per internal row (:class:`OuterGrad`) or once per distinct input row
(:class:`SharedOuterGrad`), and the same weight's gradient held dense (:class:`DenseOuterGrad`), which a diagonal
preconditioner makes of a test gradient."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from . import forms
from .forms import DenseGrad, GradBlock, Pairs
from .linalg import row_grams, sampled_dots, shared_grams

if TYPE_CHECKING:
    from .projection import GaussianProjector, SketchProjector

__all__ = ["DenseOuterGrad", "OuterGrad", "SharedOuterGrad"]

# bytes of each complex intermediate (u's spectra, v's gathered spectra) per step of the CPU TensorSketch
SKETCH_BLOCK_BYTES = 1 << 21


@dataclass
class OuterGrad(GradBlock):
    """Per-triple ``sum_r u[r] v[r]^T`` of a Linear weight; ``u (R, B, out)``, ``v (R, B, in)`` float32.

    ``R`` (rows per triple: 2 with inverse triples) comes first, so the module's own input and output
    (internal rows ``r * B + b``) are views, never copies.
    """

    u: torch.Tensor
    v: torch.Tensor

    def tensors(self) -> list[torch.Tensor]:
        return [self.u, self.full_v()]

    @property
    def num_triples(self) -> int:
        return int(self.u.shape[1])

    def full_v(self) -> torch.Tensor:
        """``v`` as ``(R, B, in)``."""
        return self.v

    def flat_v(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rows (M, in), index (R, B))``: the rows ``v`` is made of and where each internal row's is."""
        r, b, f = self.v.shape
        return self.v.reshape(r * b, f), torch.arange(r * b, device=self.v.device).reshape(r, b)

    def _v_grams(self) -> torch.Tensor:
        return row_grams(self.v)

    def batch_sum(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.einsum("rbo,rbi->oi", self.u, self.full_v()).reshape(shape)

    def densify(self) -> torch.Tensor:
        return torch.einsum("rbo,rbi->boi", self.u, self.full_v()).reshape(self.u.shape[1], -1)

    def sq_norms(self) -> torch.Tensor:
        return (row_grams(self.u) * self._v_grams()).sum((1, 2))

    def inner(self, other: GradBlock) -> torch.Tensor:
        # <sum_r u_r v_r^T, sum_s u'_s v'_s^T> = sum_{r,s} (u_r . u'_s)(v_r . v'_s): 2 GEMMs per (r, s)
        assert isinstance(other, OuterGrad)
        x, y = self, other
        out = torch.zeros(x.u.shape[1], y.u.shape[1], device=x.u.device, dtype=x.u.dtype)
        if type(x) is OuterGrad and type(y) is OuterGrad:
            for r in range(x.u.shape[0]):
                for s in range(y.u.shape[0]):
                    out += (x.u[r] @ y.u[s].T) * (x.v[r] @ y.v[s].T)
            return out
        (xv, xi), (yv, yi) = x.flat_v(), y.flat_v()
        vv = xv @ yv.T  # shared rows: each distinct pair of inputs once
        for r in range(x.u.shape[0]):
            for s in range(y.u.shape[0]):
                out += (x.u[r] @ y.u[s].T) * vv[xi[r][:, None], yi[s][None, :]]
        return out

    def pair_products(self, other: GradBlock, pairs: Pairs) -> torch.Tensor:
        assert isinstance(other, OuterGrad)
        x, y = self, other
        sa, sb, na, nb = pairs.sa, pairs.sb, pairs.na, pairs.nb
        per = y.u.shape[0]
        if isinstance(y, SharedOuterGrad):
            vdots = _shared_dots(x.full_v(), y.v, sa, y.index[:, sb].T)
        else:  # (R, P, per); row s * nb + b of y: direction s of triple b
            vdots = pairs.dots(x.full_v(), y.v.reshape(per * nb, -1), per)
        if pairs.dense:  # all test x candidate products of the narrow side, then the asked ones
            full_u = (x.u.reshape(-1, x.u.shape[-1]) @ y.u.reshape(per * nb, -1).T).reshape(-1, na, per, nb)
            udots = full_u.permute(0, 1, 3, 2)[:, sa, sb]  # (R, P, per)
        else:
            udots = torch.einsum("rpf,spf->rps", x.u[:, sa], y.u[:, sb])
        return (udots * vdots).sum((0, 2))

    def select(self, index: torch.Tensor) -> GradBlock:
        return OuterGrad(self.u[:, index], self.v[:, index])

    @classmethod
    def concat(cls, parts: list[GradBlock]) -> GradBlock:
        outer = [p for p in parts if isinstance(p, OuterGrad)]
        assert len(outer) == len(parts)
        u = torch.cat([g.u for g in outer], 1)
        if all(type(g) is OuterGrad for g in outer):
            return OuterGrad(u, torch.cat([g.v for g in outer], 1))
        vs, idx, offset = [], [], 0
        for g in outer:
            v, i = g.flat_v()
            vs.append(v)
            idx.append(i + offset)
            offset += v.shape[0]
        return SharedOuterGrad(u, torch.cat(vs), torch.cat(idx, 1))

    def reordered(self, perm: torch.Tensor) -> GradBlock:
        return OuterGrad(self.u, self.v[..., perm.to(self.v.device)])

    def scaled(self, factor: torch.Tensor) -> GradBlock:
        """``factor * sum_r u_r v_r^T`` is no outer product: the weight's gradient, dense."""
        return DenseOuterGrad(self.densify() * factor.reshape(1, -1), int(self.u.shape[-1]))

    def dense_pairs(self, x: torch.Tensor, pairs: Pairs) -> torch.Tensor:
        """``<X_a, sum_r u[r, b] v[r, b]^T> = sum_r u[r, b] . (X_a v[r, b])`` for dense ``X_a = x[a]`` ``(out, in)``:
        each distinct (test, input row) product ``X_a v`` once, one GEMM per test."""
        rows, index = self.flat_v()  # (M, in), (R, Nb)
        r_, _, out = self.u.shape
        m = int(rows.shape[0])
        keys = pairs.sa[:, None] * m + index[:, pairs.sb].T  # (P, R)
        distinct, inverse = torch.unique(keys.reshape(-1), sorted=True, return_inverse=True)
        tests, counts = torch.unique_consecutive(distinct // m, return_counts=True)
        which = distinct % m
        mats = x.reshape(x.shape[0], out, -1)
        xv = x.new_empty(int(distinct.shape[0]), out)
        start = 0
        for a, n in zip(tests.tolist(), counts.tolist(), strict=True):
            xv[start : start + n] = rows[which[start : start + n]] @ mats[a].T
            start += n
        return (xv[inverse].reshape(-1, r_, out) * self.u[:, pairs.sb].transpose(0, 1)).sum((1, 2))

    def _v_spectra(self, sk: SketchProjector, j: int) -> torch.Tensor:
        return torch.fft.rfft(sk.countsketch(self.v, j, 1), n=sk.k)  # (R, B, bins)

    def _v_spectra_of(self, cv: torch.Tensor, s: int, e: int) -> torch.Tensor:
        return cv[:, s:e]

    def countsketch(self, sk: SketchProjector, j: int) -> torch.Tensor:
        """``(B, k)``: ``sum_r TensorSketch(u_r (x) v_r)`` = ``irfft(sum_r rfft(CS u_r) * rfft(CS v_r))``.

        ``v``'s spectra come for all triples at once (its CountSketch is a sparse product that wants every
        row). On the CPU the rest goes ``SKETCH_BLOCK_BYTES`` of spectra at a time, in cache: the per-row
        operations are the same, so are the bytes, for any block.
        """
        cv = self._v_spectra(sk, j)
        r_, b_ = self.u.shape[:2]
        # a multiple of 16 triples: the FFTs run rows in SIMD groups, and a block whose rows end inside a group
        # would round its last rows differently from one FFT over the whole batch
        step = b_ if self.u.device.type != "cpu" else max(16, SKETCH_BLOCK_BYTES // (8 * r_ * cv.shape[-1]) // 16 * 16)
        out = self.u.new_empty(b_, sk.k)
        for s in range(0, b_, step):
            e = min(b_, s + step)
            spectra = torch.fft.rfft(sk.countsketch(self.u[:, s:e], j, 0), n=sk.k)
            spectra.mul_(self._v_spectra_of(cv, s, e))
            out[s:e] = torch.fft.irfft(spectra.sum(0), n=sk.k)
        return out

    def _v_rows(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``v`` as rows ``(M, in)`` and, when shared, each internal row's distinct row ``(R * B,)``."""
        r, b, _ = self.u.shape
        return self.v.reshape(r * b, -1), None

    def gaussian(self, gp: GaussianProjector, j: int) -> torch.Tensor:
        rows, _, n = gp.layout(j)
        r, b, _ = self.u.shape
        u = self.u.reshape(r * b, -1)
        v, index = self._v_rows()
        out = torch.zeros(b * r, gp.k, device=u.device)
        for c in range((rows + n - 1) // n):
            pc = gp.chunk(j, c)
            rows_c = pc.shape[1] // v.shape[1]
            # (b*r, in) @ (in, k * rows_c) -> (b*r, k, rows_c), weighted by u's rows of this chunk
            t = (v @ pc.reshape(gp.k * rows_c, v.shape[1]).T).reshape(v.shape[0], gp.k, rows_c)
            if index is not None:  # once per distinct row of v
                t = t[index]
            out += (t * u[:, None, c * n : c * n + rows_c]).sum(-1)
        return out.reshape(r, b, gp.k).sum(0)


@dataclass
class SharedOuterGrad(OuterGrad):
    """An :class:`OuterGrad` whose ``v (U, in)`` holds distinct rows only: internal row ``r * B + b``'s input is
    ``v[index[r, b]]`` (``index (R, B) int64``). Rows with the same encoder input (ConvE: the same head and
    relation) share it."""

    index: torch.Tensor

    def full_v(self) -> torch.Tensor:
        return self.v[self.index]

    def flat_v(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.v, self.index

    def _v_grams(self) -> torch.Tensor:
        return shared_grams(self.v, self.index)

    def select(self, index: torch.Tensor) -> GradBlock:  # the distinct rows stay whole; only the index is selected
        return SharedOuterGrad(self.u[:, index], self.v, self.index[:, index])

    def reordered(self, perm: torch.Tensor) -> GradBlock:
        return SharedOuterGrad(self.u, self.v[..., perm.to(self.v.device)], self.index)

    def _v_spectra(self, sk: SketchProjector, j: int) -> torch.Tensor:
        return torch.fft.rfft(sk.countsketch(self.v, j, 1), n=sk.k)  # (U, bins): once per distinct row

    def _v_spectra_of(self, cv: torch.Tensor, s: int, e: int) -> torch.Tensor:
        return cv[self.index[:, s:e]]

    def _v_rows(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.v, self.index.reshape(-1)


@dataclass
class DenseOuterGrad(DenseGrad):
    """A Linear weight's per-triple gradient held dense, ``values (B, out * in)`` with ``rows = out``: what a
    diagonal preconditioner makes of an :class:`OuterGrad`. The weight's other blocks are outer products, so
    this one is sketched as they are (the TensorSketch's hashes, which its Gaussian projection and its flat
    values already share), its input side is permuted as theirs, and its products with them are ``u^T X v``
    (:meth:`OuterGrad.dense_pairs`)."""

    rows: int

    def select(self, index: torch.Tensor) -> GradBlock:
        return DenseOuterGrad(self.values[index], self.rows)

    @classmethod
    def concat(cls, parts: list[GradBlock]) -> GradBlock:
        return DenseOuterGrad(torch.cat([p.values for p in parts]), parts[0].rows)  # type: ignore[attr-defined]

    def reordered(self, perm: torch.Tensor) -> GradBlock:
        b = self.values.shape[0]
        mats = self.values.reshape(b, self.rows, -1)[..., perm.to(self.values.device)]
        return DenseOuterGrad(mats.reshape(b, -1), self.rows)

    def countsketch(self, sk: SketchProjector, j: int) -> torch.Tensor:
        """The TensorSketch of each triple's matrix ``X``: coordinate ``(o, i)`` goes to bucket
        ``h_u(o) + h_v(i) mod k`` with sign ``s_u(o) s_v(i)``, the hashes :meth:`OuterGrad.countsketch` convolves.
        Each row of ``X`` is sketched by ``v``'s hashes, then shifted by ``h_u(o)`` and signed by ``s_u(o)``."""
        b, k = self.values.shape[0], sk.k
        dev = self.values.device
        bucket, sign = sk.hashes(j, 0, torch.arange(self.rows, device=dev))
        shift = (torch.arange(k, device=dev)[None, :] - bucket[:, None]) % k  # (out, k): where row o's bucket m lands
        step = max(1, SKETCH_BLOCK_BYTES * 16 // (8 * self.rows * k))
        out = self.values.new_empty(b, k)
        for s in range(0, b, step):
            e = min(b, s + step)
            rows_sketched = sk.countsketch(self.values[s:e].reshape(e - s, self.rows, -1), j, 1)  # (b, out, k)
            out[s:e] = (rows_sketched.gather(2, shift.expand(e - s, -1, -1)) * sign[None, :, None]).sum(1)
        return out


def _shared_dots(x: torch.Tensor, y: torch.Tensor, sa: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Dots ``x[r, sa[p]] . y[cols[p, s]]`` for ``x (R, Na, f)`` and distinct rows ``y (U, f)``: ``(R, P, per)``.

    Candidates that share an input share its dot products: each distinct (test row, ``y`` row) pair is
    computed once, by one GEMM when those pairs fill at least ``1 / DENSE_PAIRS`` of the ``Na x U``
    matrix, else by a sampled product over them.
    """
    r_, na, f = x.shape
    u_ = y.shape[0]
    p_, per = cols.shape
    keys = (sa[:, None] * u_ + cols).reshape(-1)
    distinct, inverse = torch.unique(keys, sorted=True, return_inverse=True)  # CSR order: by x's row, then y's
    if na * u_ <= forms.DENSE_PAIRS * distinct.shape[0]:
        full = (x.reshape(r_ * na, f) @ y.T).reshape(r_, na * u_)
        return full[:, keys].reshape(r_, p_, per)
    vals = torch.stack([sampled_dots(x[r].contiguous(), y, distinct) for r in range(r_)])
    return vals[:, inverse].reshape(r_, p_, per)
