"""Plain-torch attention references, used on the CPU and to test the Triton kernels (paged_attention_triton.py):
causal attention of a step's new tokens over each sequence's context in the paged KV cache, and attention of
spans of tokens that see only themselves."""

import itertools

import torch
import torch.nn.functional as F


def paged_attention_ref(q: torch.Tensor, kv_cache: torch.Tensor, cu_seqlens: torch.Tensor,
                        context_lens: torch.Tensor, block_tables: torch.Tensor, scale: float) -> torch.Tensor:
    """q: (T, H, d) new tokens of all sequences; sequence i owns q[cu[i]:cu[i+1]], the LAST tokens of its
    context_lens[i]-long context, whose keys/values (new ones included) are already in `kv_cache`
    (2, num_blocks, block_size, KVH, d) at the blocks of block_tables[i] (a padded (B, max_blocks) table)."""
    out = torch.empty_like(q)
    block_size = kv_cache.shape[2]
    gqa = q.shape[1] != kv_cache.shape[3]
    cu = cu_seqlens.tolist()
    for i, n_k in enumerate(context_lens.tolist()):
        start, end = cu[i], cu[i + 1]
        n_q = end - start
        blocks = block_tables[i, : -(-n_k // block_size)].long()
        k, v = (kv_cache[j, blocks].flatten(0, 1)[:n_k].transpose(0, 1) for j in (0, 1))  # (KVH, n_k, d)
        mask = None
        if n_q > 1:  # query j sits at position n_k - n_q + j and sees keys up to it (bottom-right causal)
            rows = torch.arange(n_k - n_q, n_k, device=q.device)[:, None]
            mask = torch.arange(n_k, device=q.device)[None, :] <= rows
        # 4-D (batch of one): the fused SDPA kernels take only 4-D inputs
        o = F.scaled_dot_product_attention(q[start:end].transpose(0, 1)[None], k.to(q.dtype)[None],
                                           v.to(q.dtype)[None], attn_mask=mask, scale=scale, enable_gqa=gqa)
        out[start:end] = o[0].transpose(0, 1)
    return out


def varlen_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, causal: bool,
                         scale: float) -> torch.Tensor:
    """q: (T, H, d); k, v: (T, KVH, d), H a multiple of KVH. Each [cu[i], cu[i+1]) span attends only to itself."""
    out = torch.empty_like(q)
    gqa = q.shape[1] != k.shape[1]
    cu = cu_seqlens.tolist()
    for start, end in itertools.pairwise(cu):
        if end == start:
            continue
        # 4-D (batch of one): the fused, memory-linear SDPA kernels take only 4-D inputs
        qs, ks, vs = (t[start:end].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=scale, enable_gqa=gqa)
        out[start:end] = o[0].transpose(0, 1)
    return out
