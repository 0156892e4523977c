"""Each Triton attention kernel equals its torch reference (computed in float64 on the CPU) across KV block
sizes, head dims 64/80/128, GQA ratios 1/4/7, ragged lengths and fp16/bf16/fp32; plus the metadata that feeds
them; the RMSNorm (+residual) and SiLU-and-mul kernels equal their layers' CPU code; and the CPU path never
imports Triton.

On a GPU the kernels are compiled for it. Without one, the same kernel tests run on CPU tensors under Triton's
interpreter (TRITON_INTERPRET=1, set by conftest.py before Triton is first imported; CI installs Triton for it): that checks
the kernels' indexing, masking and arithmetic, not their speed or their compilation for a card. Tests of the
CUDA dispatch (flash attention, the layers on CUDA tensors) need the GPU."""

import importlib.util
import subprocess
import sys

import pytest
import torch

from vlserve.kernels.kv_store import store_kv_ref
from vlserve.kernels.paged_attention import paged_attention_ref, varlen_attention_ref
from vlserve.model.layers.activation import SiluAndMul
from vlserve.model.layers.attention import AttentionMetadata, paged_attention, varlen_attention
from vlserve.model.layers.norm import RMSNorm

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: conftest.py has set TRITON_INTERPRET=1
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                   reason="CUDA dispatch (flash attention, layers on CUDA tensors): run on a GPU")
requires_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                     reason="needs Triton: compiled on a GPU, or its interpreter on the CPU "
                                            "(pip install triton, as .ci/run does)")


def skip_interpreted_bf16(dtype: torch.dtype) -> None:
    if DEVICE == "cpu" and dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter computes through numpy, which has no bfloat16: bf16 runs on a GPU")
KV_HEADS = 2
# relative error ||out - ref|| / ||ref|| allowed per dtype (fp32 dots run in IEEE precision, not tf32)
TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1e-2}
F16, B16, F32 = torch.float16, torch.bfloat16, torch.float32
# (block_size, head_dim, gqa, dtype): every value of each axis, in varied pairings
CASES = [(16, 128, 7, B16), (16, 80, 4, F16), (32, 64, 1, F32), (32, 128, 4, B16), (16, 64, 7, F16),
         (48, 80, 1, B16), (32, 80, 7, F32), (16, 128, 1, F16)]


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    return ((out - ref).norm() / ref.norm()).item()


def paged_step(query_lens, context_lens, block_size, head_dim, gqa, dtype, gen):
    """A random cache with each sequence's blocks scattered in it, and the step's metadata and queries."""
    blocks = [-(-c // block_size) for c in context_lens]
    order = torch.randperm(sum(blocks) + 3, generator=gen).tolist()  # 3 blocks nobody owns
    tables, at = [], 0
    for n in blocks:
        tables.append(order[at:at + n])
        at += n
    slots = [tables[i][p // block_size] * block_size + p % block_size
             for i, (n, c) in enumerate(zip(query_lens, context_lens)) for p in range(c - n, c)]
    meta = AttentionMetadata.from_lengths(query_lens, context_lens, tables, slots)
    cache = torch.randn(2, len(order), block_size, KV_HEADS, head_dim, generator=gen).to(dtype)
    q = torch.randn(sum(query_lens), KV_HEADS * gqa, head_dim, generator=gen).to(dtype)
    return q, cache, meta


def reference(q, cache, meta, scale):
    meta = meta.to(torch.device("cpu"))
    return paged_attention_ref(q.double().cpu(), cache.double().cpu(), meta.cu_seqlens, meta.context_lens,
                               meta.block_tables, scale)


@requires_triton
@pytest.mark.parametrize("dtype", [F16, B16, F32])
def test_store_kv_equals_reference(dtype):
    skip_interpreted_bf16(dtype)
    from vlserve.kernels.kv_store_triton import store_kv
    gen = torch.Generator().manual_seed(0)
    kv = torch.randn(37, 3 * KV_HEADS, 80, generator=gen).to(dtype)
    k, v = kv[:, :KV_HEADS], kv[:, KV_HEADS:2 * KV_HEADS]  # strided views, as the QKV projection's split leaves
    slots = torch.randperm(9 * 16, generator=gen)[:37]
    cache = torch.full((2, 9, 16, KV_HEADS, 80), float("nan"), dtype=dtype)
    expected = cache.clone()
    store_kv_ref(k, v, expected, slots)
    got = cache.to(DEVICE)
    store_kv(k.to(DEVICE), v.to(DEVICE), got, slots.to(DEVICE))
    assert torch.equal(got.cpu().nan_to_num(), expected.nan_to_num())


@requires_triton
@pytest.mark.parametrize("num_splits", [None, 1, 5])
@pytest.mark.parametrize("block_size,head_dim,gqa,dtype", CASES)
def test_paged_decode_equals_reference(block_size, head_dim, gqa, dtype, num_splits):
    skip_interpreted_bf16(dtype)
    from vlserve.kernels.paged_attention_triton import paged_decode
    gen = torch.Generator().manual_seed(block_size + head_dim + gqa)
    context_lens = [1, 15, 16, 17, 250, 701]  # ragged: inside, at and across block edges
    q, cache, meta = paged_step([1] * len(context_lens), context_lens, block_size, head_dim, gqa, dtype, gen)
    scale = head_dim**-0.5
    m = meta.to(torch.device(DEVICE))
    out = paged_decode(q.to(DEVICE), cache.to(DEVICE), m.context_lens, m.block_tables, m.max_context_len, scale,
                       num_splits)
    assert rel_error(out, reference(q, cache, meta, scale)) < TOLERANCE[dtype]


@requires_triton
@pytest.mark.parametrize("block_size,head_dim,gqa,dtype", CASES)
def test_prefix_prefill_equals_reference(block_size, head_dim, gqa, dtype):
    skip_interpreted_bf16(dtype)
    from vlserve.kernels.paged_attention_triton import prefill_attention
    gen = torch.Generator().manual_seed(block_size * head_dim + gqa)
    # chunks over cached prefixes of every kind, a fresh prompt, decode rows, and a chunk longer than a tile
    query_lens = [5, 1, 33, 16, 1, 130, 70]
    context_lens = [5, 40, 33, 48, 300, 400, 71]
    q, cache, meta = paged_step(query_lens, context_lens, block_size, head_dim, gqa, dtype, gen)
    scale = head_dim**-0.5
    m = meta.to(torch.device(DEVICE))
    cache_d = cache.to(DEVICE)
    out = prefill_attention(q.to(DEVICE), cache_d[0], cache_d[1], m.cu_seqlens, scale,
                            context_lens=m.context_lens, block_tables=m.block_tables)
    assert rel_error(out, reference(q, cache, meta, scale)) < TOLERANCE[dtype]


@requires_triton
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("head_dim,gqa,dtype", [(80, 1, F16), (128, 7, B16), (64, 4, F32), (80, 7, F32)])
def test_contiguous_prefill_equals_reference(head_dim, gqa, dtype, causal):
    """The Triton path for fresh tokens where flash attention is missing (fp32, cards before sm_80)."""
    skip_interpreted_bf16(dtype)
    from vlserve.kernels.paged_attention_triton import prefill_attention
    gen = torch.Generator().manual_seed(head_dim + gqa)
    lengths = [1, 64, 200, 17, 96]
    meta = AttentionMetadata.from_lengths(lengths)
    q, k, v = (torch.randn(sum(lengths), n, head_dim, generator=gen).to(dtype)
               for n in (KV_HEADS * gqa, KV_HEADS, KV_HEADS))
    scale = head_dim**-0.5
    out = prefill_attention(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), meta.cu_seqlens.to(DEVICE), scale, causal)
    ref = varlen_attention_ref(q.double(), k.double(), v.double(), meta.cu_seqlens, causal, scale)
    assert rel_error(out, ref) < TOLERANCE[dtype]


@requires_cuda
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("head_dim,gqa,dtype", [(80, 1, F16), (128, 7, B16), (64, 4, F32)])
def test_varlen_attention_equals_reference(head_dim, gqa, dtype, causal):
    """The dispatcher on CUDA: torch's flash varlen attention in fp16/bf16, Triton in fp32."""
    gen = torch.Generator().manual_seed(head_dim * gqa)
    lengths = [3, 128, 77, 256]
    meta = AttentionMetadata.from_lengths(lengths)
    q, k, v = (torch.randn(sum(lengths), n, head_dim, generator=gen).to(dtype)
               for n in (KV_HEADS * gqa, KV_HEADS, KV_HEADS))
    scale = head_dim**-0.5
    out = varlen_attention(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), meta, causal, scale)
    ref = varlen_attention_ref(q.double(), k.double(), v.double(), meta.cu_seqlens, causal, scale)
    assert rel_error(out, ref) < TOLERANCE[dtype]


STEPS = {  # query lens, context lens: which kernel the dispatcher picks
    "decode": ([1, 1, 1], [9, 40, 130]),
    "fresh": ([9, 40, 3], [9, 40, 3]),
    "prefix": ([1, 30, 7], [50, 30, 19]),
}


@requires_cuda
@pytest.mark.parametrize("step", sorted(STEPS))
@pytest.mark.parametrize("dtype", [B16, F32])
def test_paged_attention_on_cuda_equals_cpu(step, dtype):
    """Store then attend, as a language-model layer does, on each kernel path; v a strided view."""
    query_lens, context_lens = STEPS[step]
    gen = torch.Generator().manual_seed(len(step))
    q, cache, meta = paged_step(query_lens, context_lens, 16, 128, 4, dtype, gen)
    kv = torch.randn(q.shape[0], 2, KV_HEADS, 128, generator=gen).to(dtype)
    k, v = kv.unbind(1)
    expected_cache = cache.double()
    expected = paged_attention(q.double(), k.double(), v.double(), expected_cache, meta, 128**-0.5)
    got_cache = cache.to(DEVICE)
    got = paged_attention(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), got_cache, meta.to(torch.device(DEVICE)),
                          128**-0.5)
    assert rel_error(got, expected) < TOLERANCE[dtype]
    assert torch.equal(got_cache.cpu(), expected_cache.to(dtype))


def test_metadata_from_lengths():
    meta = AttentionMetadata.from_lengths([3, 1, 2], context_lens=[3, 17, 2], block_tables=[[4], [0, 7], [2]],
                                          slots=[64, 65, 66, 128, 32, 33])
    assert meta.cu_seqlens.tolist() == [0, 3, 4, 6] and meta.cu_seqlens.dtype == torch.int32
    assert meta.block_tables.tolist() == [[4, 0], [0, 7], [2, 0]] and meta.block_tables.dtype == torch.int32
    assert meta.context_lens.tolist() == [3, 17, 2]
    assert (meta.max_seqlen, meta.max_context_len, meta.has_prefix) == (3, 17, True)
    fresh = AttentionMetadata.from_lengths([3, 2], context_lens=[3, 2], block_tables=[[1], [2]], slots=list(range(5)))
    assert not fresh.has_prefix
    plain = AttentionMetadata.from_lengths([5, 0, 2])
    assert plain.cu_seqlens.tolist() == [0, 5, 5, 7] and plain.max_seqlen == 5 and plain.block_tables is None
    assert plain.to(torch.device("cpu")) is plain


CPU_STEP = """
import sys, torch
from vlserve.model.layers.activation import SiluAndMul
from vlserve.model.layers.attention import AttentionMetadata, paged_attention, varlen_attention
from vlserve.model.layers.norm import RMSNorm
meta = AttentionMetadata.from_lengths([2, 1], context_lens=[2, 5], block_tables=[[0], [1]], slots=[0, 1, 20])
q, kv = torch.randn(3, 4, 16), torch.randn(3, 2, 16)
cache = torch.zeros(2, 2, 16, 2, 16)
paged_attention(q, kv, kv, cache, meta, 0.25)
varlen_attention(q, kv, kv, meta, True, 0.25)
RMSNorm(16)(q[:, 0], kv[:, 0])
SiluAndMul()(q[:, 0])
print(sorted(m for m in sys.modules if m.startswith("vlserve") and m.endswith("_triton")))
"""


def test_cpu_path_never_imports_triton():
    """CI has no Triton: the CPU attention, norm and activation paths must work without importing it."""
    out = subprocess.run([sys.executable, "-c", CPU_STEP], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


ROWS, WIDTHS = [1, 7, 257], [64, 1280, 3584, 8192]
# elementwise (rtol, atol): kernel and CPU reference may round an element to neighbouring values (about 2 ulps)
CLOSE = {F32: (1e-5, 1e-5), F16: (2e-3, 1e-3), B16: (2e-2, 1e-2)}


def norm_case(rows: int, hidden: int, dtype: torch.dtype):
    """x and residual with row scales from 1e-4 to 10 (the small rows put eps to work), and a random weight."""
    gen = torch.Generator().manual_seed(rows * hidden)
    scale = 10 ** torch.empty(rows, 1).uniform_(-4, 1, generator=gen)
    x, residual = ((torch.randn(rows, hidden, generator=gen) * scale).to(dtype) for _ in range(2))
    norm = RMSNorm(hidden).to(dtype)
    norm.weight.copy_(torch.randn(hidden, generator=gen))
    return x, residual, norm


def assert_close(got: torch.Tensor, expected: torch.Tensor):
    rtol, atol = CLOSE[expected.dtype]
    torch.testing.assert_close(got.cpu(), expected, rtol=rtol, atol=atol)


@requires_triton
@pytest.mark.parametrize("dtype", [F16, B16, F32])
@pytest.mark.parametrize("hidden", WIDTHS)
@pytest.mark.parametrize("rows", ROWS)
def test_rms_norm_equals_reference(rows, hidden, dtype):
    skip_interpreted_bf16(dtype)
    from vlserve.kernels.rms_norm_triton import rms_norm
    x, _, norm = norm_case(rows, hidden, dtype)
    expected = norm(x)
    assert_close(rms_norm(x.to(DEVICE), norm.weight.to(DEVICE), norm.eps), expected)


@requires_triton
@pytest.mark.parametrize("dtype", [F16, B16, F32])
@pytest.mark.parametrize("hidden", WIDTHS)
@pytest.mark.parametrize("rows", ROWS)
def test_fused_add_rms_norm_equals_reference(rows, hidden, dtype):
    """The sum lands in the caller's residual tensor, rounded exactly as the reference rounds it; x stays."""
    skip_interpreted_bf16(dtype)
    from vlserve.kernels.rms_norm_triton import fused_add_rms_norm
    x, residual, norm = norm_case(rows, hidden, dtype)
    expected, expected_residual = norm(x, residual)
    x_d, residual_d = x.to(DEVICE), residual.to(DEVICE)
    got = fused_add_rms_norm(x_d, residual_d, norm.weight.to(DEVICE), norm.eps)
    assert torch.equal(residual_d.cpu(), expected_residual)
    assert torch.equal(x_d.cpu(), x)
    assert_close(got, expected)


@requires_triton
@pytest.mark.parametrize("dtype", [F16, B16])
def test_rms_norm_promotes_like_reference(dtype):
    """An fp32 weight over fp16/bf16 activations gives fp32 out, as torch's promotion does; 3-D input."""
    skip_interpreted_bf16(dtype)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 1280, generator=gen).to(dtype)
    norm = RMSNorm(1280)
    norm.weight.copy_(torch.randn(1280, generator=gen))
    from vlserve.kernels.rms_norm_triton import rms_norm
    expected = norm(x)
    got = rms_norm(x.to(DEVICE), norm.weight.to(DEVICE), norm.eps)
    assert got.dtype == torch.float32
    rtol, atol = CLOSE[dtype]
    torch.testing.assert_close(got.cpu(), expected, rtol=rtol, atol=atol)


@requires_triton
@pytest.mark.parametrize("dtype", [F16, B16, F32])
@pytest.mark.parametrize("width", WIDTHS + [3420, 18944])  # the vision and 7B MLP widths too
@pytest.mark.parametrize("rows", ROWS)
def test_silu_and_mul_equals_reference(rows, width, dtype):
    skip_interpreted_bf16(dtype)
    gen = torch.Generator().manual_seed(rows + width)
    x = (torch.randn(rows, 2 * width, generator=gen) * 4).to(dtype)  # gates reach both tails of SiLU
    from vlserve.kernels.activation_triton import silu_and_mul
    expected = SiluAndMul()(x)
    assert_close(silu_and_mul(x.to(DEVICE)), expected)
