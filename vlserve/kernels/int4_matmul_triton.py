"""Triton 4-bit matmul: y = x @ W (+ bias) straight from AWQ's or GPTQ's packed tensors (layers/awq.py,
layers/gptq.py); each tile of W is dequantized in registers and W itself is never written to memory.

- GEMV (M <= GEMV_MAX_M rows, decoding 1 or 2 sequences): one row of x per program, fp32 FMAs, no tl.dot. A
  nibble becomes a float with a mask and an OR (the bits of 2**23 + q * 16**pos, `_nibble`), the zero point and
  2**23 come off in one subtraction and the scale is applied once per group: about three ALU operations per
  weight, to keep up with HBM. The packed words are read along the rows they are stored in (N / 8 words a row for
  AWQ, N for GPTQ), and K is split at group boundaries so that a batch-1 3584 x 18944 layer runs hundreds of
  programs.
- GEMM (every other M): tl.dot tiles, each dequantized (BLOCK_K, BLOCK_N) tile rounded to x's dtype as the dense
  path rounds its weight; up to SPLIT_MAX_M rows K is split too, so that small batches fill the card.
Split programs write fp32 partial sums that a second kernel adds in a fixed order (deterministic), adding the bias
and rounding to x's dtype; unsplit programs write y themselves. Block sizes and splits come from the shapes alone
(plain Python: no autotuning, no host sync), so a CUDA graph captures the calls.

Seen on an H100 while tuning (an earlier block-size pick; no committed result yet, see docs/benchmarks.md):
batch 1, the 7B's four projections together run 1.65x (AWQ) and 1.8x (GPTQ) faster than bf16 F.linear, the big
ones at 1.3 to 1.6 TB/s of packed weight, the small ones (qkv, o) held back by the second kernel and the launch;
the tl.dot path is slower than bf16 (0.5x to 0.9x at M 2 to 16, 0.3x at M 1024 to 4096): its dequantization,
not the MMA, bounds it.

Contract: x (..., K) fp16, bf16 or fp32; qweight and qzeros int32 and scales of any float dtype, in the layouts of
layers/awq.py or layers/gptq.py (GPTQ without act-order: g_idx is not read); K a multiple of the group size, N of
8, the group size a multiple of 16. Returns (..., N) in x's dtype. Plain Triton ops, nothing Hopper-only
(compiled and tested on sm_90 only). GPU only: import this module only where triton is installed (tests run
it on CPU tensors under TRITON_INTERPRET=1)."""

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

GEMV_MAX_M = 2  # rows up to which the FMA GEMV runs, one program a row (tl.dot pads M to 16)
SPLIT_MAX_M = 64  # rows up to which the GEMM may split K
MAGIC = tl.constexpr(8388608.0)  # 2**23, the float whose bits are 0x4B000000


@triton.jit
def _nibble(low, high, J: tl.constexpr):
    """Nibble J (bits 4J..4J+3) of int32 words as the fp32 2**23 + q * 16**POS, exactly, from low = word |
    0x4B000000 and high = (word >> 12) | 0x4B000000 (`_magic`): POS = J for J < 5, masked in place out of `low`;
    POS = J - 3 above, out of `high`. One AND per nibble: (a | M) & (b | M) = (a & b) | M."""
    if J < 5:
        bits = low & ((0xF << (4 * J)) | 0x4B000000)
    else:
        bits = high & ((0xF << (4 * J - 12)) | 0x4B000000)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _magic(word):
    """(low, high) of `_nibble`."""
    return word | 0x4B000000, (word >> 12) | 0x4B000000


@triton.jit
def _awq_nibbles(word):
    """(R, C) AWQ words -> (R, 8C) nibble floats (`_nibble`) in output order: output 8c + i is nibble
    i // 2 + 4 (i % 2) of word c (AWQ_REVERSE). Joins and a reshape, which stay in registers."""
    low, high = _magic(word)
    lo = tl.join(tl.join(_nibble(low, high, 0), _nibble(low, high, 2)),
                 tl.join(_nibble(low, high, 1), _nibble(low, high, 3)))
    hi = tl.join(tl.join(_nibble(low, high, 4), _nibble(low, high, 6)),
                 tl.join(_nibble(low, high, 5), _nibble(low, high, 7)))
    f = tl.join(lo, hi)
    return tl.reshape(f, (f.shape[0], 8 * f.shape[1]))


@triton.jit
def _awq_group(qz_ptr, s_ptr, grp, n, N, N8):
    """Group `grp`'s terms for AWQ outputs n as _awq_nibbles leaves them: the float 2**23 + z * 16**pos to
    subtract, and scale / 16**pos to multiply by."""
    nib = (n % 8) // 2 + (n % 2) * 4
    z = (tl.load(qz_ptr + grp * N8 + n // 8, mask=n < N, other=0) >> (4 * nib)) & 0xF
    pow16 = (1 << (4 * tl.where(nib < 5, nib, nib - 3))).to(tl.float32)
    scale = tl.load(s_ptr + grp * N + n, mask=n < N, other=0.0).to(tl.float32)
    return z.to(tl.float32) * pow16 + MAGIC, scale / pow16


@triton.jit
def _gptq_zeros(qz_ptr, grp, n, N, N8, zero_offset):
    """Group `grp`'s zero points of GPTQ outputs n, as fp32."""
    z = (tl.load(qz_ptr + grp * N8 + n // 8, mask=n < N, other=0) >> ((n % 8) * 4)) & 0xF
    return (z + zero_offset).to(tl.float32)


@triton.jit
def _columns(pid_n, BLOCK_N: tl.constexpr):
    """The tile's outputs and their AWQ words. Loads mask both (n < N, words < N8: N and N8 passed apart, so
    that Triton sees when they are multiples of 16 and reads whole vectors)."""
    return pid_n * BLOCK_N + tl.arange(0, BLOCK_N), pid_n * (BLOCK_N // 8) + tl.arange(0, BLOCK_N // 8)


@triton.jit
def _store(acc, out_ptr, bias_ptr, rows, n, M, N, split, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """acc (R, C) fp32 for `rows` x outputs n: the split's partial sums, or y (+ bias) in out's dtype."""
    mask = (rows < M)[:, None] & (n < N)[None, :]
    offsets = rows.to(tl.int64)[:, None] * N + n[None, :]
    if SPLIT:
        tl.store(out_ptr + split.to(tl.int64) * M * N + offsets, acc, mask=mask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + n, mask=n < N, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + offsets, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _awq_gemv_group(x_row, qw_ptr, grp, offset, words, N8, GROUP: tl.constexpr, BLOCK_K: tl.constexpr):
    """(BLOCK_K, BLOCK_N) sums over group `grp` of (q - z) * 16**pos * x, one per K slot and output."""
    acc = tl.zeros((BLOCK_K, 8 * words.shape[0]), dtype=tl.float32)
    for t in range(GROUP // BLOCK_K):
        k = grp * GROUP + t * BLOCK_K + tl.arange(0, BLOCK_K)
        word = tl.load(qw_ptr + k[:, None] * N8 + words[None, :], mask=(words < N8)[None, :], other=0)
        x = tl.load(x_row + k).to(tl.float32)
        acc += (_awq_nibbles(word) - offset[None, :]) * x[:, None]
    return acc


@triton.jit
def _gptq_term(low, high, J: tl.constexpr, offsets, x8):
    """Nibble J's (q - z) * x for packed rows r: input 8r + J. Its float is scaled by 16**POS (see _nibble), so
    x is divided by that, exactly, instead."""
    pos: tl.constexpr = J if J < 5 else J - 3
    offset = offsets[0] if pos == 0 else offsets[1] if pos == 1 else offsets[2] if pos == 2 else \
        offsets[3] if pos == 3 else offsets[4]
    x = tl.load(x8 + J).to(tl.float32) * (1.0 / (1 << (4 * pos)))
    return (_nibble(low, high, J) - offset[None, :]) * x[:, None]


@triton.jit
def _gptq_gemv_group(x_row, qw_ptr, grp, zeros, n, N, GROUP: tl.constexpr, BLOCK_K: tl.constexpr):
    """(BLOCK_K / 8, BLOCK_N) sums over group `grp` of (q - z) * x, one per packed row and output."""
    offsets = (zeros + MAGIC, zeros * 16.0 + MAGIC, zeros * 256.0 + MAGIC, zeros * 4096.0 + MAGIC,
               zeros * 65536.0 + MAGIC)
    acc = tl.zeros((BLOCK_K // 8, n.shape[0]), dtype=tl.float32)
    for t in range(GROUP // BLOCK_K):
        r = (grp * GROUP + t * BLOCK_K) // 8 + tl.arange(0, BLOCK_K // 8)
        low, high = _magic(tl.load(qw_ptr + r[:, None] * N + n[None, :], mask=(n < N)[None, :], other=0))
        x8 = x_row + r * 8
        for j in tl.static_range(8):
            acc += _gptq_term(low, high, j, offsets, x8)
    return acc


@triton.jit
def _gemv_kernel(x_ptr, qw_ptr, qz_ptr, s_ptr, bias_ptr, out_ptr, M, N, N8, stride_xm, zero_offset, groups_per_split,
                 num_groups, GROUP: tl.constexpr, AWQ: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Row program_id(0) of x times outputs [BLOCK_N * program_id(1), +BLOCK_N) over the groups of split
    program_id(2): per group unscaled sums, then one multiply by the scale per K slot and output."""
    row, split = tl.program_id(0), tl.program_id(2)
    n, words = _columns(tl.program_id(1), BLOCK_N)
    x_row = x_ptr + row.to(tl.int64) * stride_xm
    total = tl.zeros((BLOCK_K if AWQ else BLOCK_K // 8, BLOCK_N), dtype=tl.float32)
    first = split * groups_per_split
    for grp in range(first, tl.minimum(first + groups_per_split, num_groups)):
        if AWQ:
            offset, scale = _awq_group(qz_ptr, s_ptr, grp, n, N, N8)
            total += _awq_gemv_group(x_row, qw_ptr, grp, offset, words, N8, GROUP, BLOCK_K) * scale[None, :]
        else:
            zeros = _gptq_zeros(qz_ptr, grp, n, N, N8, zero_offset)
            scale = tl.load(s_ptr + grp * N + n, mask=n < N, other=0.0).to(tl.float32)
            total += _gptq_gemv_group(x_row, qw_ptr, grp, zeros, n, N, GROUP, BLOCK_K) * scale[None, :]
    _store(tl.sum(total, axis=0)[None, :], out_ptr, bias_ptr, row + tl.arange(0, 1), n, M, N, split, SPLIT,
           HAS_BIAS)


@triton.jit
def _dequant_tile(qw_ptr, qz_ptr, s_ptr, k, grp, n, words, N, N8, zero_offset, AWQ: tl.constexpr):
    """W[k, n] in fp32, (BLOCK_K, BLOCK_N), every row k in group `grp`."""
    if AWQ:
        offset, scale = _awq_group(qz_ptr, s_ptr, grp, n, N, N8)
        f = _awq_nibbles(tl.load(qw_ptr + k[:, None] * N8 + words[None, :], mask=(words < N8)[None, :], other=0))
    else:
        offset = _gptq_zeros(qz_ptr, grp, n, N, N8, zero_offset) + MAGIC
        scale = tl.load(s_ptr + grp * N + n, mask=n < N, other=0.0).to(tl.float32)
        # each packed row is read for each of its 8 inputs (from L1)
        word = tl.load(qw_ptr + (k // 8)[:, None] * N + n[None, :], mask=(n < N)[None, :], other=0)
        f = (((word >> ((k % 8) * 4)[:, None]) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True)
    return (f - offset[None, :]) * scale[None, :]


@triton.jit
def _tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile) of program `pid`: GROUP_M row tiles sweep the columns together, so that the
    weight tiles they share are read while still in L2."""
    tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    width = GROUP_M * tiles_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(tiles_m - first_m, GROUP_M)
    return first_m + (pid % width) % size_m, (pid % width) // size_m


@triton.jit
def _gemm_kernel(x_ptr, qw_ptr, qz_ptr, s_ptr, bias_ptr, out_ptr, M, N, N8, stride_xm, zero_offset, tiles_per_split,
                 k_tiles, GROUP: tl.constexpr, AWQ: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr,
                 PRECISION: tl.constexpr):
    """Output tile program_id(0) over the K tiles of split program_id(1), fp32 accumulator."""
    pid_m, pid_n = _tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    split = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n, words = _columns(pid_n, BLOCK_N)
    x_rows = x_ptr + tl.minimum(rows, M - 1).to(tl.int64)[:, None] * stride_xm  # rows past M read the last
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    first = split * tiles_per_split
    for t in range(first, tl.minimum(first + tiles_per_split, k_tiles)):
        k = t * BLOCK_K + tl.arange(0, BLOCK_K)
        a = tl.load(x_rows + k[None, :])
        w = _dequant_tile(qw_ptr, qz_ptr, s_ptr, k, t * BLOCK_K // GROUP, n, words, N, N8, zero_offset, AWQ)
        acc = tl.dot(a, w.to(a.dtype), acc, input_precision=PRECISION)
    _store(acc, out_ptr, bias_ptr, rows, n, M, N, split, SPLIT, HAS_BIAS)


@triton.jit
def _sum_splits_kernel(part_ptr, bias_ptr, out_ptr, MN, N, splits, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """out = sum over the splits of their partial sums (+ bias), in split order, rounded to out's dtype."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < MN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for _ in range(splits):
        acc += tl.load(part_ptr + i, mask=mask, other=0.0)
        part_ptr += MN
    if HAS_BIAS:
        acc += tl.load(bias_ptr + i % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + i, acc.to(out_ptr.dtype.element_ty), mask=mask)


@dataclass(frozen=True)
class Config:
    """One launch's shape: `gemv` or the GEMM's tiles, and how many ways K is split (1: y written directly)."""

    gemv: bool
    block_n: int
    block_k: int
    splits: int
    block_m: int = 1
    num_warps: int = 4
    num_stages: int = 1


@functools.cache
def _device_facts(device: torch.device) -> tuple[int, int]:
    """(multiprocessors, GEMM pipeline stages). CPU tensors reach here only under the interpreter: an H100's."""
    if device.type != "cuda":
        return 132, 3
    props = torch.cuda.get_device_properties(device)
    return props.multi_processor_count, 3 if props.major >= 8 else 1


def _splits(units: int, programs: int, want: int) -> int:
    """Ways to split `units` (groups or K tiles) so that `programs` output tiles become about `want` programs."""
    return max(1, min(units, triton.cdiv(want, programs)))


def pick_config(m: int, n: int, k: int, group_size: int, method: str, device: torch.device) -> Config:
    """The launch for an (m, k) x (k, n) product, from a sweep on an H100 over the 7B's layers (benchmarks/
    int4_gemm.py times them). GEMV: 128 outputs a program; K steps of 16 inputs (AWQ, 4 warps) or 64 (GPTQ, 8
    warps); about 4 programs per SM. GEMM: BLOCK_K a group up to 128; up to SPLIT_MAX_M rows 64 outputs a
    program and K split to about 4 programs per SM; above, 128 x 128 tiles and no split."""
    sms, stages = _device_facts(device)
    pow2 = group_size & -group_size  # tiles divide a group
    if m <= GEMV_MAX_M:
        awq = method == "awq"
        splits = _splits(k // group_size, m * triton.cdiv(n, 128), 4 * sms)
        return Config(True, 128, 16 if awq else min(64, pow2), splits, num_warps=4 if awq else 8)
    if m <= SPLIT_MAX_M:
        block_m, block_k = min(64, max(16, triton.next_power_of_2(m))), min(128, pow2)
        tiles = triton.cdiv(m, block_m) * triton.cdiv(n, 64)
        return Config(False, 64, block_k, _splits(k // block_k // 2, tiles, 4 * sms), block_m, 4, stages)
    block_k = min(128 if method == "awq" else 64, pow2)  # GPTQ's gathered tiles take more shared memory
    return Config(False, 128, block_k, 1, 128, 8, stages)


def int4_linear(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                bias: torch.Tensor | None, method: str, group_size: int, zero_offset: int = 0,
                config: Config | None = None) -> torch.Tensor:
    """x (..., K) @ W (+ bias) -> (..., N) in x's dtype, W the AWQ or GPTQ layer of qweight, qzeros, scales
    (`method` "awq" or "gptq"; GPTQ's zero_offset is 1 for its original format). `config`: a launch other than
    pick_config's (tests, benchmarks)."""
    k, n = scales.shape[0] * group_size, scales.shape[1]
    assert x.shape[-1] == k and group_size % 16 == 0 and n % 8 == 0, "see the module's contract"
    rows = x.reshape(-1, k)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    m = rows.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out.view(*x.shape[:-1], n)
    cfg = config or pick_config(m, n, k, group_size, method, x.device)
    awq = method == "awq"
    has_bias = bias is not None
    if cfg.gemv:
        units, tiles = k // group_size, triton.cdiv(n, cfg.block_n)
    else:
        units, tiles = k // cfg.block_k, triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
    per_split = triton.cdiv(units, cfg.splits)
    splits = triton.cdiv(units, per_split)
    target = torch.empty(splits, m, n, dtype=torch.float32, device=x.device) if splits > 1 else out
    bias_arg = bias if has_bias else out
    if cfg.gemv:
        _gemv_kernel[(m, tiles, splits)](
            rows, qweight, qzeros, scales, bias_arg, target, m, n, n // 8, rows.stride(0), zero_offset, per_split,
            units, GROUP=group_size, AWQ=awq, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT=splits > 1,
            HAS_BIAS=has_bias, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    else:
        _gemm_kernel[(tiles, splits)](
            rows, qweight, qzeros, scales, bias_arg, target, m, n, n // 8, rows.stride(0), zero_offset, per_split,
            units, GROUP=group_size, AWQ=awq, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            GROUP_M=8, SPLIT=splits > 1, HAS_BIAS=has_bias, PRECISION="ieee" if x.dtype == torch.float32 else None,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if splits > 1:
        block = 1024
        _sum_splits_kernel[(triton.cdiv(m * n, block),)](target, bias_arg, out, m * n, n, splits, HAS_BIAS=has_bias,
                                                          BLOCK=block)
    return out.view(*x.shape[:-1], n)
