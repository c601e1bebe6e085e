"""Layer 4, retrieval: the catalog index (items, vector stores, calibration), building it from a data set, and the
search engine over it."""
