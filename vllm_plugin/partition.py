"""Tensor-parallel partition arithmetic of one quantized linear layer (pure Python, no vLLM).

vLLM splits a linear layer across ``tp`` ranks either along its outputs (column-parallel:
``q/k/v``, ``gate/up``; each rank keeps every input column) or along its inputs (row-parallel:
``o_proj``, ``down_proj``; each rank keeps ``in / tp`` input columns and the partial outputs are
summed).  Our ``qweight`` is packed along the input dimension, so:

* column-parallel (and fused) layers need nothing special: a rank's rows are whole packed rows;
* a row-parallel split must fall on packed-word boundaries (a multiple of 32 input columns, which
  is ``bits`` int32 words) and on group boundaries (a whole number of groups per rank, so that the
  scales split with the codes), and dynamic act order cannot be split at all (a rank's columns
  belong to arbitrary groups).
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import RcsrPluginError


@dataclass(frozen=True)
class PartitionPlan:
    bits: int
    group_size: int
    act_order: str
    in_features: int  # this rank's input columns
    shard_sizes: tuple[int, ...]  # this rank's output rows per fused shard
    input_size: int  # the whole layer's input columns
    row_parallel: bool
    n_groups: int  # this rank's scale columns

    @property
    def out_features(self) -> int:
        return sum(self.shard_sizes)

    @property
    def words(self) -> int:
        """int32 words per packed row on this rank."""
        return self.in_features * self.bits // 32

    @property
    def group_len(self) -> int:
        return self.in_features if self.group_size == -1 else self.group_size


def plan_partition(*, bits: int, group_size: int, act_order: str, input_size: int,
                   input_size_per_partition: int, output_partition_sizes: list[int] | tuple[int, ...],
                   tp_size: int = 1, prefix: str = "layer") -> PartitionPlan:
    """Check that this rank's slice of the layer is storable in our format; describe it.

    Raises :class:`RcsrPluginError` (one line naming the layer) when it is not."""
    if input_size % 32:
        raise RcsrPluginError(f"{prefix}: in-features {input_size} is not a multiple of 32 (packed format)")
    if group_size != -1 and input_size % group_size:
        raise RcsrPluginError(f"{prefix}: group size {group_size} does not divide in-features {input_size}")
    if not output_partition_sizes or any(int(s) <= 0 for s in output_partition_sizes):
        raise RcsrPluginError(f"{prefix}: invalid output partition sizes {list(output_partition_sizes)}")
    in_pp = int(input_size_per_partition)
    row_parallel = in_pp != input_size
    if row_parallel:
        if in_pp <= 0 or input_size % in_pp:
            raise RcsrPluginError(f"{prefix}: input split {in_pp} of {input_size} columns is not even")
        if act_order == "dynamic":
            raise RcsrPluginError(
                f"{prefix}: act_order 'dynamic' cannot be split along the input dimension "
                f"(row-parallel, tensor-parallel size {tp_size}); serve with --tensor-parallel-size 1 "
                "or quantize with static act order")
        if in_pp % 32:
            raise RcsrPluginError(
                f"{prefix}: tensor-parallel size {tp_size} gives each rank {in_pp} input columns, "
                "not a multiple of 32 (whole packed int32 words); use a smaller tensor-parallel size")
        if group_size != -1 and in_pp % group_size:
            raise RcsrPluginError(
                f"{prefix}: tensor-parallel size {tp_size} gives each rank {in_pp} input columns, "
                f"not a whole number of groups of {group_size}; use a smaller tensor-parallel size "
                "or a smaller group size")
    if group_size == -1:
        n_groups = 1
    else:
        n_groups = in_pp // group_size
    return PartitionPlan(bits=bits, group_size=group_size, act_order=act_order, in_features=in_pp,
                         shard_sizes=tuple(int(s) for s in output_partition_sizes), input_size=input_size,
                         row_parallel=row_parallel, n_groups=n_groups)
