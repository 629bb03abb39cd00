"""Adapters: small trainable modules beside UNet layers, the third method shape (``shape = "adapter"``).

A method of this shape (:class:`erasure.method.AdapterMethod`, e.g. SPM's one-dimensional membrane, or per-concept
LoRAs) does not train a subset of the UNet's own weights: it attaches :class:`LowRankAdapter` modules to chosen
``Linear``/``Conv2d`` layers and the shared loop trains those. An attached adapter adds to its layer's output

    y = layer(x) + m · (alpha / rank) · up(down(x))

through a forward hook; the layer itself is not replaced or renamed. Each adapter is a child module of its layer, so
its weights are ordinary UNet parameters named ``<layer>.erasure_adapters.<set>.{down,up}.weight``: everything that
swaps or copies UNet parameters by name (the frozen teacher's ``functional_call``, ``swapped_params`` in
:func:`erasure.generation.generate`, checkpoints, deltas) works on them unchanged. The base fingerprint
(:func:`erasure.models.unet_fingerprint`) leaves them out.

An adapter starts as the identity (``up`` = 0), so the trained tensors' starting values, which the teacher keeps,
are the base model. A :class:`AdapterSet` is one named group of adapters (one membrane, one concept's LoRA) with one
multiplier ``m`` for all its layers: 1 by default, 0 switches it off, and a tensor gives one value per batch row.

A set may carry a *gate*: a per-prompt multiplier computed when images are generated, by the method named in it
(:meth:`erasure.method.AdapterMethod.gate`; SPM's facilitated transport). :func:`gated` applies it around each
batch of :func:`erasure.generation.generate`; a direct UNet call sees the set's own multiplier (1 unless changed).

A delta of an adapter method holds the adapter weights by those names plus, in its metadata (``adapters``), each
set's :meth:`AdapterSet.describe` (placement, rank, alpha, gate); :func:`erasure.delta.load_delta` attaches the
described sets (identity) before the weights are swapped or copied in.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import weakref
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserError

ADAPTER_CHILD = "erasure_adapters"  # child module of an adapted layer; its name marks adapter parameters
KIND = "lowrank"


class LowRankAdapter(nn.Module):
    """``(alpha / rank) · up(down(x))`` beside one ``nn.Linear`` or ``nn.Conv2d`` (bias-free).

    Linear: down (in → rank), up (rank → out). Conv2d: down has the layer's kernel, stride, padding and dilation
    (in → rank), up is 1×1 (rank → out), and the rank is capped at min(in, out) channels. ``alpha`` None or 0 means
    alpha = rank (scale 1). With a ``generator`` down is Kaiming-uniform (a = √5, torch's Linear default) and up is
    zero; without one both are zero (a set being loaded: its weights come from a delta, and no random number is drawn).
    """

    def __init__(self, layer: nn.Module, rank: int, alpha: float | None, generator: torch.Generator | None = None):
        super().__init__()
        if rank < 1:
            raise ValueError(f"adapter rank must be at least 1, got {rank}")
        if isinstance(layer, nn.Linear):
            self.rank = rank
            self.down = nn.Linear(layer.in_features, rank, bias=False)
            self.up = nn.Linear(rank, layer.out_features, bias=False)
        elif isinstance(layer, nn.Conv2d):
            if layer.groups != 1:
                raise ValueError(f"adapters on grouped convolutions are not supported (groups={layer.groups})")
            self.rank = min(rank, layer.in_channels, layer.out_channels)
            self.down = nn.Conv2d(layer.in_channels, self.rank, layer.kernel_size, layer.stride, layer.padding,
                                  layer.dilation, bias=False)
            self.up = nn.Conv2d(self.rank, layer.out_channels, 1, bias=False)
        else:
            raise ValueError(f"adapters attach to nn.Linear or nn.Conv2d, not {type(layer).__name__}")
        self.alpha = float(alpha) if alpha else float(rank)
        self.scale = self.alpha / self.rank
        # m: 1.0, 0.0 (skipped), or a 1-D tensor with one value per batch row (tiled over a batch that repeats the
        # rows, e.g. classifier-free guidance's [negative; positive])
        self.multiplier: float | torch.Tensor = 1.0
        with torch.no_grad():
            if generator is not None:
                nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5), generator=generator)
            else:
                nn.init.zeros_(self.down.weight)
            nn.init.zeros_(self.up.weight)
        self.to(layer.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's addition to its layer's output, before the multiplier: (alpha / rank) · up(down(x)).
        (Functional calls on the two weights: the same arithmetic as calling the submodules, without their hook
        machinery, which a UNet step would otherwise pay twice per adapted layer.)"""
        down, up = self.down, self.up
        if isinstance(down, nn.Linear):
            out = F.linear(F.linear(x, down.weight), up.weight)
        else:
            out = F.conv2d(F.conv2d(x, down.weight, None, down.stride, down.padding, down.dilation), up.weight)
        return out if self.scale == 1.0 else out * self.scale

    def delta_weight(self) -> torch.Tensor:
        """ΔW of a Linear adapter, (out, in): the layer with this adapter at multiplier m is W + m ΔW."""
        if not isinstance(self.down, nn.Linear):
            raise TypeError("delta_weight is defined for Linear adapters")
        return (self.up.weight @ self.down.weight) * self.scale


def _apply(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    """Forward hook of an adapted layer: its output plus every attached adapter's, times that adapter's multiplier."""
    x = args[0]
    for adapter in module.get_submodule(ADAPTER_CHILD).values():
        m = adapter.multiplier
        if not torch.is_tensor(m):
            if m == 0.0:
                continue
            delta = adapter.forward(x) if m == 1.0 else adapter.forward(x) * m
        else:
            rows = m.to(output.device, output.dtype)
            if output.shape[0] % rows.numel():
                raise ValueError(f"an adapter multiplier has {rows.numel()} rows for a batch of {output.shape[0]}")
            rows = rows.repeat(output.shape[0] // rows.numel()).view(-1, *([1] * (output.ndim - 1)))
            delta = adapter.forward(x) * rows
        output = output + delta
    return output


@dataclasses.dataclass
class AdapterSet:
    """One named group of adapters attached to a UNet: a placement (layer names), a rank, an alpha, an optional gate."""

    name: str
    rank: int
    alpha: float | None
    targets: list[str]
    gate: dict | None
    modules: dict[str, LowRankAdapter]

    def named_parameters(self) -> dict[str, nn.Parameter]:
        """The set's weights by their UNet parameter names (what a delta stores)."""
        return {f"{target}.{ADAPTER_CHILD}.{self.name}.{key}": p
                for target, adapter in self.modules.items() for key, p in adapter.named_parameters()}

    def set_multiplier(self, value: float | torch.Tensor) -> None:
        for adapter in self.modules.values():
            adapter.multiplier = value if torch.is_tensor(value) else float(value)

    @property
    def multiplier(self) -> float | torch.Tensor:
        return next(iter(self.modules.values())).multiplier

    @contextlib.contextmanager
    def multiplied(self, value: float | torch.Tensor):
        """The set at multiplier ``value`` inside the block (e.g. 0: the model without it)."""
        before = self.multiplier
        self.set_multiplier(value)
        try:
            yield self
        finally:
            self.set_multiplier(before)

    def is_identity(self) -> bool:
        return all(not a.up.weight.detach().any() for a in self.modules.values())

    def describe(self) -> dict:
        """JSON description kept in a delta's metadata: enough to attach the same set to a fresh base model."""
        return dict(name=self.name, kind=KIND, rank=self.rank, alpha=self.alpha, targets=list(self.targets),
                    gate=self.gate)


_ATTACHED: "weakref.WeakKeyDictionary[nn.Module, dict[str, AdapterSet]]" = weakref.WeakKeyDictionary()


def attached(unet: nn.Module) -> dict[str, AdapterSet]:
    """The adapter sets attached to ``unet``, by name."""
    return dict(_ATTACHED.get(unet, {}))


def layers_inside(unet: nn.Module, containers: Sequence[str],
                  kinds: tuple[type, ...] = (nn.Linear, nn.Conv2d)) -> list[str]:
    """Names of the ``kinds`` layers inside every module whose class name is in ``containers`` (in module order)."""
    names = []
    for name, module in unet.named_modules():
        if type(module).__name__ in containers:
            for child, layer in module.named_modules():
                if child and isinstance(layer, kinds) and ADAPTER_CHILD not in child.split("."):
                    names.append(f"{name}.{child}")
    return names


def attach(unet: nn.Module, name: str, targets: Iterable[str], rank: int, alpha: float | None = None,
           gate: dict | None = None, generator: torch.Generator | None = None) -> AdapterSet:
    """Attach the adapter set ``name`` to the layers ``targets`` of ``unet`` (identity at first; see the module doc).

    With ``generator`` the down projections are initialised at random (training); without, they are zero (loading).
    Attaching a set that is already there with the same placement, rank and alpha re-initialises it and takes the new
    gate; a different set under the same name is refused.
    """
    targets = list(dict.fromkeys(targets))
    if not targets:
        raise UserError(f"adapter set '{name}' has no layer to attach to")
    if not name.isidentifier():
        raise ValueError(f"adapter set name must be an identifier, got {name!r}")
    sets = _ATTACHED.setdefault(unet, {})
    old = sets.get(name)
    if old is not None:
        if old.targets != targets or old.rank != rank or (old.alpha or rank) != (alpha or rank):
            raise UserError(f"the model already holds another adapter set '{name}' (different layers, rank or alpha): "
                            "load each adapter delta into its own model")
        for target, adapter in old.modules.items():
            fresh = LowRankAdapter(unet.get_submodule(target), rank, alpha, generator)
            with torch.no_grad():
                adapter.down.weight.copy_(fresh.down.weight)
                adapter.up.weight.copy_(fresh.up.weight)
        old.gate = gate
        old.set_multiplier(1.0)
        return old
    modules = {}
    for target in targets:
        try:
            layer = unet.get_submodule(target)
        except AttributeError:
            raise UserError(f"adapter set '{name}' names layer '{target}', which this UNet does not have: "
                            "it belongs to another architecture") from None
        if not isinstance(layer, (nn.Linear, nn.Conv2d)):
            raise UserError(f"adapter set '{name}' names layer '{target}', a {type(layer).__name__}: adapters attach to "
                            "Linear or Conv2d layers")
        if ADAPTER_CHILD not in layer._modules:
            layer.add_module(ADAPTER_CHILD, nn.ModuleDict())
            layer.register_forward_hook(_apply)
        adapter = LowRankAdapter(layer, rank, alpha, generator)
        adapter.requires_grad_(False)
        layer.get_submodule(ADAPTER_CHILD)[name] = adapter
        modules[target] = adapter
    adapter_set = AdapterSet(name=name, rank=rank, alpha=alpha, targets=targets, gate=gate, modules=modules)
    sets[name] = adapter_set
    return adapter_set


def attach_described(unet: nn.Module, descriptions: Sequence[dict]) -> list[AdapterSet]:
    """Attach the sets a delta's metadata describes (:meth:`AdapterSet.describe`), as the identity."""
    out = []
    for d in descriptions:
        if d.get("kind") != KIND:
            raise UserError(f"unknown adapter kind {d.get('kind')!r} in a delta (this version knows {KIND!r})")
        existing = attached(unet).get(str(d["name"]))
        if existing is not None and existing.describe() == dict(d):
            out.append(existing)  # the same set, already attached: keep its weights
            continue
        out.append(attach(unet, str(d["name"]), d["targets"], int(d["rank"]), d.get("alpha"), gate=d.get("gate")))
    return out


def described(unet: nn.Module, names: Iterable[str]) -> list[dict]:
    """Descriptions of the attached sets that own any of the parameter ``names`` (what a delta of them needs)."""
    names = set(names)
    return [s.describe() for s in attached(unet).values() if names & set(s.named_parameters())]


def is_adapter_parameter(name: str) -> bool:
    return ADAPTER_CHILD in name.split(".")


@contextlib.contextmanager
def gated(models, prompts: Sequence[str], prompt_embeds: torch.Tensor):
    """Inside the block, every attached set with a gate runs at the per-prompt multiplier its method computes for
    ``prompts`` (one value per prompt, tiled over a batch that repeats the prompts, as classifier-free guidance does)."""
    from . import registry

    sets = [s for s in attached(models.unet).values() if s.gate]
    before = [s.multiplier for s in sets]
    try:
        for s in sets:
            rows = registry.get_method(str(s.gate["method"])).gate(models, list(prompts), prompt_embeds, s.gate)
            s.set_multiplier(torch.as_tensor(rows, dtype=torch.float32).reshape(-1))
        yield
    finally:
        for s, m in zip(sets, before):
            s.set_multiplier(m)
