"""Bit packing: the only module that knows how integer codes sit in int32 words.

Two layouts, both least-significant bits first:

* the canonical on-disk bitstream (``pack_codes`` / ``unpack_codes``, docs/FORMAT.md), described below;
* whole words of ``32 // bits`` values along any dimension (``pack_lsb_words`` / ``unpack_lsb_words``):
  GPTQ and compressed-tensors exports, vLLM's CPU WNA16 and Machete/Marlin inputs, the Triton planes.

The canonical bitstream:

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
#: ``quantization_config.packing`` of the canonical layout
PACKING = "int32-lsb-bitstream"


def packed_width(in_features: int, bits: int) -> int:
    """Number of int32 words per row for ``in_features`` codes of ``bits`` bits."""
    check_packable(in_features, bits)
    return in_features * bits // 32


def check_packable(in_features: int, bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise RcsrError(f"bits={bits} is not supported (choose 2, 3, 4 or 8)")
    if in_features % 32:
        raise RcsrError(f"in-features {in_features} is not a multiple of 32, which the packed format requires")


def _slots(bits: int):
    """For code k of a 32-code run: (word, shift, spills into the next word)."""
    return [((k * bits) // 32, (k * bits) % 32, (k * bits) % 32 + bits > 32) for k in range(32)]


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes ``[out, in]`` (values in ``[0, 2**bits)``) into int32 ``[out, in*bits/32]``."""
    if codes.dim() != 2:
        raise RcsrError(f"codes must be 2-D, got shape {tuple(codes.shape)}")
    if codes.is_floating_point() and not torch.equal(codes, codes.round()):
        raise RcsrError("codes must be whole numbers")
    out_f, in_f = codes.shape
    width = packed_width(in_f, bits)
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= (1 << bits)):
        raise RcsrError(f"codes out of range for {bits}-bit packing")
    runs = c.reshape(out_f, in_f // 32, 32)
    words = torch.zeros(out_f, in_f // 32, bits, dtype=torch.int64, device=codes.device)
    for k, (w, sh, spill) in enumerate(_slots(bits)):
        words[:, :, w] |= (runs[:, :, k] << sh) & 0xFFFFFFFF
        if spill:
            words[:, :, w + 1] |= runs[:, :, k] >> (32 - sh)
    return _to_int32(words.reshape(out_f, width))


def unpack_codes(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: int32 ``[out, in*bits/32]`` -> uint8 codes ``[out, in]``."""
    width = packed_width(in_features, bits)
    if packed.dim() != 2 or packed.shape[1] != width or packed.dtype != torch.int32:
        raise RcsrError(
            f"packed codes must be int32 [out, {width}] for {in_features} in-features at {bits} bits, "
            f"got {packed.dtype} {tuple(packed.shape)}")
    out_f = packed.shape[0]
    words = (packed.to(torch.int64) & 0xFFFFFFFF).reshape(out_f, in_features // 32, bits)
    w_idx, shift, nxt = _slot_tensors(bits, packed.device)
    # all 32 slots of every run at once: low part from its word, spill from the next (3-bit only)
    v = words[:, :, w_idx] >> shift
    if bits == 3:
        v = v | (words[:, :, nxt] << (32 - shift))
    return (v & ((1 << bits) - 1)).to(torch.uint8).reshape(out_f, in_features)


_SLOT_CACHE: dict = {}


def _slot_tensors(bits: int, device: torch.device):
    """(word index, shift, next word index) of the 32 slots of a run, as int64 tensors (cached)."""
    key = (bits, str(device))
    if key not in _SLOT_CACHE:
        sl = _slots(bits)
        w = torch.tensor([a for a, _, _ in sl], dtype=torch.int64, device=device)
        sh = torch.tensor([b for _, b, _ in sl], dtype=torch.int64, device=device)
        # a slot that does not spill "spills" from its own word: shifted left by 32 - shift >= bits,
        # that word contributes nothing to the slot's low ``bits`` bits
        nxt = torch.tensor([a + 1 if sp else a for a, _, sp in sl], dtype=torch.int64, device=device)
        _SLOT_CACHE[key] = (w, sh, nxt)
    return _SLOT_CACHE[key]


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 words in ``[0, 2**32)`` -> the int32 with the same bits."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_lsb_words(values: torch.Tensor, bits: int, dim: int = -1) -> torch.Tensor:
    """Pack integers in ``[0, 2**bits)`` along ``dim`` into int32 words, ``32 // bits`` per word.

    Value ``j`` of a run of ``32 // bits`` occupies bits ``[j*bits, (j+1)*bits)`` of its word (least
    significant first); ``bits`` must divide 32 (1, 2, 4, 8 or 16).
    """
    if bits <= 0 or 32 % bits:
        raise RcsrError(f"whole-word packing needs bits dividing 32, got {bits}")
    per = 32 // bits
    v = values.to(torch.int64).movedim(dim, -1)
    n = v.shape[-1]
    if n % per:
        raise RcsrError(f"cannot pack {n} values of {bits} bits into whole int32 words "
                        f"(needs a multiple of {per})")
    if v.numel() and (int(v.min()) < 0 or int(v.max()) >= (1 << bits)):
        raise RcsrError(f"values out of range for {bits}-bit packing")
    v = v.reshape(*v.shape[:-1], n // per, per)
    words = (v << (torch.arange(per, dtype=torch.int64, device=v.device) * bits)).sum(-1)  # disjoint bits: sum == or
    return _to_int32(words).movedim(-1, dim).contiguous()


def unpack_lsb_words(words: torch.Tensor, bits: int, dim: int = -1) -> torch.Tensor:
    """Inverse of :func:`pack_lsb_words`: int32 words -> int64 values, ``32 // bits`` per word along ``dim``."""
    if bits <= 0 or 32 % bits:
        raise RcsrError(f"whole-word packing needs bits dividing 32, got {bits}")
    per = 32 // bits
    w = words.movedim(dim, -1)
    shifts = torch.arange(per, device=w.device, dtype=torch.int32) * bits
    v = ((w.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).reshape(*w.shape[:-1], w.shape[-1] * per)
    return v.long().movedim(-1, dim)
