"""The project's error types: each names the file, field or value that is wrong, and the tools turn any of them
into one line and exit status 2 (``clip4cir.commands.common.run``)."""
from __future__ import annotations


class Clip4CirError(ValueError):
    """A bad input, file or state that the user can fix; the message says which and how."""


class DataError(Clip4CirError):
    """A data file, folder or value is missing or malformed."""


class ModelError(Clip4CirError):
    """A model name, tag or checkpoint cannot be used."""


class ArtifactError(Clip4CirError):
    """A file or folder the project wrote is incomplete, foreign, or bound to another encoder or data set."""


class NonFiniteError(Clip4CirError):
    """A loss, feature or score is NaN or infinite: a broken model, never a result."""


class CatalogIndexError(Clip4CirError):
    """A bad index file, id, category or knob."""


class SearchError(Clip4CirError):
    """A query the engine cannot answer."""


class UnknownItemError(SearchError):
    """A query names an item or category the catalog does not have."""


class BusyError(Clip4CirError):
    """The server holds as many queries as it may: try again shortly (HTTP 503)."""


class StoreUnavailableError(BusyError):
    """The vector database does not answer in time: try again when it is back (HTTP 503)."""


class StoreError(Clip4CirError):
    """The vector database refused a request (its credentials, a collection it lacks): HTTP 502."""


SHOWN_CHARS = 80  # the most of a user's value an error message repeats


def shown(value: object, limit: int = SHOWN_CHARS) -> str:
    """A value as an error message quotes it: its repr, cut to ``limit`` characters (a 100,000-character id is
    not echoed back whole)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(str(value)):,} characters)"
