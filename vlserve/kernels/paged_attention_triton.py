"""Triton attention kernels; the torch references they equal are in paged_attention.py.

- `paged_decode`: one new token per sequence over its paged context. A program takes one sequence, one KV head
  and one split of the context, and all query heads of that KV head at once (the group shares each K/V tile);
  splits are merged by their log-sum-exp when the batch alone would leave the card idle.
- `prefill_attention`: chunks of new tokens, causal, over either the paged cache (a cached prefix plus the chunk
  itself, already stored) or contiguous K/V of the chunk alone (fresh prefill and the vision tower where flash
  attention is missing: fp32, cards before sm_80). Rows of a tile are (token, query head of the group) pairs.

Plain tl.dot only (no Hopper-only instructions): runs from sm_75 to sm_90, in fp16, bf16 and fp32 (fp32 dots in
IEEE precision, not tf32). GPU only: import this module only where triton is installed.
"""

import functools

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # scores go through exp2


@triton.jit
def _softmax_step(q, k, v, valid, m, l, acc, qk_scale, PRECISION: tl.constexpr):
    """Folds one key/value tile into the running row max `m`, sum `l` and output `acc` (base-2 logits: qk_scale
    holds log2(e)). Every row sees a valid key in its first tile, so `m` is finite from then on."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m - m_new)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l * alpha + tl.sum(p, 1), acc


@triton.jit
def _paged_offsets(block_tables_ptr, seq, stride_bt, pos, valid, stride_block, stride_slot,
                   BLOCK_SIZE: tl.constexpr):
    """Element offsets of context positions `pos` of sequence `seq` in one K or V cache (num_blocks, block_size,
    KVH, d)."""
    block = tl.load(block_tables_ptr + seq * stride_bt + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
    return block * stride_block + (pos % BLOCK_SIZE) * stride_slot


@triton.jit
def _decode_kernel(q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, out_ptr, lse_ptr,
                   qk_scale, stride_qt, stride_qh, stride_cb, stride_cs, stride_ch, stride_bt,
                   stride_ot, stride_oh, stride_os, G: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                   PRECISION: tl.constexpr, SPLIT: tl.constexpr):
    seq, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    context_len = tl.load(context_lens_ptr + seq)
    # Each sequence spreads its own context over the splits: the split count is fixed by the launch (a captured
    # CUDA graph keeps it), while context lengths change from step to step.
    split_len = tl.cdiv(tl.cdiv(context_len, tl.num_programs(2)), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, context_len)
    g = tl.arange(0, BLOCK_G)
    head = kv_head * G + g
    d = tl.arange(0, BLOCK_D)
    q_mask = (g < G)[:, None] & (d < HEAD_DIM)[None, :]
    q = tl.load(q_ptr + seq * stride_qt + head[:, None] * stride_qh + d[None, :], mask=q_mask, other=0.0)
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for n in range(start, end, BLOCK_N):
        pos = n + tl.arange(0, BLOCK_N)
        valid = pos < end
        offs = _paged_offsets(block_tables_ptr, seq, stride_bt, pos, valid, stride_cb, stride_cs, BLOCK_SIZE)
        offs = offs[:, None] + kv_head * stride_ch + d[None, :]
        kv_mask = valid[:, None] & (d < HEAD_DIM)[None, :]
        k = tl.load(k_cache_ptr + offs, mask=kv_mask, other=0.0).to(q.dtype)
        v = tl.load(v_cache_ptr + offs, mask=kv_mask, other=0.0).to(q.dtype)
        m, l, acc = _softmax_step(q, k, v, valid[None, :], m, l, acc, qk_scale, PRECISION)
    # An empty split (past a short context) leaves l == 0: it writes zeros and a -inf log-sum-exp, weight 0.
    out = acc / tl.where(l > 0, l, 1.0)[:, None]
    tl.store(out_ptr + seq * stride_ot + head[:, None] * stride_oh + split * stride_os + d[None, :], out,
             mask=q_mask)
    if SPLIT:
        num_heads = tl.num_programs(1) * G
        tl.store(lse_ptr + ((seq * num_heads + head) * tl.num_programs(2) + split), m + tl.math.log2(l),
                 mask=g < G)


@triton.jit
def _merge_splits_kernel(part_ptr, lse_ptr, out_ptr, num_splits, stride_ot, stride_oh, HEAD_DIM: tl.constexpr,
                         BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    """part: (B, H, S, d) float32 per-split outputs, lse: (B, H, S) their base-2 log-sum-exps."""
    seq, head = tl.program_id(0), tl.program_id(1)
    row = seq * tl.num_programs(1) + head
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    lse = tl.load(lse_ptr + row * num_splits + s, mask=s < num_splits, other=float("-inf"))
    weight = tl.math.exp2(lse - tl.max(lse, 0))
    mask = (s < num_splits)[:, None] & (d < HEAD_DIM)[None, :]
    part = tl.load(part_ptr + (row * num_splits + s)[:, None] * HEAD_DIM + d[None, :], mask=mask, other=0.0)
    out = tl.sum(part * weight[:, None], 0) / tl.sum(weight, 0)
    tl.store(out_ptr + seq * stride_ot + head * stride_oh + d, out, mask=d < HEAD_DIM)


@triton.jit
def _find_sequence(cu_seqlens_ptr, num_seqs, tile, BLOCK_Q: tl.constexpr):
    """The sequence that owns query tile `tile`: sequence i's tiles start at cu[i] // BLOCK_Q + i, which leaves
    room for all of them and grows with i, so a binary search finds it."""
    lo: tl.int32 = 0
    hi: tl.int32 = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(cu_seqlens_ptr + mid) // BLOCK_Q + mid <= tile:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _prefill_kernel(q_ptr, k_ptr, v_ptr, out_ptr, cu_seqlens_ptr, context_lens_ptr, block_tables_ptr, num_seqs,
                    qk_scale, stride_qt, stride_qh, stride_ot, stride_oh, stride_k0, stride_k1, stride_kh,
                    stride_v0, stride_v1, stride_vh, stride_bt, G: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_Q: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, PAGED: tl.constexpr, CAUSAL: tl.constexpr,
                    PRECISION: tl.constexpr):
    tile, kv_head = tl.program_id(0), tl.program_id(1)
    seq = _find_sequence(cu_seqlens_ptr, num_seqs, tile, BLOCK_Q)
    q_start = tl.load(cu_seqlens_ptr + seq)
    q_len = tl.load(cu_seqlens_ptr + seq + 1) - q_start
    first = (tile - (q_start // BLOCK_Q + seq)) * BLOCK_Q  # this tile's first token within the sequence
    if first >= q_len:
        return
    context_len = q_len
    if PAGED:
        context_len = tl.load(context_lens_ptr + seq)
    prefix = context_len - q_len  # the chunk's tokens are the last of the context (bottom-right causal)
    r = tl.arange(0, BLOCK_M)
    token = first + r // G
    head = kv_head * G + r % G
    d = tl.arange(0, BLOCK_D)
    q_mask = ((r // G < BLOCK_Q) & (token < q_len))[:, None] & (d < HEAD_DIM)[None, :]
    q = tl.load(q_ptr + (q_start + token)[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=q_mask, other=0.0)
    kv_end = context_len
    if CAUSAL:  # no key past the tile's last query
        kv_end = tl.minimum(context_len, prefix + first + BLOCK_Q)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n in range(0, kv_end, BLOCK_N):
        pos = n + tl.arange(0, BLOCK_N)
        valid = pos < kv_end
        if PAGED:
            k_offs = _paged_offsets(block_tables_ptr, seq, stride_bt, pos, valid, stride_k0, stride_k1, BLOCK_SIZE)
            v_offs = _paged_offsets(block_tables_ptr, seq, stride_bt, pos, valid, stride_v0, stride_v1, BLOCK_SIZE)
        else:
            k_offs = (q_start + pos).to(tl.int64) * stride_k0
            v_offs = (q_start + pos).to(tl.int64) * stride_v0
        kv_mask = valid[:, None] & (d < HEAD_DIM)[None, :]
        k = tl.load(k_ptr + k_offs[:, None] + kv_head * stride_kh + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + v_offs[:, None] + kv_head * stride_vh + d[None, :], mask=kv_mask, other=0.0)
        seen = valid[None, :]
        if CAUSAL:
            seen = seen & (pos[None, :] <= (prefix + token)[:, None])
        m, l, acc = _softmax_step(q, k.to(q.dtype), v.to(q.dtype), seen, m, l, acc, qk_scale, PRECISION)
    out = acc / l[:, None]
    tl.store(out_ptr + (q_start + token)[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :], out,
             mask=q_mask)


@functools.cache
def _device_facts(device: torch.device) -> tuple[int, int]:
    """(multiprocessors, pipeline stages): before sm_80 there is no async copy and 64 KiB of shared memory. CPU
    tensors only reach here under the Triton interpreter (the tests' TRITON_INTERPRET=1): an H100's figures."""
    if device.type != "cuda":
        return 132, 2
    props = torch.cuda.get_device_properties(device)
    return props.multi_processor_count, 2 if props.major >= 8 else 1


def _tiles(dtype: torch.dtype) -> tuple[int, int]:
    """(query rows, keys) per tile: fp32 tiles are halved to fit shared memory on every card."""
    return (32, 32) if dtype == torch.float32 else (64, 64)


def _precision(dtype: torch.dtype) -> str | None:
    return "ieee" if dtype == torch.float32 else None  # fp32 dots default to tf32


def _num_splits(batch: int, kv_heads: int, max_context_len: int, block_n: int, sms: int) -> int:
    """Context splits per sequence: split only while the batch leaves multiprocessors idle (measured on H100, 7B
    layout: at batch 64, four programs per multiprocessor ran 12% slower than one split)."""
    programs = batch * kv_heads
    return max(1, min(triton.cdiv(sms, programs), triton.cdiv(max_context_len, block_n)))


def paged_decode(q: torch.Tensor, kv_cache: torch.Tensor, context_lens: torch.Tensor, block_tables: torch.Tensor,
                 max_context_len: int, scale: float, num_splits: int | None = None) -> torch.Tensor:
    """q: (B, H, d), one new token per sequence (its key/value already stored); kv_cache: (2, num_blocks,
    block_size, KVH, d); context_lens: (B,) int32; block_tables: (B, max_blocks) int32. Returns (B, H, d).
    `num_splits` defaults to what fills the card at `max_context_len`, which only picks that count (any upper
    bound works: a CUDA graph passes max_model_len), so nothing here reads the device."""
    batch, heads, head_dim = q.shape
    kv_heads, block_size = kv_cache.shape[3], kv_cache.shape[2]
    out = torch.empty_like(q)
    if batch == 0:
        return out
    _, block_n = _tiles(q.dtype)
    sms, stages = _device_facts(q.device)
    splits = num_splits or _num_splits(batch, kv_heads, max_context_len, block_n, sms)
    group = heads // kv_heads
    if splits > 1:
        target = torch.empty(batch, heads, splits, head_dim, dtype=torch.float32, device=q.device)
        lse = torch.empty(batch, heads, splits, dtype=torch.float32, device=q.device)
        strides = target.stride()[:3]
    else:
        target, lse, strides = out, out, (out.stride(0), out.stride(1), 0)
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    _decode_kernel[(batch, kv_heads, splits)](
        q, k_cache, v_cache, block_tables, context_lens, target, lse, scale * LOG2E, q.stride(0),
        q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0), *strides,
        G=group, BLOCK_G=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)), BLOCK_SIZE=block_size, BLOCK_N=block_n,
        PRECISION=_precision(q.dtype), SPLIT=splits > 1, num_warps=4, num_stages=stages)
    if splits > 1:
        _merge_splits_kernel[(batch, heads)](
            target, lse, out, splits, out.stride(0), out.stride(1), HEAD_DIM=head_dim,
            BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_S=triton.next_power_of_2(splits))
    return out


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                      scale: float, causal: bool = True, context_lens: torch.Tensor | None = None,
                      block_tables: torch.Tensor | None = None) -> torch.Tensor:
    """q: (T, H, d), sequence i owning q[cu[i]:cu[i+1]]. Paged (block_tables given): k, v are the caches
    (num_blocks, block_size, KVH, d) and the tokens are the last of each context_lens[i]-long context, always
    causal. Contiguous: k, v are (T, KVH, d) and each span attends only to itself. Returns (T, H, d)."""
    num_tokens, heads, head_dim = q.shape
    paged = block_tables is not None
    kv_heads = k.shape[-2]
    out = torch.empty_like(q)
    batch = cu_seqlens.shape[0] - 1
    if num_tokens == 0:
        return out
    block_m, block_n = _tiles(q.dtype)
    group = heads // kv_heads
    block_q = max(1, block_m // group)
    block_m = max(block_m, triton.next_power_of_2(group))
    _, stages = _device_facts(q.device)
    k1, v1 = (k.stride(1), v.stride(1)) if paged else (0, 0)
    _prefill_kernel[(num_tokens // block_q + batch, kv_heads)](
        q, k, v, out, cu_seqlens, context_lens if paged else cu_seqlens, block_tables if paged else cu_seqlens,
        batch, scale * LOG2E, q.stride(0), q.stride(1), out.stride(0), out.stride(1), k.stride(0), k1,
        k.stride(-2), v.stride(0), v1, v.stride(-2), block_tables.stride(0) if paged else 0, G=group,
        BLOCK_M=block_m, BLOCK_Q=block_q, HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_SIZE=k.shape[1] if paged else 1, BLOCK_N=block_n, PAGED=paged, CAUSAL=causal or paged,
        PRECISION=_precision(q.dtype), num_warps=4, num_stages=stages)
    return out
