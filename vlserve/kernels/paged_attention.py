"""Causal attention of a step's new tokens over each sequence's whole context in the paged KV cache."""

import torch
import torch.nn.functional as F


def paged_attention_ref(q: torch.Tensor, kv_cache: torch.Tensor, cu_seqlens: list[int], context_lens: list[int],
                        block_tables: list[list[int]], scale: float) -> torch.Tensor:
    """q: (T, H, d) new tokens of all sequences; sequence i owns q[cu[i]:cu[i+1]], the LAST tokens of its
    context_lens[i]-long context, whose keys/values (new ones included) are already in `kv_cache`
    (2, num_blocks, block_size, KVH, d) at the blocks of block_tables[i]."""
    out = torch.empty_like(q)
    block_size = kv_cache.shape[2]
    gqa = q.shape[1] != kv_cache.shape[3]
    for i, (start, end) in enumerate(zip(cu_seqlens[:-1], cu_seqlens[1:])):
        n_q, n_k = end - start, context_lens[i]
        blocks = torch.tensor(block_tables[i][: -(-n_k // block_size)], device=q.device)
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
