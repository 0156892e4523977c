"""Logits -> next tokens: penalties, min_tokens, temperature, top-k/top-p/min-p, seeded sampling, logprobs.

One batched pass over the rows that sample this step; per-row Python only builds small index/parameter tensors,
which reach the device without a host sync (transfer.py). `sample` launches the work and returns the token ids on
the device, copied to the host in the background; `read` waits for that copy. A row's last token may itself still
be on the device (async scheduling: `PendingTokens`, the step before's samples): penalties, min_tokens and seeds
count it without reading it. Before the filters, the request's own rules: penalties, min_tokens, logit_bias,
allowed_token_ids, then the grammar of structured output (engine/structured.py). Filter order follows
transformers' `generate`: temperature, top-k, top-p, min-p.
"""

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from vlserve.config import DEFAULT_STOP_TOKEN_IDS
from vlserve.engine.sampling_params import MAX_LOGPROBS, SamplingParams, sampler_chunk_rows
from vlserve.engine.sequence import Sequence
from vlserve.engine.stop import stop_token_ids
from vlserve.engine.structured import mask as grammar_mask
from vlserve.transfer import HostCopy, device_tensor, to_device


@dataclass
class Logprob:
    logprob: float  # of the sampled token
    top: list[tuple[int, float]]  # the params.logprobs most likely (token id, logprob), most likely first


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[Logprob | None]  # None where params.logprobs is None


@dataclass
class PendingTokens:
    """A launched step's sampled token ids, still on the device, and the row of each sequence among them."""

    token_ids: torch.Tensor  # (rows,) int64 on the device
    rows: dict[int, int]  # seq_id -> row


@dataclass
class SampledTokens:
    """A step's samples: on the device (`token_ids`, for the next step's inputs) and on their way to the host."""

    token_ids: torch.Tensor
    copy: HostCopy  # token ids, then (chosen logprob, top values, top ids) when a row asked for logprobs
    logprob_rows: list[int]  # rows that asked for logprobs
    num_logprobs: list[int]  # how many top entries each of those rows asked for

    def read(self) -> SamplerOutput:
        host = self.copy.read()
        out: list[Logprob | None] = [None] * len(host[0])
        if self.logprob_rows:
            chosen, top_values, top_ids = (t.tolist() for t in host[1:])
            for j, (i, n) in enumerate(zip(self.logprob_rows, self.num_logprobs)):
                out[i] = Logprob(chosen[j], list(zip(top_ids[j][:n], top_values[j][:n])))
        return SamplerOutput(host[0].tolist(), out)


@dataclass
class PromptScores:
    """A step's prompt logprobs on their way to the host: per scored position, the prompt token's logprob and the
    most likely tokens there (as many as its request asked)."""

    copy: HostCopy
    counts: list[int]

    @staticmethod
    def of(logits: torch.Tensor, targets: list[int], counts: list[int]) -> "PromptScores":
        """From the logits of the tokens before each target (raw: as sampling logprobs are)."""
        raw = logits.float()
        tokens = device_tensor(targets, torch.long, raw.device)
        return PromptScores(HostCopy(*logprobs_of(raw, tokens, list(range(len(targets))), counts)), counts)

    def read(self) -> list[Logprob]:
        chosen, values, ids = (t.tolist() for t in self.copy.read())
        return [Logprob(c, list(zip(i[:n], v[:n]))) for c, v, i, n in zip(chosen, values, ids, self.counts)]


class Sampler:
    """`eos_ids` are blocked (with params.stop_token_ids) until min_tokens; `generator` drives unseeded rows."""

    def __init__(self, eos_ids=DEFAULT_STOP_TOKEN_IDS, generator: torch.Generator | None = None):
        self.eos_ids = tuple(eos_ids)
        self.generator = generator  # on the logits' device; None = torch's default generator there
        self._seeded: torch.Generator | None = None  # reseeded per row, so it holds no per-sequence state

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SamplerOutput:
        return self.sample(logits, seqs).read()

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, seqs: list[Sequence], pending: PendingTokens | None = None) -> SampledTokens:
        """Launches the sampling of one token per row; nothing here waits for the device. `pending`: the step
        before's samples, for rows whose last token has not reached the host."""
        # The raw float32 logits give the logprobs; penalties and min_tokens make new tensors only when a row
        # needs them (a full copy per step is 0.6 GB of traffic at 1024 rows), and the caller's stays untouched.
        raw = logits.float()
        history = History.of(seqs, pending, raw.shape[-1], raw.device)
        logits = block_stop_tokens(apply_penalties(raw, seqs, history), seqs, self.eos_ids, history)
        logits = grammar_mask(apply_token_choices(logits, seqs), seqs)
        tokens = self._sample(logits, seqs, history)
        rows = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        counts = [seqs[i].params.logprobs for i in rows]
        return SampledTokens(tokens, HostCopy(tokens, *logprobs_of(raw, tokens, rows, counts)), rows, counts)

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence], history: "History") -> torch.Tensor:
        tokens = logits.argmax(dim=-1)  # greedy rows: exactly the argmax of the penalised logits
        rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
        for chunk in row_chunks(rows, logits.shape[-1]):
            idx = device_tensor(chunk, torch.long, logits.device)
            tokens[idx] = self._draw(logits, idx, [seqs[i] for i in chunk], [history.num_outputs[i] for i in chunk])
        return tokens

    def _draw(self, logits: torch.Tensor, idx: torch.Tensor, seqs: list[Sequence],
              num_outputs: list[int]) -> torch.Tensor:
        """One token for each of the rows `idx`; the chunk's temporaries die on return, before the next chunk's."""
        probs = sampling_probs(logits[idx], [seq.params for seq in seqs])
        # argmax(p / q) with q ~ Exp(1) draws from p (the exponential race), with no host sync, and lets each
        # seeded row use its own random stream.
        return (probs / self._exponentials(probs, seqs, num_outputs)).argmax(dim=-1)

    def _exponentials(self, probs: torch.Tensor, seqs: list[Sequence], num_outputs: list[int]) -> torch.Tensor:
        q = torch.empty_like(probs).exponential_(generator=self.generator)
        if self._seeded is None or self._seeded.device != probs.device:
            self._seeded = torch.Generator(device=probs.device)
        for i, seq in enumerate(seqs):
            if seq.params.seed is not None:
                # Seeded from (seed, sample index, step) alone: the same tokens whatever else is in the batch,
                # after preemption too, and n > 1 samples of one request differ.
                self._seeded.manual_seed(_row_seed(seq.params.seed, seq.index, num_outputs[i]))
                q[i].exponential_(generator=self._seeded)
        # exponential_ can return 0 (a uniform draw of exactly 0); 0/0 = NaN would win the argmax.
        return q.clamp_(min=torch.finfo(q.dtype).tiny)


# Every full-vocabulary path at once: penalties, temperature, top-p without a top-k (a sort of the whole row),
# min-p, and the most logprobs. Its temporaries (6 fp32 copies of the logits on the CPU) set the sampler's peak.
WORST_CASE = SamplingParams(temperature=1.0, top_p=0.9, min_p=0.05, repetition_penalty=1.1, frequency_penalty=0.1,
                            presence_penalty=0.1, logprobs=MAX_LOGPROBS)


def sample_worst_case(rows: int, vocab: int, device: torch.device) -> None:
    """One sampling step of `rows` seats at their most expensive: the engine's profiling step runs it, so that
    the KV cache leaves room for the sampler's temporaries."""
    Sampler()(torch.zeros(rows, vocab, device=device), [Sequence("profile", [0], WORST_CASE) for _ in range(rows)])


def _row_seed(seed: int, index: int, step: int) -> int:
    # A stable hash (unlike hash() across Python versions) so seeded outputs reproduce across restarts.
    digest = hashlib.blake2b(f"{seed},{index},{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


@dataclass
class History:
    """What each row has generated before the token it samples now, where part of it is still on the device."""

    num_outputs: list[int]  # output tokens before this one, pending ones included
    pending_ids: torch.Tensor | None  # (rows,) on the device: each row's pending token, `vocab` where none

    @staticmethod
    def of(seqs: list[Sequence], pending: PendingTokens | None, vocab: int, device) -> "History":
        src = [-1 if pending is None else pending.rows.get(s.seq_id, -1) for s in seqs]
        num_outputs = [len(s.output_token_ids) + (r >= 0) for s, r in zip(seqs, src)]
        if all(r < 0 for r in src):
            return History(num_outputs, None)
        src_t = device_tensor(src, torch.long, device)
        ids = torch.where(src_t >= 0, pending.token_ids[src_t.clamp(min=0)], vocab)
        return History(num_outputs, ids)

    def outputs(self, seqs: list[Sequence], rows: list[int], idx: torch.Tensor, pad: int) -> torch.Tensor:
        """(len(rows), longest) output ids of `rows` on the device, pending ones last, `pad` after the end."""
        host = to_device(_padded_outputs([seqs[i].output_token_ids for i in rows], pad), idx.device)
        return host if self.pending_ids is None else torch.cat([host, self.pending_ids[idx][:, None]], dim=1)


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence], history: History | None = None) -> torch.Tensor:
    """Repetition (HF: prompt + output tokens) then frequency and presence (OpenAI: output only); `logits` itself
    when no row is penalised. Works on the tokens a row has seen (gather, change, scatter back), never on
    vocabulary-wide masks or counts: a few hundred ids a row instead of 152k columns."""
    rows = [i for i, s in enumerate(seqs) if _penalised(s.params)]
    if not rows:
        return logits
    dev, vocab = logits.device, logits.shape[-1]
    history = history or History.of(seqs, None, vocab, dev)
    idx = device_tensor(rows, torch.long, dev)
    # Column `vocab` is a scratch column: padding ids point there, and it is dropped at the end.
    sub = torch.cat([logits[idx], logits.new_zeros(len(rows), 1)], dim=1)
    params = [seqs[i].params for i in rows]
    outputs = history.outputs(seqs, rows, idx, vocab)
    if any(p.repetition_penalty != 1.0 for p in params):
        prompts = torch.nn.utils.rnn.pad_sequence([_prompt_ids(seqs[i], dev) for i in rows], batch_first=True,
                                                  padding_value=vocab)
        seen = torch.cat([prompts, outputs], dim=1)
        rep = device_tensor([p.repetition_penalty for p in params], torch.float32, dev)[:, None]
        values = sub.gather(1, seen)  # a token seen twice writes the same value twice
        sub.scatter_(1, seen, torch.where(values > 0, values / rep, values * rep))
    if any(p.frequency_penalty != 0.0 or p.presence_penalty != 0.0 for p in params) and outputs.shape[1]:
        freq = device_tensor([p.frequency_penalty for p in params], torch.float32, dev)[:, None]
        presence = device_tensor([p.presence_penalty for p in params], torch.float32, dev)[:, None]
        ids, counts = _run_counts(outputs)
        sub.scatter_(1, ids, sub.gather(1, ids) - freq * counts - presence)
    return logits.index_put((idx,), sub[:, :vocab])


def _padded_outputs(outputs: list[list[int]], pad: int) -> torch.Tensor:
    padded = np.full((len(outputs), max(map(len, outputs), default=0)), pad, dtype=np.int64)
    for row, out in zip(padded, outputs):  # 3x faster than padding Python lists: 256 rows of 256 in 1 ms
        row[:len(out)] = out
    return torch.from_numpy(padded)


def _run_counts(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's ids sorted, and beside each id how often it occurs in its row (as float), from the runs of
    equal ids: exact, and every copy of an id gets the same count (so scattering by id stays deterministic)."""
    ids = ids.sort(dim=1).values
    starts = torch.ones_like(ids, dtype=torch.bool)
    starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
    run = starts.cumsum(dim=1) - 1
    ones = torch.ones_like(ids, dtype=torch.float32)
    return ids, torch.zeros_like(ones).scatter_add_(1, run, ones).gather(1, run)


def _penalised(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0


def _prompt_ids(seq: Sequence, device) -> torch.Tensor:
    """The prompt's ids on the logits' device, made once per sequence: rebuilding them from the Python list every
    step costs milliseconds of host time for a batch of long prompts."""
    if seq.prompt_ids_tensor is None or seq.prompt_ids_tensor.device != torch.device(device):
        seq.prompt_ids_tensor = device_tensor(seq.prompt_token_ids, torch.long, device)
    return seq.prompt_ids_tensor


def block_stop_tokens(logits: torch.Tensor, seqs: list[Sequence], eos_ids,
                      history: History | None = None) -> torch.Tensor:
    """A sequence with fewer than min_tokens outputs cannot pick a token that would stop it; `logits` itself
    when no row is blocked."""
    history = history or History.of(seqs, None, logits.shape[-1], logits.device)
    rows, cols = [], []
    for i, seq in enumerate(seqs):
        if history.num_outputs[i] < seq.params.min_tokens:
            ids = [t for t in stop_token_ids(seq.params, eos_ids) if t < logits.shape[-1]]
            rows += [i] * len(ids)
            cols += ids
    if not rows:
        return logits
    dev = logits.device
    return logits.index_put((device_tensor(rows, torch.long, dev), device_tensor(cols, torch.long, dev)),
                            torch.full((), -float("inf"), device=dev))


def apply_token_choices(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """logit_bias added, then every token outside allowed_token_ids at -inf; `logits` itself when no row has
    either. A few index writes a row, on the device (the ids were checked against the vocabulary up front)."""
    rows, cols, biases = [], [], []
    for i, seq in enumerate(seqs):
        for token, bias in (seq.params.logit_bias or {}).items():
            rows.append(i)
            cols.append(token)
            biases.append(bias)
    dev = logits.device
    if rows:
        logits = logits.index_put((device_tensor(rows, torch.long, dev), device_tensor(cols, torch.long, dev)),
                                  device_tensor(biases, torch.float32, dev), accumulate=True)
    allowed = [i for i, seq in enumerate(seqs) if seq.params.allowed_token_ids]
    if allowed:
        keep = torch.zeros(len(allowed), logits.shape[-1], dtype=torch.bool, device=dev)
        for j, i in enumerate(allowed):
            keep[j, _allowed_ids(seqs[i], dev)] = True
        idx = device_tensor(allowed, torch.long, dev)
        logits = logits.index_put((idx,), logits[idx].masked_fill(~keep, -float("inf")))
    return logits


def _allowed_ids(seq: Sequence, device) -> torch.Tensor:
    """allowed_token_ids on the logits' device, made once per sequence (a list of 100k ids rebuilt every step
    would cost every sequence in the batch milliseconds)."""
    if seq.allowed_ids_tensor is None or seq.allowed_ids_tensor.device != torch.device(device):
        seq.allowed_ids_tensor = device_tensor(seq.params.allowed_token_ids, torch.long, device)
    return seq.allowed_ids_tensor


def sampling_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """The distribution a non-greedy row samples from: temperature, top-k, top-p, min-p, softmax."""
    dev = logits.device
    logits = logits / device_tensor([p.temperature for p in params], torch.float32, dev)[:, None]
    if any(p.top_k > 0 or p.top_p < 1.0 for p in params):
        logits = _top_k_top_p(logits, params)
    if any(p.min_p > 0.0 for p in params):
        probs = logits.softmax(dim=-1)
        min_p = device_tensor([p.min_p for p in params], torch.float32, dev)[:, None]
        logits = logits.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), -float("inf"))
    return logits.softmax(dim=-1)


def _top_k_top_p(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Masks each row below its cut-off: the lowest logit that survives top-k then top-p. Only the candidates are
    sorted: the largest top-k when every row has one (Qwen's checkpoints default to top_k 1), else the whole row."""
    dev, vocab = logits.device, logits.shape[-1]
    ks = [min(p.top_k, vocab) if p.top_k > 0 else vocab for p in params]
    ranked = logits.topk(max(ks), dim=-1).values  # descending
    k = device_tensor(ks, torch.long, dev)
    # Ties with the k-th logit stay, as in transformers' TopKLogitsWarper.
    ranked = ranked.masked_fill(ranked < ranked.gather(1, (k - 1)[:, None]), -float("inf"))
    probs = ranked.softmax(dim=-1)
    top_p = device_tensor([p.top_p for p in params], torch.float32, dev)[:, None]
    # Keep a token while the more likely ones hold less than top_p; the first always stays. top_p = 1 skips
    # the test, since a float32 cumsum can reach 1 before the tail and would drop it.
    remove = (probs.cumsum(dim=-1) - probs >= top_p) & (top_p < 1.0)
    cutoff = ranked.masked_fill(remove | ranked.isneginf(), float("inf")).amin(dim=-1, keepdim=True)
    return logits.masked_fill(logits < cutoff, -float("inf"))


def logprobs_of(raw: torch.Tensor, tokens: torch.Tensor, rows: list[int], counts: list[int]) -> tuple:
    """(chosen logprob, top values, top ids) of `rows` on the device; () when no row asked. From the model's raw
    distribution (log_softmax of the unmodified logits), as OpenAI and vLLM's default report them: penalties,
    temperature and filters do not change them."""
    if not rows:
        return ()
    parts = []
    for chunk in row_chunks(rows, raw.shape[-1]):
        idx = device_tensor(chunk, torch.long, raw.device)
        logprobs = raw[idx].log_softmax(dim=-1)
        chosen = logprobs.gather(1, tokens[idx][:, None]).squeeze(1)
        parts.append((chosen, *logprobs.topk(max(counts), dim=-1)))
    return tuple(torch.cat(column) if len(parts) > 1 else column[0] for column in zip(*parts))


def row_chunks(rows: list[int], vocab: int) -> list[list[int]]:
    """`rows` in runs of sampler_chunk_rows (a GPU sort's workspace grows with them)."""
    size = sampler_chunk_rows(vocab)
    return [rows[i:i + size] for i in range(0, len(rows), size)]
