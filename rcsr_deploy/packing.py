"""Bit packing of integer codes (canonical on-disk layout, see docs/FORMAT.md).

Each output row of a ``[out, in]`` code matrix is one little-endian bitstream: code ``k`` of the row
occupies stream bits ``[k*bits, (k+1)*bits)``, and stream bit ``p`` is bit ``p % 32`` of int32 word
``p // 32``.  For 2/4/8 bits a word holds ``32 // bits`` whole codes (code ``k`` of a word in bits
``[k*bits, (k+1)*bits)``); for 3 bits codes straddle words: 32 codes fill exactly 3 words.
``in`` must be a multiple of 32, so every run of 32 codes is exactly ``bits`` words and a shard on
any multiple of 32 input columns (every supported group size) is a whole number of words.
"""
from __future__ import annotations

import torch

from .errors import RcsrError

SUPPORTED_BITS = (2, 3, 4, 8)


def packed_width(in_features: int, bits: int) -> int:
    """Number of int32 words per row for ``in_features`` codes of ``bits`` bits."""
    check_packable(in_features, bits)
    return in_features * bits // 32


def check_packable(in_features: int, bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise RcsrError(f"bits={bits} is not supported (choose one of {', '.join(map(str, SUPPORTED_BITS))})")
    if in_features % 32:
        raise RcsrError(f"in-features {in_features} is not a multiple of 32, which the packed format requires")


def pack_codes(codes: torch.Tensor, bits: int, *, row_chunk: int = 1024) -> torch.Tensor:
    """Pack integer codes ``[out, in]`` (values in ``[0, 2**bits)``) into int32 ``[out, in*bits/32]``."""
    if codes.dim() != 2:
        raise RcsrError(f"codes must be 2-D, got shape {tuple(codes.shape)}")
    out_f, in_f = codes.shape
    width = packed_width(in_f, bits)
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= (1 << bits)):
        raise RcsrError(f"codes out of range for {bits}-bit packing")
    result = torch.empty(out_f, width, dtype=torch.int32, device=codes.device)
    bit_pos = torch.arange(bits, device=codes.device)
    word_w = torch.ones(32, dtype=torch.int64, device=codes.device) << torch.arange(32, device=codes.device)
    for r0 in range(0, out_f, row_chunk):
        block = c[r0:r0 + row_chunk]
        bitstream = (block.unsqueeze(-1) >> bit_pos) & 1            # [rows, in, bits], LSB first
        words = bitstream.reshape(block.shape[0], width, 32)        # stream bits -> words
        u32 = (words * word_w).sum(-1)                              # 0 <= u32 < 2**32
        result[r0:r0 + row_chunk] = torch.where(u32 >= 2**31, u32 - 2**32, u32).to(torch.int32)
    return result


def unpack_codes(packed: torch.Tensor, bits: int, in_features: int, *, row_chunk: int = 1024) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: int32 ``[out, in*bits/32]`` -> uint8 codes ``[out, in]``."""
    width = packed_width(in_features, bits)
    if packed.dim() != 2 or packed.shape[1] != width or packed.dtype != torch.int32:
        raise RcsrError(
            f"packed codes must be int32 [out, {width}] for {in_features} in-features at {bits} bits, "
            f"got {packed.dtype} {tuple(packed.shape)}")
    out_f = packed.shape[0]
    result = torch.empty(out_f, in_features, dtype=torch.uint8, device=packed.device)
    shifts = torch.arange(32, device=packed.device)
    code_w = torch.ones(bits, dtype=torch.int64, device=packed.device) << torch.arange(bits, device=packed.device)
    for r0 in range(0, out_f, row_chunk):
        words = packed[r0:r0 + row_chunk].to(torch.int64) & 0xFFFFFFFF
        bitstream = (words.unsqueeze(-1) >> shifts) & 1             # [rows, width, 32]
        bitstream = bitstream.reshape(words.shape[0], in_features, bits)
        result[r0:r0 + row_chunk] = (bitstream * code_w).sum(-1).to(torch.uint8)
    return result
