"""
Tar shards in WebDataset's layout (as img2dataset writes them), streamed: train.py --data 'dir/{00000..00331}.tar',
or from anywhere a command or URL reaches: 'pipe:aws s3 cp s3://bucket/{00000..00331}.tar -', 'https://host/{0..9}.tar'.
A sample is the run of a shard's members that share a key (the name up to the first dot). Read with the standard
library, not webdataset, nor tarfile (173 us an image for its header parsing, 42 us here): docs/data.md#tar-shards.
"""

import http.client
import itertools
import json
import os
import random
import re
from contextlib import closing

import torch

# images from shards follow the policy of image files
from plumbing.samples import MAX_UNREADABLE, UnreadableImage, UnreadableImages, decode_image, seed_of, stack
from plumbing.sources import Source

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
REMOTE = ("pipe:", "http://", "https://")  # read by plumbing/sources.py
MAX_SHARDS = 1_000_000  # what a brace pattern may name (a typo such as {00000000..99999999} would name 10^8)
MAX_MEMBER = 1 << 28  # bytes: a member over 256 MiB is no image or caption (and reading it could exhaust memory)


def braces(pattern):
    """'a/{00000..00002}.tar' -> 'a/00000.tar', 'a/00001.tar', 'a/00002.tar', one at a time; '{x,y}' lists too, and
    '{00002..00000}' counts down (as braceexpand, which webdataset and open_clip use, and bash)."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        yield pattern
        return
    if r := re.fullmatch(r"(\d+)\.\.(\d+)", m.group(1)):
        a, b = int(r.group(1)), int(r.group(2))
        items = (str(i).zfill(len(r.group(1))) for i in range(a, b + (1 if b >= a else -1), 1 if b >= a else -1))
    else:
        items = m.group(1).split(",")
    for item in items:
        yield from braces(pattern[:m.start()] + item + pattern[m.end():])


def shard_list(spec):
    """The tar shards --data names, or None if it names none: a folder of .tar files, a brace pattern, 'pipe:COMMAND'
    (its standard output is the shard), an http(s):// URL, or several of those joined by '::' (as open_clip's
    --train-data). Only local paths are checked here: a remote shard that cannot be read is a bad one when read."""
    if spec in ("synthetic", "coco"):  # names, even where a folder of that name exists
        return None
    if os.path.isdir(spec):
        shards = sorted(os.path.join(spec, f) for f in os.listdir(spec) if f.endswith(".tar"))
        if not shards:
            raise FileNotFoundError(f"{spec} holds no .tar files")
        return shards
    shards = list(itertools.islice((path for part in spec.split("::") for path in braces(part)), MAX_SHARDS + 1))
    if len(shards) > MAX_SHARDS:
        raise ValueError(f"{spec} names more than {MAX_SHARDS:,} shards: a typo in its braces?")
    if not all(path.endswith(".tar") or path.startswith(REMOTE) for path in shards):
        return None
    missing = [path for path in shards if not path.startswith(REMOTE) and not os.path.isfile(path)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of the {len(shards)} shards of {spec} do not exist, the first "
                                f"{missing[0]}")
    return shards


def octal(field):
    """A tar header's number field: octal digits, NUL- or space-padded, or none (0). No sign: a size of -1 would
    read the rest of the shard as one member."""
    digits = field.strip(b"\0 ")
    if not re.fullmatch(rb"[0-7]*", digits):
        raise ValueError("not a tar header: the shard is cut short or corrupt")
    return int(digits or b"0", 8)


def tar_members(f):
    """(name, bytes) of each file of an uncompressed tar, read in order: ustar headers, and the long names that pax and
    GNU records carry; other entries (folders, links) are skipped. A file cut short ends with (name, None), the entry it
    cuts; a header whose checksum is wrong, or a member over MAX_MEMBER, raises ValueError."""
    long_name = None
    while (header := f.read(512)).strip(b"\0"):  # a block of zeros, or the file's end, ends the archive
        checksum = sum(header) - sum(header[148:156]) + 8 * ord(" ")  # the checksum field counts as 8 spaces
        if len(header) < 512 or octal(header[148:156]) != checksum:
            raise ValueError("not a tar header: the shard is cut short or corrupt")
        size = octal(header[124:136])
        if size > MAX_MEMBER:
            raise ValueError(f"a member of {size:,} bytes, over {MAX_MEMBER >> 20} MiB: not a shard of images and "
                             f"captions, or corrupt")
        payload, _ = f.read(size), f.read(-size % 512)  # members are padded to 512 bytes
        prefix = header[345:500].rstrip(b"\0") + b"/" if header[257:263] == b"ustar\0" and header[345] else b""
        name = long_name or (prefix + header[:100].rstrip(b"\0")).decode("utf-8", "replace")
        if len(payload) < size:
            yield name, None
            return
        kind = header[156:157]
        if kind == b"x":  # pax records, "LENGTH key=value\n", for the next entry: its name, if long
            found = re.search(rb"\d+ path=([^\n]*)\n", payload)
            long_name = found.group(1).decode("utf-8", "replace") if found else long_name
            continue
        if kind == b"L":  # GNU's record of the next entry's long name
            long_name = payload.rstrip(b"\0").decode("utf-8", "replace")
            continue
        if kind in (b"0", b"\0"):  # a regular file
            yield name, payload
        long_name = None


def tar_samples(path, timeout=60):
    """A shard's samples in file order: (key, {extension: bytes}) for each run of members sharing a key (the name up
    to the first dot of its base name, as webdataset groups them); then ("", reason: one line) if the shard cannot be
    read to its end (a file, a command or a URL), in which case the sample it was reading is dropped."""
    key, members, failure = None, {}, lambda: None
    try:
        f = Source(path, timeout) if path.startswith(REMOTE) else open(path, "rb")
        failure = f.failure if isinstance(f, Source) else failure
        with closing(f):
            for name, payload in tar_members(f):
                folder, base = os.path.split(name)
                stem, _, ext = base.partition(".")
                if os.path.join(folder, stem) != key and members:
                    yield key, members
                    members = {}
                key = os.path.join(folder, stem)
                if payload is None:  # after the sample before, if this member began a new one
                    raise ValueError(f"the shard ends within {name} (it is cut short)")
                members[ext.lower()] = payload
        if reason := failure():
            raise ValueError(reason)
    except (OSError, ValueError, http.client.HTTPException) as e:  # missing, cut short, corrupt, a URL or command that
        # fails or stalls, a server whose answer is not HTTP (BadStatusLine); a failed command's output ends early:
        # failure() says why it failed (its status and the last line of its stderr)
        yield "", " ".join((failure() or str(e)).split()) or type(e).__name__
        return
    if members:
        yield key, members


def decode_sample(members, caption_key=None, name=None):
    """{extension: bytes} -> (image, caption): the first image member (a JPEG as a samples.Jpeg named `name`), the
    caption from txt or else the json member's "caption" (or caption_key's) field; ValueError without either."""
    image = next((members[ext] for ext in IMAGE_EXTS if ext in members), None)
    if image is None:
        raise ValueError(f"no image ({', '.join(IMAGE_EXTS)}) among its members {sorted(members)}")
    caption = None
    if "txt" in members and caption_key is None:
        caption = members["txt"].decode("utf-8")
    elif "json" in members:
        caption = json.loads(members["json"]).get(caption_key or "caption")
    if not isinstance(caption, str) or not caption.strip():
        where = f"a json field {caption_key!r}" if caption_key else "a txt member or a json field 'caption'"
        raise ValueError(f"no caption ({where})")
    return decode_image(image, lazy_name=name), caption.strip()


class ShardStream(torch.utils.data.IterableDataset):
    """Tar shards as N endless streams ("lanes"), one per reader (N = ranks × DataLoader workers, docs/data.md): epoch
    e shuffles the shard list with (seed, e), lane l reads shards l, l + N, ... of it, then its share of epoch e + 1.
    A lane shuffles in blocks of `buffer` samples, seeded by the block's first position, and augments each sample
    seeded by (seed, epoch, shard, index in the shard). Where a lane stands is four integers: its block's first
    position (epoch, the lane's shard number in it, sample in the shard) and how many of the block were passed.
    Reader k of the rank whose first lane is `first_lane` yields chunks of `sizes[k]` samples: the collated transforms,
    plus "bad", the (name, reason) of each sample passed over, and "lanes", [(lane, its position after the chunk)]."""

    def __init__(self, shards, transform, seed, readers, first_lane, sizes, buffer=2000, start=None, caption_key=None,
                 timeout=60):
        self.shards, self.transform, self.seed, self.readers, self.timeout = shards, transform, seed, readers, timeout
        self.first_lane, self.sizes, self.buffer, self.caption_key = first_lane, sizes, buffer, caption_key
        self.start = start or [(0, 0, 0, 0)] * readers

    def lane_shards(self, lane, epoch):
        order = random.Random(seed_of(self.seed, epoch)).sample(range(len(self.shards)), len(self.shards))
        return order[lane::self.readers]

    def read(self, lane, epoch, j, i):
        """The lane's samples from sample i of its j-th shard of `epoch` on: ((epoch, j, i), shard, key, value), a
        shard's read error as a sample without a key. An epoch without samples raises UnreadableImages."""
        while True:
            sampled, failed = False, None  # whether the epoch gave a sample; the first shard that failed, and why
            for j, shard in enumerate(self.lane_shards(lane, epoch)[j:], start=j):
                for n, (key, value) in enumerate(tar_samples(self.shards[shard], self.timeout)):
                    sampled, failed = sampled or bool(key), failed or (None if key else (self.shards[shard], value))
                    if n >= i:
                        yield (epoch, j, n), shard, key, value
                i = 0
            if not sampled:  # else the lane would go round its shards forever
                name, reason = failed or (self.shards[self.lane_shards(lane, epoch)[0]], None)
                raise UnreadableImages(f"the shards of reader {lane} hold no samples, the first {name}"
                                       + (f" ({reason})" if reason else ""))
            epoch, j = epoch + 1, 0

    def blocks(self, lane, epoch, j, i, taken):
        """The lane's samples in shuffled order from a position on, each with the lane's position after it."""
        samples = self.read(lane, epoch, j, i)
        for _, one_epoch in itertools.groupby(samples, key=lambda sample: sample[0][0]):  # no block spans two epochs
            while block := list(itertools.islice(one_epoch, self.buffer)):
                first = block[0][0]
                order = random.Random(seed_of(self.seed, lane, *first)).sample(range(len(block)), len(block))
                for t in range(taken, len(block)):
                    yield block[order[t]], (*first, t + 1)
                taken = 0

    def __iter__(self):
        worker = torch.utils.data.get_worker_info()
        k = worker.id if worker else 0
        lane, size = self.first_lane + k, self.sizes[k]
        samples, bad, in_a_row = [], [], 0
        for ((epoch, _, n), shard, key, value), position in self.blocks(lane, *self.start[lane]):
            name = f"{self.shards[shard]}/{key}" if key else self.shards[shard]
            try:
                try:
                    if not key:
                        raise ValueError(value)  # the shard's read error
                    image, caption = decode_sample(value, self.caption_key, name)
                except Exception as e:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
                    raise UnreadableImage(name, str(e) or type(e).__name__) from e
                with torch.random.fork_rng(devices=[]):  # the CPU generator only, as data.Seeded
                    torch.default_generator.manual_seed(seed_of(self.seed, epoch, shard, n))
                    sample = self.transform(image, caption)  # a samples.Jpeg is decoded here: UnreadableImage
            except UnreadableImage as e:  # not other errors of the transform: those are bugs, not bad data
                bad.append((name, e.reason))
                in_a_row += 1
                if in_a_row == MAX_UNREADABLE:
                    name, reason = bad[-in_a_row]
                    raise UnreadableImages(f"{in_a_row} samples in a row are unreadable, the first {name} "
                                                f"({reason})") from None
                continue
            in_a_row = 0
            samples.append(sample)
            if len(samples) == size:
                yield {**stack(samples), "bad": bad, "lanes": [(lane, position)]}
                samples, bad = [], []


def join(parts, pin):
    """A shard stream's micro-batch: one chunk from each of this rank's k readers (DataLoader workers, which the
    DataLoader returns in turn), concatenated on the host, into pinned memory when the batches go to a GPU."""
    return {key: concatenated([p[key] for p in parts], pin) if all(torch.is_tensor(p[key]) for p in parts)
            else [x for p in parts for x in p[key]] for key in parts[0]}  # lists: DeferredCrops, "bad", "lanes"


def concatenated(tensors, pin):
    out = torch.empty((sum(len(t) for t in tensors), *tensors[0].shape[1:]), dtype=tensors[0].dtype, pin_memory=pin)
    return torch.cat(tensors, out=out)
