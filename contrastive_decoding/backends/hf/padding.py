"""Token lists to padded ``(input_ids, attention_mask)`` tensors, on either side."""

from __future__ import annotations

from typing import Literal

import torch

__all__ = ["pad_rows"]


def pad_rows(
    rows: list[list[int]], pad_id: int, device, side: Literal["left", "right"] = "right"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token lists to the longest one: right padding for teacher forcing (positions stay
    aligned from the start), left padding for decoding (every row ends at the last column)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            span = slice(0, len(row)) if side == "right" else slice(width - len(row), width)
            ids[i, span] = torch.tensor(row, dtype=torch.long)
            mask[i, span] = 1
    return ids.to(device), mask.to(device)
