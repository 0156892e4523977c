"""A step's inputs as tensors for the other ranks: a small int64 header on the control group (Gloo, where an idle
worker may wait without a watchdog), then the step's integers packed in one int32 buffer and, with new media, the
embeddings, both broadcast on the model's group (NCCL on GPUs), straight into each rank's device memory.

Header: kind, then the sizes that shape the buffer and the host-side maxima the kernels are chosen by, so a worker
never reads the device to run a step. Buffer, in order: input ids (T), positions (P x T, P = 1 in a decode step
else 3), cu_seqlens (B + 1), context lengths (B), block tables (B x W), KV slots (T), logit rows (S), media pad
rows (M).
"""

from dataclasses import astuple, dataclass, fields

import numpy as np
import torch
import torch.distributed as dist

from vlserve.engine.model_runner import StepInput
from vlserve.model.layers.attention import AttentionMetadata
from vlserve.transfer import to_device

STEP, CALL = 0, 1  # what follows a header: a step's buffers, or a pickled (method, args) on the control group


@dataclass(frozen=True)
class Header:
    kind: int
    tokens: int = 0
    seqs: int = 0
    table_width: int = 0
    position_rows: int = 0
    logit_rows: int = 0
    media_rows: int = 0
    media_width: int = 0  # embedding width; 0 without new media
    media_embed_rows: int = 0  # equal to media_rows unless the step is malformed (the model then refuses it)
    max_seqlen: int = 0
    max_context_len: int = 0
    has_prefix: int = 0

    def tensor(self) -> torch.Tensor:
        return torch.tensor(astuple(self), dtype=torch.int64)

    @classmethod
    def of(cls, t: torch.Tensor) -> "Header":
        return cls(*t.tolist())

    def buffer_len(self) -> int:
        t, b = self.tokens, self.seqs
        return t * (2 + self.position_rows) + (b + 1) + b + b * self.table_width + self.logit_rows + self.media_rows


def pack(step: StepInput) -> tuple[Header, torch.Tensor]:
    """The step's header and its int32 buffer (CPU); the media embeddings travel as they are."""
    meta = step.meta
    if len(meta.slot_mapping) and int(meta.slot_mapping.max()) >= 2**31:  # the largest number in a step
        raise ValueError(f"KV slot {int(meta.slot_mapping.max())} does not fit the packed step's int32")
    parts = [step.input_ids, step.positions, meta.cu_seqlens, meta.context_lens, meta.block_tables,
             meta.slot_mapping, step.logit_rows]
    if step.media_rows is not None:
        parts.append(step.media_rows)
    buffer = torch.from_numpy(np.concatenate([p.numpy().ravel().astype(np.int32, copy=False) for p in parts]))
    embeds = step.media_embeds
    header = Header(STEP, len(step.input_ids), len(meta.context_lens), meta.block_tables.shape[1],
                    1 if step.is_decode else 3, len(step.logit_rows),
                    0 if step.media_rows is None else len(step.media_rows), 0 if embeds is None else embeds.shape[1],
                    0 if embeds is None else embeds.shape[0], meta.max_seqlen, meta.max_context_len,
                    int(meta.has_prefix))
    return header, buffer


def unpack(header: Header, buffer: torch.Tensor, media_embeds: torch.Tensor | None) -> StepInput:
    """The StepInput `pack` was given, its tensors views of `buffer` (on whichever device it is)."""
    h, t, b = header, header.tokens, header.seqs
    sizes = [t, h.position_rows * t, b + 1, b, b * h.table_width, t, h.logit_rows, h.media_rows]
    ids, positions, cu, context, tables, slots, logit_rows, media_rows = buffer.split(sizes)
    positions = positions.long() if h.position_rows == 1 else positions.view(3, t).long()
    meta = AttentionMetadata(cu, h.max_seqlen, context_lens=context, block_tables=tables.view(b, h.table_width),
                             slot_mapping=slots.long(), max_context_len=h.max_context_len,
                             has_prefix=bool(h.has_prefix))
    media_rows = media_rows.long() if h.media_rows or media_embeds is not None else None
    return StepInput(ids.long(), positions, meta, media_embeds, media_rows, logit_rows.long())


def send_step(step: StepInput, control: dist.ProcessGroup, device: torch.device) -> None:
    """Global rank 0: every other rank gets `step` (see receive)."""
    header, buffer = pack(step)
    dist.broadcast(header.tensor(), 0, group=control)
    dist.broadcast(to_device(buffer, device), 0)
    if step.media_embeds is not None:
        dist.broadcast(step.media_embeds.to(device).contiguous(), 0)


def send_call(control: dist.ProcessGroup) -> None:
    """Global rank 0: the next message is a pickled call, not a step."""
    dist.broadcast(Header(CALL).tensor(), 0, group=control)


def receive(control: dist.ProcessGroup, device: torch.device, dtype: torch.dtype) -> StepInput | None:
    """A worker: the next step from global rank 0, or None when a call follows."""
    t = torch.empty(len(fields(Header)), dtype=torch.int64)
    dist.broadcast(t, 0, group=control)
    header = Header.of(t)
    if header.kind == CALL:
        return None
    buffer = torch.empty(header.buffer_len(), dtype=torch.int32, device=device)
    dist.broadcast(buffer, 0)
    media = None
    if header.media_width:
        media = torch.empty(header.media_embed_rows, header.media_width, dtype=dtype, device=device)
        dist.broadcast(media, 0)
    return unpack(header, buffer, media)

