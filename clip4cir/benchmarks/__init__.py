"""Layer 6, benchmarks: each measures what a user gets (held-out queries, independent ground truth, several seeds)
and writes its JSON and markdown report."""
