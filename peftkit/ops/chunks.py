"""Row ranges that keep a chunk's temporaries near a size budget (cache-sized work, buffers the allocator reuses)."""

from __future__ import annotations

from typing import Iterator


def row_chunks(rows: int, width: int, elements: int, align: int = 1) -> Iterator[slice]:
    """Slices over ``rows`` rows of ``width`` elements each, about ``elements`` elements per slice; every slice but
    the last has a multiple of ``align`` rows (at least ``align``)."""
    step = max(align, (elements // max(width, 1)) // align * align)
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))
