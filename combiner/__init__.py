"""Stage two of CLIP4Cir: training the Combiner on cached features of the frozen encoders.

The Combiner network itself (and its file format) is :mod:`clip4cir.fusion`, where search, evaluation and the
app load it too: ``combiner`` depends on ``clip4cir``, never the other way round.
"""
