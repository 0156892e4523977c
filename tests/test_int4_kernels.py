"""The Triton 4-bit matmul (vlserve/kernels/int4_matmul_triton.py) equals x @ W + bias with W dequantized by the
torch path (awq.dequantize, gptq.dequantize) and the product taken in float64: AWQ, GPTQ with the original and
v2 zero points and symmetric, groups of 32/64/128 and odd group counts, N not a multiple of a tile, every kernel
(GEMV, split-K GEMM, GEMM) split and not, with and without bias, 3-D and strided inputs; and a 4-bit layer's CUDA
forward equals its CPU forward, which never imports Triton.

On a GPU the kernels are compiled for it (fp16, bf16, and the 7B's shapes up to M = 8192). Without one they run on
CPU tensors under Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py) on small shapes, in fp16 and fp32:
that checks indexing, masking and arithmetic, not speed or compilation."""

import functools
import importlib.util
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from vlserve.model.layers import awq, gptq
from vlserve.model.layers.linear import ColumnParallelLinear, RowParallelLinear
from vlserve.model.quantization import QuantConfig

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: conftest.py has set TRITON_INTERPRET=1
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="the layers on CUDA tensors: run on a GPU")
requires_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                     reason="needs Triton: compiled on a GPU, or its interpreter on the CPU "
                                            "(pip install triton, as .ci/run does)")
F16, B16, F32 = torch.float16, torch.bfloat16, torch.float32
DTYPES = [F16, B16] if DEVICE == "cuda" else [F16, F32]  # the interpreter computes through numpy: no bf16
# relative error ||out - ref|| / ||ref||: the GEMM rounds each weight to x's dtype, and y is rounded once
TOLERANCE = {F32: 1e-5, F16: 3e-3, B16: 1e-2}
# (method, zero_offset, symmetric)
FORMATS = {"awq": ("awq", 0, False), "gptq": ("gptq", 1, False), "gptq_v2": ("gptq", 0, False),
           "gptq_sym": ("gptq", 1, True)}
# (K, N, group): 3, 5 and 3 groups; N = 72, 40, 24: never a whole tile
SMALL = [(192, 72, 64), (160, 40, 32), (384, 24, 128)]
ROWS = [1, 2, 3, 8, 17, 40]  # GEMV (a program a row), split-K GEMM (BLOCK_M 16, 32, 64)
# the 7B's qkv and down projections (group 128), and 231 groups of 32 with N = 8 * 169 (odd everywhere)
BIG = [(3584, 4608, 128), (18944, 3584, 128), (7392, 1352, 32)] if DEVICE == "cuda" else []
BIG_ROWS = [1, 2, 16, 64, 300, 8192]


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().to(ref.device), ref.double()
    return ((out - ref).norm() / ref.norm()).item()


def make_layer(fmt: str, k: int, n: int, group: int, gen: torch.Generator, device: str = "cpu") -> dict:
    """Random (n, k) weight quantized in `fmt`, on `device`, and the dense (k, n) weight it stands for (fp64)."""
    method, zero_offset, sym = FORMATS[fmt]
    weight = torch.randn(n, k, generator=gen).to(device)
    if method == "awq":
        qweight, qzeros, scales = awq.quantize(weight, group)
        dense = awq.dequantize(qweight, qzeros, scales.double())
    else:
        qweight, qzeros, scales, _ = gptq.quantize(weight, group, sym, zero_offset)
        dense = gptq.dequantize(qweight, qzeros, scales.double(), zero_offset)
    return dict(qweight=qweight, qzeros=qzeros, scales=scales, method=method, group_size=group,
                zero_offset=zero_offset, dense=dense)


def run(x: torch.Tensor, layer: dict, bias: torch.Tensor | None, config=None) -> torch.Tensor:
    from vlserve.kernels.int4_matmul_triton import int4_linear
    return int4_linear(x.to(DEVICE), layer["qweight"].to(DEVICE), layer["qzeros"].to(DEVICE),
                       layer["scales"].to(DEVICE), None if bias is None else bias.to(DEVICE), layer["method"],
                       layer["group_size"], layer["zero_offset"], config=config)


def reference(x: torch.Tensor, layer: dict, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ W (+ bias) in float64, on x's device (the GPU for the big shapes)."""
    y = x.double() @ layer["dense"].to(x.device)
    return y if bias is None else y + bias.double()


@requires_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("k,n,group", SMALL)
@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_int4_linear_equals_dequantized_matmul(fmt, k, n, group, m, dtype):
    gen = torch.Generator().manual_seed(k + n + m)
    layer = make_layer(fmt, k, n, group, gen)
    x = torch.randn(m, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype) if m % 2 else None  # odd rows with a bias, even without
    out = run(x, layer, bias)
    assert out.shape == (m, n) and out.dtype == dtype
    assert rel_error(out, reference(x, layer, bias)) < TOLERANCE[dtype]


@requires_triton
@pytest.mark.parametrize("m", [1, 8, 40])
@pytest.mark.parametrize("fmt", ["awq", "gptq"])
def test_every_split_gives_the_same_product(fmt, m):
    """Unsplit (y written directly), split at every group or K tile, and unequal splits (5 units: 3 and 2)."""
    from vlserve.kernels.int4_matmul_triton import pick_config
    gen = torch.Generator().manual_seed(m)
    layer = make_layer(fmt, 160, 56, 32, gen)  # 5 groups of 32, and 5 K tiles of 32 in the GEMM
    x = torch.randn(m, 160, generator=gen)
    bias = torch.randn(56, generator=gen)
    expected = reference(x, layer, bias)
    base = pick_config(m, 56, 160, 32, layer["method"], torch.device(DEVICE))
    for splits in (1, 2, 5):
        out = run(x, layer, bias, replace(base, splits=splits))
        assert rel_error(out, expected) < TOLERANCE[F32], splits


@requires_triton
@pytest.mark.parametrize("fmt", ["awq", "gptq_v2"])
def test_leading_dims_strides_and_empty_batches(fmt):
    """x (2, 5, K) gives (2, 5, N); a strided x (a column slice) reads right; M = 0 gives an empty (0, N)."""
    gen = torch.Generator().manual_seed(7)
    layer = make_layer(fmt, 128, 48, 64, gen)
    x = torch.randn(2, 5, 128, generator=gen)
    out = run(x, layer, None)
    assert out.shape == (2, 5, 48)
    assert rel_error(out, reference(x, layer, None)) < TOLERANCE[F32]
    wide = torch.randn(3, 200, generator=gen)
    assert rel_error(run(wide[:, 40:168], layer, None), reference(wide[:, 40:168], layer, None)) < TOLERANCE[F32]
    assert run(torch.empty(0, 128), layer, None).shape == (0, 48)
    assert run(torch.empty(4, 0, 128), layer, None).shape == (4, 0, 48)


@functools.cache
def big_layer(fmt: str, k: int, n: int, group: int) -> dict:
    return make_layer(fmt, k, n, group, torch.Generator().manual_seed(k), DEVICE)


@requires_triton
@pytest.mark.skipif(DEVICE != "cuda", reason="the 7B's shapes: compiled on a GPU (too slow for the interpreter)")
@pytest.mark.parametrize("dtype", [F16, B16])
@pytest.mark.parametrize("m", BIG_ROWS)
@pytest.mark.parametrize("k,n,group", BIG)
@pytest.mark.parametrize("fmt", ["awq", "gptq"])
def test_int4_linear_on_the_7bs_shapes(fmt, k, n, group, m, dtype):
    layer = big_layer(fmt, k, n, group)
    gen = torch.Generator(DEVICE).manual_seed(m)
    x = torch.randn(m, k, generator=gen, device=DEVICE).to(dtype)
    bias = torch.randn(n, generator=gen, device=DEVICE).to(dtype) if m % 2 else None
    assert rel_error(run(x, layer, bias), reference(x, layer, bias)) < TOLERANCE[dtype]


@requires_cuda
@pytest.mark.parametrize("m", [1, 16])
def test_int4_linear_replays_in_a_cuda_graph(m):
    """Captured and replayed (no host sync, no allocation outside the graph's pool), it gives the eager result."""
    gen = torch.Generator().manual_seed(m)
    layer = make_layer("awq", 3584, 4608, 128, gen, DEVICE)
    x = torch.randn(m, 3584, generator=gen).to(B16).to(DEVICE)
    expected = run(x, layer, None)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run(x, layer, None)
    x.copy_(torch.randn(m, 3584, generator=gen).to(B16))
    graph.replay()
    assert torch.equal(out, run(x, layer, None)) and not torch.equal(out, expected)


QUANTS = [QuantConfig("awq", 32), QuantConfig("gptq", 32, 1), QuantConfig("gptq", 64, 0)]


def quantized_layers(quant: QuantConfig, gen: torch.Generator) -> list:
    """A column- and a row-parallel 4-bit layer (one rank), with bias, their tensors from random weights."""
    layers = [ColumnParallelLinear(192, 80, bias=True, tp=(0, 1), quant=quant),
              RowParallelLinear(192, 80, bias=True, tp=(0, 1), quant=quant)]
    for layer in layers:
        weight = torch.randn(80, 192, generator=gen)
        if quant.method == "awq":
            tensors = dict(zip(("qweight", "qzeros", "scales"), awq.quantize(weight, quant.group_size)))
        else:
            tensors = dict(zip(("qweight", "qzeros", "scales", "g_idx"),
                               gptq.quantize(weight, quant.group_size, zero_offset=quant.zero_offset)))
        with torch.no_grad():
            for name, tensor in tensors.items():
                getattr(layer, name).copy_(tensor)
            layer.bias.copy_(torch.randn(80, generator=gen))
    return layers


@requires_cuda
@pytest.mark.parametrize("quant", QUANTS, ids=lambda q: f"{q.method}{q.group_size}-{q.zero_offset}")
def test_quantized_layers_on_cuda_equal_their_cpu_forward(quant):
    gen = torch.Generator().manual_seed(quant.group_size)
    for layer in quantized_layers(quant, gen):
        x = torch.randn(3, 7, 192, generator=gen)
        expected = layer(x)
        assert rel_error(layer.to("cuda")(x.cuda()), expected) < TOLERANCE[F32]
        layer.to(B16)  # the scales in the model's dtype, as a bf16 model holds them
        assert rel_error(layer(x.cuda().to(B16)), expected) < TOLERANCE[B16]


CPU_FORWARD = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from test_int4_kernels import QUANTS, quantized_layers
for quant in QUANTS:
    for layer in quantized_layers(quant, torch.Generator().manual_seed(0)):
        layer(torch.randn(2, 192))
print(sorted(m for m in sys.modules if m.startswith("vlserve") and m.endswith("_triton")))
"""


def test_cpu_forward_of_quantized_layers_never_imports_triton():
    out = subprocess.run([sys.executable, "-c", CPU_FORWARD, str(Path(__file__).parent)], capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == "[]"
