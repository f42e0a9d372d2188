"""The Mamba mixer on CUDA with mamba-ssm's Mamba-1 kernels and causal-conv1d: same numbers
as our reference, checkpoints that move between CPU and CUDA, and a few training steps.

The `cuda`-marked tests are skipped unless a GPU, mamba-ssm with its `selective_scan_cuda`
extension and causal-conv1d are all usable (`pip install 'ssamba[cuda]'`; `make
test-cuda`); the last test, of the fallback warning, runs anywhere.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from ssamba.models import scan
from ssamba.models.encoder import AudioEncoder, EncoderConfig
from ssamba.models.mamba import MambaMixer
from ssamba.models.scan import CUDA_KERNELS

needs_cuda_kernels = pytest.mark.skipif(
    not torch.cuda.is_available()
    or CUDA_KERNELS.mamba_inner_fn is None
    or CUDA_KERNELS.causal_conv1d_fn is None,
    reason="needs a CUDA device, mamba-ssm with selective_scan_cuda, and causal-conv1d: "
    + ("; ".join(CUDA_KERNELS.problems) or "no CUDA device"),
)

D_MODEL, LENGTH = 32, 300


def make_mixer(bimamba: str) -> MambaMixer:
    torch.manual_seed(0)
    mixer = MambaMixer(D_MODEL, bimamba=bimamba)
    with torch.no_grad():
        for p in mixer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return mixer


def output_and_grads(mixer: MambaMixer, hidden: torch.Tensor):
    mixer.zero_grad()
    hidden = hidden.detach().requires_grad_()
    out = mixer(hidden)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(out.device)
    (out * weights).sum().backward()
    grads = {name: p.grad.detach().cpu() for name, p in mixer.named_parameters()}
    return out.detach().cpu(), hidden.grad.cpu(), grads


def assert_close(name: str, got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    scale = max(1.0, want.abs().max().item())
    err = (got.double() - want.double()).abs().max().item()
    assert err <= tol * scale, f"{name}: max abs error {err:.3g} (scale {scale:.3g})"


@pytest.mark.cuda
@needs_cuda_kernels
@pytest.mark.parametrize("bimamba", ["none", "v2", "v1"])
def test_cuda_mixer_matches_the_cpu_reference_values_and_gradients(bimamba, monkeypatch):
    """none/v2 run mamba-ssm's fused mamba_inner_fn, v1 its scan composed with causal-conv1d;
    the reference is the composed path with the step-by-step scan on CPU in float64."""
    mixer = make_mixer(bimamba)
    hidden = torch.randn(2, LENGTH, D_MODEL, generator=torch.Generator().manual_seed(1))
    out, d_hidden, grads = output_and_grads(mixer.cuda(), hidden.cuda())
    monkeypatch.setenv("SSAMBA_SCAN", "ref")
    reference = mixer.cpu().double()
    reference.use_fast_path = False
    want_out, want_hidden, want_grads = output_and_grads(reference, hidden.double())
    assert_close("out", out, want_out, 1e-4)
    assert_close("d hidden", d_hidden, want_hidden, 1e-3)
    for name in grads:
        assert_close(f"d {name}", grads[name], want_grads[name], 1e-3)


@pytest.mark.cuda
@needs_cuda_kernels
def test_cuda_matches_the_fused_cpu_path():
    mixer = make_mixer("v2")
    hidden = torch.randn(2, LENGTH, D_MODEL, generator=torch.Generator().manual_seed(1))
    cpu_out, cpu_hidden, cpu_grads = output_and_grads(mixer, hidden)
    out, d_hidden, grads = output_and_grads(mixer.cuda(), hidden.cuda())
    assert_close("out", out, cpu_out, 1e-4)
    assert_close("d hidden", d_hidden, cpu_hidden, 1e-3)
    for name in grads:
        assert_close(f"d {name}", grads[name], cpu_grads[name], 1e-3)


@pytest.mark.cuda
@needs_cuda_kernels
def test_weights_round_trip_between_cpu_and_cuda_with_identical_keys():
    cfg = EncoderConfig.preset("ssamba", "tiny", depth=2, input_frames=128)
    torch.manual_seed(0)
    cpu = AudioEncoder(cfg).eval()
    fbank = torch.randn(2, cfg.input_frames, cfg.num_mel_bins)
    gpu = AudioEncoder(cfg).cuda().eval()
    gpu.load_state_dict(cpu.state_dict())  # strict: same keys
    back = AudioEncoder(cfg).eval()
    back.load_state_dict({k: v.cpu() for k, v in gpu.state_dict().items()})
    assert list(gpu.state_dict()) == list(cpu.state_dict()) == list(back.state_dict())
    for key, value in cpu.state_dict().items():
        torch.testing.assert_close(back.state_dict()[key], value, atol=0, rtol=0, msg=key)
    with torch.no_grad():
        torch.testing.assert_close(gpu(fbank.cuda()).cpu(), cpu(fbank), atol=1e-3, rtol=1e-3)


@pytest.mark.cuda
@needs_cuda_kernels
def test_two_training_steps_of_a_tiny_encoder_on_cuda():
    cfg = EncoderConfig.preset("ssamba", "tiny", depth=2, input_frames=128)
    torch.manual_seed(0)
    encoder = AudioEncoder(cfg).cuda().train()
    head = torch.nn.Linear(cfg.embed_dim, 3).cuda()
    params = [*encoder.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    fbank = torch.randn(4, cfg.input_frames, cfg.num_mel_bins, device="cuda")
    labels = torch.tensor([0, 1, 2, 1], device="cuda")
    before = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
    losses = []
    for _ in range(2):
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(head(encoder(fbank)), labels)
        loss.backward()
        mixers = [p for name, p in encoder.named_parameters() if ".mixer." in name]
        assert mixers and all(p.grad is not None and p.grad.isfinite().all() for p in mixers)
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    changed = [k for k, v in encoder.state_dict().items() if not torch.equal(v, before[k])]
    assert any(".mixer.A_b_log" in k for k in changed) and any("conv1d_b" in k for k in changed)


def test_a_gpu_machine_without_the_kernels_gets_one_warning_naming_what_is_missing(monkeypatch):
    """Runs anywhere: pretends to have a GPU and no mamba-ssm/causal-conv1d."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(scan.importlib.util, "find_spec", lambda name: None)
    kernels = scan._find_cuda_kernels()
    assert kernels.selective_scan_fn is None and kernels.causal_conv1d_fn is None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scan._warn_about_cuda_kernels(kernels)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert "mamba-ssm is not installed" in messages[0] and "chunked scan" in messages[0]
    assert "pip install 'ssamba[cuda]'" in messages[0]
