"""Small tensor kernels the gradient forms share: sampled dot products, per-row Gram matrices, joins."""

from __future__ import annotations

import warnings

import torch

__all__ = ["GRAM_CHUNK", "cat_parts", "peak", "row_dots", "row_grams", "sampled_dots", "shared_grams"]

GRAM_CHUNK = 256  # feature rows per step of row_grams in the batch-innermost layout (in cache)


def cat_parts(parts: list[torch.Tensor], dim: int = 0) -> torch.Tensor:
    """``torch.cat``, without its copy of a lone part (one call of a module, one batch, one checkpoint)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def peak(x: torch.Tensor) -> float:
    """The largest ``|value|`` of ``x`` (NaN when it holds one), from one pass over it."""
    if x.numel() == 0:
        return 0.0
    lo, hi = torch.aminmax(x)
    return max(-float(lo), float(hi))


def sampled_dots(x: torch.Tensor, y: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """``x[i] . y[j]`` for each of ``pairs``, sorted distinct keys ``i * len(y) + j`` (a CSR pattern over
    ``x``'s rows), by one ``torch.sparse.sampled_addmm``: a dot product per pair, so the same bytes for any
    thread count or set of pairs."""
    n_x, n_y = x.shape[0], y.shape[0]
    rows = torch.div(pairs, n_y, rounding_mode="floor")
    crow = torch.zeros(n_x + 1, dtype=torch.long, device=x.device)
    crow[1:] = torch.cumsum(torch.bincount(rows, minlength=n_x), 0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        pattern = torch.sparse_csr_tensor(crow, pairs - rows * n_y, x.new_zeros(pairs.shape[0]), (n_x, n_y),
                                          check_invariants=False)
        return torch.sparse.sampled_addmm(pattern, x, y.T, beta=0.0).values()


def row_dots(v: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(P,)``: ``v[a[p]] . v[b[p]]`` for rows ``v (U, f)``, each distinct pair computed once."""
    pairs, inverse = torch.unique(a * v.shape[0] + b, sorted=True, return_inverse=True)
    return sampled_dots(v, v, pairs)[inverse]


def row_grams(x: torch.Tensor) -> torch.Tensor:
    """``(B, R, R)``: ``x[r, b] . x[s, b]`` for ``x (R, B, f)``.

    Features contiguous: one batched GEMM. Batch innermost (where a batched GEMM would read with stride
    ``R * B``): products accumulated over blocks of ``GRAM_CHUNK`` feature rows in cache, each pair
    ``r <= s`` once.
    """
    r_, b_, f = x.shape
    if x.stride(-1) == 1 or b_ == 0 or f == 0:
        return torch.einsum("rbi,sbi->brs", x, x)
    xt = x.permute(2, 0, 1)  # (f, R, B)
    c = min(GRAM_CHUNK, f)
    pairs = [(r, s) for r in range(r_) for s in range(r, r_)]
    acc = x.new_zeros(len(pairs), c, b_)
    for i in range(0, f, c):
        blk = xt[i : i + c]
        for j, (r, s) in enumerate(pairs):
            acc[j, : len(blk)].addcmul_(blk[:, r], blk[:, s])
    sums = acc.sum(1)  # (pairs, B)
    out = x.new_empty(b_, r_, r_)
    for j, (r, s) in enumerate(pairs):
        out[:, r, s] = out[:, s, r] = sums[j]
    return out


def shared_grams(v: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``(B, R, R)``: ``v[index[r, b]] . v[index[s, b]]`` for distinct rows ``v (U, f)``, ``index (R, B)``.

    Squared norms once per distinct row; the cross terms are the entries of ``v v^T`` that some triple
    asks for, each distinct pair once, by one sampled product (:func:`sampled_dots`).
    """
    r_, b_ = index.shape
    v = v if v.stride(-1) == 1 else v.contiguous()
    sq = torch.linalg.vector_norm(v, dim=1).square()  # (U,)
    out = v.new_empty(b_, r_, r_)
    for r in range(r_):
        out[:, r, r] = sq[index[r]]
    for r in range(r_):
        for s in range(r + 1, r_):
            out[:, r, s] = out[:, s, r] = row_dots(v, index[r], index[s])
    return out
