"""Vocabulary-parallel token embedding and LM head: each rank holds a contiguous slice of the vocabulary."""

import torch
import torch.nn.functional as F
from torch import nn

from vlserve.distributed.parallel_state import tp_all_gather, tp_all_reduce, tp_rank, tp_size
from vlserve.model.layers.linear import copy_into, expect_shape


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.tp_rank, self.tp_size = tp_rank(), tp_size()
        self.vocab_size = vocab_size
        self.per_rank = -(-vocab_size // self.tp_size)  # last rank may hold fewer real rows (zero padding)
        self.start = self.tp_rank * self.per_rank
        self.weight = nn.Parameter(torch.zeros(self.per_rank, hidden_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param, loaded, name, shard_id=None):
        expect_shape(name, loaded, (self.vocab_size, param.shape[1]))
        end = min(self.start + self.per_rank, self.vocab_size)
        copy_into(param[: end - self.start], loaded[self.start:end])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.start
        mine = (local >= 0) & (local < self.per_rank)
        y = F.embedding(local.clamp(0, self.per_rank - 1), self.weight) * mine.unsqueeze(-1)
        return tp_all_reduce(y)


class ParallelLMHead(VocabParallelEmbedding):
    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = tp_all_gather(F.linear(hidden, self.weight), dim=-1)
        return logits[..., : self.vocab_size]
