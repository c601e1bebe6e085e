"""Layer 2, the models: encoders (open_clip and timm) and their files, preprocessing, feature extraction and
caches, the Combiner network, the category probe."""
