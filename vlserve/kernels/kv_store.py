"""Writing a step's new keys and values into the paged KV cache."""

import torch


def store_kv_ref(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """k, v: (T, KVH, d); kv_cache: (2, num_blocks, block_size, KVH, d); slot_mapping: (T,) flat slot per token."""
    flat = kv_cache.view(2, -1, *kv_cache.shape[3:])
    flat[0].index_copy_(0, slot_mapping, k.to(kv_cache.dtype))
    flat[1].index_copy_(0, slot_mapping, v.to(kv_cache.dtype))
