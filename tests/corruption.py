"""Truncated and bit-flipped slices for the fuzz tests: the hypothesis strategies and the damage."""

from __future__ import annotations

from hypothesis import strategies as st

# Which of a 12-slice series, how many bytes cut from its end, which bytes inverted (the first
# 2500 hold the File Meta and the header of a small synthetic slice).
DAMAGED_SLICE = {
    "slice_index": st.integers(0, 11),
    "cut": st.integers(0, 20_000),
    "flips": st.lists(st.integers(0, 2500), max_size=8),
}


def damaged(blob: bytes, cut: int, flips: list[int]) -> bytes:
    """``blob`` without its last ``cut`` bytes, with each byte at ``flips`` inverted."""
    out = bytearray(blob[: len(blob) - cut])
    for position in flips:
        if position < len(out):
            out[position] ^= 0xFF
    return bytes(out)
