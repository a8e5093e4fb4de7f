"""The batched sampler: greedy and logprob exactness, broken rows, seeded rows independent of
their batch, top_k/top_p sets against an exact reference, frequencies, and one read-back."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from loraplane.runtime import sampler as sampler_module
from loraplane.runtime.sampler import FAILED, Sampler, _cut_top_p_
from loraplane.runtime.sampling import MIN_TEMPERATURE, SamplingParams

NEG_INF = float("-inf")


def random_logits(rows: int, vocab: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    return (torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3).to(dtype)


def mixed_params(rows: int) -> list[SamplingParams]:
    """Every kind of row: greedy by temperature and by top_k 1, seeded and unseeded, top_k,
    top_p, both, and top_k above the vocabulary."""
    kinds = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.8, seed=5),
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=1.2, top_k=5),
        SamplingParams(temperature=0.7, top_p=0.8, seed=9),
        SamplingParams(temperature=1.0, top_k=1),
        SamplingParams(temperature=1.5, top_k=40, top_p=0.9),
        SamplingParams(temperature=2.0, top_k=100_000),
    ]
    return [kinds[i % len(kinds)] for i in range(rows)]


def log_softmax_at(logits: torch.Tensor, tokens: list[int]) -> list[float]:
    lp = torch.log_softmax(logits.float(), dim=-1)
    return [float(lp[i, t]) for i, t in enumerate(tokens)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_rows_are_the_argmax_with_its_log_softmax(dtype):
    logits = random_logits(16, 50, seed=1, dtype=dtype)
    params = [SamplingParams(temperature=0.0)] * 8 + [SamplingParams(top_k=1)] * 8
    sampler = Sampler()
    tokens, logprobs = sampler(logits, list(range(16)), params)
    assert tokens == logits.float().argmax(dim=-1).tolist()
    assert logprobs == log_softmax_at(logits, tokens)  # exactly: the same fp32 op
    assert not sampler.shared and not sampler.generators  # no sampling branch, no draw


def test_sampled_rows_report_the_log_softmax_of_the_unmodified_logits():
    logits = random_logits(64, 100, seed=2)
    tokens, logprobs = Sampler()(logits, list(range(64)), mixed_params(64))
    assert all(0 <= t < 100 for t in tokens)
    assert logprobs == log_softmax_at(logits, tokens)


def test_a_non_finite_row_fails_alone():
    logits = random_logits(8, 30, seed=3)
    logits[0, :5] = NEG_INF  # -inf is a masked token, not a broken row
    params = mixed_params(8)
    want = Sampler()(logits, list(range(8)), params)
    broken = logits.clone()
    broken[2, 7] = float("nan")
    broken[5] = float("nan")
    broken[6, 0] = float("inf")
    broken[1, 3] = float("inf")
    broken[4] = NEG_INF  # no token left to draw
    tokens, logprobs = Sampler()(broken, list(range(8)), params)
    for i in range(8):
        if i in (1, 2, 4, 5, 6):
            assert tokens[i] == FAILED and math.isnan(logprobs[i])
        else:  # same draws as without the broken rows: seeded, and the shared stream is too
            assert (tokens[i], logprobs[i]) == (want[0][i], want[1][i])


def test_a_seeded_row_draws_the_same_tokens_whatever_shares_its_batch():
    mine = SamplingParams(temperature=0.9, top_k=20, top_p=0.95, seed=42)
    alone, crowded = Sampler(seed=0), Sampler(seed=123)
    others = mixed_params(12)
    got_alone, got_crowded = [], []
    for step in range(10):
        row = random_logits(1, 64, seed=100 + step)
        got_alone.append(alone(row, [7], [mine])[0][0])
        at = (step * 5) % 13  # a different row each step, among different neighbours
        batch = random_logits(13, 64, seed=200 + step)
        batch[at] = row[0]
        params = [*others[:at], mine, *others[at:]]
        seq_ids = [1000 + i for i in range(at)] + [7] + [2000 + i for i in range(at, 12)]
        got_crowded.append(crowded(batch, seq_ids, params)[0][at])
    assert got_alone == got_crowded
    assert len(set(got_alone)) > 1  # it did sample


def test_drawing_in_chunks_changes_no_seeded_or_greedy_row(monkeypatch):
    logits = random_logits(40, 50, seed=11)
    params = [
        SamplingParams(temperature=0.0) if i % 3 == 0 else SamplingParams(top_k=9, seed=i)
        for i in range(40)
    ]
    whole = Sampler()(logits, list(range(40)), params)
    monkeypatch.setattr(sampler_module, "DRAW_LOGITS", 3 * 50)  # 3 rows a draw
    assert Sampler()(logits, list(range(40)), params) == whole


def test_forget_restarts_a_seeded_sequence():
    logits = random_logits(1, 64, seed=4)
    sampler, params = Sampler(), [SamplingParams(temperature=1.5, seed=3)]
    first = [sampler(logits, [9], params)[0][0] for _ in range(6)]
    sampler.forget(9)
    assert [sampler(logits, [9], params)[0][0] for _ in range(6)] == first


def test_top_k_1_is_greedy():
    logits = random_logits(32, 80, seed=5)
    params = [SamplingParams(temperature=t, top_k=1, seed=s) for t in (0.5, 2.0) for s in range(16)]
    assert Sampler()(logits, list(range(32)), params)[0] == logits.argmax(dim=-1).tolist()


# Integer logits with ties, and temperatures that are powers of two: scaling them is exact in
# fp32, so the allowed sets below are exact, ties included.
TIED = [3.0, 1.0, 3.0, 0.0, 2.0, 2.0, 2.0, -1.0, 1.0, NEG_INF, 0.5, -3.0]
# Distinct logits for top_p, whose prefix is ambiguous only among equal probabilities.
DISTINCT = [0.6, 1.5, 1.0, 2.0, 0.3, 0.0, -0.5, -1.0, -2.0, NEG_INF, -0.2, 0.8]


def allowed(logits: list[float], p: SamplingParams) -> set[int]:
    """The tokens p may draw, computed in float64 from the definitions."""
    order = sorted(range(len(logits)), key=lambda i: -logits[i])
    keep = [i for i in order if logits[i] > NEG_INF]
    if p.top_k:
        kth = logits[order[min(p.top_k, len(logits)) - 1]]
        keep = [i for i in keep if logits[i] >= kth]  # every tie with the kth stays
    if p.top_p < 1.0:
        top = max(logits)
        weights = [math.exp((logits[i] - top) / p.temperature) for i in keep]
        mass, prefix = 0.0, []
        for i, w in zip(keep, weights, strict=True):
            if mass >= p.top_p:
                break
            prefix.append(i)
            mass += w / sum(weights)
            assert abs(mass - p.top_p) > 1e-3, "a top_p this close to a boundary is ambiguous"
        keep = prefix
    return set(keep)


CUTS = [
    (TIED, SamplingParams(temperature=0.5, top_k=2)),  # the two 3s
    (TIED, SamplingParams(temperature=1.0, top_k=3)),  # 3, 3 and every 2
    (TIED, SamplingParams(temperature=2.0, top_k=6)),  # the 1s tie at the 6th
    (DISTINCT, SamplingParams(temperature=1.0, top_p=0.5)),
    (DISTINCT, SamplingParams(temperature=2.0, top_p=0.9)),
    (DISTINCT, SamplingParams(temperature=1.0, top_p=1e-300)),  # the first token alone
    (DISTINCT, SamplingParams(temperature=2.0, top_k=6, top_p=0.8)),
    (TIED, SamplingParams(temperature=1.0)),  # no cut: every finite token
]


def test_top_k_and_top_p_draw_exactly_the_allowed_tokens():
    draws = 1500
    logits = torch.tensor([row for row, _ in CUTS for _ in range(draws)])
    params = [p for _, p in CUTS for _ in range(draws)]
    tokens, _ = Sampler(seed=7)(logits, list(range(len(params))), params)
    for n, (row, p) in enumerate(CUTS):
        seen = set(tokens[n * draws : (n + 1) * draws])
        assert seen == allowed(row, p), (row, p)  # nothing outside, and every one inside


def test_a_row_without_top_p_keeps_the_tokens_fp32_rounds_past_a_mass_of_1():
    # The top token's probability rounds to 1.0, so the mass before the second reaches 1.
    probs = torch.softmax(torch.tensor([[0.0, -18.0], [0.0, -18.0]]), dim=-1)
    assert probs[0, 0] == 1.0 and probs[0, 1] > 0
    cut = probs.clone()
    _cut_top_p_(cut, torch.tensor([1.0, 0.99]))  # batched with a row that cuts
    assert cut[0].tolist() == probs[0].tolist() and cut[1].tolist() == [1.0, 0.0]


def test_a_cut_token_never_wins_even_against_zero_noise(monkeypatch):
    # E = 0 makes every kept token's p / E inf and every cut one's 0 / 0 NaN, which argmax
    # would pick: the cut tokens must be out of the race, not merely at p = 0.
    monkeypatch.setattr(torch.Tensor, "exponential_", lambda self, **_: self.zero_())
    p = SamplingParams(temperature=1.0, top_k=3)
    tokens, _ = Sampler()(torch.tensor([TIED]), [1], [p])
    assert tokens[0] in allowed(TIED, p)


def chi_square(counts: Counter[int], probs: list[float], draws: int) -> float:
    return sum((counts[i] - draws * p) ** 2 / (draws * p) for i, p in enumerate(probs) if p > 0)


@pytest.mark.parametrize("seeded", [False, True])
def test_frequencies_follow_the_tempered_softmax(seeded):
    draws, vocab, temperature = 8000, 8, 0.7
    row = random_logits(1, vocab, seed=6)[0] / 2
    probs = torch.softmax(row.double() / temperature, dim=-1).tolist()
    params = [
        SamplingParams(temperature=temperature, seed=s if seeded else None) for s in range(draws)
    ]
    tokens, _ = Sampler(seed=11)(row.expand(draws, vocab), list(range(draws)), params)
    stat = chi_square(Counter(tokens), probs, draws)
    dof = vocab - 1
    assert stat < dof + 6 * math.sqrt(2 * dof), (stat, Counter(tokens), probs)


def test_frequencies_after_a_cut_follow_the_renormalized_softmax():
    draws, p = 8000, SamplingParams(temperature=2.0, top_k=6, top_p=0.8)
    keep = allowed(DISTINCT, p)
    top = max(DISTINCT)
    weights = [math.exp((x - top) / 2.0) if i in keep else 0.0 for i, x in enumerate(DISTINCT)]
    probs = [w / sum(weights) for w in weights]
    logits = torch.tensor([DISTINCT]).expand(draws, -1)
    tokens, _ = Sampler(seed=12)(logits, list(range(draws)), [p] * draws)
    dof = len(keep) - 1
    assert chi_square(Counter(tokens), probs, draws) < dof + 6 * math.sqrt(2 * dof)


def test_extreme_temperatures_never_make_nan():
    logits = torch.tensor(
        [
            [0.0, 10.0, 10.0 - 1e-5, NEG_INF, 5.0],
            [-1e4, 1e4, 0.0, 3.0, NEG_INF],
            [1e30, -1e30, 0.0, 1.0, 2.0],
            [0.0, 1.0, 2.0, 3.0, 4.0],
        ]
    )
    for temperature in (MIN_TEMPERATURE, 1e-4, 100.0, 1e-30):
        for top_p in (1.0, 1e-300):
            p = SamplingParams(temperature=temperature, top_p=top_p, seed=1)
            tokens, logprobs = Sampler()(logits, [1, 2, 3, 4], [p] * 4)
            assert all(0 <= t < 5 and logits[i, t] > NEG_INF for i, t in enumerate(tokens))
            assert not any(math.isnan(lp) for lp in logprobs)
            if temperature < 1e-3 or top_p < 1.0:
                assert tokens[1:3] == [1, 0]  # cold or cut: the top token


SYNCS = ("item", "tolist", "cpu", "numpy", "nonzero", "__bool__", "__int__", "__float__")


@pytest.mark.parametrize("rows", [8, 64])
def test_a_step_reads_back_once_whatever_its_rows(monkeypatch, rows):
    """On a GPU each of these waits for the device; the sampler calls one cpu() and one
    tolist() (on the copy, already on the host) for the whole batch."""
    logits = random_logits(rows, 200, seed=8)
    logits[3, 4] = float("nan")
    calls: Counter[str] = Counter()
    for name in SYNCS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    tokens, _ = Sampler()(logits, list(range(rows)), mixed_params(rows))
    monkeypatch.undo()
    assert tokens[3] == FAILED
    assert calls == {"cpu": 1, "tolist": 1}


def test_without_top_p_nothing_sorts_the_vocabulary(monkeypatch):
    sorts = Counter[int]()
    original = torch.Tensor.sort

    def counted(self, *args, **kwargs):
        sorts[self.shape[-1]] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "sort", counted)
    params = [SamplingParams(temperature=1.0, top_k=k) for k in (0, 3, 10)]
    Sampler()(random_logits(3, 1000, seed=9), [1, 2, 3], params)
    assert not sorts
    Sampler()(random_logits(1, 1000, seed=9), [1], [SamplingParams(top_p=0.5)])
    assert sorts == {1000: 1}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_nothing_before_the_read_back_waits_for_the_device():
    logits = random_logits(64, 32_000, seed=10).cuda()
    logits[5, 9] = float("inf")
    params, sampler = mixed_params(64), Sampler()
    sampler(logits, list(range(64)), params)  # warm up: generators, pinned-memory pool
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    torch.cuda.set_sync_debug_mode("error")
    try:
        choice = sampler.choose(logits, list(range(64)), params)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    # Within kv_memory.graph_reserve_bytes: two fp32 copies of the logits, and one draw.
    assert torch.cuda.max_memory_allocated() - before < 2 * logits.numel() * 4 + (150 << 20)
    tokens = choice[0].long().tolist()
    assert tokens[5] == FAILED
    greedy = [i for i, p in enumerate(params) if p.greedy and i != 5]
    assert [tokens[i] for i in greedy] == logits[greedy].argmax(dim=-1).tolist()
