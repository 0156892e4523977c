"""Runs one scheduled step on the model: builds flat inputs from block tables, encodes media not seen before,
runs the language model over the paged KV cache and samples the sequences whose chunk reached their last token.

`submit` launches a step and returns at once: the sampled token ids stay on the device, where the next step reads
the ones the host has not seen yet (async scheduling), and reach the host in the background; `wait` returns them.
Nothing between the two waits for the device (no `.item()`, `.tolist()` or pageable copies: vlserve/transfer.py).
"""

import logging
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from vlserve.config import DEFAULT_STOP_TOKEN_IDS, EngineConfig, ModelConfig, SchedulerConfig
from vlserve.distributed.parallel_state import pipeline_stage, tp_all_gather, tp_rank, tp_size
from vlserve.engine.cuda_graphs import DecodeGraphs, capture_sizes
from vlserve.engine.input_batch import InputBatch
from vlserve.engine.sampler import (
    Logprob, PendingTokens, PromptScores, SampledTokens, Sampler, SamplerOutput, sample_worst_case,
)
from vlserve.engine.scheduler import ScheduledSeq
from vlserve.engine.sequence import Sequence
from vlserve.errors import ConfigError
from vlserve.media.item import MediaItem
from vlserve.media.options import MediaOptions
from vlserve.model.layers.attention import Attention, AttentionMetadata
from vlserve.model.loader import load_model
from vlserve.transfer import device_tensor, to_device

log = logging.getLogger("vlserve.engine")


class VisionCache:
    """Encoded media by content hash, least recently used dropped first, bounded in bytes: a picture that
    returns in the next turn of a chat (or is preempted mid-prompt) is encoded once."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes = max_bytes, 0
        self.entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.hits = self.misses = 0

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def get(self, key: str) -> torch.Tensor | None:
        value = self.entries.get(key)
        if value is not None:
            self.entries.move_to_end(key)
        return value

    def put(self, key: str, value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        if key in self.entries or size > self.max_bytes:
            return
        while self.bytes + size > self.max_bytes:
            _, old = self.entries.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()
        self.entries[key] = value
        self.bytes += size


@dataclass
class StepInput:
    """Everything a rank needs to run one step; rank 0 builds it, other tensor-parallel ranks receive it."""

    input_ids: torch.Tensor
    positions: torch.Tensor  # (3, T); (T,) in a decode step (see is_decode)
    meta: AttentionMetadata
    media_embeds: torch.Tensor | None
    media_rows: torch.Tensor | None  # (pads,) where the media pad tokens are in the flat batch, in order
    # Rows whose logits the step computes, in the flat batch: each sampling sequence's last token, then the rows that
    # score prompt tokens (prompt_logprobs)
    logit_rows: torch.Tensor
    # Rows whose token is still on the device (async scheduling), and where each is among the step before's samples
    pending_rows: list[int] = field(default_factory=list)
    pending_src: list[int] = field(default_factory=list)

    def to(self, device: torch.device) -> "StepInput":
        def move(t):
            return None if t is None else to_device(t, device)

        return StepInput(move(self.input_ids), move(self.positions), self.meta.to(device), move(self.media_embeds),
                         move(self.media_rows), self.logit_rows, self.pending_rows, self.pending_src)

    @property
    def is_decode(self) -> bool:
        """One new token per sequence and no media: text tokens' three M-RoPE rows are equal, so `prepare` gives
        decode steps 1-D positions (`pos + rope_delta`), the form CUDA graphs capture."""
        return self.positions.dim() == 1


@dataclass
class LogitRows:
    """What a step's logits rows are for: the sampling sequences (rows 0..S-1, in order), then prompt positions
    scored for prompt_logprobs, as (sequence, first position, count) segments."""

    sample_seqs: list[Sequence] = field(default_factory=list)
    prompt: list[tuple[Sequence, int, int]] = field(default_factory=list)
    targets: list[int] = field(default_factory=list)  # the prompt token at each scored position
    counts: list[int] = field(default_factory=list)  # top entries wanted at each


@dataclass
class StepHandle:
    """A submitted step: what its logits rows are for, its samples and prompt logprobs (launched)."""

    rows: LogitRows
    sampled: SampledTokens | None
    scores: PromptScores | None = None


@dataclass
class StepResult:
    """A step's outputs on the host: the sampling sequences and their samples, and the prompt logprobs of
    (sequence, first position) segments."""

    sample_seqs: list[Sequence]
    sampled: SamplerOutput
    prompt_logprobs: list[tuple[Sequence, int, list[Logprob]]] = field(default_factory=list)


@dataclass
class PendingLogits:
    """A launched step's sampling logits: ready, or (global rank 0 of a pipeline) arriving from the last stage."""

    logits: torch.Tensor | None
    receive: dist.Work | None = None


def step_positions(flat: np.ndarray, prompt_mrope: list[tuple[int, torch.Tensor]], decode: bool) -> torch.Tensor:
    """(3, T) M-RoPE positions: `flat` on every row, with multimodal prompts' own rows pasted in. A decode step
    takes one row: it holds only text tokens, whose three rows are equal."""
    positions = torch.from_numpy(np.ascontiguousarray(flat, dtype=np.int64))
    if not prompt_mrope:
        return positions if decode else positions.expand(3, -1).contiguous()
    positions = positions.expand(3, -1).clone()
    for at, rows in prompt_mrope:
        positions[:, at:at + rows.shape[1]] = rows
    return positions[0].contiguous() if decode else positions


def last_stage_first_rank(stage) -> int:
    return (stage.num_stages - 1) * tp_size()


class ModelRunner:
    reads_pending_tokens = True  # a step's inputs may hold the step before's samples, still on the device

    def __init__(self, model_cfg: ModelConfig, engine_cfg: EngineConfig, device: torch.device, dtype: torch.dtype,
                 progress: bool = True):
        self.cfg, self.device, self.dtype = model_cfg, device, dtype
        self.block_size = engine_cfg.block_size
        self.engine_cfg, self.max_model_len = engine_cfg, engine_cfg.model_len(model_cfg)
        self.graphs: DecodeGraphs | None = None
        self.model = load_model(model_cfg, dtype, device, progress=progress,
                                vision_tp_mode=engine_cfg.mm_encoder_tp_mode, load_format=engine_cfg.load_format)
        self.attention_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        self.vision_cache = VisionCache(engine_cfg.vision_cache_mib << 20)
        self.encode = self.model.encode_media  # a tensor-parallel runner spreads images over its ranks instead
        self.step_tag = 0  # steps launched: tags the messages between pipeline stages
        self.handoff = []  # (send, tensor) of this stage's hand-off of the last step: tensors live until sent
        self.sampler = Sampler(DEFAULT_STOP_TOKEN_IDS)
        self.pending: PendingTokens | None = None  # the samples of the last step submitted, until it is waited on
        self.batch = InputBatch(engine_cfg.max_num_seqs, -(-self.max_model_len // self.block_size), self.block_size)

    def kv_bytes_per_block(self) -> int:
        a = self.attention_layers[0]
        per_layer = 2 * self.block_size * a.num_kv_heads * a.head_dim * self.dtype.itemsize
        return per_layer * len(self.attention_layers)

    def encode_share(self, shares: list[list[MediaItem]]) -> list[torch.Tensor]:
        """This rank's share of a step's media, in data mode (the vision tower is whole on every first-stage
        rank): embeddings come back on the CPU, to be gathered on rank 0."""
        rank = dist.get_rank()
        if not pipeline_stage().is_first or rank >= len(shares):
            return []
        return [e.cpu() for e in self.model.encode_media(shares[rank])]

    def encode_all(self, items: list[MediaItem]) -> list[torch.Tensor]:
        """Vision weights mode: every first-stage rank runs its slice of the tower on the same items (the
        collectives inside line up); later stages hold no tower and skip."""
        return self.model.encode_media(items) if pipeline_stage().is_first else []

    def shutdown(self) -> None:
        """A one-process runner holds nothing beyond its tensors (tensor-parallel runners stop their workers)."""

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """With CUDA graphs, one block more than the block manager hands out: the padding rows' KV goes there."""
        use_graphs = self.uses_graphs()
        for layer in self.attention_layers:
            layer.kv_cache = torch.zeros(2, num_blocks + use_graphs, self.block_size, layer.num_kv_heads,
                                         layer.head_dim, dtype=self.dtype, device=self.device)
        if use_graphs:
            sizes = capture_sizes(self.engine_cfg.max_num_seqs)
            self.graphs = DecodeGraphs(self.model, sizes, self.max_model_len, self.block_size, num_blocks,
                                       self.device)
            self.graphs.capture()
            log.info("CUDA graphs captured for decode batch sizes %s (--enforce-eager turns them off)", sizes)

    def uses_graphs(self) -> bool:
        if self.device.type != "cuda" or self.engine_cfg.enforce_eager:
            return False
        if tp_size() > 1 or pipeline_stage().num_stages > 1:
            # Capturing would have to take in the NCCL collectives and the stage hand-offs too: not done yet.
            log.info("CUDA graphs are off with tensor or pipeline parallel (one GPU only for now); decode runs "
                     "eagerly")
            return False
        return True

    @torch.inference_mode()
    def submit(self, scheduled: list[ScheduledSeq], departed: list[int] = ()) -> StepHandle:
        """Launches the step and its sampling; returns without waiting for the device. `departed`: sequences
        gone since the last step (their seats in the persistent batch are freed)."""
        step, rows = self.prepare(scheduled, departed)
        return self.sample(self.run(step), rows)

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor | None, rows: LogitRows) -> StepHandle:
        """Launches the sampling (and prompt scoring) of a step's logits, on global rank 0."""
        seqs, num = rows.sample_seqs, len(rows.sample_seqs)
        sampled = self.sampler.sample(logits[:num], seqs, self.pending) if seqs else None
        self.pending = None if sampled is None else PendingTokens(
            sampled.token_ids, {seq.seq_id: i for i, seq in enumerate(seqs)})
        scores = PromptScores.of(logits[num:], rows.targets, rows.counts) if rows.prompt else None
        return StepHandle(rows, sampled, scores)

    def wait(self, handle: StepHandle) -> StepResult:
        """The step's samples (in the order of its sampling sequences) and prompt logprobs on the host."""
        prompt, done = [], 0
        if handle.scores is not None:
            scored = handle.scores.read()
            for seq, first, count in handle.rows.prompt:
                prompt.append((seq, first, scored[done:done + count]))
                done += count
        if handle.sampled is None:
            return StepResult([], SamplerOutput([], []), prompt)
        if self.pending is not None and self.pending.token_ids is handle.sampled.token_ids:
            self.pending = None  # its tokens reach the host now: later steps read them there
        return StepResult(handle.rows.sample_seqs, handle.sampled.read(), prompt)

    def run(self, step: StepInput) -> torch.Tensor | None:
        """Runs this rank's part of the step; returns the sampling logits on global rank 0, None elsewhere."""
        return self.collect(self.launch(step))

    @torch.inference_mode()
    def launch(self, step: StepInput) -> "PendingLogits":
        """Runs this rank's stage of the step without waiting for the later stages: hidden states go on
        asynchronously, then global rank 0 posts the receive of the step's logits (before it takes the next step,
        so the last stage never waits on it; after the send, because NCCL runs one pair's transfers in the order
        they were posted). The pipeline can then take the next step while this one is in flight."""
        stage = pipeline_stage()
        self.step_tag += 1  # matches each step's messages between stages on Gloo (NCCL keeps their order)
        rows = len(step.logit_rows)
        if self.graphs is not None and step.is_decode and self.graphs.covers(len(step.input_ids)):
            # one stage: graphs need it
            out = self.graphs.replay(step.input_ids, step.positions, step.meta, self.pending_tokens(step))
        else:
            pending = self.pending_tokens(step)
            step = step.to(self.device)
            if pending is not None:
                step.input_ids[pending[0]] = pending[1]
            intermediate = None if stage.is_first else self.receive_intermediate(len(step.input_ids), stage)
            out = self.model(step.input_ids, step.positions, step.meta, step.media_embeds, step.media_rows,
                             intermediate)
        if not stage.is_last:
            for send, _ in self.handoff:
                send.wait()  # the previous step's (long received: stages take steps in order)
            self.handoff = [(dist.isend(t, stage.next_rank, tag=self.step_tag), t) for t in map(self.my_slice, out)]
            return self.post_logits_receive(rows, stage)
        if rows:
            logits = self.model.compute_logits(out[to_device(step.logit_rows, self.device)])
        else:
            logits = out.new_empty(0, self.cfg.vocab_size, dtype=torch.float32)
        if stage.num_stages == 1:
            return PendingLogits(logits)
        if dist.get_rank() == last_stage_first_rank(stage) and rows:
            dist.send(logits, 0, tag=self.step_tag)
        return PendingLogits(None)

    def pending_tokens(self, step: StepInput) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(rows, token ids) on the device of the step's tokens the host has not seen: the step before's samples."""
        if not step.pending_rows:
            return None
        src = device_tensor(step.pending_src, torch.long, self.device)
        return device_tensor(step.pending_rows, torch.long, self.device), self.pending.token_ids[src]

    def collect(self, pending: "PendingLogits") -> torch.Tensor | None:
        if pending.receive is not None:
            pending.receive.wait()
        return pending.logits

    def post_logits_receive(self, rows: int, stage) -> "PendingLogits":
        """Sampling happens on global rank 0 (first stage): the last stage's first rank ships the logits."""
        if stage.num_stages == 1 or dist.get_rank() != 0:
            return PendingLogits(None)
        logits = torch.empty(rows, self.cfg.vocab_size, dtype=torch.float32, device=self.device)
        receive = dist.irecv(logits, last_stage_first_rank(stage), tag=self.step_tag) if rows else None
        return PendingLogits(logits, receive)

    def sliced_handoff(self) -> bool:
        """Every rank of a stage ends a step with the same hidden states: under tensor parallel each sends only its
        1/TP of the hidden dimension to its counterpart, and the next stage's ranks all-gather (cheaper inside a
        machine than TP full copies across the network between machines)."""
        return tp_size() > 1 and self.cfg.hidden_size % tp_size() == 0

    def my_slice(self, t: torch.Tensor) -> torch.Tensor:
        if not self.sliced_handoff():
            return t.contiguous()
        width = self.cfg.hidden_size // tp_size()
        return t[:, tp_rank() * width:(tp_rank() + 1) * width].contiguous()

    def receive_intermediate(self, num_tokens: int, stage) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states and the residual stream from the previous stage."""
        width = self.cfg.hidden_size // tp_size() if self.sliced_handoff() else self.cfg.hidden_size
        parts = tuple(torch.empty(num_tokens, width, dtype=self.dtype, device=self.device) for _ in range(2))
        for t in parts:
            dist.recv(t, stage.prev_rank, tag=self.step_tag)
        return tuple(tp_all_gather(t, dim=-1) for t in parts) if self.sliced_handoff() else parts

    def prepare(self, scheduled: list[ScheduledSeq], departed: list[int] = ()) -> tuple[StepInput, LogitRows]:
        """The step's flat inputs: per-sequence work in Python (token ids, media, M-RoPE rows), per-token work as
        numpy over the persistent batch (KV slots, positions, block tables)."""
        encoded = self.encode_media(scheduled)
        seats = self.batch.update(departed, scheduled)
        starts = np.fromiter((item.start for item in scheduled), np.int64, len(scheduled))
        lengths = np.fromiter((item.num_new_tokens for item in scheduled), np.int64, len(scheduled))
        slots, positions = self.batch.slots(seats, starts, lengths)
        cu = np.cumsum(lengths) - lengths  # each sequence's first row in the flat batch
        ids, media_rows, media_parts, prompt_mrope, sample_rows, prompt_rows = [], [], [], [], [], []
        logit_rows = LogitRows()
        pending_rows, pending_src, rope_deltas = [], [], []
        for item, first in zip(scheduled, cu.tolist()):
            seq, start, end = item.seq, item.start, item.end
            ids += seq.tokens(start, end)
            if len(ids) < first + item.num_new_tokens:  # its last token is the step before's sample, on the device
                pending_rows.append(len(ids))
                pending_src.append(self.pending.rows[seq.seq_id])
                ids.append(0)
            rope_deltas.append(seq.rope_delta)
            if seq.mrope_positions is not None and start < seq.num_prompt_tokens:
                prompt_mrope.append((first, seq.mrope_positions[:, start:min(end, seq.num_prompt_tokens)]))
            rows, parts = self.media_for(seq, start, end, encoded)
            media_rows += [first + r for r in rows]
            media_parts += parts
            if item.samples:
                sample_rows.append(first + item.num_new_tokens - 1)
                logit_rows.sample_seqs.append(seq)
            if item.prompt_positions:  # token i's logits score prompt token i + 1
                scored = item.prompt_positions
                prompt_rows += range(first + scored.start - 1 - start, first + scored.stop - 1 - start)
                logit_rows.prompt.append((seq, scored.start, len(scored)))
                logit_rows.targets += seq.prompt_token_ids[scored.start:scored.stop]
                logit_rows.counts += [seq.params.prompt_logprobs] * len(scored)
        # Generated tokens (and every token of a text-only prompt) sit at i + rope_delta on all three rows.
        flat_positions = positions + np.repeat(np.asarray(rope_deltas, dtype=np.int64), lengths)
        # Built on the CPU (embeddings stay where the vision tower ran); the other ranks receive it packed
        # (distributed/packed_step.py), straight into their devices.
        meta = AttentionMetadata.paged(lengths, starts + lengths, self.batch.step_tables(seats), slots)
        decode = not media_parts and bool((lengths == 1).all())
        step = StepInput(torch.tensor(ids), step_positions(flat_positions, prompt_mrope, decode), meta,
                         torch.cat(media_parts) if media_parts else None,
                         torch.tensor(media_rows) if media_parts else None,
                         torch.tensor(sample_rows + prompt_rows, dtype=torch.long), pending_rows, pending_src)
        return step, logit_rows

    def media_for(self, seq: Sequence, start: int, end: int,
                  encoded: dict[str, torch.Tensor]) -> tuple[list[int], list[torch.Tensor]]:
        """Which of the tokens [start, end) are media pads (offsets from start), and their embedding rows in
        order."""
        rows, parts = [], []
        for span in seq.media:
            lo, hi = max(start, span.start), min(end, span.end)
            if lo < hi:
                rows += range(lo - start, hi - start)
                first = span.offset + lo - span.start
                parts.append(encoded[span.content_hash][first:first + hi - lo])
        return rows, parts

    def encode_media(self, scheduled: list[ScheduledSeq]) -> dict[str, torch.Tensor]:
        """Embeddings of every item with pads in this step: cached ones reused, the rest in one vision pass."""
        encoded, missing = {}, {}
        for item in scheduled:
            for span in item.seq.media:
                if span.start < item.end and item.start < span.end:
                    key = span.content_hash
                    if key not in encoded and key not in missing:
                        cached = self.vision_cache.get(key)
                        if cached is None:
                            missing[key] = span.item
                        else:
                            encoded[key] = cached
        self.vision_cache.hits += len(encoded)
        self.vision_cache.misses += len(missing)
        for key, embeds in zip(missing, self.encode(list(missing.values()))):
            self.vision_cache.put(key, embeds)
            encoded[key] = embeds
        return encoded

    # ---- GPU memory profiling (KV sizing) ----
    @torch.inference_mode()
    def profile_free_blocks(self, utilization: float, sched: SchedulerConfig, media: MediaOptions,
                            bytes_per_block: int) -> int:
        """Runs the worst-case step (a full token budget, the largest allowed image through the vision tower,
        logits for every seat, and on rank 0 the costliest sampling of every seat), then gives the KV cache what
        `utilization` of the card leaves."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        tokens, stage = sched.max_num_batched_tokens, pipeline_stage()
        ids = torch.zeros(tokens, dtype=torch.long, device=self.device)
        intermediate = None if stage.is_first else tuple(
            torch.zeros(tokens, self.cfg.hidden_size, dtype=self.dtype, device=self.device) for _ in range(2))
        meta = AttentionMetadata.from_lengths([tokens]).to(self.device)
        out = self.model(ids, torch.arange(tokens, device=self.device), meta,
                         intermediate=intermediate)
        if stage.is_last:
            self.model.compute_logits(out[-min(sched.max_num_seqs, tokens):])
        if self.model.visual is not None:
            options = media.for_vision(self.cfg.vision)
            grid = options.largest_image_grid()
            pixels = torch.zeros(grid[1] * grid[2], self.cfg.vision.patch_dim)
            self.model.encode_media([MediaItem("image", pixels, grid, "profile", merge_size=options.merge_size)])
        if not dist.is_initialized() or dist.get_rank() == 0:  # global rank 0 samples every step
            sample_worst_case(min(sched.max_num_seqs, tokens), self.cfg.vocab_size, self.device)
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        free, total = torch.cuda.mem_get_info(self.device)
        outside_torch = max(0, total - free - torch.cuda.memory_reserved(self.device))  # CUDA context, NCCL
        budget = total * utilization - peak - outside_torch
        if budget < bytes_per_block:
            raise ConfigError(
                f"no memory left for the KV cache: the model and a worst-case step peak at {peak / 2**30:.2f} GiB "
                f"of {total / 2**30:.2f} GiB and --gpu-memory-utilization is {utilization}; raise it, lower "
                "--max-num-batched-tokens or --max-num-seqs, or use more GPUs")
        torch.cuda.empty_cache()
        return int(budget // bytes_per_block)
