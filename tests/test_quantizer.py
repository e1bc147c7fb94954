"""LSQ fake quantizer: forward/backward against an independent float64 autograd reference."""

from __future__ import annotations

import math

import pytest
import torch

from oscqat.quantizer import LSQQuantizer, grid_bounds, lsq_fake_quant


def reference_lsq(x: torch.Tensor, s: torch.Tensor, n: int, p: int, g: float = 1.0):
    """LSQ written with plain autograd ops in float64 (Esser et al. 2020).

    Round with a straight-through estimator; the pass-through decision is made on x/s; the
    scale's gradient is scaled by ``g`` with the usual ``s*g + (s - s*g).detach()`` trick.
    Returns ``(x_hat, x, s)`` with ``x`` and ``s`` the float64 leaves to read gradients from.
    """
    x = x.detach().double().requires_grad_(True)
    s = s.detach().double().requires_grad_(True)
    s_g = s * g + (s - s * g).detach()
    v = x / s_g
    vd = v.detach()
    inside = (vd >= n) & (vd <= p)
    v_round = v + (torch.round(v) - v).detach()  # round, gradient 1
    clipped = torch.where(vd < n, torch.full_like(vd, n), torch.full_like(vd, p))
    v_q = torch.where(inside, v_round, clipped)  # clipped: constant integer, x gets no gradient
    return v_q * s_g, x, s


@pytest.mark.parametrize("bits", range(2, 9))
def test_grid_bounds_signed_and_unsigned(bits):
    assert grid_bounds(bits, True) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    assert grid_bounds(bits, False) == (0, 2**bits - 1)
    q = LSQQuantizer(bits, signed=False)
    assert q.bounds == (0, 2**bits - 1)
    assert LSQQuantizer(bits, signed=True).bounds == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)


@pytest.mark.parametrize("bits", [0, 1, 9, 16])
def test_grid_bounds_reject_unsupported_bits(bits):
    with pytest.raises(ValueError):
        grid_bounds(bits, True)
    with pytest.raises(ValueError):
        LSQQuantizer(bits)


def _edge_values(s: float, n: int, p: int) -> torch.Tensor:
    """Values exactly on the grid edges, just inside/outside them, far outside, and random ones."""
    eps = 1e-3 * s
    far = (p - n + 1) * s
    edges = [p * s, n * s, p * s - eps, n * s + eps, p * s + eps, n * s - eps, p * s + far, n * s - far, 0.0]
    rand = torch.linspace(n * s * 1.3, p * s * 1.3, 41) + 0.013 * s  # avoids exact .5 ties
    return torch.cat([torch.tensor(edges, dtype=torch.float64), rand.double()])


@pytest.mark.parametrize("bits,signed", [(2, True), (3, True), (4, False), (8, True)])
def test_forward_backward_match_reference_float64(bits, signed):
    n, p = grid_bounds(bits, signed)
    s = 0.25  # a power of two: the edge values divide exactly
    x = _edge_values(s, n, p)
    upstream = torch.linspace(0.5, 1.5, len(x), dtype=torch.float64)

    xl = x.clone().requires_grad_(True)
    sl = torch.tensor(s, dtype=torch.float64, requires_grad=True)
    x_hat, x_int = lsq_fake_quant(xl, sl, n, p, 1.0)
    (x_hat * upstream).sum().backward()

    ref_hat, xr, sr = reference_lsq(x, torch.tensor(s), n, p, 1.0)
    (ref_hat * upstream).sum().backward()

    torch.testing.assert_close(x_hat, ref_hat, rtol=0, atol=1e-12)
    torch.testing.assert_close(xl.grad, xr.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(sl.grad, sr.grad, rtol=1e-12, atol=1e-12)
    # integers: exact, within bounds
    assert torch.equal(x_int, torch.clamp(torch.round(x / s), n, p))
    assert not x_int.requires_grad

    # the grid edges themselves keep the straight-through gradient (a clamp-after-round bug kills it)
    assert xl.grad[0] == upstream[0]  # x/s == p
    assert xl.grad[1] == upstream[1]  # x/s == n
    assert xl.grad[2] == upstream[2] and xl.grad[3] == upstream[3]  # just inside
    assert xl.grad[4] == 0 and xl.grad[5] == 0  # just outside
    assert xl.grad[6] == 0 and xl.grad[7] == 0  # far outside


def test_scale_gradient_terms_by_hand():
    """d x_hat / d s: round(v) - v inside, n or p when clipped (3-bit signed: n=-4, p=3)."""
    s = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    x = torch.tensor([0.7, -0.3, 1.5, 5.0, -9.0, -2.0], dtype=torch.float64)
    x_hat, x_int = lsq_fake_quant(x, s, -4, 3, 1.0)
    assert x_int.tolist() == [1.0, -1.0, 3.0, 3.0, -4.0, -4.0]
    v = (x / 0.5).tolist()
    expected_terms = [round(v[0]) - v[0], round(v[1]) - v[1], 0.0, 3.0, -4.0, 0.0]
    for i, term in enumerate(expected_terms):
        s.grad = None
        x_hat, _ = lsq_fake_quant(x, s, -4, 3, 1.0)
        x_hat[i].backward()
        assert s.grad.item() == pytest.approx(term, abs=1e-12), i


def test_module_grad_scale_is_one_over_sqrt_n_p():
    torch.manual_seed(1)
    bits = 4
    q = LSQQuantizer(bits, signed=True, init="minmax")
    x = torch.randn(6, 7) * 0.4
    q.calibrate(x)
    q.scale.data.fill_(0.07)  # make some values clip
    xl = x.clone().requires_grad_(True)
    out = q(xl)
    upstream = torch.randn_like(x)
    (out * upstream).sum().backward()

    n, p = q.bounds
    g = 1.0 / math.sqrt(x.numel() * p)
    ref, xr, sr = reference_lsq(x, torch.tensor(0.07), n, p, g)
    (ref * upstream.double()).sum().backward()
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(xl.grad.double(), xr.grad, rtol=0, atol=0)
    torch.testing.assert_close(q.scale.grad.double(), sr.grad, rtol=1e-5, atol=1e-7)
    assert (xl.grad == 0).any() and (xl.grad != 0).any()  # both clipped and passed-through values

    # without grad scaling the scale gradient is 1/g times larger
    q2 = LSQQuantizer(bits, signed=True, init="minmax", grad_scale=False)
    q2.calibrate(x)
    q2.scale.data.fill_(0.07)
    (q2(x) * upstream).sum().backward()
    torch.testing.assert_close(q2.scale.grad * g, q.scale.grad, rtol=1e-5, atol=1e-8)


def test_per_channel_scales_shape_and_gradient():
    torch.manual_seed(2)
    w = torch.randn(5, 3, 3, 3) * torch.tensor([0.1, 0.5, 1.0, 2.0, 4.0]).view(5, 1, 1, 1)
    q = LSQQuantizer(3, signed=True, per_channel=True, num_channels=5, init="minmax")
    q.calibrate(w)
    assert q.scale.shape == (5,)
    absmax = w.abs().amax(dim=(1, 2, 3))
    torch.testing.assert_close(q.scale.detach(), absmax / 3)  # p = 3 at 3 bits
    q.scale.data.mul_(0.8)  # force clipping in every channel

    wl = w.clone().requires_grad_(True)
    w_hat, w_int = q.quantize(wl)
    upstream = torch.randn_like(w)
    (w_hat * upstream).sum().backward()

    n, p = q.bounds
    g = 1.0 / math.sqrt(w[0].numel() * p)  # N = elements per scale
    ref, wr, sr = reference_lsq(w, q.scale.detach().view(5, 1, 1, 1), n, p, g)
    (ref * upstream.double()).sum().backward()
    torch.testing.assert_close(w_hat.double(), ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(wl.grad.double(), wr.grad)
    assert q.scale.grad.shape == (5,)
    torch.testing.assert_close(q.scale.grad.double(), sr.grad.view(5), rtol=1e-5, atol=1e-7)
    # each channel has its own integer range use: max |int| hits the grid edge per channel
    assert torch.all(w_int.amax(dim=(1, 2, 3)) == p)


def test_per_channel_gradient_isolated_per_channel():
    """Upstream gradient in one channel only changes that channel's scale gradient."""
    w = torch.randn(4, 8)
    q = LSQQuantizer(4, per_channel=True, num_channels=4, init="minmax")
    q.calibrate(w)
    upstream = torch.zeros_like(w)
    upstream[2] = 1.0
    w_hat, _ = q.quantize(w)
    (w_hat * upstream).sum().backward()
    grad = q.scale.grad
    assert grad[2] != 0
    assert torch.all(grad[[0, 1, 3]] == 0)


def test_per_channel_activation_axis():
    x = torch.randn(2, 3, 4, 4)
    q = LSQQuantizer(4, per_channel=True, num_channels=3, channel_axis=1, init="minmax")
    q.calibrate(x)
    absmax = x.abs().amax(dim=(0, 2, 3))
    torch.testing.assert_close(q.scale.detach(), absmax / 7)
    assert q(x).shape == x.shape


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_minmax_and_mse_init(bits):
    torch.manual_seed(3)
    x = torch.randn(4096)
    mm = LSQQuantizer(bits, signed=True, init="minmax")
    mm.calibrate(x)
    n, p = mm.bounds
    assert mm.scale.item() == pytest.approx(x.abs().max().item() / p, rel=1e-6)
    assert bool(mm.initialized)

    mse = LSQQuantizer(bits, signed=True, init="mse")
    mse.calibrate(x)

    def err(scale):
        return (torch.clamp(torch.round(x / scale), n, p) * scale - x).pow(2).mean().item()

    assert err(mse.scale.detach()) <= err(mm.scale.detach()) + 1e-12
    if bits <= 4:  # Gaussian data at low bits: clipping the tails clearly helps
        assert err(mse.scale.detach()) < 0.8 * err(mm.scale.detach())
        assert mse.scale.item() < mm.scale.item()


def test_first_call_calibrates_once():
    q = LSQQuantizer(4, init="minmax")
    assert not bool(q.initialized)
    x = torch.randn(100)
    q(x)
    s0 = q.scale.item()
    assert bool(q.initialized)
    assert s0 == pytest.approx(x.abs().max().item() / 7, rel=1e-6)
    q(x * 10)  # a later, larger batch does not re-calibrate
    assert q.scale.item() == s0


def test_signed_none_auto_detects():
    relu_out = torch.rand(64) * 3.0  # non-negative, like after ReLU
    q = LSQQuantizer(4, signed=None, init="minmax")
    assert int(q.signed_flag) == -1
    q.calibrate(relu_out)
    assert not q.signed
    assert q.bounds == (0, 15)
    assert q.scale.item() == pytest.approx(relu_out.max().item() / 15, rel=1e-6)
    _, x_int = q.quantize(relu_out)
    assert x_int.min() >= 0 and x_int.max() == 15

    q2 = LSQQuantizer(4, signed=None, init="minmax")
    q2.calibrate(torch.randn(64))
    assert q2.signed and q2.bounds == (-8, 7)


def test_state_dict_round_trip_keeps_sign_and_scale():
    q = LSQQuantizer(3, signed=None, init="mse")
    q(torch.rand(50))
    q2 = LSQQuantizer(3, signed=None, init="mse")
    q2.load_state_dict(q.state_dict())
    assert q2.bounds == (0, 7)
    x = torch.rand(50) * 2
    assert torch.equal(q(x), q2(x))
    assert q2.scale.item() == q.scale.item()  # no re-calibration after loading


def test_invalid_init_rejected():
    with pytest.raises(ValueError):
        LSQQuantizer(4, init="percentile")


# ------------------------------------------------------------------------------ positive scales
@pytest.mark.parametrize("signed", [True, False])
def test_forward_never_divides_by_a_scale_below_eps(signed):
    """A scale pushed to or below 0 (as a too-large Adam step does) is clamped at SCALE_EPS in
    forward; the LSQ gradient still reaches the raw scale (the clamp is straight-through)."""
    from oscqat.quantizer import SCALE_EPS

    q = LSQQuantizer(4, signed=signed)
    q.set_scale(0.1)
    x = torch.randn(1000) * 0.3
    for bad in (0.0, -0.05):
        with torch.no_grad():
            q.scale.fill_(bad)
        q.scale.grad = None
        out = q(x)
        n, p = q.bounds
        assert torch.isfinite(out).all()
        # with s = eps everything clips to the grid edge: |x_hat| <= max(|n|, p) * eps
        assert float(out.abs().max()) <= max(abs(n), p) * SCALE_EPS * (1 + 1e-6)
        out.sum().backward()
        assert q.scale.grad is not None and float(q.scale.grad.abs()) > 0


def test_collapsed_scales_names_the_quantizers_at_the_floor():
    from oscqat.quantizer import collapsed_scales

    good, low, nan = LSQQuantizer(4), LSQQuantizer(8, per_channel=True, num_channels=3), LSQQuantizer(4)
    good.set_scale(0.1)
    low.set_scale(torch.tensor([0.1, 0.2, 0.3]))
    nan.set_scale(0.1)
    named = [("a", good), ("b", low), ("c", nan)]
    assert collapsed_scales(named) == []
    with torch.no_grad():
        low.scale[1] = -1e-3
        nan.scale.fill_(float("nan"))
    bad = collapsed_scales(named)
    assert [name for name, _ in bad] == ["b"]  # NaN is divergence (NonFiniteLossError), not collapse
    assert bad[0][1] == pytest.approx(-1e-3)


# ------------------------------------------------------------------------------ set_scale
def test_set_scale_survives_the_first_forward_while_a_plain_assignment_does_not():
    x = torch.randn(4000)
    plain = LSQQuantizer(4)
    with torch.no_grad():
        plain.scale.fill_(0.123)
    plain(x)
    assert float(plain.scale) != pytest.approx(0.123)  # calibration overwrote it: why set_scale exists
    q = LSQQuantizer(4)
    q.set_scale(0.123)
    assert bool(q.initialized)
    out = q(x)
    assert float(q.scale) == pytest.approx(0.123)
    torch.testing.assert_close(out, (x / 0.123).round().clamp(-8, 7) * 0.123)
    # per channel: a tensor of the scale's shape, or one number for all channels
    pc = LSQQuantizer(4, per_channel=True, num_channels=3)
    pc.set_scale([0.1, 0.2, 0.3])
    torch.testing.assert_close(pc.scale.detach(), torch.tensor([0.1, 0.2, 0.3]))
    pc.set_scale(0.5)
    torch.testing.assert_close(pc.scale.detach(), torch.full((3,), 0.5))


def test_set_scale_rejects_bad_values_and_an_undecided_sign():
    q = LSQQuantizer(4)
    for bad in (0.0, -0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="scale"):
            q.set_scale(bad)
    with pytest.raises(ValueError, match="shape"):
        LSQQuantizer(4, per_channel=True, num_channels=3).set_scale([0.1, 0.2])
    auto = LSQQuantizer(4, signed=None)
    with pytest.raises(ValueError, match="signed"):
        auto.set_scale(0.1)
    auto.set_scale(0.1, signed=False)
    assert auto.bounds == (0, 15) and bool(auto.initialized) is not False
    assert float(auto(torch.tensor([-1.0, 0.26]))[1]) == pytest.approx(0.3)
