"""Layer 0, the foundation every layer uses: the error types, atomic artifacts, fingerprints, devices and
precision, torch.distributed helpers, and registries."""
