"""The Combiner network (CLIP4Cir stage two) and its training on cached features."""
