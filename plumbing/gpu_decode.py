"""
train.py --gpu-decode: JPEGs decoded on the GPU (nvJPEG, through torchvision.io) instead of in the DataLoader workers.
The crop that only the uint8 conversion follows (data.train_transform: CLIP's, SigLIP's and FILIP's view, SLIP's CLIP
view) draws its box in the worker as always, from the sample's seed, and hands on the file's bytes and the box (a
DeferredCrop) instead of pixels; data.to_device decodes a batch's crops in one call on the device and cuts each box
as torchvision's RandomResizedCrop cuts a full decode. Views with colour jitter, blur or flips stay on the CPU.
"""
import warnings

import torch
import torchvision.io as tvio
from torchvision.transforms import v2

from plumbing.samples import DeferredCrop, Jpeg, UnreadableImages, decode_image


class Deferring:
    """transform(image, caption) with a samples.Jpeg marked for decoding on the device: its crops that only a uint8
    conversion follows become DeferredCrops (data.train_transform); colour-jittered views (SLIP's SimCLR, DeCLIP's)
    are decoded in the worker as without the flag."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, image, caption):
        if isinstance(image, Jpeg):
            image.defer = True
        return self.transform(image, caption)



def decode_columns(batch, device, bad=None):
    """A batch (on the device but for its lists) with each list of DeferredCrops (samples.stack's columns) decoded
    (decode_crops). A sample whose image nothing could decode takes the place of the next readable one in every column
    (a repeated pair, where the CPU path would draw a new sample: the workers have passed it), its (name, reason)
    appended to `bad`."""
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
    device, {i: (name, reason)} of the crops nothing could decode). The JPEGs are decoded in one batch by torchvision.io
    on the device (nvJPEG on a GPU), then cut and resized as RandomResizedCrop cuts and resizes a full decode. One that
    the device cannot decode (nvJPEG: CMYK, 12-bit, some corrupt files) is decoded on the CPU (samples.decode_image)."""
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
    try:
        return tvio.decode_jpeg(raw, mode=tvio.ImageReadMode.RGB, device=device)
    except RuntimeError:
        pass
    try:
        return v2.Compose([v2.ToImage(), v2.ToDtype(torch.uint8, scale=True)])(decode_image(bytes(raw)))
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ...)
        return str(e) or type(e).__name__
