"""The compiled kernels for quantized weights (glm_kernels/csrc/quant_kernels.cpp, through glm_kernels.quant_linear)
against blockquant's references: `linear_q8a_reference` (their exact model: only the order of fp32 additions may
differ) and `linear_reference` (dequantize, then matmul: the error of quantizing activations on top), on every
compiled instruction-set path (scalar, AVX2 forced, and the native one), with 1 and 2 threads.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from glm_kernels import blockquant, cpu_compiled, quant_linear
from glm_kernels.blockquant import dequantize, dequantize_activations, quantize_activations
from glm_kernels.quant_linear import (
    quantized_fused_moe,
    quantized_fused_moe_reference,
    quantized_linear,
    set_isa,
)
from kernel_testing import assert_close


@pytest.fixture(scope="module")
def compiled():
    module = cpu_compiled.load()  # the first run on a machine compiles it (about a minute)
    assert module is not None, f"the compiled CPU kernels did not build: {cpu_compiled.build_error()}"
    return module


@pytest.fixture
def device() -> torch.device:
    return torch.device("cpu")  # CPU kernels: the seeded `gen` fixture makes its inputs here, even with a GPU


ISA_CHOICES = ["scalar", "avx2", "native"]


@pytest.fixture(params=ISA_CHOICES)
def isa(request, compiled):
    """Each compiled path in turn ("native": the widest this build has), restored afterwards."""
    best = quant_linear.best_isa()
    name = best if request.param == "native" else request.param
    if quant_linear.ISAS.index(name) > quant_linear.ISAS.index(best):
        pytest.skip(f"{name} is not compiled on this machine (best: {best})")
    set_isa(name)
    yield name
    set_isa(None)


def quantize(w: torch.Tensor, fmt: str):
    return {"int8": lambda: blockquant.quantize_int8(w), "int8-g16": lambda: blockquant.quantize_int8(w, group=16),
            "int4": lambda: blockquant.quantize_int4(w)}[fmt]()


def bounds(x: torch.Tensor, qw) -> tuple[torch.Tensor, torch.Tensor]:
    """Per output element: a bound on fp32 accumulation-order differences from linear_q8a_reference (a few ulps
    of the sum of |products|), and the largest error activation quantization can add (half a step per value)."""
    q, scales, _ = quantize_activations(x.float())
    w_abs = dequantize(qw).abs().transpose(-1, -2)
    magnitude = dequantize_activations(q, scales).abs() @ w_abs
    half_step = (scales / 2).repeat_interleave(blockquant.ACT_BLOCK, dim=-1)
    return 1e-5 * magnitude + 1e-30, magnitude * 1e-5 + half_step @ w_abs + 1e-30


def assert_within(actual: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor) -> None:
    assert actual.shape == expected.shape and torch.isfinite(actual).all()
    if actual.numel() == 0:
        return
    excess = (actual.float() - expected.float()).abs() - bound
    assert excess.max().item() <= 0, f"exceeds the bound by {excess.max().item():.3g} at {excess.argmax().item()}"


FORMATS = ["int8", "int8-g16", "int4"]
SHAPES = [  # M, N, K
    pytest.param(1, 40, 32, id="K=32: one group"),
    pytest.param(1, 24, 1408, id="K=1408: a partial last super-block (GLM-4.5-Air expert width)"),
    pytest.param(3, 9, 1440, id="K=1440: an odd number of groups"),
    pytest.param(1, 1, 512, id="N=1"),
    pytest.param(1, 67, 768, id="M=1 decode"),
    pytest.param(17, 33, 512, id="M=17 prefill"),
    pytest.param(70, 21, 256, id="M=70: more rows than a tile of 64"),
    pytest.param(0, 16, 256, id="M=0: no rows"),
]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("m, n, k", SHAPES)
def test_quantized_linear_matches_references(isa, fmt, m, n, k, gen):
    qw = quantize(torch.randn(n, k, generator=gen), fmt)
    x = torch.randn(m, k, generator=gen)
    y = quantized_linear(x, qw)
    assert y.dtype == torch.float32 and y.shape == (m, n)
    tight, loose = bounds(x, qw)
    assert_within(y, blockquant.linear_q8a_reference(x, qw), tight)
    assert_within(y, blockquant.linear_reference(x, qw), loose)


@pytest.mark.parametrize("fmt", FORMATS)
def test_zero_weight_rows_and_zero_activation_blocks(isa, fmt, gen):
    # All-zero groups have scale 0 (their q all 0): nothing may divide by it or turn NaN.
    w = torch.randn(12, 320, generator=gen)
    w[3] = 0
    w[7, 64:128] = 0
    x = torch.randn(5, 320, generator=gen)
    x[1] = 0
    x[2, :32] = 0
    qw = quantize(w, fmt)
    y = quantized_linear(x, qw)
    tight, _ = bounds(x, qw)
    assert_within(y, blockquant.linear_q8a_reference(x, qw), tight)
    assert (y[1] == 0).all() and (y[:, 3] == 0).all()


@pytest.mark.parametrize("fmt", FORMATS)
def test_large_magnitude_outliers(isa, fmt, gen):
    # An outlier sets its block's scale: the rest of the block loses precision, never range (no int16 overflow in
    # the AVX2 pair sums: weights of -128 and 127-activations are the extremes).
    w = torch.randn(16, 512, generator=gen)
    w[2, 5] = 300.0
    w[9, 300] = -500.0
    x = torch.randn(4, 512, generator=gen)
    x[0, 17] = 1e4
    x[3, 400] = -3e4
    qw = quantize(w, fmt)
    y = quantized_linear(x, qw)
    tight, loose = bounds(x, qw)
    assert_within(y, blockquant.linear_q8a_reference(x, qw), tight)
    assert_within(y, blockquant.linear_reference(x, qw), loose)


def test_int8_extremes_saturate_nothing(isa, gen):
    # q = -128 (a GGUF Q8_0 can hold it) against activations at +-127 in every position: the sign trick's |w| is
    # 128 as an unsigned byte, and every pair sum stays below 2^15.
    q = torch.full((4, 64), -128, dtype=torch.int8)
    q[1] = 127
    q[2, ::2] = -128
    q[2, 1::2] = 127
    qw = blockquant.Int8Weight(q, torch.ones(4, 2))
    x = torch.ones(2, 64)
    x[1, ::2] = -1
    tight, _ = bounds(x, qw)
    assert_within(quantized_linear(x, qw), blockquant.linear_q8a_reference(x, qw), tight)


@pytest.mark.parametrize("fmt", FORMATS)
def test_bfloat16_input_gives_bfloat16(isa, fmt, gen):
    qw = quantize(torch.randn(40, 256, generator=gen), fmt)
    x = torch.randn(3, 256, generator=gen).to(torch.bfloat16)
    y = quantized_linear(x, qw)
    assert y.dtype == torch.bfloat16
    assert_close(y, blockquant.linear_q8a_reference(x, qw).to(torch.bfloat16))


@pytest.mark.parametrize("fmt", FORMATS)
def test_one_and_two_threads_agree_bitwise(isa, fmt, gen):
    qw = quantize(torch.randn(300, 1408, generator=gen), fmt)
    x = torch.randn(3, 1408, generator=gen)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = quantized_linear(x, qw)
        torch.set_num_threads(2)
        two = quantized_linear(x, qw)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_activation_quantization_is_exact(compiled, gen):
    # Bit for bit: ties (x / scale exactly k + 0.5) round to even, an all-zero block is scale 0.
    x = torch.randn(6, 1408, generator=gen)
    x[1, :32] = 0
    x[2, :32] = torch.arange(32) - 15.5  # amax 16.5: scale 16.5/127; halves appear
    x[3, 40] = 1e4
    x[4] = x[4].to(torch.bfloat16).float()
    for inputs in (x, x.to(torch.bfloat16)):
        for ours, theirs in zip(compiled.quantize_activations(inputs), quantize_activations(inputs.float()),
                                strict=True):
            assert torch.equal(ours, theirs)


@pytest.mark.parametrize("tokens", [1, 9], ids=["decode: one token", "prefill: 9 tokens"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("formats", [("int8", "int8"), ("int4", "int8-g16"), ("int4", "int4")],
                         ids=lambda f: "+".join(f))
def test_quantized_fused_moe_matches_reference(isa, tokens, dtype, formats, gen):
    experts, dim, width, top_k = 6, 256, 96, 2  # width 96: three groups, a partial super-block
    w_gate_up = quantize(torch.randn(experts, 2 * width, dim, generator=gen) * 0.1, formats[0])
    w_down = quantize(torch.randn(experts, dim, width, generator=gen) * 0.1, formats[1])
    x = torch.randn(tokens, dim, generator=gen).to(dtype)
    # expert 5 never chosen; ids as the router gives them (int64), weights fp32
    ids = torch.stack([torch.randperm(experts - 1, generator=gen)[:top_k] for _ in range(tokens)])
    weights = torch.rand(tokens, top_k, generator=gen)
    ours = quantized_fused_moe(x, w_gate_up, w_down, ids, weights)
    expected = quantized_fused_moe_reference(x, w_gate_up, w_down, ids, weights)
    # fp32: accumulation order, and a hidden value that lands on a rounding tie of its 8-bit block can go one step
    # either way; bf16: one bf16 rounding of the hidden activations or an expert output apart at most.
    assert_close(ours, expected, tolerance=1e-4 if dtype == torch.float32 else 2e-2)


def test_quantized_fused_moe_takes_the_routers_strided_top_k(compiled, gen):
    """The router's top-k ids and weights are views with a row stride wider than top_k (a slice of its sorted
    scores): the kernel must read them by their strides, not as if packed."""
    w_gate_up = quantize(torch.randn(8, 64, 64, generator=gen) * 0.1, "int8")
    w_down = quantize(torch.randn(8, 64, 32, generator=gen) * 0.1, "int8")
    x = torch.randn(6, 64, generator=gen)
    scores = torch.rand(6, 8, generator=gen)
    weights, ids = scores.sort(dim=-1, descending=True)
    ids, weights = ids[:, :2], weights[:, :2]
    assert not ids.is_contiguous() and not weights.is_contiguous()
    expected = quantized_fused_moe_reference(x, w_gate_up, w_down, ids.contiguous(), weights.contiguous())
    assert_close(quantized_fused_moe(x, w_gate_up, w_down, ids, weights), expected, tolerance=1e-4)


def test_quantized_fused_moe_threads_agree_bitwise(compiled, gen):
    w_gate_up = quantize(torch.randn(4, 128, 64, generator=gen), "int4")
    w_down = quantize(torch.randn(4, 64, 64, generator=gen), "int8")
    x = torch.randn(5, 64, generator=gen)
    ids = torch.tensor([[0, 1], [1, 2], [3, 0], [2, 1], [0, 3]])
    weights = torch.rand(5, 2, generator=gen)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = quantized_fused_moe(x, w_gate_up, w_down, ids, weights)
        torch.set_num_threads(2)
        two = quantized_fused_moe(x, w_gate_up, w_down, ids, weights)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_without_the_compiled_kernels_the_reference_serves(monkeypatch, gen):
    qw = quantize(torch.randn(8, 64, generator=gen), "int4")
    x = torch.randn(2, 64, generator=gen)
    monkeypatch.setattr(cpu_compiled, "_module", None)
    assert torch.equal(quantized_linear(x, qw), blockquant.linear_q8a_reference(x, qw))


def test_bad_input_says_what_is_wrong(compiled, gen):
    qw = quantize(torch.randn(8, 64, generator=gen), "int8")
    with pytest.raises(ValueError, match="same K"):
        quantized_linear(torch.randn(2, 32), qw)
    with pytest.raises(ValueError, match="unknown instruction set"):
        set_isa("avx1024")
    with pytest.raises(RuntimeError, match="expert id"):
        quantized_fused_moe(torch.randn(1, 64), quantize(torch.randn(2, 64, 64), "int8"),
                            quantize(torch.randn(2, 64, 32), "int8"), torch.tensor([[0, 2]]), torch.ones(1, 2))


def test_environment_variable_forces_the_path(compiled):
    # Read once, when the kernels load: a fresh process with WORKBENCH_CPU_ISA=scalar runs the scalar path.
    code = "from glm_kernels import cpu_compiled, quant_linear; cpu_compiled.load(); print(quant_linear.isa())"
    env = {**os.environ, "WORKBENCH_CPU_ISA": "scalar"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "scalar"


# --- prefill through the bf16 GEMM -----------------------------------------------------------------------------------
@pytest.fixture
def bf16_gemm_always():
    quant_linear.set_bf16_gemm("always")  # every CPU can run it (ATen's bf16 GEMM), slowly without native bf16
    yield
    quant_linear.set_bf16_gemm(None)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("n, k", [pytest.param(24, 1408, id="K=1408: a partial last super-block"),
                                  pytest.param(5, 32, id="K=32: one group")])
def test_bf16_gemm_weights_match_dequantize_to_the_bit(compiled, fmt, n, k, gen):
    qw = quantize(torch.randn(n, k, generator=gen) * 3, fmt)
    ours = compiled.dequantize_bf16(quant_linear.weight_parts(qw))
    assert torch.equal(ours.view(torch.int16), dequantize(qw, torch.bfloat16).view(torch.int16))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("m, n, k", [
    pytest.param(64, 40, 256, id="M=64: the fewest rows that take it"),
    pytest.param(100, 1100, 4096, id="N=1100 at K=4096: two blocks of weight rows, the second partial"),
    pytest.param(70, 24, 1408, id="K=1408: a partial last super-block"),
])
def test_bf16_gemm_matches_its_reference(compiled, bf16_gemm_always, fmt, m, n, k, gen):
    qw = quantize(torch.randn(n, k, generator=gen), fmt)
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
    assert quant_linear.takes_bf16_gemm(x)
    y = quantized_linear(x, qw)
    assert y.dtype == torch.bfloat16 and y.shape == (m, n)
    expected = blockquant.linear_bf16_reference(x, qw)
    # fp32 sums in another order, then one rounding to bf16: at most one bf16 step (2^-7 relative) apart, plus the
    # accumulation's own few ulps of the sum of |products|.
    magnitude = x.float().abs() @ dequantize(qw, torch.bfloat16).float().abs().T
    bound = expected.float().abs() * 2.0**-7 + 1e-5 * magnitude + 1e-30
    assert_within(y, expected, bound)
    # and it is not the integer kernels' result (their activations are quantized to 8 bits): the path was taken
    assert not torch.equal(y, blockquant.linear_q8a_reference(x, qw).to(torch.bfloat16))


def test_which_products_take_the_bf16_gemm(compiled, gen):
    rows = quant_linear.BF16_GEMM_MIN_ROWS
    bf16 = torch.zeros(rows, 64, dtype=torch.bfloat16)
    try:
        quant_linear.set_bf16_gemm("always")
        assert quant_linear.takes_bf16_gemm(bf16)
        assert not quant_linear.takes_bf16_gemm(bf16[: rows - 1])  # too few rows: dequantizing would not pay
        assert not quant_linear.takes_bf16_gemm(bf16.float())  # fp32 activations keep their precision
        quant_linear.set_bf16_gemm("never")
        assert not quant_linear.takes_bf16_gemm(bf16)
        quant_linear.set_bf16_gemm("auto")
        assert quant_linear.takes_bf16_gemm(bf16) == quant_linear.native_bf16()
        # the integer kernels' numbers where it is not taken
        qw = quantize(torch.randn(8, 64, generator=gen), "int4")
        x = torch.randn(rows, 64, generator=gen).to(torch.bfloat16)
        quant_linear.set_bf16_gemm("never")
        tight, _ = bounds(x, qw)
        assert_within(quantized_linear(x, qw).float(), blockquant.linear_q8a_reference(x, qw),
                      tight + blockquant.linear_q8a_reference(x, qw).abs() * 2.0**-8)
    finally:
        quant_linear.set_bf16_gemm(None)
    with pytest.raises(ValueError, match="use one of auto, always, never"):
        quant_linear.set_bf16_gemm("sometimes")


def test_bf16_gemm_choice_holds_without_the_compiled_kernels(monkeypatch, bf16_gemm_always, gen):
    qw = quantize(torch.randn(8, 64, generator=gen), "int8")
    x = torch.randn(quant_linear.BF16_GEMM_MIN_ROWS, 64, generator=gen).to(torch.bfloat16)
    monkeypatch.setattr(cpu_compiled, "_module", None)
    assert torch.equal(quantized_linear(x, qw), blockquant.linear_bf16_reference(x, qw))


def test_bf16_gemm_environment_variable(compiled):
    code = "from glm_kernels import quant_linear; print(quant_linear.bf16_gemm())"
    run = [sys.executable, "-c", code]
    out = subprocess.run(run, env={**os.environ, "WORKBENCH_CPU_BF16_GEMM": "never"}, capture_output=True, text=True)
    assert out.stdout.strip() == "never"
    bad = subprocess.run(run, env={**os.environ, "WORKBENCH_CPU_BF16_GEMM": "fast"}, capture_output=True, text=True)
    assert bad.returncode != 0 and "WORKBENCH_CPU_BF16_GEMM='fast': use one of auto, always, never" in bad.stderr


@pytest.mark.parametrize("formats", [("int8", "int8"), ("int4", "int4")], ids=lambda f: "+".join(f))
def test_quantized_fused_moe_busy_experts_take_the_bf16_gemm(compiled, bf16_gemm_always, formats, gen):
    """A prefill where expert 0 gets BF16_GEMM_MIN_ROWS rows and the others fewer: expert 0 runs as bf16 GEMMs,
    the others on the integer kernels, in one call; the reference makes the same choice per expert."""
    experts, dim, width, top_k = 4, 256, 96, 2
    tokens = quant_linear.BF16_GEMM_MIN_ROWS + 6
    w_gate_up = quantize(torch.randn(experts, 2 * width, dim, generator=gen) * 0.1, formats[0])
    w_down = quantize(torch.randn(experts, dim, width, generator=gen) * 0.1, formats[1])
    x = torch.randn(tokens, dim, generator=gen).to(torch.bfloat16)
    others = torch.randint(1, experts, (tokens,), generator=gen)
    ids = torch.stack([torch.zeros(tokens, dtype=torch.long), others], dim=1)  # every token: expert 0 and another
    weights = torch.rand(tokens, top_k, generator=gen)
    ours = quantized_fused_moe(x, w_gate_up, w_down, ids, weights)
    expected = quantized_fused_moe_reference(x, w_gate_up, w_down, ids, weights)
    assert_close(ours, expected, tolerance=2e-2)
    # the integer kernels' answer differs (expert 0's activations would be quantized): the GEMM ran
    quant_linear.set_bf16_gemm("never")
    integer = quantized_fused_moe(x, w_gate_up, w_down, ids, weights)
    assert not torch.equal(ours, integer)
    assert_close(integer, quantized_fused_moe_reference(x, w_gate_up, w_down, ids, weights), tolerance=2e-2)
