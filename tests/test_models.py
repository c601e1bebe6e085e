import json

import open_clip
import pytest
import torch

from clip4cir.core.device import resolve_device
from clip4cir.core.errors import ModelError
from clip4cir.models.encoder import CLIPEncoder
from clip4cir.models.encoder_file import load_encoder, read_encoder_metadata, save_encoder
from clip4cir.models.factory import CONFIG_DIR, create_model, load_checkpoint, load_model
from clip4cir.models.transforms import Preprocess


@pytest.fixture(scope="module")
def tiny():
    return create_model("cir-tiny")


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_cir_tiny_is_seeded_and_small(tiny):
    assert same_weights(tiny.model, create_model("cir-tiny").model)
    assert not same_weights(tiny.model, create_model("cir-tiny", seed=1).model)
    assert sum(p.numel() for p in tiny.model.parameters()) < 5_000_000
    assert tiny.dim == 64 and tiny.preprocess.kind == "targetpad" and tiny.preprocess.size == 64


def test_trimmed_text_context_gives_identical_features(tiny):
    captions = ["is red with shorter sleeves", "is blue", "has a collar and is striped and longer"]
    tokens = tiny.tokenize(captions)
    assert tokens.shape[1] < 20
    with torch.no_grad():
        full = tiny.model.encode_text(tiny.tokenizer(captions))
        trimmed = tiny.encode_text(captions)
    torch.testing.assert_close(trimmed, full, rtol=1e-5, atol=1e-5)
    assert tiny.count_tokens(" ".join(["word"] * 100)) > tiny.context_length


@pytest.mark.parametrize("text_cfg", [{"no_causal_mask": True}, {"pool_type": "last"},
                                      {"no_causal_mask": True, "pool_type": "last"}],
                         ids=["no-causal-mask", "last-token-pooling", "siglip-like"])
def test_context_trimming_only_where_it_gives_the_same_features(text_cfg):
    """Text towers that see the padding (no causal mask) or pool over positions the trimming moves fall back to
    the full context: their features equal open_clip's own."""
    config = json.loads((CONFIG_DIR / "cir-tiny.json").read_text())
    config["text_cfg"].update(text_cfg)
    torch.manual_seed(0)
    model = open_clip.CLIP(**config).eval()
    encoder = CLIPEncoder(model, "cir-tiny", config, Preprocess(size=64), {"model": "custom"})
    captions = ["is red with shorter sleeves", "is blue"]
    assert encoder.tokenize(captions).shape[1] == 77
    with torch.no_grad():
        torch.testing.assert_close(encoder.encode_text(captions), model.encode_text(encoder.tokenizer(captions)))


def test_each_tower_gets_the_gradients_of_its_own_features(tiny):
    """Image features backpropagate into the visual tower only, text features into the text tower only: what
    --encoder image|text relies on to train one tower and freeze the other."""
    enc = create_model("cir-tiny")
    for features, trained in ((lambda: enc.encode_image(torch.randn(4, 3, 64, 64)), "visual."),
                              (lambda: enc.encode_text(["is red", "is blue"]), "text")):
        enc.model.zero_grad(set_to_none=True)
        features().pow(2).sum().backward()
        with_grad = {n for n, p in enc.model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        assert with_grad, trained
        assert all(n.startswith("visual.") == (trained == "visual.") for n in with_grad), sorted(with_grad)[:5]


def test_encoder_round_trip(tiny, tmp_path):
    path = tmp_path / "enc.safetensors"
    save_encoder(tiny, path, info={"epoch": 2})
    meta = read_encoder_metadata(path)
    assert meta["format"] == "clip4cir.encoder" and meta["model_name"] == "cir-tiny" and meta["info"] == {"epoch": 2}
    loaded = load_encoder(path)
    assert same_weights(loaded.model, tiny.model) and loaded.fingerprint() == tiny.fingerprint()
    assert loaded.preprocess == tiny.preprocess
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(images), tiny.encode_image(images))
    # loads with open_clip and safetensors alone, as the format promises
    from safetensors.torch import load_file
    model = open_clip.CLIP(**meta["model_config"])
    model.load_state_dict(load_file(path))
    assert not list(tmp_path.glob(".*.tmp"))


def openai_style_state_dict(vision_layers):
    """A small CLIP with OpenAI's conventions (QuickGELU, 64-wide heads), as OpenAI/CLIP4Cir checkpoints have."""
    vision = {"image_size": 64, "layers": vision_layers, "width": 64 if isinstance(vision_layers, int) else 16,
              "patch_size": 16 if isinstance(vision_layers, int) else None}
    torch.manual_seed(0)
    model = open_clip.CLIP(embed_dim=32, vision_cfg=vision, quick_gelu=True,
                           text_cfg={"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 1})
    return model


@pytest.mark.parametrize("vision_layers", [2, [1, 1, 1, 1]], ids=["vit", "resnet"])
def test_clip4cir_and_openai_state_dicts_load_with_inferred_architecture(tmp_path, vision_layers):
    reference = openai_style_state_dict(vision_layers).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = reference.encode_image(images)
    torch.save({"epoch": 7, "CLIP": reference.state_dict()}, tmp_path / "tuned_clip_best.pt")
    torch.save(reference.state_dict(), tmp_path / "plain.pt")
    for name in ("tuned_clip_best.pt", "plain.pt"):
        enc = load_checkpoint(tmp_path / name)
        assert enc.dim == 32 and enc.preprocess.size == 64
        with torch.no_grad():
            torch.testing.assert_close(enc.encode_image(images), expected)
    assert load_checkpoint(tmp_path / "tuned_clip_best.pt").info == {"epoch": 7}
    # same architecture as open_clip's own builder infers
    built = open_clip.model.build_model_from_openai_state_dict(reference.state_dict(), cast_dtype=None)
    assert {k: v.shape for k, v in built.state_dict().items()} == \
        {k: v.shape for k, v in enc.model.state_dict().items()}
    # and it round-trips through the project's format
    save_encoder(enc, tmp_path / "converted.safetensors")
    assert load_encoder(tmp_path / "converted.safetensors").fingerprint() == enc.fingerprint()


def test_bad_models_and_checkpoints(tmp_path):
    with pytest.raises(ModelError, match="'no-such-model'"):
        create_model("no-such-model")
    with pytest.raises(ModelError, match="RN50.*could not load|could not load.*RN50"):
        create_model("RN50", pretrained="openai")  # offline: the download fails with a clear message
    with pytest.raises(ModelError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ModelError, match="junk.pt"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ModelError, match="not a CLIP checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    (tmp_path / "x.safetensors").write_bytes(b"junk")
    with pytest.raises(ModelError, match="x.safetensors"):
        load_checkpoint(tmp_path / "x.safetensors")
    with pytest.raises(ModelError, match="model name"):
        load_model()
    with pytest.raises(ModelError, match="'tpu'"):
        resolve_device("tpu")
