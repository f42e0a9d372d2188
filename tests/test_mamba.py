"""The Mamba mixer: which way information flows, agreement with Vim's flip recipe, init, grads."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ssamba.models.fused import causal_conv1d_silu
from ssamba.models.mamba import MambaMixer
from ssamba.models.scan import selective_scan_ref

D_MODEL, LENGTH = 16, 24


def make_mixer(bimamba: str, **kwargs) -> MambaMixer:
    torch.manual_seed(0)
    return MambaMixer(D_MODEL, bimamba=bimamba, **kwargs).eval()


def output_change(mixer: MambaMixer, frame: int) -> torch.Tensor:
    """|mixer(x') - mixer(x)| per position, x' = x with one frame changed: (length,)."""
    x = torch.randn(2, LENGTH, D_MODEL, generator=torch.Generator().manual_seed(1))
    changed = x.clone()
    changed[:, frame] += 3.0
    with torch.no_grad():
        return (mixer(changed) - mixer(x)).abs().amax(dim=(0, 2))


@pytest.mark.parametrize("bimamba", ["v1", "v2"])
def test_bidirectional_mixer_sees_the_future_and_the_past(bimamba):
    mixer = make_mixer(bimamba)
    late_change = output_change(mixer, frame=20)
    early_change = output_change(mixer, frame=3)
    assert late_change[:20].max() > 1e-5, "an earlier output must depend on a later frame"
    assert early_change[4:].max() > 1e-5, "a later output must depend on an earlier frame"


def test_unidirectional_mixer_is_causal():
    mixer = make_mixer("none")
    change = output_change(mixer, frame=20)
    assert change[:20].max() <= 1e-6, "outputs before the changed frame must not move"
    assert change[20:].max() > 1e-3


def vim_reference(mixer: MambaMixer, hidden: torch.Tensor) -> torch.Tensor:
    """Vim's v1/v2 recipe written out with explicit flips and the step-by-step scan:
    the backward direction is the forward recipe applied to time-flipped inputs."""
    k = mixer.d_conv

    def causal_conv(x, conv):
        return F.silu(
            F.conv1d(x, conv.weight, conv.bias, padding=k - 1, groups=x.shape[1])[
                ..., : x.shape[-1]
            ]
        )

    def ssm_inputs(u, x_proj, dt_proj):
        x_dbl = x_proj(u.transpose(1, 2))
        dt, B, C = x_dbl.split([mixer.dt_rank, mixer.d_state, mixer.d_state], dim=-1)
        return (dt @ dt_proj.weight.T).transpose(1, 2), B.transpose(1, 2), C.transpose(1, 2)

    def scan(u, delta, A_log, B, C, D, z, bias):
        A = -torch.exp(A_log)
        return selective_scan_ref(u, delta, A, B, C, D, z=z, delta_bias=bias, delta_softplus=True)

    x, z = mixer.in_proj(hidden).transpose(1, 2).chunk(2, dim=1)
    u = causal_conv(x, mixer.conv1d)
    delta, B, C = ssm_inputs(u, mixer.x_proj, mixer.dt_proj)
    y = scan(u, delta, mixer.A_log, B, C, mixer.D, z, mixer.dt_proj.bias)
    if mixer.bimamba == "v1":  # shared conv/projections, own A_b, no halving upstream
        flip = [t.flip(-1) for t in (u, delta, B, C, z)]
        y_b = scan(
            flip[0], flip[1], mixer.A_b_log, flip[2], flip[3], mixer.D, flip[4], mixer.dt_proj.bias
        )
        y = y + y_b.flip(-1)
    elif mixer.bimamba == "v2":
        xf, zf = x.flip(-1), z.flip(-1)
        u_b = causal_conv(xf, mixer.conv1d_b)
        delta_b, B_b, C_b = ssm_inputs(u_b, mixer.x_proj_b, mixer.dt_proj_b)
        y_b = scan(u_b, delta_b, mixer.A_b_log, B_b, C_b, mixer.D_b, zf, mixer.dt_proj_b.bias)
        y = (y + y_b.flip(-1)) / 2
    return mixer.out_proj(y.transpose(1, 2))


@pytest.mark.parametrize(("bimamba", "divide_out"), [("none", True), ("v1", False), ("v2", True)])
def test_reverse_scan_and_look_ahead_conv_equal_vims_flip_recipe(bimamba, divide_out):
    mixer = make_mixer(bimamba, divide_out=divide_out)
    with torch.no_grad():  # make every parameter matter: distinct, non-trivial values
        for p in mixer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    hidden = torch.randn(2, LENGTH, D_MODEL)
    with torch.no_grad():
        torch.testing.assert_close(
            mixer(hidden), vim_reference(mixer, hidden), atol=2e-5, rtol=1e-4
        )


def pytorch_conv(x, weight, bias, look_ahead):
    """Vim's conv: causal on the sequence, or on the flipped sequence for the backward direction."""
    k = weight.shape[-1]
    x = x.flip(-1) if look_ahead else x
    out = F.conv1d(x, weight, bias, padding=k - 1, groups=x.shape[1])[..., : x.shape[-1]]
    out = F.silu(out)
    return out.flip(-1) if look_ahead else out


@pytest.mark.parametrize("look_ahead", [False, True])
@pytest.mark.parametrize(
    ("batch", "dim", "length", "channels_last", "with_bias", "taps"),
    [
        (2, 5, 1, True, True, 4),
        (2, 19, 3, False, True, 4),
        (3, 37, 150, True, True, 4),
        (1, 16, 70, True, False, 4),
        (2, 48, 130, True, True, 3),
        (2, 21, 70, False, True, 2),
    ],
)
def test_cpu_conv_kernel_matches_pytorch_conv(
    look_ahead, batch, dim, length, channels_last, with_bias, taps
):
    """Values and gradients; 150 steps cross the kernel's 64-step work items. Channels-last
    tensors with 4 taps run the kernel's compiled fast path, the rest its general one."""
    g = torch.Generator().manual_seed(0)

    def activation(rows: int) -> torch.Tensor:
        if channels_last:  # the x half of in_proj's (batch, length, 2 * dim) output
            return torch.randn(batch, length, 2 * rows, generator=g)[..., :rows].transpose(1, 2)
        return torch.randn(batch, rows, length, generator=g)

    x = activation(dim)
    weight = torch.randn(dim, 1, taps, generator=g)
    bias = torch.randn(dim, generator=g) if with_bias else None
    params = [t.requires_grad_() for t in (x, weight, bias) if t is not None]
    grad_out = activation(dim)
    got = causal_conv1d_silu(x, weight, bias, look_ahead)
    want = pytorch_conv(x, weight, bias, look_ahead)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert got.transpose(1, 2).is_contiguous(), "output should be channels-last"
    got_grads = torch.autograd.grad(got, params, grad_out)
    want_grads = torch.autograd.grad(want, params, grad_out)
    for name, a, b in zip(("x", "weight", "bias"), got_grads, want_grads, strict=False):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.parametrize("look_ahead", [False, True])
def test_cpu_conv_kernel_passes_gradcheck_in_float64(look_ahead):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 70, generator=g, dtype=torch.float64).requires_grad_()
    weight = torch.randn(3, 1, 4, generator=g, dtype=torch.float64).requires_grad_()
    bias = torch.randn(3, generator=g, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda *a: causal_conv1d_silu(*a, look_ahead), (x, weight, bias), eps=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("bimamba", ["none", "v1", "v2"])
def test_cpu_kernels_and_pure_pytorch_give_the_same_mixer_and_gradients(bimamba, monkeypatch):
    """SSAMBA_SCAN=ref runs PyTorch's conv and the reference scan: the C++ path must agree
    (here the composed one; tests/test_fused_mixer.py checks the fused one)."""
    mixer = make_mixer(bimamba, use_fast_path=False).train()
    hidden = torch.randn(2, 70, D_MODEL, generator=torch.Generator().manual_seed(2))
    results = []
    for choice in ("cpp", "ref"):
        monkeypatch.setenv("SSAMBA_SCAN", choice)
        mixer.zero_grad()
        out = mixer(hidden)
        out.square().mean().backward()
        results.append((out.detach(), {k: p.grad.clone() for k, p in mixer.named_parameters()}))
    (cpp_out, cpp_grads), (ref_out, ref_grads) = results
    torch.testing.assert_close(cpp_out, ref_out, atol=1e-5, rtol=1e-4)
    for name in ref_grads:
        torch.testing.assert_close(cpp_grads[name], ref_grads[name], atol=1e-5, rtol=1e-3, msg=name)


@pytest.mark.parametrize("bimamba", ["v1", "v2"])
def test_every_parameter_of_both_directions_gets_a_gradient(bimamba):
    # Upstream's non-CUDA path ignores the *_b parameters; ours must train them.
    mixer = make_mixer(bimamba).train()
    mixer(torch.randn(2, LENGTH, D_MODEL)).square().mean().backward()
    for name, p in mixer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_parameter_names_and_shapes_match_vim():
    mixer = MambaMixer(192, bimamba="v2")
    shapes = {k: tuple(v.shape) for k, v in mixer.state_dict().items()}
    d_inner, rank = 384, 12
    expected = {
        "in_proj.weight": (2 * d_inner, 192),
        "x_proj.weight": (rank + 32, d_inner),
        "dt_proj.weight": (d_inner, rank),
        "dt_proj.bias": (d_inner,),
        "conv1d.weight": (d_inner, 1, 4),
        "conv1d.bias": (d_inner,),
        "A_log": (d_inner, 16),
        "D": (d_inner,),
        "out_proj.weight": (192, d_inner),
    }
    expected |= {
        k.replace("conv1d", "conv1d_b")
        .replace("x_proj", "x_proj_b")
        .replace("dt_proj", "dt_proj_b"): v
        for k, v in expected.items()
        if k.startswith(("conv1d", "x_proj", "dt_proj"))
    }
    expected |= {"A_b_log": (d_inner, 16), "D_b": (d_inner,)}
    assert shapes == expected
    assert set(MambaMixer(192, bimamba="v1").state_dict()) == {
        k for k in expected if not k.startswith(("conv1d_b", "x_proj_b", "dt_proj_b", "D_b"))
    }


def test_initialisation_follows_mamba_ssm():
    mixer = MambaMixer(64, bimamba="v2", dt_min=0.001, dt_max=0.1)
    for A_log in (mixer.A_log, mixer.A_b_log):
        torch.testing.assert_close(A_log.exp(), torch.arange(1.0, 17.0).expand(128, 16))
        assert A_log._no_weight_decay
    for D in (mixer.D, mixer.D_b):
        assert torch.all(D == 1) and D._no_weight_decay
    for dt_proj in (mixer.dt_proj, mixer.dt_proj_b):
        dt = F.softplus(dt_proj.bias)
        assert dt.min() >= 0.001 * 0.999 and dt.max() <= 0.1 * 1.001
        assert dt_proj.weight.abs().max() <= mixer.dt_rank**-0.5
    assert mixer.in_proj.bias is None and mixer.out_proj.bias is None
    assert mixer.dt_rank == math.ceil(64 / 16)


def test_unknown_bimamba_type_is_named():
    with pytest.raises(ValueError, match=r"bimamba.*'v3'"):
        MambaMixer(16, bimamba="v3")
