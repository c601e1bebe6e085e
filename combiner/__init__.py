"""Stage two of CLIP4Cir (layer 5, beside serving): training the Combiner on cached features of the frozen encoders
(``stage_two``, ``feature_cache``).

The Combiner network itself (and its file format) is :mod:`clip4cir.models.combiner`, where search, evaluation and
the app load it too: ``combiner`` depends on the library's lower layers, never the other way round.
"""
