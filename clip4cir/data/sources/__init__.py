"""Data sets behind one interface (:class:`~clip4cir.data.sources.base.Source`): a user's own triplets (JSONL or
CSV over an image folder), labelled images (a folder per label, or image,label rows), image-text pairs (image,text
rows, or images with sidecar texts), CIRR, CIRCO, FashionIQ, Hugging Face ``datasets``, and a plain image folder.
``--data`` names one; its kind is recognised from what is there, or given with ``--dataset`` (a folder of label
sub-folders needs ``--dataset labels``, a folder of images with sidecar texts ``--dataset pairs``). A new data set
is one module that registers its Source class in ``SOURCES``, and its name in the import line here."""
from __future__ import annotations

from clip4cir.data.sources import (  # noqa: F401 (they register)
    circo,
    cirr,
    fashioniq,
    folder,
    hub,
    labels,
    pairs,
    triplet_files,
)
from clip4cir.data.sources.base import SOURCES, EvaluationProtocol, Source, SourceOptions, Triplet

__all__ = ["EvaluationProtocol", "Source", "SourceOptions", "Triplet", "SOURCES", "open_source", "reopen"]


def open_source(data: str, dataset: str = "auto", **options) -> Source:
    """The data set ``data`` names (see the module docstring); ``options`` are :class:`SourceOptions`' fields."""
    return SourceOptions(str(data), dataset, **options).open()


def reopen(record: dict) -> Source:
    """The source a ``Source.record()`` describes."""
    return SourceOptions.from_record(record).open()
