"""Which category a composed search should run within: the rank of each target when every query searches the
whole gallery, or only the items of a category chosen for it (the reference's own, or one a probe predicts). A
target outside the chosen category is a miss. Measured by ``evaluate --task category`` to pick the app's default."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from clip4cir.evaluation.ranking import target_ranks


def ranks_within(queries: torch.Tensor, gallery: torch.Tensor, targets: Sequence[int], exclude: Sequence[int],
                 gallery_categories: Sequence[Sequence[str]], chosen: Sequence[str | None]) -> torch.Tensor:
    """0-based rank of each query's target among the gallery items of its chosen category (all items for None),
    the reference (``exclude``, a gallery index per query) left out; ``len(gallery)`` when the target is not in
    the chosen category."""
    ranks = torch.full((len(chosen),), gallery.shape[0], dtype=torch.long)
    for category in dict.fromkeys(chosen):
        rows = [i for i, c in enumerate(chosen) if c == category]
        members = [j for j, cats in enumerate(gallery_categories) if category is None or category in cats]
        position = {j: p for p, j in enumerate(members)}
        inside = [i for i in rows if targets[i] in position]
        if not inside:
            continue
        found = target_ranks(queries[inside], gallery[members], torch.tensor([position[targets[i]] for i in inside]),
                             torch.tensor([position.get(exclude[i], -1) for i in inside]))
        ranks[inside] = found
    return ranks
