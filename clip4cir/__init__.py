"""CLIP4Cir composed image retrieval: data, encoders, stage-one training, features, index, evaluation, search."""
__version__ = "0.1.0"
