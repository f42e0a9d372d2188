"""The fused CPU mixer (`ssamba.models.fused`): same outputs and gradients as the composed
reference, a true gradient in float64, torch.compile/export, bf16 inputs, no flips."""

from __future__ import annotations

import pytest
import torch

from ssamba.models import fused
from ssamba.models.mamba import MambaBlock, MambaMixer

D_MODEL, LENGTH = 16, 150  # 150 steps cross the kernels' 64-step chunks


def make_mixer(bimamba: str, d_model: int = D_MODEL, **kwargs) -> MambaMixer:
    """A mixer whose parameters all differ from their symmetric initial values."""
    torch.manual_seed(0)
    mixer = MambaMixer(d_model, bimamba=bimamba, **kwargs).train()
    with torch.no_grad():
        for p in mixer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return mixer


def output_and_grads(mixer: MambaMixer, hidden: torch.Tensor, fast: bool, reverse=False):
    """Output, d/d hidden and every parameter's gradient of a loss that weights each output."""
    mixer.use_fast_path = fast
    mixer.zero_grad()
    hidden = hidden.detach().requires_grad_()
    out = mixer(hidden, reverse=reverse)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    (out * weights).sum().backward()
    # (a torch.compile'd module names its parameters "_orig_mod.<name>")
    grads = {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in mixer.named_parameters()}
    return out.detach(), hidden.grad, grads


def assert_close(name: str, got: torch.Tensor, want: torch.Tensor, tol: float = 1e-4) -> None:
    """Max abs error <= tol, relative to the magnitude once values exceed 1."""
    scale = max(1.0, want.abs().max().item())
    err = (got.double() - want.double()).abs().max().item()
    assert err <= tol * scale, f"{name}: max abs error {err:.3g} (scale {scale:.3g})"


@pytest.mark.parametrize(("bimamba", "divide_out"), [("v2", True), ("v1", False), ("none", True)])
@pytest.mark.parametrize("reference", ["cpp", "ref"])
def test_fused_output_and_every_gradient_equal_the_composed_reference(
    bimamba, divide_out, reference, monkeypatch
):
    """reference=ref: the composed path with PyTorch's conv and the step-by-step scan."""
    mixer = make_mixer(bimamba, divide_out=divide_out)
    hidden = torch.randn(2, LENGTH, D_MODEL, generator=torch.Generator().manual_seed(1))
    out, d_hidden, grads = output_and_grads(mixer, hidden, fast=True)
    monkeypatch.setenv("SSAMBA_SCAN", reference)
    want_out, want_hidden, want_grads = output_and_grads(mixer, hidden, fast=False)
    assert_close("out", out, want_out)
    assert_close("d hidden", d_hidden, want_hidden)
    assert grads.keys() == want_grads.keys()
    for name in grads:
        assert_close(f"d {name}", grads[name], want_grads[name])


def test_biases_other_state_sizes_and_ranks_match_the_reference(monkeypatch):
    """in_proj/out_proj biases, no conv bias, d_state 4 and dt_rank 5 (odd) are all
    handled by the op's layout and the kernels' run-time sizes."""
    mixer = make_mixer("v2", bias=True, conv_bias=False, d_state=4, dt_rank=5)
    hidden = torch.randn(2, LENGTH, D_MODEL, generator=torch.Generator().manual_seed(1))
    out, d_hidden, grads = output_and_grads(mixer, hidden, fast=True)
    monkeypatch.setenv("SSAMBA_SCAN", "ref")
    want_out, want_hidden, want_grads = output_and_grads(mixer, hidden, fast=False)
    assert_close("out", out, want_out)
    assert_close("d hidden", d_hidden, want_hidden)
    assert grads.keys() == want_grads.keys() and "in_proj.bias" in grads
    for name in grads:
        assert_close(f"d {name}", grads[name], want_grads[name])


@pytest.mark.parametrize("bimamba", ["v2", "v1", "none"])
def test_reverse_is_the_mixer_of_the_flipped_sequence_flipped_back(bimamba):
    """What the second layer of SSAMBA's pairs computes, here without flipping anything."""
    mixer = make_mixer(bimamba)
    hidden = torch.randn(2, LENGTH, D_MODEL, generator=torch.Generator().manual_seed(1))
    out, d_hidden, grads = output_and_grads(mixer, hidden, fast=True, reverse=True)
    mixer.use_fast_path = False
    mixer.zero_grad()
    flipped = hidden.flip(1).requires_grad_()
    want = mixer(flipped).flip(1)
    weights = torch.randn(want.shape, generator=torch.Generator().manual_seed(3))
    (want * weights).sum().backward()
    assert_close("out", out, want.detach())
    assert_close("d hidden", d_hidden, flipped.grad.flip(1))
    for name, p in mixer.named_parameters():
        assert_close(f"d {name}", grads[name], p.grad)


def test_reverse_block_equals_flipping_its_inputs_and_outputs():
    torch.manual_seed(0)
    block = MambaBlock(make_mixer("v2"), torch.nn.LayerNorm(D_MODEL)).eval()
    hidden, residual = torch.randn(2, 2, 40, D_MODEL).unbind(0)
    with torch.no_grad():
        got = block(hidden, residual, reverse=True)
        flipped = block(hidden.flip(1), residual.flip(1))
    for a, b in zip(got, flipped, strict=True):
        torch.testing.assert_close(a, b.flip(1), atol=1e-5, rtol=1e-5)


def op_inputs(bimamba: str, dtype=torch.float64, length: int = 70, d_model: int = 4):
    """A small mixer (d_inner 8, d_state 16) and an input for it, (2, length, d_model)."""
    mixer = make_mixer(bimamba, d_model, dt_rank=2).to(dtype)
    hidden = torch.randn(2, length, d_model, dtype=dtype, generator=torch.Generator())
    return mixer, hidden.requires_grad_()


@pytest.mark.parametrize(
    ("bimamba", "reverse"), [("v2", False), ("v2", True), ("v1", False), ("none", True)]
)
def test_fused_op_passes_gradcheck_in_float64(bimamba, reverse):
    """Every parameter and the input."""
    mixer, hidden = op_inputs(bimamba)
    names = [n for n, _ in mixer.named_parameters()]

    def run(hidden, *values):
        with torch.nn.utils.stateless._reparametrize_module(
            mixer, dict(zip(names, values, strict=True))
        ):
            return fused.mamba_inner(hidden, mixer, reverse)

    # fast_mode: one random projection of the Jacobian instead of all ~3,000 columns.
    assert torch.autograd.gradcheck(
        run, (hidden, *mixer.parameters()), eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True
    )


@pytest.mark.parametrize("bimamba", ["v2", "v1", "none"])
def test_registered_ops_pass_torch_library_opcheck(bimamba):
    """Schema, fake (meta) implementation and autograd registration agree with the kernels."""
    mixer, hidden = op_inputs(bimamba, dtype=torch.float32)
    for in_proj, save in ((1, True), (1, False), (0, True)):
        layout = fused._Layout(bimamba, True, False, in_proj)
        weights = [mixer.get_parameter(name) for name in layout.weight_names()]
        x = hidden if in_proj else mixer.in_proj(hidden).detach().requires_grad_()
        args = (x, weights, *layout, 0.5, True, save)
        torch.library.opcheck(torch.ops.ssamba.mamba_inner.default, args)
    x = torch.randn(2, 70, 2 * mixer.d_inner)[..., : mixer.d_inner].transpose(1, 2)
    conv_args = (x.requires_grad_(), mixer.conv1d.weight, mixer.conv1d.bias, True)
    torch.library.opcheck(torch.ops.ssamba.causal_conv1d_silu.default, conv_args)


@pytest.mark.parametrize("bimamba", ["v2", "v1"])
def test_fused_mixer_compiles_as_one_graph_with_the_same_outputs_and_gradients(bimamba):
    """aot_eager traces the forward and backward through the fake implementations."""
    mixer = make_mixer(bimamba)
    hidden = torch.randn(2, 40, D_MODEL, generator=torch.Generator().manual_seed(1))
    out, d_hidden, grads = output_and_grads(mixer, hidden, fast=True)
    torch._dynamo.reset()
    compiled = torch.compile(mixer, backend="aot_eager", fullgraph=True)
    got_out, got_hidden, got_grads = output_and_grads(compiled, hidden, fast=True)
    torch.testing.assert_close(got_out, out, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got_hidden, d_hidden, atol=1e-6, rtol=1e-6)
    for name in grads:
        torch.testing.assert_close(got_grads[name], grads[name], msg=name)


@pytest.mark.filterwarnings("ignore:dynamo_pgo force disabled")
def test_fused_mixer_under_inductor_matches_eager():
    mixer = make_mixer("v2")
    hidden = torch.randn(2, 40, D_MODEL, generator=torch.Generator().manual_seed(1))
    out, d_hidden, grads = output_and_grads(mixer, hidden, fast=True)
    torch._dynamo.reset()
    compiled = torch.compile(mixer, fullgraph=True)
    # Inductor's caches key on the graph, not on the custom ops' code: no stale artifacts.
    with torch._inductor.config.patch(fx_graph_cache=False, force_disable_caches=True):
        got_out, got_hidden, got_grads = output_and_grads(compiled, hidden, fast=True)
    torch.testing.assert_close(got_out, out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_hidden, d_hidden, atol=1e-5, rtol=1e-5)
    for name in grads:
        torch.testing.assert_close(got_grads[name], grads[name], msg=name)


def test_exported_mixer_calls_the_fused_op_and_gives_the_same_output():
    mixer = make_mixer("v2").eval()
    hidden = torch.randn(2, 40, D_MODEL, generator=torch.Generator().manual_seed(1))
    program = torch.export.export(mixer, (hidden,))
    assert "ssamba.mamba_inner" in str(program.graph)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(hidden), mixer(hidden))


@pytest.mark.parametrize("bimamba", ["v2", "v1"])
def test_bf16_autocast_runs_the_fused_path_close_to_float32(bimamba):
    mixer = make_mixer(bimamba, d_model=32)
    hidden = torch.randn(2, LENGTH, 32, generator=torch.Generator().manual_seed(1))
    out, d_hidden, grads = output_and_grads(mixer, hidden, fast=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        xz = mixer.in_proj(hidden)
        assert xz.dtype == torch.bfloat16
        got_out, got_hidden, got_grads = output_and_grads(mixer, hidden, fast=True)
    assert got_out.dtype == torch.bfloat16
    for name, got, want in [("out", got_out, out), ("d hidden", got_hidden, d_hidden)]:
        assert_close(name, got, want, tol=0.03 * want.abs().max().item())
    for name in grads:
        assert got_grads[name].dtype == torch.float32, name
        assert_close(f"d {name}", got_grads[name], grads[name], 0.05 * grads[name].abs().max())


def test_bf16_mixer_weights_give_bf16_gradients():
    mixer = make_mixer("v2").to(torch.bfloat16)
    hidden = torch.randn(2, 40, D_MODEL, dtype=torch.bfloat16, requires_grad=True)
    mixer(hidden).float().square().sum().backward()
    assert hidden.grad.dtype == torch.bfloat16 and torch.isfinite(hidden.grad).all()
    for name, p in mixer.named_parameters():
        assert p.grad.dtype == torch.bfloat16 and torch.isfinite(p.grad).all(), name


def test_backward_keeps_no_activation_of_the_inner_width():
    """The point of fusing: per direction only x_proj's output (dt_rank + 2 * d_state a
    token) and the states every 128 steps are kept, no (batch, length, d_inner) tensor,
    and in_proj's output xz is recomputed."""
    mixer = make_mixer("v2", d_model=32)
    batch, length = 2, 256
    hidden = torch.randn(batch, length, 32, requires_grad=True)
    saved = {}
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: saved.setdefault(t.untyped_storage().data_ptr(), t), lambda t: t
    ):
        mixer(hidden)
    params = {p.untyped_storage().data_ptr() for p in mixer.parameters()}
    activations = [t for ptr, t in saved.items() if ptr not in params]
    d_inner, x_dbl = mixer.d_inner, mixer.dt_rank + 2 * mixer.d_state
    per_direction = batch * length * x_dbl + batch * (length // fused.CHUNK) * 16 * d_inner
    expected = batch * length * 32 + 2 * per_direction  # hidden, directions
    assert sum(t.numel() for t in activations) == expected, [tuple(t.shape) for t in activations]


def test_inference_reuses_its_temporaries_and_matches_the_reference(monkeypatch):
    """Inference takes xz, y and u from the per-thread workspace (no fresh large blocks per
    call), gives the reference's output at two lengths, a training step can follow, and
    release_workspace frees them."""
    mixer = make_mixer("v2").eval()
    fused.release_workspace()
    outputs = {}
    with torch.inference_mode():
        for length in (LENGTH, LENGTH // 2):
            hidden = torch.randn(2, length, D_MODEL, generator=torch.Generator().manual_seed(1))
            outputs[length] = (hidden, mixer(hidden))
            if length == LENGTH:
                buffers = {n: b.data_ptr() for n, b in fused._workspace.buffers.items()}
        assert set(buffers) == {"xz", "y", "u"}
        # the shorter call ran in the longer call's buffers
        assert {n: b.data_ptr() for n, b in fused._workspace.buffers.items()} == buffers
        monkeypatch.setenv("SSAMBA_SCAN", "ref")
        mixer.use_fast_path = False
        for length, (hidden, out) in outputs.items():
            assert_close(f"out at {length}", out, mixer(hidden))
    # training after inference (Lightning validates under inference_mode) writes into the
    # same buffers: they must be normal tensors
    monkeypatch.delenv("SSAMBA_SCAN")
    mixer.train().use_fast_path = True
    hidden = torch.randn(2, LENGTH, D_MODEL, requires_grad=True)
    mixer(hidden).sum().backward()
    assert hidden.grad is not None and hidden.grad.abs().sum() > 0
    fused.release_workspace()
    assert not fused._workspace.buffers
