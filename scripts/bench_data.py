"""
The input pipeline's benchmark: images/s of decoding a folder of JPEGs and applying a method's training transform,
per DataLoader worker, which says how many CPU cores feed a GPU that trains at R samples/s. Figures: docs/speed.md.

    python scripts/bench_data.py --make-jpegs 200 /tmp/jpegs                           # a folder of COCO-sized JPEGs
    python scripts/bench_data.py --data-dir /tmp/jpegs --model ViT-B-32 --workers 1,2  # decode + augment, images/s
    python scripts/bench_data.py --vs-open-clip --model ViT-B-32  # images per CPU-second, ours against open_clip's

Each configuration prints one line, which ends with the command.
"""

import argparse
import os
import shlex
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image, ImageDraw
from torchvision.transforms import v2

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project's root, from any folder

import data
import train
from model import CONFIGS
from plumbing import gpu_decode, samples
from plumbing.runlog import fail
from plumbing.tokenizer import get_tokenizer

CAPTIONS = ["a photo of a dog on a red sofa.", "two people walking along the beach at sunset",
            "a plate of food with rice and vegetables", "a city street with cars and a bus."]


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--make-jpegs", nargs=2, metavar=("N", "DIR"), help="write N synthetic JPEGs into DIR and exit")
    p.add_argument("--jpeg-size", default="500x375", help="--make-jpegs: WIDTHxHEIGHT")
    p.add_argument("--data-dir", default=None, help="time decoding + the method's transform on this folder of JPEGs")
    p.add_argument("--method", default="clip", choices=train.METHODS, help="whose training transform")
    p.add_argument("--method-args", default="", help="the method's constructor arguments, as train.py's")
    p.add_argument("--model", default="tiny-vit", choices=CONFIGS, help="a config of model.py: its image size")
    p.add_argument("--workers", default=str(os.cpu_count()), help="DataLoader workers: N for 1..N, or a list: 1,4,8")
    p.add_argument("--decoders", default="pil,tvio,crop", help="pil, tvio (samples.load_image: torchvision.io, in "
                   "full), crop (training's: the JPEG decoded by the crop at the size it needs)")
    p.add_argument("--vs-open-clip", action="store_true", help="images per CPU-second of CLIP's train transform, ours "
                   "against open_clip's, on generated 640x480 and 256x256 JPEGs, and the cores a GPU needs")
    p.add_argument("--images", type=int, default=100, help="--vs-open-clip: JPEGs of each size")
    p.add_argument("--rounds", type=int, default=5, help="--vs-open-clip: timed passes over them, per pipeline")
    p.add_argument("--gpu-rate", type=float, default=4862, help="--vs-open-clip: the GPU's samples/s (default: one "
                   "H100, compiled ViT-B/32, docs/speed.md)")
    args = p.parse_args(argv)
    args.command = "python scripts/bench_data.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    return args


def lazy_jpeg(path):  # what data.py's datasets return: a JPEG's bytes, decoded by the training crop
    with open(path, "rb") as f:
        return samples.decode_image(f.read(), lazy_name=path)


def decode(path, decoder):
    if decoder == "pil":
        with Image.open(path) as img:
            return img.convert("RGB")
    return lazy_jpeg(path) if decoder == "crop" else samples.load_image(path)  # tvio: a (3, H, W) uint8 tensor


class JpegFolder(torch.utils.data.Dataset):
    def __init__(self, paths, transform, decoder):
        self.paths, self.transform, self.decoder = paths, transform, decoder

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):  # the v2 transforms take a PIL image or a uint8 tensor alike
        return self.transform(decode(self.paths[i], self.decoder), CAPTIONS[i % len(CAPTIONS)])


def make_jpegs(n, folder, w=500, h=375):
    """n photo-like JPEGs of COCO's usual 500×375 (smooth colour field + shapes + sensor-like noise, quality 90): about
    the file size and decoding cost of COCO's images; flat synthetic images would decode unrealistically fast."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        field = Image.fromarray(rng.integers(0, 256, (h // 32 + 2, w // 32 + 2, 3), dtype=np.uint8))
        image = field.resize((w, h), Image.BICUBIC)
        draw = ImageDraw.Draw(image)
        for _ in range(8):
            x, y, r = rng.integers(0, w), rng.integers(0, h), rng.integers(10, h // 3)
            draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, 10, (h, w, 3))
        Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(os.path.join(folder, f"{i:06d}.jpg"), quality=90)
    files = [os.path.join(folder, f) for f in os.listdir(folder)]
    kb = sum(os.path.getsize(f) for f in files) / 1024 / max(1, len(files))
    print(f"wrote {n} {w}x{h} JPEGs to {folder} ({kb:.0f} KiB each on average)")


def vs_open_clip(args):
    """Images per CPU-second (one thread; this process's CPU time, which the machine's other users disturb less than
    wall time) of reading a JPEG and applying CLIP's train transform: open_clip's, ours before issue 22, ours, the
    workers' part of train.py --gpu-decode, and decoding alone at 1/1 to 1/8 of the size, alternating within each
    round (docs/speed.md); on a GPU, also the device's part of --gpu-decode."""
    try:
        import open_clip
    except ImportError:
        fail("--vs-open-clip needs open_clip: pip install open_clip_torch")
    R = CONFIGS[args.model]["image_resolution"]
    theirs = open_clip.image_transform(R, is_train=True, mean=data.MEAN, std=data.STD)
    before = v2.Compose([v2.RandomResizedCrop(R, scale=(0.9, 1.0), interpolation=v2.InterpolationMode.BICUBIC,
                                              antialias=True), v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                         v2.Normalize(data.MEAN, data.STD)])
    ours = data.train_transform(R, scale=(0.9, 1.0))  # CLIP's (clip.Transform)

    def decode_only(path, r):  # libjpeg at 1/r (PIL's draft), the floor of a reduced decode
        with Image.open(path) as img:
            img.draft("RGB", (img.size[0] // r, img.size[1] // r))
            img.load()
    def deferred(path):  # train.py --gpu-decode: the workers' part (the header, the box); the device decodes
        jpeg = lazy_jpeg(path)
        jpeg.defer = True
        return ours(jpeg)
    pipelines = {"open_clip": lambda path: theirs(Image.open(path)),  # as open_clip's CsvDataset
                 "before": lambda path: before(samples.load_image(path)),
                 "ours": lambda path: ours(lazy_jpeg(path)),
                 "ours --gpu-decode": deferred,
                 **{f"decode 1/{r}": lambda path, r=r: decode_only(path, r) for r in (1, 2, 4, 8)}}
    torch.set_num_threads(1)
    print(f"# CLIP's train transform at {R} px, images per CPU-second (1 thread), median of {args.rounds} rounds "
          f"(min-max) | load average {os.getloadavg()[0]:.2f}")
    for w, h in ((640, 480), (256, 256)):
        rates = {name: [] for name in pipelines}
        with tempfile.TemporaryDirectory() as folder:
            make_jpegs(args.images, folder, w, h)
            paths = sorted(os.path.join(folder, f) for f in os.listdir(folder))
            for k in range(args.rounds + 1):  # round 0 warms up (first decodes, page cache) and is not counted
                for name in list(pipelines)[k % len(pipelines):] + list(pipelines)[:k % len(pipelines)]:
                    torch.manual_seed(k)
                    t0 = time.process_time()
                    for path in paths:
                        pipelines[name](path)
                    rates[name] += [len(paths) / (time.process_time() - t0)] if k else []
            if torch.cuda.is_available():  # the device's part of --gpu-decode: batches of 256, decoded and cropped
                crops = [deferred(path) for path in paths] * (256 // len(paths) + 1)
                seconds = []
                for k in range(args.rounds + 1):
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    gpu_decode.decode_crops(crops[:256], "cuda")
                    torch.cuda.synchronize()
                    seconds += [time.perf_counter() - t0] if k else []
                gpu = 256 / float(np.median(seconds))
                print(f"gpu-decode {w}x{h} -> {R}px on {torch.cuda.get_device_name()} | {gpu:.0f} images/s in batches "
                      f"of 256 (nvJPEG decode, crop, resize; median of {args.rounds}) | {args.gpu_rate:,.0f} samples/s "
                      f"of training would spend {100 * args.gpu_rate / gpu:.0f}% of the GPU's time on it")
        median = {name: float(np.median(r)) for name, r in rates.items()}
        ratios = [a / b for a, b in zip(rates["ours"], rates["open_clip"])]
        print(f"data-vs-open_clip {w}x{h} -> {R}px | " + " | ".join(
            f"{name} {median[name]:.0f} ({min(r):.0f}-{max(r):.0f})" for name, r in rates.items() if "/" not in name) +
            f" | ours/open_clip {median['ours'] / median['open_clip']:.2f}x (rounds {min(ratios):.2f}-"
            f"{max(ratios):.2f}) | ours/before {median['ours'] / median['before']:.2f}x")
        print(f"decode-only {w}x{h} | " + " | ".join(
            f"{name} {1000 / m:.2f} ms" for name, m in median.items() if "/" in name))
        print(f"cores-per-gpu {w}x{h} at {args.gpu_rate:,.0f} samples/s | " + " | ".join(
            f"{name} {args.gpu_rate / m:.1f}" for name, m in median.items() if "/" not in name) + f" | {args.command}")


def main(argv=None):
    args = get_args(argv)
    if args.vs_open_clip:
        return vs_open_clip(args)
    if args.make_jpegs:
        n, folder = args.make_jpegs
        return make_jpegs(int(n), folder, *(int(x) for x in args.jpeg_size.lower().split("x")))
    if not args.data_dir:
        fail("name a folder of JPEGs with --data-dir (make one with --make-jpegs 200 DIR)")
    paths = sorted(os.path.join(args.data_dir, f) for f in os.listdir(args.data_dir)
                   if f.lower().endswith((".jpg", ".jpeg")))
    if not paths:
        fail(f"no .jpg files in {args.data_dir} (make some with --make-jpegs 200 {args.data_dir})")
    method = train.build_method(args.method, CONFIGS[args.model], train.parse_kwargs(args.method_args), "cpu")
    transform = method.transform(get_tokenizer("clip"))
    R = method.model.image_resolution
    decoders = args.decoders.split(",")
    names = {"pil": "PIL", "tvio": "torchvision.io", "crop": "decoded by the crop"}
    print(f"# {len(paths)} JPEGs in {args.data_dir}, {args.method} transform at {R} px | "
          f"load average {os.getloadavg()[0]:.2f}")

    # one thread, per image: where the time goes
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    sample = paths[:50]
    cost = {}
    for decoder in decoders:
        for p in sample[:5]:  # warm up: the first decodes and transforms pay one-off set-up costs
            transform(decode(p, decoder), CAPTIONS[0])
        t0 = time.perf_counter()
        images = [decode(p, decoder) for p in sample]
        t1 = time.perf_counter()
        for image in images:
            transform(image, CAPTIONS[0])
        t2 = time.perf_counter()
        cost[decoder] = (1000 * (t1 - t0) / len(sample), 1000 * (t2 - t1) / len(sample))
    torch.set_num_threads(threads)
    print("# per image, 1 thread: " + "; ".join(f"{names[d]} decode {a:.2f} ms + transform {b:.2f} ms"
                                                 for d, (a, b) in cost.items()))

    counts = [int(w) for w in args.workers.split(",")]
    counts = list(range(1, counts[0] + 1)) if len(counts) == 1 else counts
    for decoder in decoders:
        parts = []
        for workers in counts:
            loader = torch.utils.data.DataLoader(JpegFolder(paths, transform, decoder), batch_size=16,
                                                 num_workers=workers, persistent_workers=True, prefetch_factor=4)
            for _ in loader:  # one untimed pass: worker start-up, page cache
                pass
            t0 = time.perf_counter()
            for _ in range(2):  # timed passes
                for _ in loader:
                    pass
            rate = 2 * len(paths) / (time.perf_counter() - t0)
            parts.append(f"{workers} worker{'s' * (workers > 1)} {rate:.1f} images/s ({rate / workers:.1f} per worker)")
            del loader
        print(f"data {args.method} {R}px {names[decoder]} | {len(paths)} JPEGs × 2 passes | "
              f"{' | '.join(parts)} | {args.command}")


if __name__ == "__main__":
    main()
