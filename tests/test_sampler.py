"""Sampler: penalties and filters against hand-computed values and transformers' processors, seeds, logprobs."""

import pytest
import torch
from transformers.generation.logits_process import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                                                    TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

from vlserve.engine.sampler import Sampler, apply_penalties, block_stop_tokens, row_chunks, sampling_probs
from vlserve.engine.sampling_params import SamplingParams
from vlserve.engine.sequence import Sequence

V = 64
EOS = (60, 61)


def seq(prompt=(1, 2, 3), output=(), index=0, **params) -> Sequence:
    s = Sequence("r", list(prompt), SamplingParams(**params), index=index)
    s.output_token_ids = list(output)
    return s


def rand_logits(rows: int, seed: int = 0, vocab: int = V, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale


def test_greedy_is_argmax_and_input_untouched():
    logits = rand_logits(5)
    before = logits.clone()
    out = Sampler(EOS)(logits, [seq(temperature=0.0) for _ in range(5)])
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs == [None] * 5
    assert torch.equal(logits, before)


def test_greedy_is_argmax_of_penalised_logits():
    logits = torch.zeros(1, V)
    logits[0, 5], logits[0, 7] = 2.0, 1.5
    s = seq(output=[5], temperature=0.0, repetition_penalty=2.0)  # 5 falls to 1.0, below 7
    assert Sampler(EOS)(logits, [s]).token_ids == [7]


def test_top_k_1_is_greedy():
    logits = rand_logits(8, seed=1)
    seqs = [seq(top_k=1, seed=i if i % 2 else None) for i in range(8)]
    assert Sampler(EOS)(logits, seqs).token_ids == logits.argmax(-1).tolist()


def test_repetition_penalty_by_hand():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0, 1.0]])
    before = logits.clone()
    out = apply_penalties(logits, [seq(prompt=[0, 1], output=[1, 4], repetition_penalty=2.0)])
    assert torch.equal(logits, before)  # a new tensor: the caller's logits stay as they were
    assert out.tolist() == [[1.0, -2.0, 0.5, 3.0, -4.0, 1.0]]


def test_frequency_and_presence_by_hand():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0, 1.0]])
    # Prompt tokens don't count for OpenAI's penalties: token 0 is only in the prompt.
    out = apply_penalties(logits, [seq(prompt=[0, 0], output=[3, 3, 3, 5], frequency_penalty=0.5,
                                      presence_penalty=0.25)])
    assert out[0].tolist() == pytest.approx([2.0, -1.0, 0.5, 3.0 - 1.5 - 0.25, -2.0, 1.0 - 0.5 - 0.25])


def test_repetition_penalty_matches_transformers():
    logits = rand_logits(3, seed=2)
    gen = torch.Generator().manual_seed(3)
    ids = [torch.randint(0, V, (n,), generator=gen).tolist() for n in (10, 10, 10)]
    seqs = [seq(prompt=t[:6], output=t[6:], repetition_penalty=p) for t, p in zip(ids, (1.3, 0.7, 1.0))]
    ours = apply_penalties(logits, seqs)
    for row, (t, p) in enumerate(zip(ids, (1.3, 0.7, 1.0))):
        ref = RepetitionPenaltyLogitsProcessor(p)(torch.tensor([t]), logits[row:row + 1].clone())
        torch.testing.assert_close(ours[row:row + 1], ref)


def test_min_tokens_blocks_stop_tokens_until_reached():
    logits = torch.zeros(3, V)
    seqs = [seq(output=[9], min_tokens=2, stop_token_ids=[7]),  # 1 < 2 outputs: blocked
            seq(output=[9, 9], min_tokens=2, stop_token_ids=[7]),  # reached: free
            seq(output=[], min_tokens=1, stop_token_ids=[7], ignore_eos=True)]  # EOS is no stop: free
    free = logits[1:2]
    assert block_stop_tokens(free, seqs[1:2], EOS) is free  # nothing to block: no copy
    logits = block_stop_tokens(logits, seqs, EOS)
    inf = float("inf")
    assert [logits[0, t].item() for t in (7, *EOS)] == [-inf, -inf, -inf]
    assert logits[1].eq(0).all()
    assert [logits[2, t].item() for t in (7, *EOS)] == [-inf, 0.0, 0.0]
    # The sampler never picks them, even when they are the most likely tokens.
    logits = torch.zeros(1, V)
    logits[0, list(EOS)] = 20.0
    assert Sampler(EOS)(logits, [seq(min_tokens=1, temperature=0.0)]).token_ids[0] not in EOS


def hf_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    warpers = [TemperatureLogitsWarper(p.temperature)]
    if p.top_k > 0:
        warpers.append(TopKLogitsWarper(p.top_k))
    if p.top_p < 1.0:
        warpers.append(TopPLogitsWarper(p.top_p))
    if p.min_p > 0.0:
        warpers.append(MinPLogitsWarper(p.min_p))
    for warper in warpers:
        logits = warper(None, logits)
    return logits.softmax(-1)


FILTERS = [dict(temperature=0.7), dict(temperature=1.3, top_k=5), dict(top_p=0.8), dict(temperature=0.5, top_p=0.5),
           dict(min_p=0.1), dict(temperature=1.5, min_p=0.3), dict(top_k=20, top_p=0.9, min_p=0.05),
           dict(temperature=2.0, top_k=3, top_p=0.95), dict(top_k=-1, top_p=1.0)]


def test_filtered_distributions_match_transformers():
    logits = rand_logits(len(FILTERS), seed=4, vocab=1000)
    params = [SamplingParams(**f) for f in FILTERS]
    ours = sampling_probs(logits, params)  # one batch, mixed parameters
    for row, p in enumerate(params):
        ref = hf_probs(logits[row:row + 1], p)
        assert torch.equal(ours[row:row + 1] > 0, ref > 0), FILTERS[row]
        torch.testing.assert_close(ours[row:row + 1], ref, atol=1e-6, rtol=1e-5)


TOP_K_FILTERS = [dict(temperature=0.1, top_k=1, top_p=0.001), dict(top_k=50, top_p=0.9), dict(top_k=7),
                 dict(temperature=0.6, top_k=20, top_p=0.5, min_p=0.02)]  # the first: Qwen's generation_config


def test_top_k_rows_sort_only_their_candidates_and_match_transformers():
    """Every row has a top-k: only the largest k are sorted, with the same distributions as transformers."""
    logits = rand_logits(len(TOP_K_FILTERS), seed=6, vocab=1000)
    params = [SamplingParams(**f) for f in TOP_K_FILTERS]
    ours = sampling_probs(logits, params)
    for row, p in enumerate(params):
        ref = hf_probs(logits[row:row + 1], p)
        assert torch.equal(ours[row:row + 1] > 0, ref > 0), TOP_K_FILTERS[row]
        torch.testing.assert_close(ours[row:row + 1], ref, atol=1e-6, rtol=1e-5)
    assert (ours[0] > 0).sum() == 1 and ours[0].argmax() == logits[0].argmax()


def test_top_k_keeps_ties_with_the_kth_logit():
    logits = torch.tensor([[3.0, 2.0, 0.5, 2.0, 2.0, 1.0]])
    for p in (SamplingParams(top_k=2), SamplingParams(top_k=2, top_p=0.99)):
        ours = sampling_probs(logits, [p])
        assert (ours[0] > 0).tolist() == [True, True, False, True, True, False]
        torch.testing.assert_close(ours, hf_probs(logits, p))


def test_samples_follow_the_distribution():
    # 6000 rows of one distribution, one step each: frequencies within 3% of the probabilities (> 5 sigma).
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().repeat(6000, 1)
    unseeded = Sampler(EOS, generator=torch.Generator().manual_seed(0))(logits, [seq() for _ in range(6000)])
    seeded = Sampler(EOS)(logits, [seq(seed=i) for i in range(6000)])
    for out in (unseeded, seeded):
        freq = torch.bincount(torch.tensor(out.token_ids), minlength=4) / 6000
        torch.testing.assert_close(freq, probs, atol=0.03, rtol=0)


def test_filters_are_respected_when_sampling():
    logits = rand_logits(1, seed=5).repeat(500, 1)
    out = Sampler(EOS, generator=torch.Generator().manual_seed(1))(logits, [seq(top_k=3) for _ in range(500)])
    assert set(out.token_ids) <= set(logits[0].topk(3).indices.tolist())
    assert len(set(out.token_ids)) == 3


def run_steps(sampler: Sampler, batches, steps: int = 12) -> list[list[int]]:
    """Samples `steps` tokens for every sequence of `batches` (a list of Sequence lists sampled together)."""
    for step in range(steps):
        for batch in batches:
            logits = rand_logits(len(batch), seed=100 + step, scale=0.5)  # flat: many likely tokens
            logits = logits[0].repeat(len(batch), 1)  # every row sees the same logits this step
            for s, t in zip(batch, sampler(logits, batch).token_ids):
                s.output_token_ids.append(t)
    return [[s.output_token_ids for s in batch] for batch in batches]


def test_same_seed_same_tokens_whatever_the_batch():
    alone = seq(seed=42)
    run_steps(Sampler(EOS), [[alone]])
    crowded = seq(seed=42)
    others = [seq(), seq(seed=7), seq(seed=42, index=1), seq(temperature=0.0)]
    run_steps(Sampler(EOS, generator=torch.Generator().manual_seed(9)), [others[:2] + [crowded] + others[2:]])
    assert crowded.output_token_ids == alone.output_token_ids
    # Different seeds, and the n > 1 samples of one request, differ.
    assert others[1].output_token_ids != alone.output_token_ids
    assert others[2].output_token_ids != alone.output_token_ids


def test_logprobs_are_raw_log_softmax():
    logits = rand_logits(4, seed=6)
    seqs = [seq(logprobs=5, temperature=0.7, repetition_penalty=1.5, output=[1, 2]), seq(),
            seq(logprobs=0, top_k=2, seed=1), seq(logprobs=20, temperature=0.0, presence_penalty=1.0, output=[3])]
    out = Sampler(EOS)(logits, seqs)
    ref = logits.log_softmax(-1)
    assert out.logprobs[1] is None
    for row, n in ((0, 5), (2, 0), (3, 20)):
        lp = out.logprobs[row]
        assert abs(lp.logprob - ref[row, out.token_ids[row]].item()) < 1e-6
        assert len(lp.top) == n
        values = [v for _, v in lp.top]
        assert values == sorted(values, reverse=True)
        for token, value in lp.top:
            assert abs(value - ref[row, token].item()) < 1e-6
        assert [t for t, _ in lp.top] == ref[row].topk(n).indices.tolist()


@pytest.fixture
def two_row_chunks(monkeypatch):
    """The sampler's row chunks (sampling_params.sampler_chunk_rows) hold two rows of V logits."""
    monkeypatch.setattr("vlserve.engine.sampling_params.SAMPLER_CHUNK_ELEMENTS", 2 * V)


def test_row_chunks_change_no_sample_and_no_logprob(two_row_chunks):
    """Seeded rows, greedy rows and logprobs across chunk boundaries: as one chunk (test above) or alone."""
    assert row_chunks([0, 1, 2, 3, 4], V) == [[0, 1], [2, 3], [4]]
    test_same_seed_same_tokens_whatever_the_batch()
    test_logprobs_are_raw_log_softmax()
    logits = rand_logits(5, seed=3)
    seqs = [seq(seed=s, top_p=0.8, logprobs=3) for s in range(5)]
    chunked = Sampler(EOS)(logits, seqs)
    alone = [Sampler(EOS)(logits[i:i + 1], [seq(seed=i, top_p=0.8, logprobs=3)]) for i in range(5)]
    assert chunked.token_ids == [a.token_ids[0] for a in alone]
    assert [lp.top for lp in chunked.logprobs] == [a.logprobs[0].top for a in alone]


def test_penalties_before_any_output_and_with_ragged_rows():
    """The first step has no outputs yet; rows of different prompt and output lengths pad without counting."""
    fresh = Sequence("a", [5, 5, 9], SamplingParams(repetition_penalty=2.0))
    later = Sequence("b", [1], SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5))
    later.output_token_ids = [3, 3]
    logits = torch.ones(2, 12)
    out = apply_penalties(logits[:1], [fresh])  # no outputs at all
    assert out[0].tolist() == [1, 1, 1, 1, 1, 0.5, 1, 1, 1, 0.5, 1, 1]
    logits = torch.ones(2, 12)
    out = apply_penalties(logits, [fresh, later])
    assert out[0, 5] == 0.5 and out[0, 0] == 1
    assert out[1, 1] == 0.5 and out[1, 3] == 0.5 - 2 * 0.5 and out[1, 5] == 1


def dense_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """The textbook form: vocabulary-wide counts and masks, row by row."""
    out = logits.clone()
    for row, s in enumerate(seqs):
        p, vocab = s.params, logits.shape[1]
        counts = torch.bincount(torch.tensor(s.output_token_ids, dtype=torch.long), minlength=vocab).float()
        seen = torch.bincount(torch.tensor(s.prompt_token_ids), minlength=vocab).bool() | (counts > 0)
        x = out[row]
        x = torch.where(seen, torch.where(x > 0, x / p.repetition_penalty, x * p.repetition_penalty), x)
        out[row] = x - p.frequency_penalty * counts - p.presence_penalty * (counts > 0)
    return out


def test_penalties_on_seen_ids_equal_the_dense_form():
    """Many repeats, ragged prompts and outputs, a row without outputs, a row with no penalty in between."""
    gen = torch.Generator().manual_seed(8)
    logits = rand_logits(5, seed=8, vocab=300)
    seqs = []
    for row, (n_prompt, n_out) in enumerate([(40, 200), (3, 0), (100, 7), (1, 1), (9, 60)]):
        s = Sequence(f"r{row}", torch.randint(0, 60, (n_prompt,), generator=gen).tolist(),
                     SamplingParams(repetition_penalty=1.0 if row == 3 else 1.3, frequency_penalty=0.2 * row,
                                    presence_penalty=0.0 if row == 3 else 0.7))
        s.output_token_ids = torch.randint(0, 80, (n_out,), generator=gen).tolist()
        seqs.append(s)
    seqs[3].params = SamplingParams()  # not penalised: its row stays as it was
    ours = apply_penalties(logits, seqs)
    torch.testing.assert_close(ours, dense_penalties(logits, seqs))
    assert torch.equal(ours[3], logits[3])
    assert torch.equal(apply_penalties(logits, seqs), ours)  # copies of an id write the same value: deterministic
