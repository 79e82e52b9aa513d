"""What every kernel shares: the layer description, the kernel interface, unpacking helpers.

A kernel owns the runtime form of ONE quantized linear layer (possibly a fused q/k/v or gate/up
layer, whose rows are the shards stacked along the output dimension).  It is built from the
canonical checkpoint tensors (see ``docs/FORMAT.md``)::

    qweight      int32 [out, in*bits/32]   little-endian bitstream per row
    scales       fp16  [out, n_groups]
    zeros        uint8 [out, n_groups]     asymmetric only (symmetric: 2**(bits-1))
    group_index  int32 [n_shards, in]      dynamic act order only, one row per shard

and computes ``y = x @ W.T + bias`` with ``W[o, i] = (q[o, i] - z[o, g(i)]) * s[o, g(i)]``.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from rcsr_deploy.packing import unpack_codes


@dataclass(frozen=True)
class LayerSpec:
    """Static description of one (per-TP-rank) quantized linear layer."""

    bits: int
    group_size: int  # -1: one group per output row
    sym: bool
    act_order: str  # "none" | "static" | "dynamic"
    in_features: int  # per partition
    out_features: int  # per partition, all shards together
    act_dtype: torch.dtype
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    shard_sizes: tuple[int, ...] = ()  # output rows of each fused shard; () = one shard
    # dynamic act order: True when every shard has the same group_index (so one input permutation
    # turns the layer into static groups); always True for static groups
    shared_group_index: bool = True
    prefix: str = ""

    def __post_init__(self):
        object.__setattr__(self, "device", torch.device(self.device))
        if not self.shard_sizes:
            object.__setattr__(self, "shard_sizes", (self.out_features,))

    @property
    def group_len(self) -> int:
        return self.in_features if self.group_size == -1 else self.group_size

    @property
    def n_groups(self) -> int:
        return self.in_features // self.group_len

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    @property
    def dynamic(self) -> bool:
        return self.act_order == "dynamic"


@dataclass
class QuantWeights:
    """Canonical tensors of one layer (on the layer's device)."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None = None
    group_index: torch.Tensor | None = None  # [n_shards, in]


class Kernel(ABC):
    """Runtime form of one quantized linear layer."""

    name: ClassVar[str] = "?"

    def __init__(self, spec: LayerSpec):
        self.spec = spec

    @classmethod
    @abstractmethod
    def unsupported_reason(cls, spec: LayerSpec) -> str | None:
        """``None`` when this kernel can run ``spec``, else a short reason."""

    @classmethod
    def label(cls, spec: LayerSpec) -> str:
        """The kernel's name in the dispatch log line (a kernel may add what it delegates to)."""
        return cls.name

    @abstractmethod
    def prepare(self, w: QuantWeights) -> None:
        """Build the runtime tensors from the canonical ones (which the caller may then free)."""

    @abstractmethod
    def apply(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x [..., in] -> [..., out]`` in ``x.dtype``."""

    def nbytes(self) -> int:
        """Bytes held by the prepared tensors."""
        return sum(t.numel() * t.element_size() for t in vars(self).values() if isinstance(t, torch.Tensor))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec.prefix or '?'})"


# --------------------------------------------------------------------------------------------------
# helpers shared by the kernels
# --------------------------------------------------------------------------------------------------
def unpack(w: QuantWeights, spec: LayerSpec) -> torch.Tensor:
    """uint8 codes ``[out, in]`` (on the qweight's device)."""
    return unpack_codes(w.qweight, spec.bits, spec.in_features)


def scales_f32(w: QuantWeights) -> torch.Tensor:
    return w.scales.float()


def zeros_f32(w: QuantWeights, spec: LayerSpec) -> torch.Tensor:
    """fp32 ``[out, n_groups]`` zero points (the constant ``2**(bits-1)`` for symmetric grids)."""
    if spec.sym or w.zeros is None:
        return torch.full(tuple(w.scales.shape), float(1 << (spec.bits - 1)), device=w.scales.device)
    return w.zeros.float()


def group_permutation(w: QuantWeights, spec: LayerSpec) -> torch.Tensor | None:
    """For dynamic act order with one shared ``group_index`` whose groups hold exactly ``group_len``
    columns each: the input permutation ``perm`` (int64 ``[in]``) with ``g[perm] == arange(in) //
    group_len``, so that ``x @ W.T == x[:, perm] @ W[:, perm].T`` has static groups.  ``None`` for
    static groups.  Raises ValueError if the layer cannot be permuted (kernels check
    ``spec.shared_group_index`` first)."""
    if not spec.dynamic or w.group_index is None:
        return None
    g = w.group_index[0].long()
    if w.group_index.shape[0] > 1 and not bool((w.group_index == w.group_index[:1]).all()):
        raise ValueError("shards have different group_index")
    perm = torch.sort(g, stable=True).indices
    expect = torch.arange(spec.in_features, device=g.device) // spec.group_len
    if not torch.equal(g[perm], expect):
        raise ValueError("groups of group_index are not all of size group_size")
    return perm


def can_permute(group_index: torch.Tensor | None, spec: LayerSpec) -> bool:
    """True when :func:`group_permutation` succeeds (or groups are static)."""
    if not spec.dynamic or group_index is None:
        return True
    try:
        group_permutation(QuantWeights(torch.empty(0), torch.empty(0), None, group_index), spec)
    except ValueError:
        return False
    return True


def flatten_x(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    lead = tuple(x.shape[:-1])
    return x.reshape(-1, x.shape[-1]), lead
