"""The cheaper image path (issue 22): a JPEG decoded by the training crop at 1/r of its size (data.RandomResizedCrop on
a data.Jpeg), the crop boxes torchvision's, uint8 out of the workers and normalised on the device (data.normalise)."""

import io
import math

import pytest
import torch
from PIL import Image
from sklearn.datasets import load_sample_image  # two real photos, 640x427, shipped with scikit-learn (requirements-dev)
from torchvision.transforms import v2

import data
from clip import Transform
from tokenizer import get_tokenizer

BICUBIC = dict(interpolation=v2.InterpolationMode.BICUBIC, antialias=True)


def photo(name, quality=90):
    """A real photo as JPEG bytes, cut to 640x424 (sides divisible by 8: every reduced decode is exact)"""
    buffer = io.BytesIO()
    Image.fromarray(load_sample_image(name)[:424]).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def psnr(a, b):
    return 10 * math.log10(255 ** 2 / max((a.float() - b.float()).pow(2).mean().item(), 1e-10))


def fast_crop(crop, raw, seed):
    """crop of a data.Jpeg of raw (640x424), and the r and (top, left, h, w) in source pixels it cut: torchvision's
    draw for the seed, at r > 1 its edges rounded to multiples of r (data.RandomResizedCrop's rule)"""
    torch.manual_seed(seed)
    top, left, h, w = v2.RandomResizedCrop.get_params(torch.empty(0, 424, 640), crop.scale, crop.ratio)
    r = next((r for r in (8, 4, 2) if min(h, w) >= r * crop.size), 1)
    edges = [r * round(x / r) for x in (top, left, top + h, left + w)]
    torch.manual_seed(seed)
    return crop(data.Jpeg(raw, (640, 424), "x")), r, (*edges[:2], edges[2] - edges[0], edges[3] - edges[1])


@pytest.mark.parametrize("name", ["china.jpg", "flower.jpg"])
def test_reduced_decode_matches_full_decoding_of_the_same_box(name):
    # The tolerance: every crop within 30 dB PSNR of the full decoding's, the mean over crops above 33 dB. What
    # differs is the low-pass filter before subsampling (libjpeg's DCT-domain reduction, then bicubic, against one
    # bicubic reduction): differences of the size JPEG compression itself makes (re-encoding these photos' 224 px
    # reductions at quality 90 costs them 35-37 dB), and the images we train on are JPEGs already. A box shifted by
    # r/2 source pixels scored 23-26 dB when we tried, so the box is checked too. Measured (16 crops per size): means
    # 34-44 dB, minimum 31.8 dB. Boxes too small for a reduction are decoded in full: exact.
    raw = photo(name)
    full = data.decode_image(raw)
    for size, scale, expected_r in ((200, (0.6, 1.0), {1, 2}), (96, (0.3, 1.0), {2, 4}), (48, (0.08, 1.0), {2, 4, 8})):
        crop, values, rs = data.RandomResizedCrop(size, scale), [], set()
        for seed in range(16):
            fast, r, box = fast_crop(crop, raw, seed)
            slow = v2.functional.resized_crop(full, *box, [size, size], **BICUBIC)
            assert fast.dtype == slow.dtype == torch.uint8 and fast.shape == slow.shape == (3, size, size)
            assert r > 1 or torch.equal(fast, slow)
            values += [psnr(fast, slow)] if r > 1 else []
            rs.add(r)
        assert rs == expected_r and min(values) > 30 and sum(values) / len(values) > 33, (size, rs, values)


def test_a_jpeg_too_small_for_a_reduction_is_decoded_in_full_to_torchvisions_pixels():
    raw = photo("china.jpg")
    torch.manual_seed(0)
    ours = data.RandomResizedCrop(224, (0.9, 1.0))(data.Jpeg(raw, (640, 424), "x"))  # a side < 2 x 224: r = 1
    torch.manual_seed(0)
    assert torch.equal(ours, v2.RandomResizedCrop(224, (0.9, 1.0), **BICUBIC)(data.decode_image(raw)))


@pytest.mark.parametrize("scale", [(0.9, 1.0), (0.08, 1.0)])
def test_boxes_are_torchvisions_draws(scale):
    # The same draws of torch's RNG as torchvision's RandomResizedCrop for a seed: on a decoded image exactly its
    # crop, and on a Jpeg (whose box the test above checks by its pixels) the same RNG state after it, for the draws
    # of the augmentations that follow (SLIP's and DeCLIP's colour jitter, blur, flips)
    raw, image = photo("flower.jpg"), Image.fromarray(load_sample_image("china.jpg")[:424])
    reference, ours = v2.RandomResizedCrop(48, scale, **BICUBIC), data.RandomResizedCrop(48, scale)
    for seed in range(40):
        torch.manual_seed(seed)
        reference(image)
        after = torch.get_rng_state()
        assert fast_crop(ours, raw, seed)[1] > 1 and torch.equal(torch.get_rng_state(), after)
        for x in (image, v2.functional.pil_to_tensor(image)):
            torch.manual_seed(seed)
            mine = ours(x)
            torch.manual_seed(seed)
            theirs = reference(x)
            assert torch.equal(v2.functional.pil_to_tensor(mine) if isinstance(mine, Image.Image) else mine,
                               v2.functional.pil_to_tensor(theirs) if isinstance(theirs, Image.Image) else theirs)


def test_uint8_normalised_on_the_device_equals_the_float_transform():
    # before issue 22 the workers made the float image: crop, ToDtype(float32, scale=True), Normalize
    before = v2.Compose([v2.RandomResizedCrop(32, scale=(0.5, 1.0), **BICUBIC), v2.ToImage(),
                         v2.ToDtype(torch.float32, scale=True), v2.Normalize(data.MEAN, data.STD)])
    g = torch.Generator().manual_seed(0)
    tensor = torch.randint(0, 256, (3, 50, 70), dtype=torch.uint8, generator=g)
    for x in (tensor, Image.fromarray(tensor.permute(1, 2, 0).numpy())):
        torch.manual_seed(1)
        old = before(x)
        torch.manual_seed(1)
        new = data.train_transform(32, scale=(0.5, 1.0))(x)
        assert new.dtype == torch.uint8
        torch.testing.assert_close(data.normalise(new), old, rtol=0, atol=0)  # the same floats, on the CPU
    transform = Transform(32, get_tokenizer("clip"), 77)
    batch = torch.utils.data.default_collate([transform(tensor, "a caption") for _ in range(3)])
    on_device = data.to_device(batch, torch.device("cpu"))
    assert on_device["image"].dtype == torch.float32 and torch.equal(on_device["text"], batch["text"])
    torch.testing.assert_close(on_device["image"], data.normalise(batch["image"]), rtol=0, atol=0)


def test_an_unreadable_jpeg_is_found_by_the_crop_and_passed_over(tmp_path):
    # a JPEG cut short has a readable header: the dataset hands on a Jpeg and its decoding, in the training transform,
    # fails; data.Seeded counts it as unreadable (with its path) and replaces it, as it does a file PIL cannot open
    raw = photo("china.jpg")
    (tmp_path / "good.jpg").write_bytes(raw)
    (tmp_path / "cut.jpg").write_bytes(raw[:len(raw) // 2])
    paths = [str(tmp_path / "cut.jpg"), str(tmp_path / "good.jpg")]
    dataset = data.ImageCaptions(paths, ["cut", "good"])
    assert isinstance(dataset[0][0], data.Jpeg)  # no error yet
    seeded = data.Seeded(dataset, Transform(64, get_tokenizer("clip"), 77), seed=0, group=1)
    for size in (64, 224):  # a reduced decode (r = 4) and a full one
        seeded.transform.image = data.train_transform(size)
        out = seeded[(0, 0)]
        assert out["image"].shape == (3, size, size) and out["image"].dtype == torch.uint8
        assert out["bad"] and all(path == paths[0] for path, _ in out["bad"])
        assert out["bad"][0][1].startswith("image file is truncated")
