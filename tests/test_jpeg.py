"""The cheaper image path (issue 22): a JPEG decoded by the training crop at 1/r of its size (data.RandomResizedCrop on
a samples.Jpeg), the crop boxes torchvision's, uint8 out of the workers and normalised on the device (data.normalise)."""

import io
import math
import os

import pytest
import torch
from PIL import Image
from sklearn.datasets import load_sample_image  # two real photos, 640x427, shipped with scikit-learn (requirements-dev)
from torchvision.transforms import v2

import data
from clip import Transform
from plumbing import gpu_decode, samples
from plumbing.tokenizer import get_tokenizer

BICUBIC = dict(interpolation=v2.InterpolationMode.BICUBIC, antialias=True)


def photo(name, quality=90):
    """A real photo as JPEG bytes, cut to 640x424 (sides divisible by 8: every reduced decode is exact)"""
    buffer = io.BytesIO()
    Image.fromarray(load_sample_image(name)[:424]).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def psnr(a, b):
    return 10 * math.log10(255 ** 2 / max((a.float() - b.float()).pow(2).mean().item(), 1e-10))


def fast_crop(crop, raw, seed):
    """crop of a samples.Jpeg of raw (640x424), and the r and (top, left, h, w) in source pixels it cut: torchvision's
    draw for the seed, at r > 1 its edges rounded to multiples of r (data.RandomResizedCrop's rule)"""
    torch.manual_seed(seed)
    top, left, h, w = v2.RandomResizedCrop.get_params(torch.empty(0, 424, 640), crop.scale, crop.ratio)
    r = next((r for r in (8, 4, 2) if min(h, w) >= r * crop.size), 1)
    edges = [r * round(x / r) for x in (top, left, top + h, left + w)]
    torch.manual_seed(seed)
    return crop(samples.Jpeg(raw, (640, 424), "x")), r, (*edges[:2], edges[2] - edges[0], edges[3] - edges[1])


@pytest.mark.parametrize("name", ["china.jpg", "flower.jpg"])
def test_reduced_decode_matches_full_decoding_of_the_same_box(name):
    # The tolerance: every crop within 30 dB PSNR of the full decoding's, the mean over crops above 33 dB. What
    # differs is the low-pass filter before subsampling (libjpeg's DCT-domain reduction, then bicubic, against one
    # bicubic reduction): differences of the size JPEG compression itself makes (re-encoding these photos' 224 px
    # reductions at quality 90 costs them 35-37 dB), and the images we train on are JPEGs already. A box shifted by
    # r/2 source pixels scored 23-26 dB when we tried, so the box is checked too. Measured (16 crops per size): means
    # 34-44 dB, minimum 31.8 dB. Boxes too small for a reduction are decoded in full: exact.
    raw = photo(name)
    full = samples.decode_image(raw)
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
    ours = data.RandomResizedCrop(224, (0.9, 1.0))(samples.Jpeg(raw, (640, 424), "x"))  # a side < 2 x 224: r = 1
    torch.manual_seed(0)
    assert torch.equal(ours, v2.RandomResizedCrop(224, (0.9, 1.0), **BICUBIC)(samples.decode_image(raw)))


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


@pytest.mark.parametrize("scale", [(0.9, 1.0), (0.08, 1.0)])
def test_get_params_is_torchvisions(scale):
    # data.RandomResizedCrop.get_params against torchvision's: the same box and the same RNG state after it, on shapes
    # that take each branch (a try that fits; the central crop of a too wide, a too tall and a fitting image)
    from torchvision.transforms import RandomResizedCrop as RandomResizedCropV1
    crop, central = data.RandomResizedCrop(32, scale), set()
    for seed in range(500):
        for height, width in ((424, 640), (100, 1000), (1000, 100), (3, 3)):
            torch.manual_seed(seed)
            theirs = RandomResizedCropV1.get_params(torch.empty(0, height, width), scale, crop.ratio)
            after = torch.get_rng_state()
            torch.manual_seed(seed)
            assert crop.get_params(height, width) == theirs and torch.equal(torch.get_rng_state(), after)
            if theirs[:2] == ((height - theirs[2]) // 2, (width - theirs[3]) // 2):
                central.add((height, width))
    assert {(100, 1000), (1000, 100), (3, 3)} <= central


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
    assert isinstance(dataset[0][0], samples.Jpeg)  # no error yet
    seeded = data.Seeded(dataset, Transform(64, get_tokenizer("clip"), 77), seed=0, group=1)
    for size in (64, 224):  # a reduced decode (r = 4) and a full one
        seeded.transform.image = data.train_transform(size)
        out = seeded[(0, 0)]
        assert out["image"].shape == (3, size, size) and out["image"].dtype == torch.uint8
        assert out["bad"] and all(path == paths[0] for path, _ in out["bad"])
        assert out["bad"][0][1].startswith("image file is truncated")


# --- train.py --gpu-decode: the workers hand the JPEG's bytes and box, the device decodes and crops ---------------------


def photos(folder):
    """Six image files: real photos at three qualities, a greyscale JPEG, a PNG (never deferred: decoded in the worker)"""
    china, flower = (load_sample_image(name)[:424] for name in ("china.jpg", "flower.jpg"))
    files = [("china90.jpg", china, 90), ("flower90.jpg", flower, 90), ("china60.jpg", china[::-1], 60),
             ("flower75.jpg", flower[:, ::-1], 75), ("grey.jpg", china[..., 1], 85), ("china.png", china[50:350], 0)]
    for name, pixels, quality in files:
        Image.fromarray(pixels.copy()).save(folder / name, **({"quality": quality} if quality else {}))
    return [str(folder / name) for name, *_ in files]


def first_batch(paths, workers=0, size=96, device="cpu", **stream):
    dataset = data.ImageCaptions(paths, [f"photo number {i}" for i in range(len(paths))])
    transform = Transform(size, get_tokenizer("clip"), 77)
    stream = data.TrainingStream(dataset, transform, 0, len(paths), 0, 1, workers, device, **stream)
    return data.to_device(next(stream), device), stream  # as a pass of train.forward_backward takes it


def unnormalised(images):  # (B, 3, R, R) float on the device -> the uint8 values the transforms made
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in (data.MEAN, data.STD))
    return (images * std + mean) * 255


def test_gpu_decode_gives_torchvisions_crop_of_the_full_decode(tmp_path):
    # The device's part runs on the CPU device here (torchvision.io's libjpeg in place of nvJPEG; tests/test_cuda.py
    # runs it on a GPU). Each image is exactly torchvision's RandomResizedCrop of the full decode under the sample's seed:
    # the workers drew the box (two workers: DeferredCrops travel through the DataLoader's queues and pinning) and the
    # crop is torchvision's. Against the workers' own reduced decode, the CPU path: its tolerance, above.
    paths = photos(tmp_path)
    deferred, _ = first_batch(paths, workers=2, decode_on_device=True)
    on_cpu, _ = first_batch(paths, workers=2)
    crop = v2.RandomResizedCrop(96, (0.9, 1.0), **BICUBIC)
    for position in range(len(paths)):
        index = data.epoch_order(len(paths), 0, 0)[position].item()
        torch.manual_seed(samples.seed_of(0, position))
        reference = crop(samples.load_image(paths[index]))
        assert torch.equal(deferred["image"][position], data.normalise(reference)), paths[index]
        assert psnr(unnormalised(deferred["image"][position]), unnormalised(on_cpu["image"][position])) > 30
    assert torch.equal(deferred["text"], on_cpu["text"])


def test_gpu_decode_of_a_method_with_other_views_and_of_shards(tmp_path):
    # SLIP: its CLIP view is deferred, its two SimCLR views (colour jitter, blur, flips on the CPU) are not, and draw
    # the same as without --gpu-decode. Shards: chunks of two readers joined with their lists of DeferredCrops; their
    # tiny JPEGs are decoded in full on the CPU path too, so the batches are equal.
    from test_shards import write_shards

    from model import create_model
    from slip import SLIP
    paths = photos(tmp_path)
    dataset = data.ImageCaptions(paths, [f"photo number {i}" for i in range(len(paths))])
    transform = SLIP(create_model("tiny-vit"), mlp_dim=16).transform(get_tokenizer("clip"))
    batches = [data.to_device(next(data.TrainingStream(dataset, transform, 0, 6, 0, 1, 0, "cpu", decode_on_device=d)),
                              "cpu") for d in (0, 1)]
    assert all(torch.equal(batches[0][k], batches[1][k]) for k in batches[0] if k != "image")
    assert min(psnr(unnormalised(a), unnormalised(b)) for a, b in zip(batches[0]["image"], batches[1]["image"])) > 30
    assert not torch.equal(batches[0]["image"], batches[1]["image"])  # deferred: a full decode, not the reduced one

    shards = write_shards(str(tmp_path / "shards"), corrupt=[(1, 2)])
    streams = [data.TrainingStream(shards, Transform(16, get_tokenizer("clip"), 77), 0, 4, 0, 1, 2, "cpu",
                                   decode_on_device=d) for d in (False, True)]
    for _ in range(6):
        plain, deferred = (data.to_device(next(stream), "cpu") for stream in streams)
        assert plain.keys() == deferred.keys() and all(torch.equal(plain[k], deferred[k]) for k in plain)
    (bad, *counts), (bad_deferred, *counts_deferred) = (stream.take_unreadable() for stream in streams)
    assert bad.keys() == bad_deferred.keys() and len(bad) == 1 and counts == counts_deferred


def test_gpu_decode_of_files_the_device_or_nothing_can_decode(tmp_path, monkeypatch):
    # A truncated JPEG is found in the worker (no end marker after its last scan) and replaced there as on the CPU
    # path. One the device cannot decode is decoded on the CPU (nvJPEG lacks CMYK and 12-bit; here a decoder that
    # refuses one file stands in for it). One nothing decodes (a bogus Huffman table: the header reads) gives its place
    # to the next sample of the batch, in every column, and is counted unreadable.
    paths = photos(tmp_path)[:5]
    raw = open(paths[0], "rb").read()
    (tmp_path / "cut.jpg").write_bytes(raw[:len(raw) // 2])
    bogus = bytearray(raw)
    dht = raw.index(b"\xff\xc4")
    bogus[dht + 5:dht + 21] = b"\xff" * 16  # its 16 code counts: 4,080 codes of at most 16 bits
    (tmp_path / "bogus.jpg").write_bytes(bogus)
    paths = [paths[0], str(tmp_path / "cut.jpg"), str(tmp_path / "bogus.jpg"), *paths[1:]]
    refused = open(paths[3], "rb").read()
    decode_jpeg = gpu_decode.tvio.decode_jpeg

    def device_decoder(raws, **kwargs):
        if any(bytes(r.numpy()) == refused for r in (raws if isinstance(raws, list) else [raws])):
            raise RuntimeError("unsupported")
        return decode_jpeg(raws, **kwargs)
    monkeypatch.setattr(gpu_decode.tvio, "decode_jpeg", device_decoder)
    deferred, stream = first_batch(paths, decode_on_device=True)
    on_cpu, cpu_stream = first_batch(paths)
    order = data.epoch_order(len(paths), 0, 0).tolist()
    b = order.index(2)  # bogus.jpg's place in the batch
    for column in deferred:
        assert torch.equal(deferred[column][b], deferred[column][(b + 1) % len(paths)])
    (unreadable, _, failed), (on_cpu_unreadable, _, _) = stream.take_unreadable(), cpu_stream.take_unreadable()
    assert set(unreadable) == set(on_cpu_unreadable) == {paths[1], paths[2]} and failed == 2
    assert unreadable[paths[1]].startswith("truncated") and unreadable[paths[2]] == on_cpu_unreadable[paths[2]]
    for position, index in enumerate(order):  # the rest: the same samples as on the CPU path, the refused file too
        if index != 2:
            assert torch.equal(deferred["text"][position], on_cpu["text"][position])
            assert psnr(unnormalised(deferred["image"][position]), unnormalised(on_cpu["image"][position])) > 30
    with pytest.raises(SystemExit) as stopped:  # a batch of them: nothing to take their place, one line
        first_batch([paths[2]] * 3, decode_on_device=True)
    assert stopped.value.code == f"error: no image of a batch decodes, the first {paths[2]}"


def test_train_py_gpu_decode(tmp_path):
    # --gpu-decode end to end (on the CPU device): the same run as without it but for the decoding of the images,
    # so the losses agree closely; DeCLIP's views are all colour-jittered on the CPU, which the run says
    import cli
    from test_train import METHOD_ARGS, read_log
    paths = photos(tmp_path)
    rows = [f"{os.path.basename(p)}\ta photo of something number {i}" for i, p in enumerate(paths * 2)]
    (tmp_path / "pairs.tsv").write_text("filepath\ttitle\n" + "\n".join(rows) + "\n")
    args = ["--data", tmp_path / "pairs.tsv", "--model", "tiny-vit", "--batch-size", "4", "--steps", "3",
            "--workers", "1", "--log-every", "1", "--eval-size", "0"]
    losses = []
    for flags in ([], ["--gpu-decode"]):
        p = cli.run("train.py", *args, *flags, "--out-dir", tmp_path / f"out{len(flags)}", cwd=tmp_path)
        assert p.returncode == 0, p.stderr
        assert "nothing to decode" not in p.stdout
        losses.append([row["loss"] for row in read_log(tmp_path / f"out{len(flags)}") if "loss" in row])
    assert len(losses[1]) == 3 and losses[0] != losses[1]
    # measured: 1.4e-4 at the first step (the same weights), 2.3e-3 and 4.2e-3 after (the weights part)
    torch.testing.assert_close(losses[1][0], losses[0][0], rtol=1e-3, atol=0)
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-2, atol=0)
    p = cli.run("train.py", *args, "--steps", "1", "--method", "declip", "--method-args", METHOD_ARGS["declip"],
                "--gpu-decode", "--out-dir", tmp_path / "declip", cwd=tmp_path)
    assert p.returncode == 0 and "--gpu-decode: nothing to decode on the device" in p.stdout, p.stdout + p.stderr


# --- several views of one JPEG; a JPEG with an embedded thumbnail ------------------------------------------------------


def test_views_of_one_jpeg_at_different_scales_each_match_their_own_full_decode():
    """The views of one sample share its Jpeg (SLIP's and DeCLIP's three and two crops), whose decodes are kept: a
    view reuses a decode made at a finer r than it needs, never a coarser one. Each view, whatever the decodes the
    views before it left, is within 30 dB of torchvision's crop of the full decode of its box (edges rounded to the
    r it was cut from), and is exact where it needed the full decode."""
    raw = photo("flower.jpg")
    full = samples.decode_image(raw)
    jpeg = samples.Jpeg(raw, (640, 424), "x")
    # (size, scale) of views needing r = 8, then 2 (finer than the decode there is), 4 (a finer one is there), 1,
    # 8 (there), 4, 4
    views = [(40, (0.9, 1.0)), (150, (0.9, 1.0)), (96, (0.9, 1.0)), (224, (0.9, 1.0)), (24, (0.5, 1.0)),
             (64, (0.5, 1.0)), (48, (0.08, 0.3))]
    decoded, used, values = set(), [], []
    for seed, (size, scale) in enumerate(views):
        torch.manual_seed(seed)
        top, left, h, w = v2.RandomResizedCrop.get_params(torch.empty(0, 424, 640), scale, (3 / 4, 4 / 3))
        needed = next((r for r in (8, 4, 2) if min(h, w) >= r * size), 1)
        r = max([k for k in decoded if k <= needed], default=needed)  # the finest kept decode that is fine enough
        decoded.add(r)
        used.append(r)
        torch.manual_seed(seed)
        view = data.RandomResizedCrop(size, scale)(jpeg)
        edges = [r * round(x / r) for x in (top, left, top + h, left + w)]
        reference = v2.functional.resized_crop(full, edges[0], edges[1], edges[2] - edges[0], edges[3] - edges[1],
                                               [size, size], **BICUBIC)
        assert view.shape == (3, size, size) and view.dtype == torch.uint8
        if r == 1:
            assert torch.equal(view, reference), seed
        else:
            values.append(psnr(view, reference))
            assert values[-1] > 30, (seed, size, r, values)
    assert used == [8, 2, 2, 1, 8, 2, 2] and sorted(jpeg.decoded) == [1, 2, 8]  # each decode made once, then reused


def exif_with_thumbnail(thumbnail):
    """An APP1 Exif segment (little-endian TIFF) whose IFD1 holds a JPEG thumbnail, as cameras write it"""
    import struct

    ifd0 = struct.pack("<H", 0) + struct.pack("<I", 26)  # no entries; IFD1 at offset 26
    entries = [(0x0103, 3, 1, 6), (0x0201, 4, 1, 68), (0x0202, 4, 1, len(thumbnail))]  # compression JPEG, offset, length
    ifd1 = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", *e) for e in entries) + struct.pack("<I", 0)
    tiff = b"II*\x00" + struct.pack("<I", 8) + ifd0 + b"\x00" * 12 + ifd1  # IFD1 at 8 + 6 + 12 = 26, ends at 68
    assert len(tiff) == 68
    payload = b"Exif\x00\x00" + tiff + thumbnail
    return b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload


def test_a_jpeg_with_an_embedded_thumbnail(tmp_path):
    """A camera's JPEG carries a small JPEG inside its Exif segment, with its own end-of-image marker before the main
    image's scans: it is read as the main image (size, reduced and full decodes), its complete file is not taken for
    a truncated one (--gpu-decode's check looks for the LAST end marker), and the same file cut short is."""
    buffer = io.BytesIO()
    Image.fromarray(load_sample_image("china.jpg")[:424][::4, ::4]).save(buffer, "JPEG", quality=70)
    thumbnail = buffer.getvalue()
    main = photo("china.jpg")
    raw = main[:2] + exif_with_thumbnail(thumbnail) + main[2:]  # after SOI
    assert raw.find(b"\xff\xda", raw.find(b"\xff\xd9")) > 0  # the main image's scan after the thumbnail's end
    jpeg = samples.decode_image(raw, lazy_name="thumb.jpg")
    assert isinstance(jpeg, samples.Jpeg) and jpeg.size == (640, 424)
    assert torch.equal(jpeg.decode(1), samples.decode_image(main))
    assert torch.equal(samples.Jpeg(raw, (640, 424), "x").decode(4), samples.Jpeg(main, (640, 424), "x").decode(4))
    for cut in (len(raw) // 2, len(raw) - 100):  # cut within the main image's scan
        with pytest.raises(samples.UnreadableImage, match="truncated"):
            samples.DeferredCrop(samples.Jpeg(raw[:cut], (640, 424), "cut.jpg"), (0, 0, 100, 100), 64)
    # --gpu-decode: the worker hands on the complete file (not taken for a truncated one), and the device's decoder
    # (here torchvision.io's, the CPU device's) gives torchvision's crop of the main image
    transform = gpu_decode.Deferring(Transform(96, get_tokenizer("clip"), 77))
    torch.manual_seed(0)
    crop = transform(samples.decode_image(raw, lazy_name="thumb.jpg"), "a photo")["image"]
    assert isinstance(crop, samples.DeferredCrop) and crop.raw == raw
    images, failed = gpu_decode.decode_crops([crop], torch.device("cpu"))
    torch.manual_seed(0)
    reference = v2.RandomResizedCrop(96, (0.9, 1.0), **BICUBIC)(samples.decode_image(main))
    assert not failed and torch.equal(images[0], reference)
