"""Pseudo-word tokens: a prompt encoded with the placeholder's embedding replaced is exactly the prompt with that
word, gradients reach the pseudo token, and a text without a placeholder is an error."""
import pytest
import torch

from clip4cir.core.errors import ModelError
from clip4cir.models.factory import create_model
from clip4cir.models.pseudo_tokens import (Phi, composed_prompts, encode_with_pseudo_tokens, placeholder_id,
                                           token_width)


@pytest.fixture(scope="module")
def encoder():
    return create_model("cir-tiny", seed=0)


def test_a_pseudo_token_that_is_a_words_embedding_gives_that_words_text_feature(encoder):
    words = ["dress", "shirt"]
    ids = [int(encoder.tokenizer([w])[0][1]) for w in words]
    pseudo = encoder.model.token_embedding.weight[ids].detach()
    with torch.no_grad():
        got = encode_with_pseudo_tokens(encoder, ["a photo of $ that is red", "a $"], pseudo)
        expected = encoder.encode_text(["a photo of dress that is red", "a shirt"])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    other = encode_with_pseudo_tokens(encoder, ["a photo of $ that is red"], pseudo[1:]).detach()
    assert not torch.allclose(other, expected[:1], atol=1e-3)  # another token, another feature


def test_gradients_reach_the_pseudo_token_through_phi(encoder):
    phi = Phi(encoder.dim, token_width(encoder), hidden=32)
    features = torch.randn(3, encoder.dim)
    out = encode_with_pseudo_tokens(encoder, composed_prompts(["Is red", " has a collar", "is longer"]), phi(features))
    out.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in phi.parameters())
    assert composed_prompts(["Is red"]) == ["a photo of $ that is red"]
    assert placeholder_id(encoder) == int(encoder.tokenizer(["$"])[0][1])


def test_every_placeholder_takes_the_pseudo_token_and_none_is_an_error(encoder):
    word = int(encoder.tokenizer(["dress"])[0][1])
    pseudo = encoder.model.token_embedding.weight[[word]].detach()
    with torch.no_grad():
        torch.testing.assert_close(encode_with_pseudo_tokens(encoder, ["$ and $"], pseudo),
                                   encoder.encode_text(["dress and dress"]), rtol=1e-5, atol=1e-5)
    with pytest.raises(ModelError, match="text 'a red dress' holds no placeholder"):
        encode_with_pseudo_tokens(encoder, ["a red dress"], pseudo)
