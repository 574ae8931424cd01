"""
Training data: image transforms, the datasets of (image, caption) pairs (synthetic shapes, COCO Captions 2017, a CSV/TSV
of image paths and captions, tar shards), and the training stream that orders and seeds them: each rank's
micro-batches, the same whatever the number of ranks or workers, and exact on resume.
"""
import csv
import itertools
import json
import math
import os
import time
import warnings
from functools import lru_cache

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import v2

from plumbing import gpu_decode, memory, samples, shards, stops
from plumbing.runlog import fail
from plumbing.samples import DeferredCrop, Jpeg, UnreadableImage, UnreadableImages, decode_image, seed_of, stack
from plumbing.synthetic import SyntheticCaptions

# -----------------------------------------------------------------------------
# image transforms: training's give uint8 (3, R, R) images, normalised on the device (a quarter of the bytes through
# pinned memory and the copy); evaluation's give the normalised float image

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
BICUBIC = dict(interpolation=v2.InterpolationMode.BICUBIC, antialias=True)  # every resize here, as OpenAI's


class RandomResizedCrop:
    """v2.RandomResizedCrop(size, scale, bicubic, antialias) of a PIL image, an image tensor or a Jpeg: the same box
    for the same seed. deferrable: only the uint8 conversion follows (train_transform), so a Jpeg marked for decoding
    on the GPU (--gpu-decode) is returned as a DeferredCrop, its bytes and box."""

    def __init__(self, size, scale, ratio=(3 / 4, 4 / 3), deferrable=False):
        self.size, self.scale, self.ratio, self.deferrable = size, scale, ratio, deferrable
        self.log_ratio = torch.log(torch.tensor(ratio)).tolist()  # float32 values, as torchvision's
        self.draw = torch.empty(1)  # one float32, redrawn in place: the draws of torchvision's torch.empty(1)

    def get_params(self, height, width):
        """torchvision's RandomResizedCrop.get_params (the same draws in the same float32 arithmetic) at a third of its
        cost: up to 10 tries at an area and a log-uniform aspect ratio, then the central crop."""
        area = height * width
        for _ in range(10):
            target_area = area * self.draw.uniform_(*self.scale).item()
            aspect_ratio = self.draw.uniform_(*self.log_ratio).exp_().item()
            w, h = round(math.sqrt(target_area * aspect_ratio)), round(math.sqrt(target_area / aspect_ratio))
            if 0 < w <= width and 0 < h <= height:
                top = torch.randint(0, height - h + 1, size=(1,)).item()
                return top, torch.randint(0, width - w + 1, size=(1,)).item(), h, w
        in_ratio = width / height
        if in_ratio < min(self.ratio):
            w, h = width, round(width / min(self.ratio))
        elif in_ratio > max(self.ratio):
            w, h = round(height * max(self.ratio)), height
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, image):
        width, height = image.size if isinstance(image, (Jpeg, Image.Image)) else image.shape[:-3:-1]
        top, left, h, w = self.get_params(height, width)
        if isinstance(image, Jpeg) and image.defer and self.deferrable:
            return DeferredCrop(image, (top, left, h, w), self.size)
        if isinstance(image, Jpeg):
            # Differs from torchvision: the JPEG is decoded at 1/r of its size (libjpeg's DCT scaling), the largest r
            # of 8, 4, 2 that leaves the crop at least `size` pixels a side, and the box mapped to the reduced image:
            # the same boxes, pixels at PSNR > 30 dB (docs/data.md). A finer decode of another view is reused.
            r = next((r for r in (8, 4, 2) if min(h, w) >= r * self.size), 1)
            r = max([k for k in image.decoded if k <= r], default=r)
            if r > 1:
                bottom, right = round((top + h) / r), round((left + w) / r)
                top, left = round(top / r), round(left / r)
                # cut out and copied channels-last (the decode's layout): torch's uint8 antialiased resize takes 0.29
                # ms on that against 0.48 on a strided view of it (a 300x228 crop to 224)
                image = image.decode(r)[:, top:bottom, left:right].permute(1, 2, 0).contiguous().permute(2, 0, 1)
                return v2.functional.resize(image, [self.size, self.size], **BICUBIC)
            image = image.decode(1)
        return v2.functional.resized_crop(image, top, left, h, w, [self.size, self.size], **BICUBIC)


def train_transform(image_size, scale=(0.9, 1.0)):
    """RandomResizedCrop -> uint8 (3, R, R) (an image of 16 bits a channel is cut to 8 here), or a DeferredCrop"""
    return v2.Compose([RandomResizedCrop(image_size, scale, deferrable=True), to_uint8])


TO_UINT8 = [v2.ToImage(), v2.ToDtype(torch.uint8, scale=True)]


def to_uint8(image):
    """TO_UINT8, but a uint8 tensor (a decoded JPEG's crop) or a DeferredCrop as it is (v2's checks cost 0.05 ms)"""
    done = isinstance(image, DeferredCrop) or torch.is_tensor(image) and image.dtype == torch.uint8
    return image if done else v2.Compose(TO_UINT8)(image)


def normalise(images):
    """uint8 images (..., 3, R, R) -> float32, normalised as v2.ToDtype(scale=True) and v2.Normalize do (same floats)"""
    mean, std = (torch.tensor(v, device=images.device).view(3, 1, 1) for v in (MEAN, STD))
    return images.to(torch.float32).mul_(1.0 / 255).sub_(mean).div_(std)


def to_device(batch, device):
    """A micro-batch as the stream hands it (uint8 images, in pinned memory on CUDA) on the device, its uint8 images
    (the training transforms') normalised there: float32, four times the bytes, so made only when a pass needs it."""
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    return {k: normalise(v) if v.dtype == torch.uint8 else v for k, v in batch.items()}


def on_device(batches, device):
    """A step's micro-batches, each moved and normalised (to_device) when the caller asks for it: the device holds the
    float images of two, never all K. On CUDA the next one's copy runs on a side stream while the caller computes."""
    if not str(device).startswith("cuda"):
        trim = len(batches) >= 16  # many batches waiting fragment malloc's heap: what a pass frees would stay
        for batch in batches:  # resident; a trim costs its pages' faults (11-22% of a step, for nothing at K = 4)
            if trim:
                memory.release_freed()
            yield to_device(batch, device)
        return
    side, main = torch.cuda.Stream(device), torch.cuda.current_stream(device)

    def start(batch):
        side.wait_stream(main)  # --gpu-decode's crops, decoded on the main stream, are ready
        with torch.cuda.stream(side):
            return to_device(batch, device)
    ahead = start(batches[0])
    for i in range(len(batches)):
        main.wait_stream(side)
        batch = ahead
        for v in batch.values():
            v.record_stream(main)  # made on the side stream: its memory is reused only after main's use of it
        if i + 1 < len(batches):
            ahead = start(batches[i + 1])  # queued before this batch's compute: the two overlap
        yield batch


def eval_transform(image_size):
    return v2.Compose([v2.Resize(image_size, **BICUBIC), v2.CenterCrop(image_size), v2.ToImage(),
                       v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])


class ImageCaptions(Dataset):
    """One item per (image path, caption) pair, a JPEG as a Jpeg (decoded by the training transform); retrieval()
    groups the captions by image. An image that cannot be read raises UnreadableImage (Seeded replaces it)."""

    def __init__(self, paths, captions):
        self.paths, self.captions = paths, captions

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        try:
            with open(self.paths[index], "rb") as f:
                image = decode_image(f.read(), lazy_name=self.paths[index])  # a JPEG: decoded by the crop
        except Exception as e:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
            raise UnreadableImage(self.paths[index], str(e) or type(e).__name__) from e
        return image, self.captions[index]

    def retrieval(self):
        """(image_paths, captions, caption_image): caption_image[j] indexes the image that caption j describes."""
        image_index = {}
        caption_image = [image_index.setdefault(p, len(image_index)) for p in self.paths]
        return list(image_index), list(self.captions), caption_image


class CocoCaptions(ImageCaptions):
    """COCO Captions 2017: root/{train,val}2017/*.jpg and root/annotations/captions_{split}2017.json."""

    def __init__(self, root, split="train"):
        ann = os.path.join(root, "annotations", f"captions_{split}2017.json")
        image_dir = os.path.join(root, f"{split}2017")
        if not os.path.isfile(ann):
            raise FileNotFoundError(f"{ann} not found: download http://images.cocodataset.org/annotations/"
                                    f"annotations_trainval2017.zip and unzip it into {root}")
        if not os.path.isdir(image_dir):
            raise FileNotFoundError(f"{image_dir} not found: download http://images.cocodataset.org/zips/"
                                    f"{split}2017.zip and unzip it into {root}")
        with open(ann) as f:
            coco = json.load(f)
        file_names = {im["id"]: im["file_name"] for im in coco["images"]}
        pairs = sorted((a["image_id"], a["id"], a["caption"].strip()) for a in coco["annotations"])
        super().__init__([os.path.join(image_dir, file_names[i]) for i, _, _ in pairs], [c for _, _, c in pairs])


class CsvCaptions(ImageCaptions):
    """A CSV/TSV with an image-path column and a caption column (open_clip's filepath/title, or image/caption, or
    those named by img_key and caption_key); sep defaults to a tab for .tsv files, a comma otherwise."""

    IMAGE_KEYS, CAPTION_KEYS = ("filepath", "image", "image_path", "file_name"), ("title", "caption", "text")

    def __init__(self, path, img_key=None, caption_key=None, sep=None, root=None):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"caption file {path} does not exist")
        sep = "\t" if sep == "\\t" else sep or ("\t" if path.endswith(".tsv") else ",")  # \t typed in a shell: a tab
        if len(sep) != 1:
            raise ValueError(f"--csv-separator {sep!r}: a separator is one character")
        try:  # utf-8-sig: a file saved with a byte-order mark (Excel, Notepad) reads as one without
            with open(path, newline="", encoding="utf-8-sig") as f:
                reader = csv.DictReader(f, delimiter=sep)
                rows, columns = list(reader), reader.fieldnames or []
        except UnicodeDecodeError as e:
            raise ValueError(f"{path} is not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8") from None
        keys = []
        for given, options in ((img_key, self.IMAGE_KEYS), (caption_key, self.CAPTION_KEYS)):
            found = [k for k in ([given] if given else options) if k in columns]
            if not found:
                raise ValueError(f"{path}: no column {' or '.join(map(repr, [given] if given else options))}; "
                                 f"columns found: {list(columns)} with separator {sep!r}; name the columns with "
                                 f"--csv-img-key and --csv-caption-key, the separator with --csv-separator")
            keys.append(found[0])
        root = root or os.path.dirname(os.path.abspath(path))
        kept = [r for r in rows if (r[keys[1]] or "").strip()]
        if not kept:
            raise ValueError(f"{path}: no captions (all {len(rows)} rows have empty captions)")
        if len(kept) < len(rows):
            warnings.warn(f"{path}: dropped {len(rows) - len(kept)} of {len(rows)} rows with empty captions")
        super().__init__([os.path.join(root, r[keys[0]]) for r in kept], [r[keys[1]].strip() for r in kept])


def make_dataset(data, data_dir=None, split="train", image_size=64, img_key=None, caption_key=None, sep=None):
    """"synthetic", "coco" (data_dir = COCO root), a .csv/.tsv path (data_dir = root of relative paths; the file is the
    split; img_key, caption_key and sep as in CsvCaptions), or tar shards (plumbing/shards.py), streamed, never
    indexed: their list of paths."""
    if data == "synthetic":
        return SyntheticCaptions(split, image_size=image_size)
    tar_shards = shards.shard_list(data)
    if tar_shards:
        return tar_shards
    if data == "coco":
        if data_dir is None:
            raise ValueError("data 'coco' needs data_dir: the folder holding train2017/, val2017/, annotations/")
        return CocoCaptions(data_dir, split)
    if str(data).endswith((".csv", ".tsv")):
        return CsvCaptions(data, img_key, caption_key, sep, root=data_dir)
    raise ValueError(f"unknown data {data!r}: use 'synthetic', 'coco' (with data_dir), a path to a .csv/.tsv file, "
                     f"or tar shards")


def retrieval_set(data, data_dir=None, split="val", **csv_keys):
    """(image_paths, captions, caption_image) for image-text retrieval on "coco" or a .csv/.tsv file."""
    if data == "synthetic":
        raise ValueError("retrieval needs 'coco' or a .csv/.tsv file; evaluate synthetic data with SyntheticTask")
    return make_dataset(data, data_dir, split, **csv_keys).retrieval()


# -----------------------------------------------------------------------------
# the data stream: which samples make each rank's micro-batches, and the seeds of their augmentations

@lru_cache(maxsize=1)
def epoch_order(n, seed, epoch):
    """The permutation of the n items that epoch `epoch` of the data stream follows."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed_of(seed, epoch)))


class Batches(torch.utils.data.Sampler):
    """Index lists of this rank's micro-batches. The data is one endless stream: epoch e is a permutation drawn from
    (seed, e); global micro-batch i is positions [i·G, (i+1)·G), G = micro · world, and rank r takes its r-th slice,
    so the global batch does not depend on the world size. Each item carries its position, which seeds it."""

    def __init__(self, n, micro, rank, world, seed, start):
        self.n, self.micro, self.rank, self.world, self.seed, self.start = n, micro, rank, world, seed, start

    def __iter__(self):
        for i in itertools.count(self.start):
            first = i * self.micro * self.world + self.rank * self.micro
            positions = range(first, first + self.micro)
            yield [(epoch_order(self.n, self.seed, p // self.n)[p % self.n].item(), p) for p in positions]


class Seeded(torch.utils.data.Dataset):
    """Stream item (index, position) -> transform(image, caption) plus "bad", the (path, reason) of each unreadable
    image passed over. Augmentations are a function of (run seed, stream position), and so is the replacement of an
    unreadable image: the item at the same place of the following batches of its epoch, then of the preceding ones
    (positions p ± k·G, G the global micro-batch), so never an item of its own batch (docs/data.md)."""

    def __init__(self, dataset, transform, seed, group):
        self.dataset, self.transform, self.seed, self.group = dataset, transform, seed, group  # group: G

    def __len__(self):
        return len(self.dataset)

    def positions(self, position):
        n, G = len(self.dataset), self.group
        start = position - position % n  # of the epoch
        after = range(position, start + n, G)  # starts with the position itself
        return itertools.chain(after, range(position - G, start - 1, -G), itertools.count(after[-1] + G, G))

    def __getitem__(self, item):
        index, position = item
        n, bad = len(self.dataset), []
        for p in itertools.islice(self.positions(position), samples.MAX_UNREADABLE):
            i = index if p == position else epoch_order(n, self.seed, p // n)[p % n].item()
            try:
                image, caption = self.dataset[i]
                with torch.random.fork_rng(devices=[]):
                    # the CPU generator only: torch.manual_seed also queues a seeding of every CUDA device's (~0.1 ms)
                    torch.default_generator.manual_seed(seed_of(self.seed, position))
                    return {**self.transform(image, caption), "bad": bad}  # a Jpeg's decoding fails here
            except UnreadableImage as e:
                bad.append((e.path, e.reason))
        raise UnreadableImages(f"{len(bad)} images in a row are unreadable, the first {bad[0][0]} ({bad[0][1]}); are "
                               f"the paths right (relative to the csv's folder, or --data-dir)?")


def collate(items):
    """default_collate, with the items' lists of unreadable images joined into one"""
    bad = [b for item in items for b in item.pop("bad")]
    return {**stack(items), "bad": bad}


class TrainingStream:
    """This rank's micro-batches, endlessly, as to_device takes them: from an indexed dataset, its slice of each global
    micro-batch (Batches, Seeded); from tar shards, a chunk from each of its readers (shards.ShardStream). Keeps for
    RunLog what it passed over (`unreadable`, `reads`, `failed`), the seconds waited in `next` (`waited`) and, from
    shards, where each reader stands after the last whole step of `per_step` micro-batches (`lanes`). start: the
    micro-batch to start from; resumed: the checkpoint's record of a shard stream, {"readers", "shards", "lanes"}."""

    def __init__(self, dataset, transform, seed, micro, rank, world, workers, device, start=0, resumed=None,
                 shuffle_buffer=2000, caption_key=None, decode_on_device=False, per_step=1, shard_timeout=60):
        self.device, self.micro, self.readers, self.shards, k = device, micro, None, None, 1
        transform = gpu_decode.Deferring(transform) if decode_on_device else transform  # decoded in __next__
        self.note_deferred = decode_on_device and rank == 0  # at the first batch
        if isinstance(dataset, list):  # tar shards (make_dataset)
            k = max(1, workers)  # this rank's readers
            self.readers, self.shards = world * k, len(dataset)
            if micro < k:
                fail(f"--workers {workers}: each DataLoader worker reads its own shards and adds at least one sample "
                     f"to each batch of {micro} per rank; use at most {micro} workers")
            if len(dataset) < self.readers:
                fail(f"{len(dataset)} shards for {self.readers} readers ({world} ranks × {k} workers): each reader "
                     f"needs a shard of its own; use fewer --workers")
            if resumed and (resumed["readers"], resumed["shards"]) != (self.readers, self.shards):
                fail(f"the checkpoint streamed {resumed['shards']} shards with {resumed['readers']} readers (ranks × "
                     f"workers), this run {self.shards} with {self.readers}: pass the same --data and --workers on as "
                     f"many ranks")
            sizes = [micro // k + (i < micro % k) for i in range(k)]  # reader i's share of each micro-batch
            source = dict(batch_size=None, dataset=shards.ShardStream(
                dataset, transform, seed, self.readers, first_lane=rank * k, sizes=sizes, buffer=shuffle_buffer,
                start=resumed and resumed["lanes"], caption_key=caption_key, timeout=shard_timeout))
        else:
            source = dict(dataset=Seeded(dataset, transform, seed, micro * world), collate_fn=collate,
                          batch_sampler=Batches(len(dataset), micro, rank, world, seed, start))
        loader = torch.utils.data.DataLoader(**source, num_workers=workers, pin_memory=device.startswith("cuda"),
                                             persistent_workers=workers > 0, prefetch_factor=4 if workers else None,
                                             worker_init_fn=stops.ignore_interrupts, timeout=workers and stops.TICK)
        self.batches, self.k, self.pin = iter(loader), k, device.startswith("cuda")
        stops.found_when_read()
        self.unreadable, self.reads, self.failed, self.lanes, self.moved, self.waited = {}, 0, 0, {}, {}, 0.0
        self.per_step, self.taken = per_step, 0

    def __next__(self):
        start = time.perf_counter()  # host time, no device sync
        try:
            parts = [stops.next_batch(self.batches) for _ in range(self.k)]  # a chunk from each reader, in turn
            batch = shards.join(parts, self.pin) if self.shards else parts[0]
            bad, lanes = batch.pop("bad"), batch.pop("lanes", ())
            if self.note_deferred and not any(isinstance(v, list) for v in batch.values()):
                print("--gpu-decode: nothing to decode on the device in the first batch (no JPEGs, or every view is "
                      "colour-jittered, on the CPU)", flush=True)
            self.note_deferred = False
            batch = gpu_decode.decode_columns(batch, self.device, bad)  # --gpu-decode's; bad: + what nothing decodes
        except UnreadableImages as e:  # from a worker it arrives in the worker's traceback: its last line
            fail(str(e).strip().splitlines()[-1].removeprefix("plumbing.samples.UnreadableImages: "))
        self.moved.update(lanes)
        self.taken += 1
        if self.taken % self.per_step == 0:  # a stop between micro-batches saves the positions of the steps done
            self.lanes.update(self.moved)
        self.unreadable.update(bad)
        self.reads, self.failed = self.reads + self.micro + len(bad), self.failed + len(bad)
        self.waited += time.perf_counter() - start
        return batch

    def take_unreadable(self):
        """-> ({path: reason} of the unreadable samples since the last call, reads and failed reads since the start)"""
        taken, self.unreadable = self.unreadable, {}
        return taken, self.reads, self.failed
