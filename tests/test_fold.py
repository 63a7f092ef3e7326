"""Folded eval-mode encoders equal the modules they stand in for (:mod:`tracin_index.fold`)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn

from tracin_index import backend
from tracin_index.fold import fold


@pytest.fixture(autouse=True, params=backend.MODES)
def backend_mode(request: pytest.FixtureRequest) -> Iterator[str]:
    """Every case with oneDNN's fused convolution + ReLU and with the plain ``F.conv2d`` (``TRACIN_INDEX_BACKEND=plain``)."""
    backend.use(request.param)
    yield request.param
    backend.use(None)


def _randomise(seq: nn.Sequential, gen: torch.Generator) -> None:
    """BatchNorm statistics and affine parameters far from the identity, so that a wrong fold shows."""
    for m in seq.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            assert m.running_mean is not None and m.running_var is not None
            m.running_mean.copy_(torch.randn(c, generator=gen))
            m.running_var.copy_(torch.rand(c, generator=gen) * 3 + 0.2)
            if m.weight is not None:
                m.weight.data.copy_(torch.randn(c, generator=gen))
                m.bias.data.copy_(torch.randn(c, generator=gen))


def _conve_encoder(padding: int = 0, affine: bool = True) -> nn.Sequential:
    return nn.Sequential(nn.BatchNorm2d(2, affine=affine), nn.Dropout(0.3), nn.Conv2d(2, 5, 3, padding=padding),
                         nn.BatchNorm2d(5), nn.ReLU(), nn.Dropout2d(0.2))


@pytest.mark.parametrize(("padding", "affine"), [(0, True), (0, False), (1, True)])
def test_folded_encoder_equals_the_module(padding: int, affine: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    seq = _conve_encoder(padding, affine)
    _randomise(seq, gen)
    seq.eval()
    folded = fold(seq)
    assert folded is not None
    kinds = [k for k, _ in folded.plan]
    # no padding: both BatchNorms go into the convolution; with padding the first one cannot (padded zeros)
    assert kinds == (["conv", "relu"] if padding == 0 else ["call", "conv", "relu"])
    x = torch.randn(7, 2, 10, 8, generator=gen)
    before = x.clone()
    with torch.no_grad():
        ref = seq(x)
    got, perm = folded(x)
    assert perm is None
    assert torch.equal(x, before), "the module's own input is never overwritten"
    assert not got.requires_grad
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5)
    assert not torch.equal(got, torch.relu(seq[2](x))), "BatchNorms took part"


def test_folded_encoder_follows_a_new_state() -> None:
    """A loaded checkpoint changes the weights in place: the fold is made again."""
    gen = torch.Generator().manual_seed(1)
    seq = _conve_encoder()
    _randomise(seq, gen)
    seq.eval()
    folded = fold(seq)
    assert folded is not None
    x = torch.randn(4, 2, 6, 6, generator=gen)
    folded(x)
    other = _conve_encoder()
    _randomise(other, gen)
    seq.load_state_dict(other.state_dict())
    with torch.no_grad():
        assert torch.allclose(folded(x)[0], other.eval()(x), rtol=1e-5, atol=1e-5)


def test_nothing_to_fold() -> None:
    assert fold(nn.Sequential(nn.Linear(3, 3), nn.Tanh()).eval()) is None
    assert fold(_conve_encoder().train()) is None  # training mode: batch statistics, live dropout
    assert fold(nn.Linear(3, 3)) is None


@pytest.mark.parametrize(("cin", "cout", "kernel", "stride", "padding", "dilation"),
                         [(1, 32, 3, 1, 0, 1), (2, 5, 3, 1, 1, 1), (2, 6, (3, 2), 2, (1, 0), 2)])
def test_batch_last_convolution_equals_the_module(cin: int, cout: int, kernel: int | tuple[int, int], stride: int,
                                                  padding: int | tuple[int, int], dilation: int) -> None:
    """The batch-innermost GEMM form gives the module's values, with the batch as the fastest axis in memory,
    and a consumer's flatten is a view of it (no copy)."""
    gen = torch.Generator().manual_seed(2)
    seq = nn.Sequential(nn.BatchNorm2d(cin), nn.Dropout(0.2),
                        nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, dilation=dilation),
                        nn.BatchNorm2d(cout), nn.ReLU())
    _randomise(seq, gen)
    seq.eval()
    folded = fold(seq)
    assert folded is not None
    x = torch.randn(7, cin, 10, 9, generator=gen)
    before = x.clone()
    with torch.no_grad():
        ref = seq(x)
    got, perm = folded(x, "batch_last")
    assert perm is None
    assert torch.equal(x, before)
    n, _, h, w = got.shape
    assert got.shape == ref.shape and got.stride() == (1, h * w * n, w * n, n)
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5)
    flat = got.view(n, -1)
    assert flat.data_ptr() == got.data_ptr() and flat.stride() == (1, n)
    assert torch.allclose(flat, ref.reshape(n, -1), rtol=1e-5, atol=1e-5)
    assert folded(x)[0].is_contiguous()


def test_batch_last_declines_a_wide_convolution() -> None:
    """More taps than PATCHES_PER_OUTPUT x output channels: the patches would outweigh the output, so the
    convolution runs as usual (contiguous output, same values)."""
    seq = nn.Sequential(nn.Conv2d(8, 2, 3), nn.BatchNorm2d(2), nn.ReLU()).eval()
    _randomise(seq, torch.Generator().manual_seed(3))
    folded = fold(seq)
    assert folded is not None
    x = torch.randn(5, 8, 6, 6)
    got, _ = folded(x, "batch_last")
    assert got.is_contiguous()
    with torch.no_grad():
        assert torch.allclose(got, seq(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("padding", [0, 1])
def test_any_layout_output_is_the_module_output_in_its_feature_order(padding: int, backend_mode: str) -> None:
    """Layout ``any``: row ``j`` of the flattened output holds canonical feature ``perm[j]`` (oneDNN's
    channels-last memory), or the canonical order itself (``perm`` None, as the plain backend gives)."""
    gen = torch.Generator().manual_seed(7)
    seq = _conve_encoder(padding)
    _randomise(seq, gen)
    seq.eval()
    folded = fold(seq)
    assert folded is not None
    x = torch.randn(6, 2, 10, 8, generator=gen)
    out, perm = folded(x, "any")
    flat = out.reshape(6, -1)
    with torch.no_grad():
        ref = seq(x).reshape(6, -1)
    if backend_mode == "plain":
        assert perm is None
    canonical = flat if perm is None else torch.empty_like(flat).index_copy_(1, perm, flat)
    assert torch.allclose(canonical, ref, rtol=1e-5, atol=1e-5)
