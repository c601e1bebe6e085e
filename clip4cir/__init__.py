"""CLIP4Cir composed image retrieval, in layers (each imports only the ones below it; tests/test_structure.py):

- ``core``: errors, atomic artifacts, fingerprints, devices, distributed helpers, registries
- ``data``: data sets (sources), images, captions, torch datasets, synthetic data sets
- ``models``: encoders and their files, preprocessing, features, the Combiner network
- ``evaluation``: Recall@K under each protocol, other metrics, evaluation tasks
- ``training`` (one trainer and its tasks) and ``retrieval`` (the index and the search engine)
- ``serving`` (the app) and the top-level ``combiner`` package (stage two)
- ``benchmarks``, then ``commands`` (every command line)
"""
__version__ = "0.1.0"
