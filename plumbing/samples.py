"""
One training sample as the DataLoader workers make it, for data.py and the tar shards (plumbing/shards.py) alike: an
image file's bytes decoded (a JPEG left for the training crop, or the device, to decode), the one policy for samples
that cannot be read, the one seeding scheme of a run, and the collation of samples into a batch.
"""
import io
import warnings

import numpy as np
import torch
import torchvision.io as tvio
from PIL import Image


def load_image(path):
    """An RGB image from a file, decoded now so that a corrupt file fails inside the dataset: a (3, H, W) uint8 tensor
    from torchvision.io (1.7x faster than PIL on JPEGs: scripts/bench_data.py), or a PIL image if it cannot read it."""
    with open(path, "rb") as f:
        return decode_image(f.read())


def decode_image(raw, lazy_name=None):
    """load_image on the bytes of an image file (a member of a tar shard); of an animated image, the first frame.
    Refuses one over PIL's decompression-bomb limit (~89M pixels) before decoding it: a 400M-pixel PNG can be 389 KB
    on disk and 2.7 GB in memory. With lazy_name (what an UnreadableImage names), a JPEG is returned as a Jpeg."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below, in one line
        header = Image.open(io.BytesIO(raw))  # reads the header only: ~1% of decoding a JPEG
    (width, height), kind = header.size, header.format
    if width * height > Image.MAX_IMAGE_PIXELS:
        raise ValueError(f"{width}x{height} pixels, over the {Image.MAX_IMAGE_PIXELS:,} of PIL's decompression-bomb "
                         f"limit")
    if lazy_name is not None and kind == "JPEG":
        return Jpeg(raw, (width, height), lazy_name, header)
    header.close()
    try:
        with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders in favour of TorchCodec
            warnings.simplefilter("ignore", DeprecationWarning)
            image = tvio.decode_image(torch.frombuffer(bytearray(raw), dtype=torch.uint8), mode=tvio.ImageReadMode.RGB)
        return image[0] if image.ndim == 4 else image  # an animated GIF: (frames, 3, H, W)
    except RuntimeError:  # an unsupported format, or a broken file: PIL reads the one and names the other
        with Image.open(io.BytesIO(raw)) as img:
            if img.mode.startswith("I;16"):  # 16-bit grey, as torchvision.io gives it (PIL's RGB would clip at 255)
                return torch.from_numpy(np.array(img).astype(np.uint16)).expand(3, -1, -1)
            return img.convert("RGB")  # of an animated image, the first frame, as PIL opens it


class Jpeg:
    """A JPEG file's bytes and (width, height), not decoded yet: RandomResizedCrop decodes it at the size its crop
    needs (decode). name: what an UnreadableImage names if its decoding fails."""

    def __init__(self, raw, size, name, header=None):
        self.raw, self.size, self.name, self.decoded = raw, size, name, {}  # decoded: {r: the decode at 1/r}
        self.header = header  # PIL's Image of raw, its header read (decode_image's): the first reduced decode uses it
        self.defer = False  # decoded on the device (DeferredCrop): set by TrainingStream's decode_on_device

    def decode(self, r=1):
        """The (3, ⌈H/r⌉, ⌈W/r⌉) uint8 image: r = 1 torchvision.io's (faster at full size), else libjpeg's DCT-domain
        reduction (PIL's draft): each output pixel from its r×r block's coefficients, r² fewer pixels to compute."""
        if r not in self.decoded:
            try:
                if r == 1:
                    self.decoded[r] = decode_image(self.raw)
                else:
                    img, self.header = self.header or Image.open(io.BytesIO(self.raw)), None
                    with img:
                        img.draft("RGB", (self.size[0] // r, self.size[1] // r))  # picks 1/r: the size is >= this
                        img.load()
                        rgb = img if img.mode == "RGB" else img.convert("RGB")
                        self.decoded[r] = torch.from_numpy(np.array(rgb)).permute(2, 0, 1)
            except Exception as e:  # PIL raises many types (OSError, SyntaxError, ...)
                raise UnreadableImage(self.name, str(e) or type(e).__name__) from e
        return self.decoded[r]


class UnreadableImage(Exception):
    """An image file that is missing, corrupt, or in a format neither torchvision.io nor PIL reads."""

    def __init__(self, path, reason):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


class UnreadableImages(Exception):
    """Too many unreadable images to go on training: the data is not where it was looked for."""


# The one policy for unreadable samples, from image files and tar shards alike: each is replaced by another of the same
# epoch, so that every batch stays whole, and counted in the log's `skipped`; the run stops, naming the first, when this
# many in a row fail for one sample or reader, or more than half of all reads have (runlog.RunLog): docs/data.md
MAX_UNREADABLE = 64


class DeferredCrop:
    """A training crop left to the GPU (train.py --gpu-decode): the JPEG's bytes and the box (top, left, h, w) that
    RandomResizedCrop drew in the worker. A JPEG with no end marker after its last scan (a truncated file) is
    unreadable here already, in the worker, which replaces it as it would on failing to decode it."""

    def __init__(self, jpeg, box, size):
        end = jpeg.raw.rfind(b"\xff\xd9")  # EOI; then no SOS after it (a scan cut short); markers are not data
        if end < 0 or jpeg.raw.find(b"\xff\xda", end) >= 0:
            raise UnreadableImage(jpeg.name, "truncated: no end-of-image marker after its last scan")
        self.raw, self.name, self.box, self.size = jpeg.raw, jpeg.name, box, size


def seed_of(seed, *parts):
    """The one seeding scheme of a run: the seed of what `parts` (integers ≥ 0) name, e.g. seed_of(seed, epoch) for an
    epoch's order, seed_of(seed, step, rank, micro-batch) for a step's in-model randomness. So every draw is a function
    of where it is in the run, which makes a resume exact. Distinct parts below 1,000,003 give distinct seeds."""
    for part in parts:
        seed = seed * 1_000_003 + part
    return seed % 2**62


def stack(samples):
    """default_collate, but a column holding DeferredCrops stays a list (to_device decodes it)"""
    lists = {k for sample in samples for k, v in sample.items() if isinstance(v, DeferredCrop)}
    batch = torch.utils.data.default_collate([{k: v for k, v in s.items() if k not in lists} for s in samples])
    return {**batch, **{k: [s[k] for s in samples] for k in lists}}
