"""
Tar shards in WebDataset's layout (as img2dataset writes them), streamed: train.py --data 'dir/{00000..00331}.tar',
or from anywhere a command or URL reaches: 'pipe:aws s3 cp s3://bucket/{00000..00331}.tar -', 'https://host/{0..9}.tar'.

A sample is the run of a shard's members that share a key (the name up to the first dot): an image (jpg, jpeg, png,
webp) and a caption (txt, else json's "caption"). The shards are never indexed: N readers (ranks × DataLoader workers)
each stream their own shards, shuffle in blocks, and know where they stand in four integers, so that a resumed run
reads on exactly where it stopped (ShardStream).

Read with the standard library rather than the webdataset package: which shards each reader takes, a shuffle that
resumes exactly and bad samples counted would be written here either way, through webdataset's hooks; what it would
replace is reading a tar in order and grouping its members by key (tar_members, tar_samples: 50 lines). webdataset
reads tars with the tarfile module, whose header parsing (every field, in Python) costs more than the rest of reading
an image (173 us an image, against 42 us with tar_members and 15 us to read it as a file: docs/speed.md).
"""

import http.client
import itertools
import json
import os
import random
import re

import torch

from plumbing.sources import Source
# images from shards follow the policy of image files
from plumbing.samples import MAX_UNREADABLE, UnreadableImage, UnreadableImages, decode_image, seed_of, stack

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


MAX_SHARDS = 1_000_000  # what a brace pattern may name (a typo such as {00000000..99999999} would name 10^8)


def braces(pattern):
    """'a/{00000..00002}.tar' -> 'a/00000.tar', 'a/00001.tar', 'a/00002.tar', one at a time; '{x,y}' lists too, and
    '{00002..00000}' counts down (as braceexpand, which webdataset and open_clip use, and bash)."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        yield pattern
        return
    r = re.fullmatch(r"(\d+)\.\.(\d+)", m.group(1))
    if r:
        a, b = int(r.group(1)), int(r.group(2))
        items = (str(i).zfill(len(r.group(1))) for i in range(a, b + (1 if b >= a else -1), 1 if b >= a else -1))
    else:
        items = m.group(1).split(",")
    for item in items:
        yield from braces(pattern[:m.start()] + item + pattern[m.end():])


REMOTE = ("pipe:", "http://", "https://")


def shard_list(spec):
    """The tar shards --data names, or None if it names none: a folder of .tar files, a brace pattern
    ('cc3m/{00000..00331}.tar'), 'pipe:COMMAND' (its standard output is the shard: 'pipe:aws s3 cp
    s3://b/{00000..00331}.tar -'), an http(s):// URL, or several of those joined by '::' (as open_clip's --train-data).
    Only local paths are checked here: a remote shard that cannot be read is a bad sample when it is read."""
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


MAX_MEMBER = 1 << 28  # bytes: a member over 256 MiB is no image or caption (and reading it could exhaust memory)


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


def open_shard(path, timeout=60):
    """-> (a binary file of the shard's bytes, failure): failure(), once the file is closed, is why its source failed
    (a command's exit status and the last line of its standard error) or None. A command's or URL's reads give up
    after `timeout` seconds without progress (plumbing/sources.py)."""
    if path.startswith(REMOTE):
        source = Source(path, timeout)
        return source, source.failure
    return open(path, "rb"), lambda: None


def tar_samples(path, timeout=60):
    """A shard's samples in file order: (key, {extension: bytes}) for each run of members sharing a key (the member's
    name up to the first dot of its base name, as webdataset groups them); then ("", reason: one line) if the shard
    cannot be read to its end (a file, URL or command: open_shard), in which case the sample it was reading is
    dropped."""
    key, members = None, {}
    try:
        f, failure = open_shard(path, timeout)
        try:
            with f:
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
        except (OSError, ValueError, http.client.HTTPException) as e:
            raise ValueError(failure() or str(e)) from e  # a failed command's output ends early: say why it failed
        if reason := failure():
            raise ValueError(reason)
    except (OSError, ValueError, http.client.HTTPException) as e:  # missing, cut short, corrupt, a URL or command that
        # fails or stalls, a server whose answer is not HTTP (urlopen: BadStatusLine), said in one line
        reason = " ".join(str(e).split()) or type(e).__name__
        yield "", f"{type(e).__name__}: {reason}" if isinstance(e, http.client.HTTPException) else reason
        return
    if members:
        yield key, members


def decode_sample(members, caption_key=None, name=None):
    """{extension: bytes} -> (image, caption): the first image member (jpg, jpeg, png, webp; a JPEG as a samples.Jpeg
    named `name`, decoded by the transform), the caption from txt or else the json member's "caption" (or
    caption_key's) field. Raises ValueError for a sample without either."""
    image = next((members[ext] for ext in IMAGE_EXTS if ext in members), None)
    if image is None:
        raise ValueError(f"no image ({', '.join(IMAGE_EXTS)}) among its members {sorted(members)}")
    if "txt" in members and caption_key is None:
        caption = members["txt"].decode("utf-8")
    elif "json" in members:
        caption = json.loads(members["json"]).get(caption_key or "caption")
    else:
        caption = None
    if not isinstance(caption, str) or not caption.strip():
        where = f"a json field {caption_key!r}" if caption_key else "a txt member or a json field 'caption'"
        raise ValueError(f"no caption ({where})")
    return decode_image(image, lazy_name=name), caption.strip()


class ShardStream(torch.utils.data.IterableDataset):
    """Tar shards as N endless streams ("lanes"), one per reader: N = ranks × DataLoader workers (a rank without
    workers is one reader). Epoch e shuffles the shard list with (seed, e); lane l reads shards l, l + N, l + 2N, ...
    of it, and when they are done goes on to its share of epoch e + 1: no shard is read by two lanes in an epoch, and
    no lane runs out (unequal shards only move where each lane's epochs end).

    A lane shuffles in blocks of `buffer` samples (fewer at the end of its epoch): it reads that many (bytes only),
    permutes them with a seed drawn from the block's first position, then decodes and augments them in that order,
    each seeded by (seed, epoch, shard, index in the shard). So lane l's stream is a function of (seed, N, l), and where
    it stands is four integers: the position of its block's first sample (epoch, the lane's shard number in that
    epoch, sample in the shard) and how many of the block were passed. A lane started from those four integers goes
    on exactly where it stood, after reading again, without decoding, at most one shard and one block.

    Reader k of the rank whose first lane is `first_lane` yields chunks of `sizes[k]` samples: the collated transforms,
    plus "bad", the (name, reason) of each sample passed over (unreadable image, no caption, truncated shard), and
    "lanes", [(lane, its position after the chunk)]. join() makes a micro-batch of one chunk from each reader."""

    def __init__(self, shards, transform, seed, readers, first_lane, sizes, buffer=2000, start=None, caption_key=None,
                 timeout=60):
        self.shards, self.transform, self.seed, self.readers, self.timeout = shards, transform, seed, readers, timeout
        self.first_lane, self.sizes, self.buffer, self.caption_key = first_lane, sizes, buffer, caption_key
        self.start = start or [(0, 0, 0, 0)] * readers

    def lane_shards(self, lane, epoch):
        order = random.Random(seed_of(self.seed, epoch)).sample(range(len(self.shards)), len(self.shards))
        return order[lane::self.readers]

    def read(self, lane, epoch, j, i):
        """The lane's samples from sample i of its j-th shard of `epoch` on: ((epoch, j, i), shard, key, value); a
        shard's read error is a sample without a key. An epoch of the lane's shards that gives no sample (they are
        empty, or all fail) raises UnreadableImages: else the lane would go round them forever."""
        while True:
            sampled, failed = False, None  # whether the epoch gave a sample; the first shard that failed, and why
            for j, shard in enumerate(self.lane_shards(lane, epoch)[j:], start=j):
                for n, (key, value) in enumerate(tar_samples(self.shards[shard], self.timeout)):
                    sampled, failed = sampled or bool(key), failed or (None if key else (self.shards[shard], value))
                    if n >= i:
                        yield (epoch, j, n), shard, key, value
                i = 0
            if not sampled:
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
