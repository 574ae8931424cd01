"""
train.py --gpu-decode: JPEGs decoded on the GPU (nvJPEG, through torchvision.io) instead of in the DataLoader workers:
the worker's crop hands on a DeferredCrop (the file's bytes and its box), decoded here a batch at a time (docs/data.md).
"""
import warnings
from contextlib import suppress

import torch
import torchvision.io as tvio
from torchvision.transforms import v2

from plumbing.samples import DeferredCrop, Jpeg, UnreadableImages, decode_image


class Deferring:
    """transform(image, caption) with a samples.Jpeg marked for decoding on the device: its crops that only a uint8
    conversion follows become DeferredCrops; colour-jittered views (SLIP's SimCLR, DeCLIP's) decode in the worker."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, image, caption):
        if isinstance(image, Jpeg):
            image.defer = True
        return self.transform(image, caption)


def decode_columns(batch, device, bad=None):
    """A batch with each list of DeferredCrops (samples.stack's columns) decoded (decode_crops). A row whose image
    nothing could decode takes a copy of the next readable row in every column (the CPU path would draw a new sample:
    the workers have passed it), its (name, reason) appended to `bad`."""
    failed = {}  # {row: (name, reason)}
    for k, v in batch.items():
        if isinstance(v, list):  # of DeferredCrops (samples.stack)
            batch[k], f = decode_crops(v, device)
            failed.update(f)
    if failed:
        n = len(next(iter(batch.values())))
        readable = [i for i in range(n) if i not in failed]
        if not readable:
            raise UnreadableImages(f"no image of a batch decodes, the first {next(iter(failed.values()))[0]}")
        rows = [i if i not in failed else min(readable, key=lambda j: (j - i) % n) for i in range(n)]  # the next one
        batch = {k: v[torch.tensor(rows, device=v.device)] for k, v in batch.items()}
        if bad is not None:
            bad.extend(failed.values())
    return batch


def decode_crops(crops, device):
    """A column of DeferredCrops (and uint8 (3, R, R) images, of files that are not JPEGs) -> (uint8 (B, 3, R, R) on the
    device, {i: (name, reason)} of the crops nothing could decode). The JPEGs are decoded in one batch on the device;
    one it cannot decode (nvJPEG: CMYK, 12-bit, some corrupt files) on the CPU (samples.decode_image)."""
    jpegs = [i for i, c in enumerate(crops) if isinstance(c, DeferredCrop)]
    raws = [torch.frombuffer(bytearray(crops[i].raw), dtype=torch.uint8) for i in jpegs]
    with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders in favour of TorchCodec
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            decoded = tvio.decode_jpeg(raws, mode=tvio.ImageReadMode.RGB, device=device) if raws else []
        except RuntimeError:  # one bad file fails the batch: one at a time
            decoded = [decode_on(raw, device) for raw in raws]
    images, failed = [c.to(device) if torch.is_tensor(c) else None for c in crops], {}
    for i, image in zip(jpegs, decoded):
        if isinstance(image, str):  # decode_columns puts another sample in its place
            failed[i], image = (crops[i].name, image), torch.zeros(3, crops[i].size, crops[i].size, dtype=torch.uint8)
        else:
            image = v2.functional.resized_crop(image.to(device), *crops[i].box, [crops[i].size] * 2,
                                               interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
        images[i] = image.to(device)
    return torch.stack(images), failed


def decode_on(raw, device):
    """One JPEG's (3, H, W) uint8 decode: on the device, else on the CPU, else the reason neither could."""
    with suppress(RuntimeError):
        return tvio.decode_jpeg(raw, mode=tvio.ImageReadMode.RGB, device=device)
    try:
        return v2.Compose([v2.ToImage(), v2.ToDtype(torch.uint8, scale=True)])(decode_image(bytes(raw)))
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ...)
        return str(e) or type(e).__name__
