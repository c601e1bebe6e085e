"""Synthetic data sets in the real layouts, drawn from one garment model (``garments``): FashionIQ and CIRR
catalogs with triplets, captions and titles, a CIRCO-layout set with several ground truths a query,
labelled identities, and an image-text pretraining corpus. The real
annotation files have no images here; these do."""
from clip4cir.data.synthetic.circo import CIRCO_SIZES, make_synthetic_circo
from clip4cir.data.synthetic.cirr import CIRR_SIZES, make_synthetic_cirr
from clip4cir.data.synthetic.corpus import make_pretraining_corpus
from clip4cir.data.synthetic.fashioniq import SIZES, make_synthetic_fashioniq
from clip4cir.data.synthetic.identities import make_synthetic_identities

SYNTHETIC_FORMAT = "clip4cir.synthetic-catalog"  # the artifact format of a generated data set folder

__all__ = ["SYNTHETIC_FORMAT", "CIRCO_SIZES", "CIRR_SIZES", "SIZES", "make_pretraining_corpus", "make_synthetic_circo",
           "make_synthetic_cirr",
           "make_synthetic_fashioniq", "make_synthetic_identities"]
