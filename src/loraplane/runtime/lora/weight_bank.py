"""LoraWeightBank: the stacked adapter weights of every wrapped layer, one row per LoRA slot,
and the step inputs those layers read."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
from torch import nn

from loraplane.runtime.lora.batch import LoraBatch, LoraStep, make_batch
from loraplane.runtime.lora.group import SHARED_INPUT, SharedInputGroup
from loraplane.runtime.lora.layer import LoraLinear
from loraplane.runtime.lora.weights import AdapterWeights

Backend = Literal["auto", "triton", "torch"]


class LoraWeightBank:
    def __init__(self, max_slots: int, max_rank: int, backend: Backend = "auto") -> None:
        if max_slots < 1 or max_rank < 1:
            raise ValueError(f"max_slots ({max_slots}) and max_rank ({max_rank}) must be >= 1")
        if backend not in ("auto", "triton", "torch"):
            raise ValueError(f"backend {backend!r} is not one of auto, triton, torch")
        self.max_slots = max_slots
        self.max_rank = max_rank
        self.backend = backend
        self.layers: dict[str, LoraLinear] = {}  # path in the model → layer
        self.other_linears: set[str] = set()  # base Linears left unwrapped, for error messages
        self.groups: list[SharedInputGroup] = []
        self.step = LoraStep()  # given to every layer at injection
        self.device = torch.device("cpu")

    @property
    def batch(self) -> LoraBatch | None:
        return self.step.batch

    @property
    def module_names(self) -> set[str]:
        return {path.rsplit(".", 1)[-1] for path in self.layers}

    @property
    def use_kernels(self) -> bool:
        return self.backend == "triton" or (self.backend == "auto" and self.device.type == "cuda")

    def add(self, layer: LoraLinear) -> None:
        self.layers[layer.name] = layer
        self.device = layer.lora_a.device

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.max_slots:
            raise ValueError(f"slot {slot} is outside [0, {self.max_slots})")

    def load(self, slot: int, adapter: AdapterWeights) -> None:
        self._check_slot(slot)
        for path, module in adapter.modules.items():
            layer = self.layers.get(path)
            if layer is None:
                short = path.rsplit(".", 1)[-1]
                why = (
                    f"it is a Linear of the base that was not wrapped (wrapped: {sorted(self.module_names)}); "
                    f"add {short!r} to the runtime's target modules"
                    if path in self.other_linears
                    else "the base model has no such Linear module (wrong base model?)"
                )
                raise ValueError(f"adapter targets module {path!r}: {why}")
            layer.check(module)
        for path, layer in self.layers.items():
            layer.load_slot(slot, adapter.modules.get(path))

    def clear(self, slot: int) -> None:
        self._check_slot(slot)
        for layer in self.layers.values():
            layer.clear_slot(slot)

    def set_batch(self, token_slots: torch.Tensor, graph_safe: bool = False) -> None:
        """token_slots: [tokens] int, -1 = base only, in the order the layers see the tokens.

        A host tensor is range-checked and, when no token has an adapter, makes the layers
        skip LoRA altogether; a device tensor is trusted and never synchronised, so the step
        (this call included) can be captured in a CUDA graph. graph_safe treats a host tensor
        as a device one: a CPU run of a graph's code takes the path the graph captures.
        """
        batch = make_batch(token_slots, self.max_slots, self.device, self.use_kernels, graph_safe)
        self.step.start(batch)

    def clear_batch(self) -> None:
        self.step.start(None)


def group_siblings(
    bank: LoraWeightBank,
    wrap: dict[str, nn.Linear],
    dtype: torch.dtype | None,
    device: torch.device | None,
) -> dict[str, tuple[SharedInputGroup, int]]:
    """Projections that read one input (q/k/v, gate/up) share a shrink, and their base weights
    one tensor (SharedInputGroup.fuse_bases): path → (group, member)."""
    member_of: dict[str, tuple[SharedInputGroup, int]] = {}
    for names in SHARED_INPUT:
        parents: dict[str, list[str]] = {}
        for path in wrap:
            parent, _, short = path.rpartition(".")
            if short in names:
                parents.setdefault(parent, []).append(path)
        for paths in parents.values():
            d_in = wrap[paths[0]].in_features
            dtypes = {dtype or wrap[p].weight.dtype for p in paths}
            devices = {device or wrap[p].weight.device for p in paths}
            if len(paths) < 2 or len(dtypes) > 1 or len(devices) > 1:
                continue
            if any(wrap[p].in_features != d_in for p in paths):
                continue
            group = SharedInputGroup(
                len(bank.groups),
                len(paths),
                bank.max_slots,
                bank.max_rank,
                d_in,
                dtypes.pop(),
                devices.pop(),
            )
            group.fuse_bases([wrap[p] for p in paths])
            bank.groups.append(group)
            member_of.update({p: (group, i) for i, p in enumerate(paths)})
    return member_of


def inject_lora(
    model: nn.Module,
    target_modules: Iterable[str],
    max_slots: int,
    max_rank: int,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    backend: Backend = "auto",
) -> LoraWeightBank:
    """Replace every nn.Linear whose short name is in target_modules with a LoraLinear, in place."""
    targets = set(target_modules)
    bank = LoraWeightBank(max_slots, max_rank, backend)
    linears = {p: m for p, m in model.named_modules() if isinstance(m, nn.Linear)}
    wrap = {p: m for p, m in linears.items() if p.rsplit(".", 1)[-1] in targets}
    bank.other_linears = set(linears) - set(wrap)
    missing = targets - {p.rsplit(".", 1)[-1] for p in wrap}
    if missing:  # checked before anything is replaced: the model stays as it was
        raise ValueError(
            f"target modules {sorted(missing)} match no nn.Linear in the model "
            f"(unwrapped Linears end in {sorted({p.rsplit('.', 1)[-1] for p in bank.other_linears})})"
        )
    dev = torch.device(device) if device is not None else None
    member_of = group_siblings(bank, wrap, dtype, dev)  # before the layers: they view its buffers
    for path, module in wrap.items():
        parent, _, short = path.rpartition(".")
        group, member = member_of.get(path, (None, 0))
        layer = LoraLinear(
            module,
            path,
            bank.step,
            max_slots,
            max_rank,
            dtype=dtype or module.weight.dtype,
            device=dev or module.weight.device,
            group=group,
            member=member,
        )
        setattr(model.get_submodule(parent), short, layer)
        bank.add(layer)
    return bank
