import pytest
import torch
from PIL import Image

from clip4cir.models.transforms import Preprocess, build_transform, square_pad, target_pad


def test_target_pad_only_beyond_ratio():
    assert target_pad(Image.new("RGB", (100, 120)), 1.25).size == (100, 120)  # 1.2 < 1.25: untouched
    padded = target_pad(Image.new("RGB", (100, 160), (255, 255, 255)), 1.25)
    assert padded.size == (128, 160)  # width grows to 160 / 1.25
    assert padded.getpixel((0, 80)) == (0, 0, 0) and padded.getpixel((64, 80)) == (255, 255, 255)
    assert target_pad(Image.new("RGB", (160, 100)), 1.25).size == (160, 128)


def test_square_pad():
    assert square_pad(Image.new("RGB", (60, 100))).size == (100, 100)
    assert square_pad(Image.new("RGB", (100, 100))).size == (100, 100)


@pytest.mark.parametrize("kind", ["targetpad", "squarepad", "openclip"])
@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "CMYK"])
def test_transforms_give_normalised_rgb_tensors(kind, mode):
    transform = build_transform(Preprocess(kind=kind, size=48))
    x = transform(Image.new("RGB", (70, 110), (200, 20, 20)).convert(mode))
    assert x.shape == (3, 48, 48) and x.dtype == torch.float32


def test_preprocess_validation_and_round_trip():
    pre = Preprocess("squarepad", 64, target_ratio=1.5)
    assert Preprocess.from_dict(pre.to_dict()) == pre
    with pytest.raises(ValueError, match="'crop'"):
        Preprocess("crop")
