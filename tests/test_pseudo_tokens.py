"""Pseudo-word tokens: a prompt encoded with the placeholder's embedding replaced is exactly the prompt with that
word, gradients reach the pseudo token, a text without a placeholder is an error, and φ + Sum queries are the
two queries' normalised weighted sum."""
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from clip4cir.commands.import_phi import main as import_phi
from clip4cir.core.errors import ModelError
from clip4cir.data.sources import open_source
from clip4cir.models.factory import create_model
from clip4cir.models.feature_sum import combine_sum
from clip4cir.models.features import encode_texts
from clip4cir.models.pseudo_tokens import (
    Phi,
    composed_prompts,
    encode_with_pseudo_tokens,
    load_phi,
    placeholder_id,
    save_phi,
    token_width,
    zero_shot_queries,
)
from clip4cir.models.tensor_files import read_tensor_file


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


def test_plain_texts_encoded_in_the_same_pass_keep_their_own_tokens(encoder):
    word = int(encoder.tokenizer(["dress"])[0][1])
    pseudo = encoder.model.token_embedding.weight[[word]].detach()
    with torch.no_grad():
        got = encode_with_pseudo_tokens(encoder, ["a photo of $"], pseudo, plain=["a red dress", "has a $ sign"])
        expected = encoder.encode_text(["a photo of dress", "a red dress", "has a $ sign"])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)  # the plain "$" is not replaced


def test_phi_plus_sum_queries_add_the_sum_query_at_the_recorded_weight(encoder, tmp_path):
    torch.manual_seed(0)
    phi = Phi(encoder.dim, token_width(encoder), hidden=32).eval()
    path = tmp_path / "phi.safetensors"
    save_phi(phi, path, "pic2word", "a photo of $ that {caption}", encoder.record(), sum_weight=1.5)
    assert load_phi(path, encoder)[1]["sum_weight"] == 1.5
    reference, captions = torch.randn(3, encoder.dim), ["is red", "has much longer sleeves and is a maxi dress", "x"]
    alone = zero_shot_queries(path, encoder, sum_weight=0)(reference, captions)
    with torch.no_grad():
        expected_alone = encode_with_pseudo_tokens(encoder, composed_prompts(captions), phi(F.normalize(reference)),
                                                   normalize=True)
        expected = F.normalize(expected_alone + 1.5 * combine_sum(reference, encode_texts(encoder, captions)), dim=-1)
    torch.testing.assert_close(alone, expected_alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(zero_shot_queries(path, encoder)(reference, captions), expected, rtol=1e-5, atol=1e-5)
    assert zero_shot_queries(path, encoder).describe() == "a photo of $ that {caption}, + 1.5 × Sum"

    # a φ file written before the weight was recorded queries with φ alone, as it did; a broken weight is refused
    state, meta = read_tensor_file(path, "clip4cir.phi", "φ")
    older = {k: v for k, v in meta.items() if k != "sum_weight"}
    save_file(load_file(str(path)), str(tmp_path / "older.safetensors"), metadata=older)
    torch.testing.assert_close(zero_shot_queries(tmp_path / "older.safetensors", encoder)(reference, captions),
                               expected_alone, rtol=1e-5, atol=1e-5)
    for bad in ("-1", "nan", "heavy"):
        save_file(state, str(tmp_path / "bad.safetensors"), metadata={**meta, "sum_weight": bad})
        with pytest.raises(ModelError, match=f"bad.safetensors: sum_weight '{bad}' is not a number ≥ 0"):
            load_phi(tmp_path / "bad.safetensors")


def test_a_searle_phi_is_imported_for_its_encoder_and_reads_raw_features(encoder, tiny_root, tmp_path):
    """SEARLE's file format ({"Phi": state}) becomes a φ file whose queries are SEARLE's own computation: φ of the
    raw image feature in "a photo of $ that {caption}"; another encoder, shape or kind of file is refused."""
    torch.manual_seed(0)
    published = Phi(encoder.dim, token_width(encoder), hidden=48).eval()
    torch.save({"Phi": published.state_dict()}, tmp_path / "SEARLE_tiny.pt")
    args = ["--model", "cir-tiny", "--device", "cpu"]
    with pytest.raises(ModelError, match="for CLIP ViT-B-32 or ViT-L-14 with --pretrained openai, not cir-tiny"):
        import_phi(["--searle", str(tmp_path / "SEARLE_tiny.pt"), "--output", str(tmp_path / "x.safetensors")] + args)
    args.append("--any-encoder")
    assert import_phi(["--searle", str(tmp_path / "SEARLE_tiny.pt"), "--output", str(tmp_path / "phi.safetensors")]
                      + args) == 0
    source = open_source(tiny_root)
    first = sorted(source.gallery("val"))[:2]
    with torch.no_grad():
        raw = encoder.encode_image(torch.stack([encoder.transform(source.load_image(i)) for i in first]))
        expected = encode_with_pseudo_tokens(encoder, composed_prompts(["is red", "has a collar"]), published(raw),
                                             normalize=True)
    assert abs(float(raw.norm(dim=-1).mean()) - 1) > 0.05  # raw features, not unit ones: the difference matters
    queries = zero_shot_queries(tmp_path / "phi.safetensors", encoder)
    torch.testing.assert_close(queries(raw, ["is red", "has a collar"]), expected, rtol=1e-5, atol=1e-5)
    assert load_phi(tmp_path / "phi.safetensors")[1]["info"]["licence"] == "CC BY-NC 4.0"
    torch.save({"Phi": Phi(encoder.dim + 1, token_width(encoder), hidden=8).state_dict()}, tmp_path / "wide.pt")
    with pytest.raises(ModelError, match=f"maps {encoder.dim + 1}-d features"):
        import_phi(["--searle", str(tmp_path / "wide.pt"), "--output", str(tmp_path / "x.safetensors")] + args)
    broken = {**published.state_dict(), "layers.3.weight": torch.zeros(48, 7)}
    torch.save({"Phi": broken}, tmp_path / "broken.pt")
    with pytest.raises(ModelError, match="broken.pt: φ's layers do not chain"):
        import_phi(["--searle", str(tmp_path / "broken.pt"), "--output", str(tmp_path / "x.safetensors")] + args)
    torch.save({"phi": {}}, tmp_path / "other.pt")
    with pytest.raises(ModelError, match="other.pt holds no SEARLE φ"):
        import_phi(["--searle", str(tmp_path / "other.pt"), "--output", str(tmp_path / "x.safetensors")] + args)
    assert not (tmp_path / "x.safetensors").exists()
