"""Next tokens from last-token logits: the whole batch on the device, read back in one copy.

Greedy rows are one argmax. Sampled rows are scaled, cut (top_k, top_p) and drawn together
by the exponential race: argmax(probs / E) with E ~ Exp(1) is token i with probability
probs[i], so a draw needs noise, not a host round trip (torch.multinomial per row was one
sync per row). A request with a seed draws its noise from its own generator, so its output
depends neither on what else shares the batch nor on its row.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from loraplane.runtime.sampling import SamplingParams

FAILED = -1  # the token of a row that could not be sampled
# Logits drawn together at most. While it runs a draw holds up to ~17 bytes per logit (sort
# values and int64 indices, cumsum, probs, noise; ~5 without top_k and top_p), so this bounds
# it to ~70 MiB whatever the batch, beside the two fp32 copies of the whole batch's logits
# (sanitized, and their log_softmax) within kv_memory.graph_reserve_bytes's four.
DRAW_LOGITS = 1 << 22


class Sampler:
    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.generators: dict[int, torch.Generator] = {}  # seq_id -> its own generator
        self.shared: dict[torch.device, torch.Generator] = {}

    def _own(self, seq_id: int, seed: int, device: torch.device) -> torch.Generator:
        if seq_id not in self.generators:
            self.generators[seq_id] = torch.Generator(device=device).manual_seed(seed)
        return self.generators[seq_id]

    def _shared(self, device: torch.device) -> torch.Generator:
        if device not in self.shared:
            self.shared[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self.shared[device]

    def forget(self, seq_id: int) -> None:
        self.generators.pop(seq_id, None)

    def __call__(
        self, logits: torch.Tensor, seq_ids: list[int], params: list[SamplingParams]
    ) -> tuple[list[int], list[float]]:
        """Next token of each row and its log-probability under the unmodified logits.

        A row whose logits hold NaN or +inf, or are all -inf, gets token FAILED (and logprob
        NaN): only that sequence fails, never the rows it shares the batch with.
        """
        return read_back(self.choose(logits, seq_ids, params))

    def choose(
        self, logits: torch.Tensor, seq_ids: list[int], params: list[SamplingParams]
    ) -> torch.Tensor:
        """__call__ without the read-back: [2, seqs] float64 on the logits' device, row 0 the
        tokens, row 1 their logprobs. Nothing here waits for the device."""
        # logits: [seqs, vocab]
        assert logits.dim() == 2 and logits.shape[0] == len(seq_ids) == len(params)
        logits = logits.float()
        # NaN or +inf anywhere, or no finite logit at all (every token -inf): nothing to draw.
        broken = (logits.isnan() | (logits == float("inf"))).any(dim=-1) | (
            logits == float("-inf")
        ).all(dim=-1)  # [seqs]
        # Zeroed before any batched op, so no NaN or inf of a broken row can reach the others.
        logits = logits.masked_fill(broken[:, None], 0.0)
        tokens = logits.argmax(dim=-1)  # [seqs]
        # Seeded rows first: their noise is drawn row by row, the others' in one call.
        sampled = [i for i, p in enumerate(params) if not p.greedy]
        rows = sorted(sampled, key=lambda i: params[i].seed is None)
        if rows:
            index, drawn = self._sample(logits, rows, seq_ids, params)
            tokens = tokens.index_copy(0, index, drawn)
        logprobs = torch.log_softmax(logits, dim=-1).gather(1, tokens[:, None])[:, 0]
        tokens = tokens.masked_fill(broken, FAILED)
        logprobs = logprobs.masked_fill(broken, float("nan"))
        # float64 holds every token id and every fp32 logprob exactly.
        return torch.stack([tokens.double(), logprobs.double()])

    def _sample(
        self,
        logits: torch.Tensor,
        rows: list[int],
        seq_ids: list[int],
        params: list[SamplingParams],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows drawn (seeded ones first) and their tokens, both [len(rows)]."""
        # logits: [seqs, vocab], finite
        vocab = logits.shape[1]
        ps = [params[i] for i in rows]
        # One small host-to-device copy carries every per-row setting.
        settings = _to_device(
            [
                rows,
                [p.temperature for p in ps],
                [min(p.top_k, vocab) for p in ps],
                [p.top_p for p in ps],
            ],
            logits.device,
        )  # [4, rows]
        step = max(1, DRAW_LOGITS // vocab)
        drawn = []
        for a in range(0, len(rows), step):
            chunk = rows[a : a + step]  # seeded ones still first
            ids = [seq_ids[i] for i in chunk]
            drawn.append(self._draw(logits, settings[:, a : a + step], ids, ps[a : a + step]))
        return settings[0].long(), torch.cat(drawn)

    def _draw(
        self,
        logits: torch.Tensor,
        settings: torch.Tensor,
        seq_ids: list[int],
        ps: list[SamplingParams],
    ) -> torch.Tensor:
        """Tokens of some sampled rows, seeded ones first; every op in place where it can be."""
        # logits: [seqs, vocab]; settings: [4, rows]: row, temperature, top_k, top_p
        index, temperature, top_k, top_p = settings.unbind(0)
        x = logits.index_select(0, index.long())  # [rows, vocab]
        # Shift so each row's top logit is 0 before dividing: a tiny temperature then sends
        # the others to -inf, not the top one to inf (inf - inf is NaN).
        x.sub_(x.amax(dim=-1, keepdim=True)).div_(temperature.float()[:, None])
        k_max = max(min(p.top_k, x.shape[1]) for p in ps)
        if k_max:
            _cut_top_k_(x, top_k.long(), k_max)
        probs = x.softmax(dim=-1)
        del x
        if any(p.top_p < 1.0 for p in ps):
            _cut_top_p_(probs, top_p.float())
        return self._race_(probs, seq_ids, ps)

    def _race_(
        self, probs: torch.Tensor, seq_ids: list[int], params: list[SamplingParams]
    ) -> torch.Tensor:
        """One token per row drawn from probs (overwritten): argmax(probs / E), E ~ Exp(1),
        with a seeded row's E from its own generator. Seeded rows come first."""
        # probs: [rows, vocab]
        noise = torch.empty_like(probs)
        seeded = [p.seed for p in params if p.seed is not None]
        for j, seed in enumerate(seeded):  # a launch per seeded row, and no sync
            noise[j].exponential_(generator=self._own(seq_ids[j], seed, probs.device))
        if len(seeded) < len(params):
            noise[len(seeded) :].exponential_(generator=self._shared(probs.device))
        # A cut token (p = 0) never wins, even against E = 0 (0/0 is NaN, which argmax picks).
        cut = probs == 0
        return probs.div_(noise).masked_fill_(cut, -1.0).argmax(dim=-1)


def take_tokens(input_ids: torch.Tensor, index: torch.Tensor, choice: torch.Tensor) -> None:
    """input_ids[index[0]] = the tokens at rows index[1] of an earlier step's choice, on the
    device: the inputs of sequences whose last token the host has not read back yet (async
    scheduling). A FAILED row gives token 0, a valid id: that sequence fails on the host once
    its token is read, and the step meanwhile must not index out of the embedding."""
    # input_ids: [tokens] long; index: [2, k] long; choice: [2, sampled] float64
    assert index.shape[0] == 2 and choice.dim() == 2, (index.shape, choice.shape)
    tokens = choice[0].index_select(0, index[1]).clamp(min=0).long()
    input_ids.index_copy_(0, index[0], tokens)


def read_back(choice: torch.Tensor) -> tuple[list[int], list[float]]:
    """The step's one device-to-host copy: [2, seqs] tokens and logprobs to Python lists."""
    tokens, logprobs = choice.cpu().tolist()
    return [int(t) for t in tokens], logprobs


def _to_device(columns: Sequence[Sequence[float]], device: torch.device) -> torch.Tensor:
    """Host lists as one [columns, n] float64 tensor on the device (exact for ints < 2**53)."""
    host = torch.tensor(columns, dtype=torch.float64)
    if device.type == "cuda":  # from pinned memory the copy is queued; pageable would wait
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def _cut_top_k_(x: torch.Tensor, top_k: torch.Tensor, k_max: int) -> None:
    """-inf below each row's kth largest value, in place; ties with the kth stay. top_k 0
    keeps the row whole."""
    # x: [rows, vocab]; top_k: [rows], each <= k_max <= vocab
    kth = x.topk(k_max, dim=-1).values.gather(1, (top_k - 1).clamp(min=0)[:, None])
    kth.masked_fill_(top_k[:, None] == 0, float("-inf"))
    x.masked_fill_(x < kth, float("-inf"))


def _cut_top_p_(probs: torch.Tensor, top_p: torch.Tensor) -> None:
    """0 outside each row's smallest prefix (by probability) whose mass reaches its top_p, in
    place; top_p 1 keeps the row whole."""
    # probs: [rows, vocab]; top_p: [rows]
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    drop = sorted_probs.cumsum(dim=-1).sub_(sorted_probs) >= top_p[:, None]
    # Always keep the first token: a top_p below fp32's smallest number compares as 0 and
    # would drop them all. A row at top_p 1 keeps its tail, where fp32's cumsum can reach 1
    # before the end.
    drop[:, 0] = False
    drop &= (top_p < 1.0)[:, None]
    probs.scatter_(1, order, sorted_probs.masked_fill_(drop, 0.0))
