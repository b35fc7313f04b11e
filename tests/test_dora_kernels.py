"""Tests of the Triton epilogues of the DoRA layer against the PyTorch path.

On CPU the kernels run under the Triton interpreter. ``TRITON_INTERPRET=1`` must be set before
Triton is first imported, so the checks run in a child process: this file, executed as a script,
runs every check and prints a JSON report that the tests read. The interpreter computes bfloat16
incorrectly (it truncates on store), so interpreter checks cover float32 and float16 only.
The ``gpu`` tests run the same kernels in bfloat16 on CUDA and are skipped without a CUDA device.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]

# Odd sizes exercise the masked edges of the 32×128 tiles.
_SHAPES = [(37, 301), (128, 512), (1, 5)]


def _reference_forward(inner, scale, bias):
    from fedsim.dora.functional import compose_forward_torch

    return compose_forward_torch(inner, scale, bias)


def _check_forward(dtype: torch.dtype, device: str) -> None:
    from fedsim.dora import kernels

    generator = torch.Generator().manual_seed(0)
    for rows, cols in _SHAPES:
        inner = torch.randn(rows, cols, generator=generator).to(device=device, dtype=dtype)
        scale = (1 + 0.1 * torch.randn(cols, generator=generator)).to(device)
        bias = torch.randn(cols, generator=generator).to(device=device, dtype=dtype)

        for bias_or_none in (bias, None):
            expected = _reference_forward(inner, scale, bias_or_none)
            actual = kernels.compose_forward(inner, scale, bias_or_none)
            _assert_matches(
                actual, expected, f"forward {dtype} {rows}x{cols} bias={bias_or_none is not None}"
            )

        in_place = inner.clone()
        result = kernels.compose_forward(in_place, scale, bias, out=in_place)
        assert result.data_ptr() == in_place.data_ptr(), "in-place forward wrote elsewhere"
        _assert_matches(
            in_place, _reference_forward(inner, scale, bias), f"in-place forward {dtype}"
        )


def _check_backward(dtype: torch.dtype, device: str) -> None:
    from fedsim.dora import kernels
    from fedsim.dora.functional import compose_backward_torch

    generator = torch.Generator().manual_seed(1)
    for rows, cols in _SHAPES:
        grad = torch.randn(rows, cols, generator=generator).to(device=device, dtype=dtype)
        inner = torch.randn(rows, cols, generator=generator).to(device=device, dtype=dtype)
        scale = (1 + 0.1 * torch.randn(cols, generator=generator)).to(device)

        grad_inner, row_sum = kernels.compose_backward(grad, scale, inner)
        expected_inner, _ = compose_backward_torch(grad, scale, None)
        exact_sum = (grad.double() * inner.double()).sum(dim=0)

        _assert_matches(grad_inner, expected_inner, f"d_inner {dtype} {rows}x{cols}")
        assert row_sum.dtype == torch.float32, f"row sum dtype {row_sum.dtype}"
        torch.testing.assert_close(row_sum.double(), exact_sum, rtol=1e-5, atol=1e-5)

        again_inner, again_sum = kernels.compose_backward(grad, scale, inner)
        assert torch.equal(again_sum, row_sum), "row sums differ between two identical runs"
        assert torch.equal(again_inner, grad_inner), "d_inner differs between two identical runs"

        no_inner, no_sum = kernels.compose_backward(grad, scale, None)
        assert no_sum is None, "row sum returned without inner"
        _assert_matches(no_inner, expected_inner, f"d_inner without inner {dtype}")


def _check_layer(dtype: torch.dtype, device: str) -> None:
    from torch import nn

    from fedsim.dora import DoRALinear

    torch.manual_seed(2)
    linear = nn.Linear(96, 80).to(device=device, dtype=dtype)
    torch_layer = DoRALinear.from_linear(linear, r=8, alpha=16, seed=3, kernel="torch")
    with torch.no_grad():
        torch_layer.lora_B.weight.normal_(std=0.1)
    triton_layer = DoRALinear.from_linear(nn.Linear(96, 80), r=8, alpha=16, kernel="triton")
    triton_layer.base_layer.to(device=device, dtype=dtype)
    triton_layer.load_state_dict(torch_layer.state_dict())

    x = torch.randn(3, 11, 96, device=device, dtype=dtype)
    outputs, grads = [], []
    for layer in (torch_layer, triton_layer):
        x_leaf = x.clone().requires_grad_(True)
        y = layer(x_leaf)
        y.float().square().sum().backward()
        outputs.append(y.detach())
        grads.append(
            [
                x_leaf.grad,
                layer.lora_A.weight.grad,
                layer.lora_B.weight.grad,
                layer.lora_magnitude_vector.grad,
            ]
        )

    _assert_matches(outputs[1], outputs[0], f"layer output {dtype}")
    tolerance = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}[dtype]
    for name, actual, expected in zip(("x", "A", "B", "m"), grads[1], grads[0], strict=True):
        torch.testing.assert_close(
            actual.float(),
            expected.float(),
            rtol=tolerance,
            atol=tolerance,
            msg=f"gradient of {name}",
        )


def _assert_matches(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Exact for float32 and float16; within one bfloat16 unit in the last place (rtol 2⁻⁷)."""
    assert actual.dtype == expected.dtype, (
        f"{what}: dtype {actual.dtype}, expected {expected.dtype}"
    )
    if actual.dtype == torch.bfloat16:
        torch.testing.assert_close(actual.float(), expected.float(), rtol=8e-3, atol=1e-6, msg=what)
    elif actual.is_cuda and actual.dtype == torch.float32:
        # The GPU may fuse the multiply and add into one FMA.
        torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6, msg=what)
    else:
        assert torch.equal(actual, expected), (
            f"{what}: max abs diff {(actual - expected).abs().max()}"
        )


CHECKS = {
    "forward_fp32": lambda device: _check_forward(torch.float32, device),
    "forward_fp16": lambda device: _check_forward(torch.float16, device),
    "backward_fp32": lambda device: _check_backward(torch.float32, device),
    "backward_fp16": lambda device: _check_backward(torch.float16, device),
    "layer_fp32": lambda device: _check_layer(torch.float32, device),
}


def _run_checks(device: str) -> dict[str, str]:
    report = {}
    for name, check in CHECKS.items():
        try:
            check(device)
            report[name] = "ok"
        except Exception:  # noqa: BLE001 - every failure goes into the report
            report[name] = traceback.format_exc()
    return report


# CPU: the Triton interpreter in a child process.

_needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None,
    reason="triton is not installed (pip install -e '.[dev]' installs it)",
)


@pytest.fixture(scope="module")
def interpreter_report() -> dict[str, str]:
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    completed = subprocess.run(
        [sys.executable, str(Path(__file__).resolve())],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if completed.returncode != 0:
        pytest.fail(f"interpreter run failed:\n{completed.stdout}\n{completed.stderr}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


@_needs_triton
@pytest.mark.parametrize("check", sorted(CHECKS))
def test_kernel_interpreter(interpreter_report, check):
    assert interpreter_report[check] == "ok", interpreter_report[check]


def test_package_import_does_not_import_triton():
    code = "import sys, fedsim.dora; assert 'triton' not in sys.modules, 'triton was imported'"
    completed = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True
    )

    assert completed.returncode == 0, completed.stderr


def test_auto_kernel_on_cpu_is_torch():
    from fedsim.dora import resolve_backend

    assert resolve_backend("auto", torch.device("cpu"), torch.float32) == "torch"


# CUDA: the compiled kernels, bfloat16 included.

_needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.mark.gpu
@_needs_cuda
@_needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kernels_cuda(dtype):
    _check_forward(dtype, "cuda")
    _check_backward(dtype, "cuda")


@pytest.mark.gpu
@_needs_cuda
@_needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_cuda(dtype):
    _check_layer(dtype, "cuda")


@pytest.mark.gpu
@_needs_cuda
@_needs_triton
def test_auto_kernel_on_cuda_is_triton():
    from fedsim.dora import resolve_backend

    assert resolve_backend("auto", torch.device("cuda"), torch.bfloat16) == "triton"


if __name__ == "__main__":
    print(json.dumps(_run_checks("cpu")))
