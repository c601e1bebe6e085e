"""The paper's ablation table: Sum and Combiner × encoder fine-tuning none/image/text/both, in its layout."""
from __future__ import annotations

from pathlib import Path

import torch

from clip4cir.data.sources import Source
from clip4cir.evaluation.composed import rankings_of, summarize
from clip4cir.evaluation.tasks import EvalRequest
from clip4cir.models.combiner import combining_function
from clip4cir.models.factory import load_model
from clip4cir.models.features import gallery_features

TABLE_ENCODERS = ("none", "image", "text", "both")
TABLE_COLUMNS = ("shirt", "dress", "toptee", "average")  # the paper's column order (FashionIQ)


def table_columns(source: Source) -> list[tuple[str, str]]:
    """(ranking, metric) columns: FashionIQ's in the paper's order, else the average's metrics."""
    if source.protocol.name == "fashioniq":
        return [(c, f"R@{k}") for c in TABLE_COLUMNS if c in source.categories() + ["average"]
                for k in source.protocol.ks]
    return [("average", f"R@{k}") for k in source.protocol.ks] + \
        [("average", f"Rs@{k}") for k in source.protocol.subset_ks] + [("score", "")]


def markdown_table(rows: list[tuple[str, str, dict]], columns: list[tuple[str, str]]) -> str:
    """Rows of (encoder fine-tuning, combining function, metrics) in the paper's layout."""
    head = ["Encoder FT", "Combining"] + [f"{r.capitalize()} {m}".strip() for r, m in columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for encoder_ft, combining, metrics in rows:
        cells = [f"{(metrics[r][m] if m else metrics[r]):.2f}" if r in metrics else "–" for r, m in columns]
        lines.append("| " + " | ".join([encoder_ft, combining] + cells) + " |")
    return "\n".join(lines)


def ablation_table(source: Source, model: str | None, pretrained: str | None, seed: int, device: torch.device,
                   checkpoints: dict[str, str], combiners: dict[str, str], request: EvalRequest) -> str:
    """Sum / Combiner × encoder fine-tuning (``checkpoints``: the stage-one file of image, text and both;
    ``combiners``: the stage-two file of each row); a missing checkpoint is a note, its rows left out."""
    split = source.protocol.val_split
    rows, notes = [], []
    for encoder_ft in TABLE_ENCODERS:
        path = checkpoints.get(encoder_ft)
        if encoder_ft != "none" and not path:
            notes.append(f"no stage-one checkpoint for encoder fine-tuning '{encoder_ft}': its rows are left out")
            continue
        if path and not Path(path).is_file():
            notes.append(f"checkpoint {path} for '{encoder_ft}' does not exist: its rows are left out")
            continue
        encoder = load_model(model, pretrained, path, seed=seed, device=device)
        names = source.categories() if source.protocol.per_category else [None]
        galleries = {c: gallery_features(encoder, source, split, c, request.cache_dir, request.batch_size,
                                         request.workers, request.progress) for c in names}  # once for both rows
        for combining, combiner_path in (("Sum", None), ("Combiner", combiners.get(encoder_ft))):
            if combining == "Combiner" and not (combiner_path and Path(combiner_path).is_file()):
                notes.append(f"no Combiner checkpoint for '{encoder_ft}'" +
                             (f" ({combiner_path} does not exist)" if combiner_path else ""))
                continue
            combine = combining_function(encoder, combiner_path, "combiner" if combiner_path else "sum")
            rankings = rankings_of(encoder, source, split, combine, galleries=galleries)
            rows.append((encoder_ft, combining, summarize(rankings, source.protocol)))
    return markdown_table(rows, table_columns(source)) + "".join(f"\n\nNote: {n}" for n in notes)
