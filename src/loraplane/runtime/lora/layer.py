"""LoraLinear: a base nn.Linear plus this module's slice of every adapter slot."""

from __future__ import annotations

import torch
from torch import nn

from loraplane.runtime.kernels.lora_expand import lora_expand, lora_expand_ref
from loraplane.runtime.kernels.lora_expand_group import lora_expand_group
from loraplane.runtime.kernels.lora_shrink import lora_shrink, lora_shrink_ref
from loraplane.runtime.lora.batch import LoraBatch, LoraStep
from loraplane.runtime.lora.group import SharedInputGroup
from loraplane.runtime.lora.weights import LoraModuleWeights


class LoraLinear(nn.Module):
    lora_a: torch.Tensor  # [slots, max_rank, d_in]
    lora_b: torch.Tensor  # [slots, d_out, max_rank]
    ranks: torch.Tensor  # [slots] int32, 0 = this slot's adapter does not target this module
    scales: torch.Tensor  # [slots] fp32

    def __init__(
        self,
        base: nn.Linear,
        name: str,
        step: LoraStep,
        max_slots: int,
        max_rank: int,
        dtype: torch.dtype,
        device: torch.device,
        group: SharedInputGroup | None = None,
        member: int = 0,
    ) -> None:
        """step: the model's one LoraStep, read in forward. group, member: the siblings this
        layer shares a shrink with (lora/group.py), and its place among them; lora_a and ranks
        are then views of the group's buffers."""
        super().__init__()
        self.base = base
        self.name = name  # path in the base model, e.g. "model.layers.0.self_attn.q_proj"
        self.step = step  # plain attribute, not a child module
        self.max_slots, self.max_rank = max_slots, max_rank
        self.group, self.member = group, member
        s, r, d_in, d_out = max_slots, max_rank, base.in_features, base.out_features
        if group is None:
            a = torch.zeros(s, r, d_in, dtype=dtype, device=device)
            ranks = torch.zeros(s, dtype=torch.int32, device=device)
        else:
            a, ranks = group.a[:, group.cols(member)], group.ranks[member]
            assert a.shape == (s, r, d_in) and a.dtype == dtype, (name, a.dtype, a.shape)
        # Slot state is runtime data, not weights: kept out of state_dict.
        self.register_buffer("lora_a", a, persistent=False)
        self.register_buffer(
            "lora_b", torch.zeros(s, d_out, r, dtype=dtype, device=device), persistent=False
        )
        self.register_buffer("ranks", ranks, persistent=False)
        self.register_buffer(
            "scales", torch.zeros(s, dtype=torch.float32, device=device), persistent=False
        )

    # The wrapped layer still looks like a Linear to code that inspects it.
    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def check(self, module: LoraModuleWeights) -> None:
        d_out, d_in = self.out_features, self.in_features
        if module.a.shape[1] != d_in or module.b.shape[0] != d_out:
            raise ValueError(
                f"{self.name}: adapter A {tuple(module.a.shape)} / B {tuple(module.b.shape)} "
                f"do not fit the base layer (d_in={d_in}, d_out={d_out})"
            )
        if module.rank > self.max_rank:
            raise ValueError(
                f"{self.name}: adapter rank {module.rank} exceeds max_rank {self.max_rank}"
            )

    @torch.no_grad()
    def load_slot(self, slot: int, module: LoraModuleWeights | None) -> None:
        self.clear_slot(slot)
        if module is None:
            return  # rank 0: the kernels skip this slot here
        r = module.rank
        # Asynchronous from a pinned host copy (AdapterWeights.pin): stream-ordered before
        # the next forward, and torch keeps the host memory until the copy is done.
        self.lora_a[slot, :r].copy_(module.a, non_blocking=True)
        self.lora_b[slot, :, :r].copy_(module.b, non_blocking=True)
        self.ranks[slot] = r
        self.scales[slot] = module.scaling

    @torch.no_grad()
    def clear_slot(self, slot: int) -> None:
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        self.ranks[slot] = 0
        self.scales[slot] = 0.0

    def tokens(self, x: torch.Tensor, batch: LoraBatch) -> torch.Tensor:
        """x: [..., d_in] → [tokens, d_in], one token per slot that set_batch was given."""
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] != batch.num_tokens:
            raise ValueError(
                f"{self.name}: got {x2.shape[0]} tokens but set_batch was given "
                f"{batch.num_tokens}; call set_batch with one slot per token of this forward"
            )
        return x2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        batch = self.step.batch
        if batch is None or batch.token_slots is None:
            return y
        x2 = self.tokens(x, batch)
        y2 = y.view(-1, self.out_features)  # [tokens, d_out], a view: the delta lands in y
        if batch.tiles is not None:
            if self.group is not None:
                h = self.group.shrink(self.member, x2, self.step)
            else:
                h = lora_shrink(x2.contiguous(), self.lora_a, self.ranks, batch.tiles)
            lora_expand(y2, h, self.lora_b, self.ranks, self.scales, batch.tiles)
        else:
            ts = batch.token_slots
            h = lora_shrink_ref(x2, self.lora_a, self.ranks, ts)
            y2.copy_(lora_expand_ref(y2, h, self.lora_b, self.ranks, self.scales, ts))
        return y

    def extra_repr(self) -> str:
        return f"{self.name}, slots={self.max_slots}, max_rank={self.max_rank}"


def _whole_group(modules: tuple[nn.Module, ...]) -> SharedInputGroup | None:
    """The group whose members modules are, all of them in member order; else None."""
    first = modules[0] if modules else None
    group = first.group if isinstance(first, LoraLinear) else None
    if group is None or len(modules) != group.size:
        return None
    for member, m in enumerate(modules):
        if not isinstance(m, LoraLinear) or m.group is not group or m.member != member:
            return None
    return group


def project(x: torch.Tensor, *modules: nn.Module) -> tuple[torch.Tensor, ...]:
    """Each module applied to x. For all the members of one shared-input group, in order: one
    base GEMM (lora/group.py fuse_bases) and, under a batch that runs the kernels, one shrink
    and one expand launch in all. Anything else runs module by module, as HF models call them."""
    group = _whole_group(modules)
    if group is None:
        return tuple(m(x) for m in modules)
    layers = [m for m in modules if isinstance(m, LoraLinear)]
    batch = layers[0].step.batch
    if batch is not None and batch.token_slots is not None and batch.tiles is None:
        return tuple(m(x) for m in modules)  # the torch backend's reference path
    ys = group.base(x, [layer.base for layer in layers])  # [..., d_out_m]
    if batch is None or batch.tiles is None:
        return ys  # no adapter in this batch
    x2 = layers[0].tokens(x, batch)
    h = group.shrink_all(x2, batch.tiles)
    lora_expand_group(
        [y.view(-1, layer.out_features) for y, layer in zip(ys, layers, strict=True)],
        h,
        [layer.lora_b for layer in layers],
        group.ranks,
        [layer.scales for layer in layers],
        batch.tiles,
    )
    return ys
