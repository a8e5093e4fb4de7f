"""Next tokens from last-token logits: greedy rows in one argmax, sampled rows one by one.

A request with a seed gets its own generator, so its output does not depend on what else
shares the batch.
"""

from __future__ import annotations

import torch

from loraplane.runtime.sampling import SamplingParams

FAILED = -1  # the token of a row that could not be sampled


class Sampler:
    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.generators: dict[int, torch.Generator] = {}  # seq_id -> its own generator
        self.shared: dict[torch.device, torch.Generator] = {}

    def _generator(self, seq_id: int, params: SamplingParams, device: torch.device):
        if params.seed is None:
            if device not in self.shared:
                self.shared[device] = torch.Generator(device=device).manual_seed(self.seed)
            return self.shared[device]
        if seq_id not in self.generators:
            self.generators[seq_id] = torch.Generator(device=device).manual_seed(params.seed)
        return self.generators[seq_id]

    def forget(self, seq_id: int) -> None:
        self.generators.pop(seq_id, None)

    def __call__(
        self, logits: torch.Tensor, seq_ids: list[int], params: list[SamplingParams]
    ) -> tuple[list[int], list[float]]:
        """Next token of each row and its log-probability under the unmodified logits.

        A row whose logits hold NaN or +inf gets token FAILED: only that sequence fails,
        never the rows it shares the batch with.
        """
        # logits: [seqs, vocab]
        assert logits.dim() == 2 and logits.shape[0] == len(seq_ids) == len(params)
        broken = (logits.isnan() | (logits == float("inf"))).any(dim=-1).tolist()
        out = logits.argmax(dim=-1).tolist()
        for i, p in enumerate(params):
            if broken[i]:
                out[i] = FAILED
            elif not p.greedy:
                out[i] = self._sample(logits[i], seq_ids[i], p)
        chosen = torch.tensor([max(t, 0) for t in out], device=logits.device)[:, None]
        logprobs = torch.log_softmax(logits.float(), dim=-1).gather(1, chosen)[:, 0]
        return out, logprobs.tolist()

    def _sample(self, logits: torch.Tensor, seq_id: int, p: SamplingParams) -> int:
        # logits: [vocab], finite. Shift so the top logit is 0 before dividing: a tiny
        # temperature then sends the others to -inf, not the top one to inf (inf - inf is NaN).
        row = logits.float()
        row = (row - row.max()) / p.temperature
        if p.top_k:
            kth = torch.topk(row, min(p.top_k, row.shape[0])).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        probs = torch.softmax(row, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            # Keep the smallest prefix whose mass reaches top_p, and always the first token
            # (a top_p below fp32's smallest number compares as 0 and would drop them all).
            drop = sorted_probs.cumsum(0) - sorted_probs >= p.top_p
            drop[0] = False
            sorted_probs[drop] = 0.0
            probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
        gen = self._generator(seq_id, p, logits.device)
        return int(torch.multinomial(probs, 1, generator=gen))
