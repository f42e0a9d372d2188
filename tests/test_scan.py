"""Selective scan: every implementation computes the reference recurrence, values and gradients.

The oracle is `selective_scan_ref` run in float64; the kernels run in float32 and must
agree to 1e-4 (relative to the magnitude for the gradients that are sums over
thousands of steps, e.g. dA).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ssamba.models import scan
from ssamba.models.scan import (
    resolve_implementation,
    selective_scan_chunked,
    selective_scan_cpp,
    selective_scan_fn,
    selective_scan_ref,
)

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def make_inputs(
    batch: int,
    dim: int,
    d_state: int,
    length: int,
    *,
    softplus: bool = True,
    with_D: bool = True,
    with_z: bool = True,
    with_bias: bool = True,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
) -> dict[str, torch.Tensor | None]:
    """Inputs in the ranges a trained Mamba sees: delta' ~ 0.01-1, A < 0 (S4D-real-like)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    delta = (
        randn(batch, dim, length) - 1.0
        if softplus
        else torch.rand(batch, dim, length, generator=g, dtype=torch.float64) * 0.5 + 0.01
    )
    inputs = {
        "u": randn(batch, dim, length),
        "delta": delta,
        "A": -(torch.rand(dim, d_state, generator=g, dtype=torch.float64) * 8 + 0.5),
        "B": randn(batch, d_state, length),
        "C": randn(batch, d_state, length),
        "D": randn(dim) if with_D else None,
        "z": randn(batch, dim, length) if with_z else None,
        "delta_bias": randn(dim) * 0.1 if with_bias else None,
    }
    return {k: None if v is None else v.to(dtype).requires_grad_() for k, v in inputs.items()}


def run(impl, inputs, softplus=True, reverse=False, through_last_state=True):
    """out, last_state and the gradient of a loss that uses both, for every given input."""
    out, last = impl(
        *(inputs[k] for k in NAMES),
        delta_softplus=softplus,
        return_last_state=True,
        reverse=reverse,
    )
    g = torch.Generator().manual_seed(1)
    w_out = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
    w_last = torch.randn(last.shape, generator=g, dtype=torch.float64).to(out.dtype)
    given = [k for k in NAMES if inputs[k] is not None]
    loss = (out * w_out).sum()
    if through_last_state:
        loss = loss + (last * w_last).sum()
    grads = torch.autograd.grad(loss, [inputs[k] for k in given])
    return out, last, dict(zip(given, grads, strict=True))


def as_float32(inputs):
    return {
        k: None if v is None else v.detach().float().requires_grad_() for k, v in inputs.items()
    }


def assert_close(name: str, got: torch.Tensor, want: torch.Tensor, tol: float = 1e-4) -> None:
    """Max abs error <= tol, scaled by the magnitude once values exceed 1."""
    scale = max(1.0, want.abs().max().item())
    err = (got.double() - want.double()).abs().max().item()
    assert err <= tol * scale, f"{name}: max abs error {err:.3g} (scale {scale:.3g})"


def assert_matches(impl, inputs64, softplus, reverse=False, tol=1e-4):
    ref_out, ref_last, ref_grads = run(selective_scan_ref, inputs64, softplus, reverse)
    out, last, grads = run(impl, as_float32(inputs64), softplus, reverse)
    assert out.dtype == torch.float32
    assert_close("out", out, ref_out, tol)
    assert_close("last_state", last, ref_last, tol)
    assert grads.keys() == ref_grads.keys()
    for k in grads:
        assert grads[k].shape == ref_grads[k].shape, k
        assert_close(f"d{k}", grads[k], ref_grads[k], tol)


# --------------------------------------------------------------------------- C++ kernel
@pytest.mark.parametrize(
    ("batch", "dim", "d_state", "length"),
    [(2, 5, 16, 1), (2, 19, 16, 7), (2, 5, 4, 130), (1, 19, 16, 512)],
)
def test_cpp_kernel_matches_reference_values_and_gradients(batch, dim, d_state, length):
    assert_matches(selective_scan_cpp, make_inputs(batch, dim, d_state, length), softplus=True)


def test_cpp_kernel_matches_reference_on_a_long_sequence():
    """4096 steps = 64 checkpointed chunks: the recomputation must chain exactly."""
    assert_matches(selective_scan_cpp, make_inputs(1, 3, 16, 4096, seed=3), softplus=True)


@pytest.mark.parametrize(
    ("softplus", "with_D", "with_z", "with_bias"),
    [
        (False, False, False, False),
        (False, True, False, True),
        (True, False, True, False),
        (True, True, False, True),
    ],
)
def test_cpp_kernel_matches_reference_with_and_without_options(softplus, with_D, with_z, with_bias):
    inputs = make_inputs(
        2, 19, 16, 100, softplus=softplus, with_D=with_D, with_z=with_z, with_bias=with_bias
    )
    assert_matches(selective_scan_cpp, inputs, softplus=softplus)


def test_cpp_kernel_handles_state_sizes_other_than_16():
    assert_matches(selective_scan_cpp, make_inputs(2, 17, 5, 90), softplus=True)


@pytest.mark.parametrize("impl", [selective_scan_cpp, selective_scan_chunked])
def test_reverse_equals_the_flipped_computation(impl):
    """reverse=True is scan(flip(inputs)) flipped back, the backward direction of BiMamba."""
    inputs = make_inputs(2, 19, 16, 150, dtype=torch.float32)
    out, last, grads = run(impl, inputs, reverse=True)
    flipped = {
        k: None if v is None else (v.detach().flip(-1) if v.dim() == 3 else v.detach())
        for k, v in inputs.items()
    }
    flipped = {k: None if v is None else v.requires_grad_() for k, v in flipped.items()}
    # The loss weights must see the same positions: flip them via the output.
    f_out, f_last = impl(*(flipped[k] for k in NAMES), True, True)
    torch.testing.assert_close(out, f_out.flip(-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(last, f_last, atol=1e-5, rtol=1e-5)
    g = torch.Generator().manual_seed(1)
    w_out = torch.randn(out.shape, generator=g, dtype=torch.float64).float()
    w_last = torch.randn(last.shape, generator=g, dtype=torch.float64).float()
    loss = (f_out.flip(-1) * w_out).sum() + (f_last * w_last).sum()
    f_grads = torch.autograd.grad(loss, [flipped[k] for k in grads])
    for (k, grad), f_grad in zip(grads.items(), f_grads, strict=True):
        expected = f_grad.flip(-1) if f_grad.dim() == 3 else f_grad
        torch.testing.assert_close(grad, expected, atol=1e-4, rtol=1e-4, msg=k)


def test_cpp_reverse_matches_reference():
    assert_matches(selective_scan_cpp, make_inputs(2, 5, 16, 70), softplus=True, reverse=True)


@pytest.mark.parametrize("reverse", [False, True])
def test_cpp_kernel_passes_gradcheck_in_float64(reverse):
    """Analytic gradients of every input (and through last_state) equal finite differences;
    70 steps cross a checkpoint boundary."""
    inputs = make_inputs(2, 3, 4, 70, seed=5)
    tensors = tuple(inputs[k] for k in NAMES)

    def f(*args):
        out, last = selective_scan_cpp(*args, True, True, reverse)
        return out, last

    assert torch.autograd.gradcheck(f, tensors, eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("reverse", [False, True])
def test_cpp_kernel_reads_channels_last_views_and_keeps_their_layout(reverse):
    """(batch, length, dim) memory seen as (batch, dim, length), as the mixer produces it;
    150 steps span three chunks, so the prefetch of the next chunk's rows is exercised."""
    inputs = make_inputs(2, 21, 16, 150, dtype=torch.float32)
    views = {}
    for k, v in inputs.items():
        if v is not None and v.dim() == 3:
            v = v.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
        views[k] = v
    out, last, grads = run(selective_scan_cpp, inputs, reverse=reverse)
    v_out, v_last, v_grads = run(selective_scan_cpp, views, reverse=reverse)
    assert v_out.stride(1) == 1, "output should stay channels-last (no copy)"
    torch.testing.assert_close(v_out, out, atol=0, rtol=0)
    torch.testing.assert_close(v_last, last, atol=0, rtol=0)
    for k in grads:
        torch.testing.assert_close(v_grads[k], grads[k], atol=1e-6, rtol=1e-6, msg=k)


@pytest.mark.parametrize("batch", [1, 3])
def test_cpp_kernel_results_do_not_depend_on_the_thread_count(batch):
    """With fewer batch elements than threads the channels are split between threads and
    dB/dC are summed over the groups: same values, and the same bits run to run."""
    inputs = make_inputs(batch, 40, 16, 150, dtype=torch.float32)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 3, 3):
            torch.set_num_threads(n)
            results.append(run(selective_scan_cpp, inputs))
    finally:
        torch.set_num_threads(threads)
    (out1, last1, grads1), (out3, last3, grads3), (again, _, grads_again) = results
    assert torch.equal(out1, out3) and torch.equal(last1, last3)
    assert torch.equal(out3, again)
    for k in grads1:
        torch.testing.assert_close(grads3[k], grads1[k], atol=1e-5, rtol=1e-5, msg=k)
        assert torch.equal(grads3[k], grads_again[k]), k


def test_cpp_kernel_gradients_through_the_last_state_alone():
    """A loss on last_state only: the output's gradient reaches the kernel as None."""
    inputs = make_inputs(2, 19, 16, 70)
    grads = {}
    for impl, given in ((selective_scan_ref, inputs), (selective_scan_cpp, as_float32(inputs))):
        _, last = impl(*(given[k] for k in NAMES), delta_softplus=True, return_last_state=True)
        leaves = [given[k] for k in NAMES]
        # D and z do not reach the last state: their gradients are zero.
        grads[impl] = torch.autograd.grad(
            last.square().sum(), leaves, allow_unused=True, materialize_grads=True
        )
    for name, got, want in zip(
        NAMES, grads[selective_scan_cpp], grads[selective_scan_ref], strict=True
    ):
        assert_close(f"d{name}", got, want)


def test_cpp_kernel_accepts_broadcast_output_gradients():
    """out.sum().backward() hands the kernel a stride-0 gradient."""
    inputs = make_inputs(1, 4, 16, 33, dtype=torch.float32)
    selective_scan_cpp(*(inputs[k] for k in NAMES), True).sum().backward()
    ref = make_inputs(1, 4, 16, 33, dtype=torch.float32)
    selective_scan_ref(*(ref[k] for k in NAMES), True).sum().backward()
    for k in NAMES:
        torch.testing.assert_close(inputs[k].grad, ref[k].grad, atol=1e-4, rtol=1e-4, msg=k)


@pytest.mark.parametrize("reverse", [False, True])
def test_cpp_kernel_fused_options_equal_their_composition(reverse):
    """The options the fused mixer uses: delta = dt_weight @ dt computed in the kernel (d dt
    and d dt_weight out), out scaled and added to an existing tensor, the output recomputed
    by the backward, gradients added to given tensors."""
    kernel = scan.load_cpu_kernel()
    batch, dim, rank, length, scale = 2, 21, 3, 150, 0.5
    inputs = {k: v.detach().float() for k, v in make_inputs(batch, dim, 16, length).items()}
    g = torch.Generator().manual_seed(5)
    dt = torch.randn(batch, rank, length, generator=g).requires_grad_()
    dt_weight = (torch.randn(dim, rank, generator=g) * 0.5).requires_grad_()
    u, A, B, C, D, z, bias = (inputs[k] for k in ("u", "A", "B", "C", "D", "z", "delta_bias"))
    previous = torch.randn(batch, dim, length, generator=g)
    dout = torch.randn(batch, dim, length, generator=g)

    out = previous.clone()
    *_, states = kernel.scan_forward(
        u, dt.detach(), A, B, C, D, z, bias, True, reverse, scan.CHUNK, scale, out, True,
        dt_weight.detach(), None, True,
    )  # fmt: skip
    delta = torch.einsum("dr,brl->bdl", dt_weight, dt)
    leaves = [u, A, B, C, D, z, bias]
    for t in leaves:
        t.requires_grad_()
    want = selective_scan_ref(u, delta, A, B, C, D, z, bias, delta_softplus=True, reverse=reverse)
    torch.testing.assert_close(out, previous + scale * want.detach(), atol=1e-5, rtol=1e-5)

    du, dz, y = (torch.randn(batch, length, dim, generator=g).transpose(1, 2) for _ in range(3))
    du0, dz0, y0 = du.clone(), dz.clone(), y.clone()
    grads = kernel.scan_backward(
        dout, None, u.detach(), dt.detach(), A.detach(), B.detach(), C.detach(), D.detach(),
        z.detach(), bias.detach(), states, True, reverse, scan.CHUNK, scale, du, None, dz, y,
        True, True, dt_weight.detach(),
    )  # fmt: skip
    ddt, dA, dB, dC, dD, dbias, d_dt_weight = (grads[i] for i in (1, 2, 3, 4, 5, 7, 8))
    names = ("u", "dt", "dt_weight", "A", "B", "C", "D", "z", "delta_bias")
    want_grads = torch.autograd.grad(want, [u, dt, dt_weight, A, B, C, D, z, bias], scale * dout)
    got = (du - du0, ddt, d_dt_weight, dA, dB, dC, dD, dz - dz0, dbias)
    for name, a, b in zip(names, got, want_grads, strict=True):
        assert_close(f"d{name}", a, b)
    torch.testing.assert_close(y, y0 + scale * want.detach(), atol=1e-5, rtol=1e-5)


def test_cpp_scan_op_runs_in_a_compiled_graph_and_passes_opcheck():
    inputs = make_inputs(2, 19, 16, 70, dtype=torch.float32)
    args = [inputs[k] for k in NAMES]

    def f(*args):
        out, last = selective_scan_cpp(*args, delta_softplus=True, return_last_state=True)
        return out.square().sum() + last.sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(compiled(*args), args)
    want = torch.autograd.grad(f(*args), args)
    for name, a, b in zip(NAMES, got, want, strict=True):
        torch.testing.assert_close(a, b, msg=name)
    detached = [t.detach().requires_grad_() for t in args]
    torch.library.opcheck(torch.ops.ssamba.selective_scan.default, (*detached, True, True))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_are_computed_in_float32(dtype):
    inputs = make_inputs(2, 8, 16, 40, dtype=dtype)
    out, _, grads = run(selective_scan_cpp, inputs)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads.values())
    exact = {k: None if v is None else v.detach().double() for k, v in inputs.items()}
    want = selective_scan_ref(*(exact[k] for k in NAMES), True)
    # Only the final cast to half precision may differ from the float64 result.
    assert_close("out", out, want, tol=1e-2)


# --------------------------------------------------------------------------- chunked scan
@pytest.mark.parametrize(
    ("length", "reverse"), [(1, False), (150, False), (150, True), (3 * scan.SEGMENT // 2, False)]
)
def test_chunked_scan_matches_reference(length, reverse):
    """The last length spans two checkpointed segments: the state must carry across."""
    assert_matches(
        selective_scan_chunked, make_inputs(2, 5, 16, length), softplus=True, reverse=reverse
    )


def test_chunked_scan_stays_finite_where_cumulative_decay_underflows():
    """dt = 0.1 and A = -16 over a 64-step chunk decays by e^-102: the naive
    exp(S_t) * cumsum(exp(-S_s) x_s) form gives inf * 0 = NaN there."""
    inputs = make_inputs(1, 4, 16, 128, softplus=False, dtype=torch.float32)
    with torch.no_grad():
        inputs["delta"].fill_(0.1)
        inputs["A"].fill_(-16.0)
    out, _last, grads = run(selective_scan_chunked, inputs, softplus=False)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads.values())
    exact = {k: None if v is None else v.detach().double() for k, v in inputs.items()}
    want = selective_scan_ref(*(exact[k] for k in NAMES), False)
    assert_close("out", out, want)


# --------------------------------------------------------------------------- validation
def test_wrong_shapes_name_the_argument_and_the_expected_shape():
    inputs = make_inputs(2, 6, 16, 100, dtype=torch.float32)
    inputs["B"] = inputs["B"].detach()[..., :99]
    with pytest.raises(
        ValueError, match=r"^B: expected \(batch=2, d_state=16, length=100\), got \(2, 16, 99\)$"
    ):
        selective_scan_fn(*(inputs[k] for k in NAMES))


@pytest.mark.parametrize(
    ("name", "bad", "message"),
    [
        ("delta", torch.ones(2, 6, 10, dtype=torch.int64), "delta: expected a floating-point"),
        ("D", torch.ones(5), r"D: expected \(dim=6\), got \(5,\)"),
        ("A", torch.ones(6), r"A: expected \(dim, d_state\)"),
        ("z", torch.ones(2, 6, 10, device="meta"), "z: expected a tensor on cpu"),
    ],
)
def test_bad_inputs_raise_value_errors_naming_the_argument(name, bad, message):
    inputs = make_inputs(2, 6, 4, 10, dtype=torch.float32)
    inputs[name] = bad
    for impl in (selective_scan_fn, selective_scan_ref, selective_scan_chunked, selective_scan_cpp):
        with pytest.raises(ValueError, match=message):
            impl(*(inputs[k] for k in NAMES))


# --------------------------------------------------------------------------- dispatch
def test_environment_variable_forces_the_implementation(monkeypatch):
    cpu = torch.device("cpu")
    for choice in ("ref", "chunked", "cpp"):
        monkeypatch.setenv("SSAMBA_SCAN", choice)
        assert resolve_implementation(cpu) == choice
    monkeypatch.setenv("SSAMBA_SCAN", "auto")
    assert resolve_implementation(cpu) == "cpp"  # a compiler is present here
    monkeypatch.setenv("SSAMBA_SCAN", "fast")
    with pytest.raises(ValueError, match="SSAMBA_SCAN='fast'"):
        resolve_implementation(cpu)


def test_dispatch_gives_the_same_result_whichever_implementation_runs(monkeypatch):
    inputs = make_inputs(2, 5, 16, 40, dtype=torch.float32)
    args = [inputs[k].detach() if inputs[k] is not None else None for k in NAMES]
    results = {}
    for choice in ("ref", "chunked", "cpp"):
        monkeypatch.setenv("SSAMBA_SCAN", choice)
        results[choice] = selective_scan_fn(*args, delta_softplus=True, reverse=True)
    torch.testing.assert_close(results["chunked"], results["ref"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(results["cpp"], results["ref"], atol=1e-5, rtol=1e-5)


def test_without_a_compiler_the_scan_warns_once_and_still_computes(tmp_path):
    """A fresh process whose C++ compiler does not exist: one warning, then chunked results."""
    script = textwrap.dedent(
        """
        import warnings, torch
        from ssamba.models.scan import selective_scan_fn, selective_scan_ref
        u, dt, z = torch.randn(1, 3, 20), torch.rand(1, 3, 20), torch.randn(1, 3, 20)
        A, B, C = -torch.rand(3, 4), torch.randn(1, 4, 20), torch.randn(1, 4, 20)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = selective_scan_fn(u, dt, A, B, C, z=z)
            selective_scan_fn(u, dt, A, B, C, z=z)
        messages = [str(w.message) for w in caught if "selective scan" in str(w.message)]
        assert len(messages) == 1, messages
        assert "chunked" in messages[0], messages[0]
        torch.testing.assert_close(out, selective_scan_ref(u, dt, A, B, C, z=z))
        print("ok")
        """
    )
    env = {
        **os.environ,
        "CXX": str(tmp_path / "no-such-compiler"),
        "TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions"),
        "SSAMBA_SCAN": "auto",
    }
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


def test_a_lock_left_by_a_killed_build_does_not_block_the_next_process(tmp_path):
    """torch's own lock file in a built kernel folder (its holder killed mid-rebuild): a
    fresh process still loads the kernels instead of waiting on it forever."""
    scan.load_cpu_kernel()  # built (or loaded) in this process's own folder
    flags = scan._kernel_flags()
    built = scan.kernel_build_folder(flags)
    copy = scan.kernel_build_folder(flags, tmp_path)
    shutil.copytree(built, copy, ignore=shutil.ignore_patterns("lock"))
    (copy / "lock").touch()  # what a killed build leaves
    script = "from ssamba.models import scan; scan.load_cpu_kernel(); print('ok')"
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]
    assert not (copy / "lock").exists()


@pytest.mark.cuda
@pytest.mark.skipif(
    not (torch.cuda.is_available() and scan.mamba_ssm_available()),
    reason="needs a CUDA device and mamba-ssm",
)
@pytest.mark.parametrize("reverse", [False, True])
def test_mamba_ssm_on_cuda_matches_reference(reverse):
    inputs = make_inputs(2, 19, 16, 300, dtype=torch.float32)
    cuda = {k: None if v is None else v.detach().cuda().requires_grad_() for k, v in inputs.items()}
    # mamba-ssm drops the gradient of last_state, so the loss uses `out` only.
    out, last, grads = run(
        scan.selective_scan_cuda, cuda, reverse=reverse, through_last_state=False
    )
    ref_out, ref_last, ref_grads = run(
        selective_scan_ref, inputs, reverse=reverse, through_last_state=False
    )
    assert_close("out", out.cpu(), ref_out)
    assert_close("last_state", last.cpu(), ref_last)
    for k in grads:
        assert_close(f"d{k}", grads[k].cpu(), ref_grads[k], tol=1e-3)


def test_kernel_loading_hides_the_cuda_home_notice():
    import logging

    from ssamba.models import scan

    notice = "No CUDA runtime is found, using CUDA_HOME='/usr/local'"
    record = logging.LogRecord(
        "torch.utils.cpp_extension", logging.WARNING, "", 0, notice, None, None
    )
    other = logging.LogRecord("torch.utils.cpp_extension", logging.WARNING, "", 0, "x", None, None)
    assert not scan._no_cuda_home_notice(record) and scan._no_cuda_home_notice(other)


def test_the_kernel_build_folder_is_keyed_by_the_sources_their_place_and_flags(
    tmp_path, monkeypatch
):
    from ssamba.models import scan

    flags = scan._kernel_flags()
    folder = scan.kernel_build_folder(flags, tmp_path)
    assert folder.parent == tmp_path and folder.name.startswith("ssamba_cpu_kernels-")
    assert scan.kernel_build_folder(flags, tmp_path) == folder
    assert scan.kernel_build_folder([*flags, "-DOTHER"], tmp_path) != folder
    # another checkout of the same sources: its own folder (torch's build file names the
    # sources by path, so sharing one would rebuild it whenever the two took turns) ...
    csrc = tmp_path / "csrc"
    shutil.copytree(scan._CSRC, csrc)
    monkeypatch.setattr(scan, "_CSRC", csrc)
    checkout = scan.kernel_build_folder(flags, tmp_path)
    assert checkout != folder
    # ... and other sources there: another folder again
    with (csrc / "module.cpp").open("a") as source:
        source.write("// changed\n")
    assert scan.kernel_build_folder(flags, tmp_path) not in (folder, checkout)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "env"))
    assert scan.kernel_build_folder(flags).parent == tmp_path / "env"


@pytest.mark.slow
def test_two_processes_building_the_kernels_at_once_build_them_once(tmp_path):
    """Both wait on one lock: one builds (and says so in one line), the other loads it."""
    script = "from ssamba.models.scan import load_cpu_kernel; load_cpu_kernel(); print('ok')"
    env = {
        **os.environ,
        "TORCH_EXTENSIONS_DIR": str(tmp_path),
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
    }
    command = [sys.executable, "-c", script]
    both = [
        subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outputs = [process.communicate() for process in both]

    assert [process.returncode for process in both] == [0, 0], [err for _, err in outputs]
    announced = [err.count("ssamba: building the C++ CPU kernels in") for _, err in outputs]
    assert sorted(announced) == [0, 1], [err for _, err in outputs]
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert (folder / "ssamba_cpu_kernels.so").is_file()
    again = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    assert "building" not in again.stderr
