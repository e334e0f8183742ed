"""What a :class:`PrunedModel` executes on a batch: the slots kept after each site and their blocks' FLOPs.

Bench's columns and the export record both report it; it sits in the core, below either (issue 25: export
used to import it from evaluation/bench.py, which imports export).
"""

from __future__ import annotations

from typing import Any

import torch

from policy_prune.core.inference import PrunedModel


def executed_schedule(pruned: PrunedModel, x: Any) -> tuple[list[int], float, int]:
    """(slots per row after each site, FLOPs ratio, tokens embedded) of what runs on ``x``. On padded text
    the slots are the planned widths of the static path (rows may keep fewer), else the largest count;
    FLOPs are counted on those slots, padding included. The blocks' FLOPs only: selection is apart (bench's
    ``selection_ratio``)."""
    with torch.no_grad():
        _, state, counts = pruned.run(x)
    b, n = pruned.backbone, state.n_full
    kept = pruned.text_widths(n) if pruned.static_text(x) else [int(c.max()) for c in counts]
    return kept, float(b.schedule_flops(pruned.sites, kept, n)) / b.full_flops(n), n
