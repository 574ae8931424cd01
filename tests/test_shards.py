"""Tar shards (issue 12): streamed in img2dataset's layout, split over readers with no sample read twice in an epoch,
resumed exactly mid-epoch, bad samples skipped and counted; 2 "nodes" equal one process; DeCLIP's multi-rank resume
is exact."""

import http.server
import io
import json
import os
import signal
import socket
import socketserver
import subprocess
import sys
import tarfile
import threading
import time

import pytest
import torch
from PIL import Image

import train
from plumbing import checkpoint, runlog, samples, shards, stops
from plumbing.shards import ShardStream, braces, decode_sample, shard_list, tar_members, tar_samples
from test_train import main_error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model", "tiny-vit", "--batch-size", "8", "--log-every", "1", "--eval-size", "0", "--shuffle-buffer", "6"]
SIZES = [9, 5, 12, 7, 6]  # unequal shards: readers' epochs end at different steps


def add(tar, name, payload):
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def write_shards(folder, sizes=SIZES, corrupt=(), uncaptioned=(), truncated=()):
    """Shards as img2dataset writes them (KEY.jpg, KEY.txt, KEY.json per sample), each caption naming its sample:
    "sample S I". corrupt: (S, I) whose jpg is garbage; uncaptioned: (S, I) with neither txt nor a json caption;
    truncated: shards cut in the middle of their last sample's image. -> the shard paths."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for s, n in enumerate(sizes):
        path = os.path.join(folder, f"{s:05d}.tar")
        with tarfile.open(path, "w") as tar:
            for i in range(n):
                key = f"{s:04d}{i:05d}"
                jpeg = io.BytesIO()
                Image.new("RGB", (24 + i, 20), ((37 * s) % 256, (53 * i) % 256, 120)).save(jpeg, "JPEG")
                add(tar, key + ".jpg", b"not a jpeg" if (s, i) in corrupt else jpeg.getvalue())
                meta = {"key": key, "status": "success"}
                if (s, i) not in uncaptioned:
                    add(tar, key + ".txt", f"sample {s} {i}".encode())
                    meta["caption"] = f"sample {s} {i}"
                add(tar, key + ".json", json.dumps(meta).encode())
        if s in truncated:
            with tarfile.open(path) as tar:
                last = [m for m in tar.getmembers() if m.name.endswith(".jpg")][-1]
            os.truncate(path, last.offset_data + last.size // 2)
        paths.append(path)
    return paths


def ids(image, caption):
    """A transform that keeps which sample this is, (S, I), and the decoded image's width (a JPEG comes as a
    samples.Jpeg, decoded by the transform, as the training transforms' crop does)."""
    s, i = map(int, caption.split()[1:])
    image = image.decode() if isinstance(image, samples.Jpeg) else image
    return {"id": torch.tensor([s, i]), "width": torch.tensor(image.shape[-1])}


def take(stream, chunks):
    """The first chunks of a stream (one reader's): [(S, I), ...], the bad samples, the positions after each chunk."""
    it = iter(stream)
    got = [next(it) for _ in range(chunks)]
    return ([tuple(x.tolist()) for c in got for x in c["id"]], [b for c in got for b in c["bad"]],
            [c["lanes"][0][1] for c in got])


def test_shard_list(tmp_path):
    paths = write_shards(tmp_path / "d", sizes=[1, 1, 1])
    (tmp_path / "d" / "stats.json").write_text("{}")  # img2dataset's other files in the folder are not shards
    assert shard_list(str(tmp_path / "d")) == paths
    assert shard_list(str(tmp_path / "d" / "{00000..00002}.tar")) == paths
    assert shard_list(f"{paths[2]}::{tmp_path}/d/{{00000..00001}}.tar") == [paths[2], *paths[:2]]
    assert shard_list(str(tmp_path / "d" / "{00000,00002}.tar")) == [paths[0], paths[2]]
    for other in ("synthetic", "coco", "pairs.tsv", "x.csv"):
        assert shard_list(other) is None
    with pytest.raises(FileNotFoundError, match=r"2 of the 5 shards .* the first \S+00003.tar"):
        shard_list(str(tmp_path / "d" / "{00000..00004}.tar"))
    with pytest.raises(FileNotFoundError, match="holds no .tar files"):
        shard_list(str(tmp_path))


def test_tar_samples_group_by_key_and_report_a_truncated_file(tmp_path):
    path = write_shards(tmp_path, sizes=[4], truncated=[0])[0]
    samples = list(tar_samples(path))
    assert [key for key, _ in samples[:3]] == ["000000000", "000000001", "000000002"]
    assert sorted(samples[0][1]) == ["jpg", "json", "txt"]
    image, caption = decode_sample(samples[1][1])
    assert caption == "sample 0 1" and image.shape == (3, 20, 25)  # no name: decoded here
    assert len(samples) == 4 and samples[3] == ("", "the shard ends within 000000003.jpg (it is cut short)")
    members = dict(samples[0][1])
    assert decode_sample({"png": members["jpg"], "json": members["json"]})[1] == "sample 0 0"  # json's caption
    assert decode_sample(members, caption_key="key")[1] == "000000000"
    with pytest.raises(ValueError, match="no caption"):
        decode_sample({"jpg": members["jpg"], "json": b'{"key": "x"}'})
    with pytest.raises(ValueError, match="no image"):
        decode_sample({"txt": b"a caption"})
    assert list(tar_samples(str(tmp_path / "missing.tar")))[0][0] == ""


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_tar_members_reads_what_tarfile_reads(tmp_path, fmt):
    """tar_members against the standard library's reader: long names (pax records, GNU's, ustar's prefix),
    pax records for float mtimes (webdataset's TarWriter, which img2dataset uses, writes one per member), folders and
    links skipped; a corrupt header and a file cut short."""
    long = "c" * 90 + "/" + "d" * 60 + ".jpg" if fmt == tarfile.USTAR_FORMAT else "a/" + "é" * 120 + "/000000001.jpg"
    path = tmp_path / "shard.tar"
    with tarfile.open(path, "w", format=fmt) as tar:
        # a long name, then a short one (the long name is the next entry's only); an old-style regular file ("\0")
        for name, payload in [("x/000000000.jpg", b"abc"), ("x/000000000.txt", b"a caption"), (long, b"zz" * 700),
                              ("x/000000001.txt", b"after the long name"), ("x/000000002.txt", b"type nul")]:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(payload), 1.5 if fmt == tarfile.PAX_FORMAT else 1
            info.type = tarfile.AREGTYPE if name.startswith("x/000000002") else tarfile.REGTYPE
            tar.addfile(info, io.BytesIO(payload))
            for kind in (tarfile.DIRTYPE, tarfile.SYMTYPE):
                info = tarfile.TarInfo(name + ".entry")
                info.type, info.linkname = kind, "x"
                tar.addfile(info)
    with tarfile.open(path) as tar:
        expected = [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]
        last = [m for m in tar if m.isfile()][-3]  # the long-named one
    with open(path, "rb") as f:
        assert list(tar_members(f)) == expected and len(expected) == 5 and expected[3][0] == "x/000000001.txt"
    raw = path.read_bytes()
    cut = list(tar_members(io.BytesIO(raw[:last.offset_data + 100])))  # within the long-named member's data
    assert cut == [*expected[:2], (long, None)]
    with pytest.raises(ValueError, match="not a tar header"):  # within a header
        list(tar_members(io.BytesIO(raw[:last.offset - 200])))
    corrupt = raw[:100] + bytes([raw[100] ^ 1]) + raw[101:]  # one bit of the first header's mode field
    with pytest.raises(ValueError, match="not a tar header"):
        list(tar_members(io.BytesIO(corrupt)))


def header(size_field):
    """a ustar header of a member 'a.jpg' whose size field is these 12 bytes, its checksum right"""
    h = bytearray(512)
    h[:5], h[100:108], h[124:136], h[156:157], h[257:263] = b"a.jpg", b"0000644\0", size_field, b"0", b"ustar\0"
    h[148:156] = f"{sum(h) + 8 * ord(' '):06o}\0 ".encode()
    return bytes(h)


def test_tar_headers_are_read_within_bounds(monkeypatch):
    """A size of -1 does not make the rest of the shard one member, nor 8 GB a read of 8 GB; a typo in braces does
    not name 10^8 shards; a range may count down, as in bash and braceexpand."""
    with pytest.raises(ValueError, match="not a tar header"):
        list(tar_members(io.BytesIO(header(b"-0000000001") + b"x" * 4096)))
    with pytest.raises(ValueError, match="a member of 8,589,934,592 bytes, over 256 MiB"):
        list(tar_members(io.BytesIO(header(b"100000000000"))))  # then endless zeros, in the attack's pipe
    assert list(tar_members(io.BytesIO(header(b"00000000003\0") + b"abc".ljust(512, b"\0")))) == [("a.jpg", b"abc")]
    assert list(braces("d/{03..01}.tar")) == ["d/03.tar", "d/02.tar", "d/01.tar"]
    monkeypatch.setattr(shards, "MAX_SHARDS", 100)
    with pytest.raises(ValueError, match="names more than 100 shards"):
        shard_list("d/{00000000..99999999}.tar")


def test_readers_split_the_shards_and_each_reads_every_sample_of_its_own_once_per_epoch(tmp_path):
    shards = write_shards(tmp_path)
    N, seen = 3, []
    for lane in range(N):
        stream = ShardStream(shards, ids, seed=0, readers=N, first_lane=lane, sizes=[1], buffer=4)
        mine = stream.lane_shards(lane, 0)
        epoch = sum(SIZES[s] for s in mine)
        got, _, _ = take(stream, epoch + 5)
        assert sorted(got[:epoch]) == sorted((s, i) for s in mine for i in range(SIZES[s]))  # each once
        assert {s for s, _ in got[epoch:]} <= set(stream.lane_shards(lane, 1))  # then its share of epoch 1
        seen += got[:epoch]
        # a shuffle of samples within blocks of 4, reproducible, a function of the seed
        assert got[:4] != sorted(got[:4]) or got[4:8] != sorted(got[4:8])
        assert take(stream, epoch)[0] == got[:epoch]
        other = ShardStream(shards, ids, seed=1, readers=N, first_lane=lane, sizes=[1], buffer=4)
        assert take(other, epoch)[0] != got[:epoch]
    assert sorted(seen) == sorted((s, i) for s, n in enumerate(SIZES) for i in range(n))  # no sample twice


def test_each_epoch_shuffles_the_shards_and_each_reader_takes_every_nth(tmp_path):
    """ShardStream's rule: epoch e shuffles the shard list with (seed, e) (random.Random's sample); lane l of N
    reads the shards l, l + N, l + 2N, ... of that order."""
    import random

    shards = write_shards(tmp_path, sizes=[1] * 7)
    orders = [random.Random(samples.seed_of(0, e)).sample(range(7), 7) for e in range(3)]
    assert orders[0] != orders[1] != orders[2]
    stream = ShardStream(shards, ids, seed=0, readers=3, first_lane=0, sizes=[1])
    for e, order in enumerate(orders):
        assert [stream.lane_shards(lane, e) for lane in range(3)] == [order[0::3], order[1::3], order[2::3]]


def test_readers_of_a_rank_share_an_uneven_batch(tmp_path):
    """A micro-batch of 5 from 2 DataLoader workers: chunks of 3 and 2, from each worker's own lane."""
    import data

    write_shards(tmp_path / "d")
    stream = data.TrainingStream(shard_list(str(tmp_path / "d")), ids, 0, 5, 0, 1, 2, "cpu")
    first, second = next(stream), next(stream)
    assert first["id"].shape == second["id"].shape == (5, 2)
    lanes = [ShardStream(shard_list(str(tmp_path / "d")), ids, 0, 2, first_lane=lane, sizes=[1]) for lane in (0, 1)]
    expected = [take(lane, 6)[0] for lane in lanes]  # what each lane reads, one sample at a time
    got = [tuple(x) for b in (first, second) for x in b["id"].tolist()]
    assert got == expected[0][:3] + expected[1][:2] + expected[0][3:6] + expected[1][2:4]
    assert dict(stream.lanes).keys() == {0, 1}


def test_a_reader_resumes_exactly_from_any_position(tmp_path):
    shards = write_shards(tmp_path, corrupt=[(2, 3)], uncaptioned=[(0, 1)], truncated=[3])
    stream = ShardStream(shards, ids, seed=0, readers=2, first_lane=1, sizes=[1], buffer=5)
    got, bad, positions = take(stream, 45)  # reader 1 of 2, through 2 epochs, one sample at a time
    for k in (0, 3, 4, 9, 17, 30):
        start = [None, positions[k]]
        resumed = ShardStream(shards, ids, seed=0, readers=2, first_lane=1, sizes=[1], buffer=5, start=start)
        assert take(resumed, 10)[0] == got[k + 1:k + 11], k


def test_bad_samples_are_skipped_named_and_not_fatal(tmp_path):
    shards = write_shards(tmp_path, corrupt=[(2, 3)], uncaptioned=[(0, 1)], truncated=[3])
    stream = ShardStream(shards, ids, seed=0, readers=1, first_lane=0, sizes=[4], buffer=8)
    got, bad, _ = take(stream, 10)  # an epoch's 36 good samples (3 are not), and 4 of the next
    assert len(set(got[:36])) == 36 and {(2, 3), (0, 1), (3, 6)}.isdisjoint(got)  # (3, 6): the truncated one's last
    names = dict(bad)
    assert set(names) == {shards[2] + "/000200003", shards[0] + "/000000001", shards[3]}, names
    assert "no caption" in names[shards[0] + "/000000001"] and "cut short" in names[shards[3]]
    assert (3, 5) in got  # the truncated shard's samples before the cut are read


def test_bad_samples_apart_never_stop_the_stream_and_a_key_is_the_name_to_its_first_dot(tmp_path):
    """64 unreadable samples IN A ROW stop a reader; as many or more with good ones between them do not. A sample's
    members share the name up to the first dot of the base name (webdataset's rule): k.jpg, k.seg.png, k.txt; their
    extensions are read in lower case (a camera's .JPG is a jpg)"""
    shards = write_shards(tmp_path / "d", sizes=[150], corrupt=[(0, i) for i in range(150) if i % 3])  # 100 bad
    got, bad, _ = take(ShardStream(shards, ids, seed=0, readers=1, first_lane=0, sizes=[10], buffer=150), 5)
    assert sorted(got) == [(0, i) for i in range(0, 150, 3)] and len(bad) == 100
    with tarfile.open(tmp_path / "dots.tar", "w") as tar:
        for name in ("a/k1.jpg", "a/k1.seg.png", "a/k1.txt", "a/k2.v1.jpg", "a/k2.txt", "a/k3.JPG", "a/k3.Txt"):
            add(tar, name, name.encode())
    assert [(key, sorted(members)) for key, members in tar_samples(str(tmp_path / "dots.tar"))] == \
        [("a/k1", ["jpg", "seg.png", "txt"]), ("a/k2", ["txt", "v1.jpg"]), ("a/k3", ["jpg", "txt"])]  # lower case


def test_unreadable_shards_stop_the_stream(tmp_path):
    shards = write_shards(tmp_path, sizes=[75], corrupt=[(0, i) for i in range(3, 75)])  # 3 good ones, then none
    with pytest.raises(samples.UnreadableImages, match=r"64 samples in a row are unreadable, the first \S+00000.tar/0"):
        next(iter(ShardStream(shards, ids, seed=0, readers=1, first_lane=0, sizes=[4], buffer=1)))
    empty = tmp_path / "empty.tar"
    tarfile.open(empty, "w").close()
    with pytest.raises(samples.UnreadableImages, match="hold no samples"):
        next(iter(ShardStream([str(empty)], ids, seed=0, readers=1, first_lane=0, sizes=[2])))


@pytest.fixture
def http_folder():
    """serve(folder) -> the URL of a local HTTP server (a thread, 127.0.0.1) of that folder's files"""
    import functools
    import http.server
    import threading

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass
    servers = []

    def serve(folder):
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"
    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


def test_shards_from_a_command_or_a_url_read_as_local_ones_and_resume(tmp_path, http_folder):
    local = write_shards(tmp_path / "d", corrupt=[(2, 3)], uncaptioned=[(0, 1)], truncated=[3])
    url = http_folder(tmp_path / "d")
    reference = ShardStream(local, ids, seed=0, readers=2, first_lane=1, sizes=[1], buffer=5)
    got, bad, positions = take(reference, 45)  # reader 1 of 2, through 2 epochs, bad samples and all
    for spec, prefix in ((f"pipe:cat {tmp_path}/d/{{00000..00004}}.tar", "pipe:cat "), (f"{url}/{{00000..00004}}.tar",
                         url + "/"), (f"pipe:cat {local[0]}::{url}/{{00001..00004}}.tar", None)):
        remote = shard_list(spec)
        if prefix:
            assert remote == [prefix + (p if prefix.startswith("pipe") else os.path.basename(p)) for p in local]
        stream = ShardStream(remote, ids, seed=0, readers=2, first_lane=1, sizes=[1], buffer=5)
        assert take(stream, 45)[0] == got, spec
        assert [reason for _, reason in take(stream, 45)[1]] == [reason for _, reason in bad]
        for k in (3, 17, 30):  # a resumed reader opens its shard again and reads on to its sample
            resumed = ShardStream(remote, ids, seed=0, readers=2, first_lane=1, sizes=[1], buffer=5,
                                  start=[None, positions[k]])
            assert take(resumed, 10)[0] == got[k + 1:k + 11], (spec, k)


def test_a_failing_command_or_url_is_a_bad_shard_named_in_one_line(tmp_path, http_folder):
    good = write_shards(tmp_path / "d", sizes=[3])[0]
    url = http_folder(tmp_path / "d")
    failing = {f"pipe:cat {tmp_path}/missing.tar": "the command exited with status 1: cat: ",
               f"pipe:head -c 4300 {good}; echo out of credit >&2; exit 3": "the command exited with status 3: out of "
                                                                          "credit",  # the why, not the cut
               "pipe:exit 4": "the command exited with status 4",
               f"{url}/missing.tar": "HTTP Error 404",
               "http://127.0.0.1:9/00000.tar": "Connection refused"}
    assert shard_list("::".join(failing)) == list(failing)  # remote shards are looked at when read
    for shard, reason in failing.items():
        samples = list(tar_samples(shard))
        assert samples[-1][0] == "" and reason in samples[-1][1] and "\n" not in samples[-1][1], (shard, samples)
    cut = list(tar_samples(f"pipe:head -c 4300 {good}"))  # within sample 1: sample 0, then the reason
    assert [key for key, _ in cut] == ["000000000", ""] and "cut short" in cut[1][1]
    stream = ShardStream([*failing, f"pipe:cat {good}"], ids, seed=0, readers=1, first_lane=0, sizes=[1])
    got, bad, _ = take(stream, 8)  # two epochs: each epoch, sample 0 of the cut command and the good shard's 3
    assert sorted(got) == [(0, 0)] * 4 + [(0, 1)] * 2 + [(0, 2)] * 2 and {name for name, _ in bad} == set(failing)


class Stalling(http.server.BaseHTTPRequestHandler):
    """/stall: 200, headers and 10 bytes, then nothing; /trickle: a byte every 0.3 s; /loop: a redirect to itself"""

    def do_GET(self):
        if self.path == "/loop":
            self.send_response(302)
            self.send_header("Location", self.path)
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", "100000")
        self.end_headers()
        try:
            self.wfile.write(b"\0" * 10)
            for _ in range(100 if self.path == "/trickle" else 0):
                time.sleep(0.3)
                self.wfile.write(b"a")
            time.sleep(30)
        except OSError:  # the reader gave up
            pass

    def log_message(self, *args):
        pass


def gone(pid_file):
    """whether the process group whose leader wrote its pid to pid_file has ended"""
    for _ in range(50):
        try:
            os.killpg(int(open(pid_file).read()), 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def test_a_stalled_source_is_a_bad_shard_named_in_one_line_and_a_command_is_not_waited_for(tmp_path):
    """A source that stops sending, or trickles, is a bad shard after --shard-timeout seconds (2 here) without
    progress, named with what it waited for; a command whose output ended, or that the reader left, is killed
    (its process group) instead of waited for."""
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Stalling)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    good = write_shards(tmp_path / "d", sizes=[3])[0]
    pid = tmp_path / "pid"
    cases = {f"pipe:echo $$ > {pid}; sleep 600": "stalled: no data in 2 s (--shard-timeout) waiting for the command's",
             f"{url}/stall": "stalled: 10 bytes in 2 s (--shard-timeout) waiting for the rest of the server's response",
             f"{url}/trickle": "bytes in 2 s (--shard-timeout) waiting for the rest of the server's response",
             f"{url}/loop": "HTTP Error 302: The HTTP server returned a redirect error that would lead to an infinite",
             f"pipe:trap '' PIPE; echo $$ > {pid}; printf '%0600d'; sleep 600": "not a tar header",
             f"pipe:echo $$ > {pid}; cat {good}; exec >&-; sleep 600": None}  # the whole shard, then a sleep
    try:
        for source, reason in cases.items():
            started = time.monotonic()
            samples = list(tar_samples(source, timeout=2))
            elapsed = time.monotonic() - started
            # a stall at --shard-timeout, not earlier and not much later (a stall is tested each tick of 0.5 s)
            assert 2 <= elapsed < 3.5 if "(--shard-timeout)" in (reason or "") else elapsed < 5, (source, elapsed)
            if reason:
                assert samples[-1][0] == "" and reason in samples[-1][1] and "\n" not in samples[-1][1], samples
            else:
                assert [key for key, _ in samples] == ["000000000", "000000001", "000000002"]
            assert not source.startswith("pipe:") or gone(pid), source
    finally:
        server.shutdown()
        server.server_close()
    assert not stops.children


def test_a_stalled_source_stops_the_run_in_one_line(tmp_path):
    started = time.monotonic()
    message = main_error("--data", "pipe:sleep 600", *TINY, "--workers", "0", "--shard-timeout", "2", "--out-dir",
                         tmp_path / "o")
    assert "the shards of reader 0 hold no samples, the first pipe:sleep 600 (stalled: no data in 2 s" in message
    assert time.monotonic() - started < 30


def stuck(tmp_path, workers):
    """A run of 2 steps on local shards, resumed with --data a command per shard that sleeps: stuck in its first read.
    -> (train.py's arguments to resume it, the file the commands write their pids to)"""
    write_shards(tmp_path / "shards")
    args = [*TINY, "--workers", workers, "--save-every", "2"]
    train.main(["--data", str(tmp_path / "shards"), *args, "--steps", "2", "--out-dir", str(tmp_path / "o")])
    checkpoint.claim(str(tmp_path / "elsewhere"), fresh=True)  # the lock on o/ released, for a run of its own
    pids = tmp_path / "pids"
    sleeping = "::".join([f"pipe:echo $$ >> {pids}; sleep 600"] * len(SIZES))
    return ["--data", sleeping, *args, "--steps", "4", "--out-dir", tmp_path / "o", "--resume"], pids


def test_a_stop_signal_ends_a_read_that_waits_and_keeps_the_checkpoint(tmp_path):
    """SIGTERM while the training process waits in a read of a stalled source (no --workers): the run stops within
    seconds, as it would at a step's end: ckpt.pt untouched, which holds the steps done."""
    argv, pids = stuck(tmp_path, "0")
    saved = (tmp_path / "o" / "ckpt.pt").read_bytes()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    runlog.stop_on_signals()
    threading.Thread(target=lambda: (wait_for(pids.exists), os.kill(os.getpid(), signal.SIGTERM)), daemon=True).start()
    try:
        with pytest.raises(SystemExit) as stopped:
            train.main([str(a) for a in argv])
    finally:
        runlog.signals.clear()
        for s, handler in handlers.items():
            signal.signal(s, handler)
    assert stopped.value.code == 143 and (tmp_path / "o" / "ckpt.pt").read_bytes() == saved
    assert gone(pids)


def test_torchrun_s_stop_ends_a_worker_s_read_that_waits(tmp_path):
    """The same stall in a DataLoader worker, and SIGTERM to the process group, as torchrun stops a rank: the worker
    leaves it to the training process, which stops waiting for the batch within seconds."""
    argv, pids = stuck(tmp_path, "1")
    saved = (tmp_path / "o" / "ckpt.pt").read_bytes()
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *map(str, argv)], cwd=tmp_path,
                         env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)
    wait_for(lambda: pids.exists() or p.poll() is not None)
    os.killpg(p.pid, signal.SIGTERM)
    sent = time.monotonic()
    out, err = p.communicate(timeout=120)
    assert p.returncode == 143 and time.monotonic() - sent < 15 and "Traceback" not in err, err
    assert f"stopped by SIGTERM at step 2; {tmp_path / 'o' / 'ckpt.pt'} holds it" in out
    assert (tmp_path / "o" / "ckpt.pt").read_bytes() == saved and gone(pids)


def wait_for(ready, seconds=120):
    deadline = time.monotonic() + seconds
    while not ready() and time.monotonic() < deadline:
        time.sleep(0.05)


# --- train.py on shards -----------------------------------------------------------------------------------------------


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def load(out):
    return torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)


def test_training_resumes_mid_epoch_exactly(tmp_path, killed_while_saving):
    shards = write_shards(tmp_path / "shards", corrupt=[(2, 3)])
    args = ["--data", str(tmp_path / "shards"), "--steps", "6", "--save-every", "2", *TINY, "--workers", "2"]
    train.main([*args, "--out-dir", str(tmp_path / "full")])

    out = tmp_path / "resumed"
    killed_while_saving([*args, "--out-dir", out], step=4)
    stream = load(out)["stream"]
    assert load(out)["step"] == 2 and stream["readers"] == 2 and stream["shards"] == len(shards)
    assert [tuple(p)[:1] for p in stream["lanes"]] == [(0,), (0,)]  # both readers mid-way through epoch 0
    train.main([*args, "--out-dir", str(out), "--resume"])

    full, resumed = load(tmp_path / "full"), load(out)
    for k in full["model"]:
        torch.testing.assert_close(resumed["model"][k], full["model"][k], rtol=0, atol=0, msg=k)
    assert resumed["stream"] == full["stream"] and max(p[0] for p in full["stream"]["lanes"]) >= 1  # past an epoch
    assert [e["loss"] for e in read_log(out)] == [e["loss"] for e in read_log(tmp_path / "full")]
    # the resumed run's readers must be as many as before: they define the stream
    message = main_error(*args, "--workers", "1", "--steps", "8", "--out-dir", out, "--resume")
    assert "streamed 5 shards with 2 readers" in message and "this run 5 with 1" in message
    message = main_error(*args, "--shuffle-buffer", "5", "--steps", "8", "--out-dir", out, "--resume")
    assert "was trained with --shuffle-buffer 6, this run has 5" in message  # other blocks: other positions


def test_bad_samples_are_counted_like_unreadable_images(tmp_path, capsys):
    write_shards(tmp_path / "shards", corrupt=[(2, 3)], uncaptioned=[(0, 1)], truncated=[3])
    train.main(["--data", str(tmp_path / "shards" / "{00000..00004}.tar"), "--steps", "5", *TINY, "--workers", "0",
                "--out-dir", str(tmp_path / "o")])
    assert read_log(tmp_path / "o")[-1]["skipped"] == 3  # an epoch is 36 good samples: 4.5 steps of 8
    out = capsys.readouterr().out
    assert "warning: cannot read" in out and "skipped 3 unreadable images" in out

    write_shards(tmp_path / "junk", sizes=[20, 20], corrupt=[(s, i) for s in range(2) for i in range(20) if i % 4])
    message = main_error("--data", tmp_path / "junk", "--steps", "30", *TINY, "--workers", "0", "--out-dir",
                         tmp_path / "o2")
    assert "image reads failed, the first" in message and "junk/0000" in message


def test_training_reads_shards_through_a_command(tmp_path):
    write_shards(tmp_path / "shards", corrupt=[(2, 3)])
    args = ["--steps", "3", *TINY, "--workers", "0"]
    train.main(["--data", str(tmp_path / "shards" / "{00000..00004}.tar"), *args, "--out-dir", str(tmp_path / "a")])
    train.main(["--data", f"pipe:cat {tmp_path}/shards/{{00000..00004}}.tar", *args, "--out-dir", str(tmp_path / "b")])
    losses = [e["loss"] for e in read_log(tmp_path / "a")]
    assert len(losses) == 3 and [e["loss"] for e in read_log(tmp_path / "b")] == losses


def test_shard_flags_are_checked(tmp_path):
    write_shards(tmp_path, sizes=[2, 2, 2])
    message = main_error("--data", tmp_path, *TINY, "--workers", "4", "--out-dir", tmp_path / "o")
    assert "3 shards for 4 readers (1 ranks × 4 workers)" in message
    message = main_error("--data", tmp_path, *TINY, "--batch-size", "2", "--workers", "3", "--out-dir", tmp_path / "o")
    assert "use at most 2 workers" in message
    assert "--shuffle-buffer must be 1 or more" in main_error("--data", tmp_path, *TINY, "--shuffle-buffer", "0")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(*args, launcher=(), cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="default")
    return subprocess.Popen([sys.executable, *launcher, *map(str, args)], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finish(p):
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out
    return out


def test_two_nodes_equal_one_process(tmp_path):
    """torchrun --nnodes 2, one process each, rendezvous on localhost: the same global batches as one process whose
    2 DataLoader workers are the same 2 readers, so the same losses."""
    write_shards(tmp_path / "shards", corrupt=[(2, 3)])
    args = [os.path.join(ROOT, "train.py"), "--data", tmp_path / "shards", "--steps", "4", *TINY]
    one = launch(*args, "--workers", "2", "--out-dir", tmp_path / "one", cwd=tmp_path)
    port = free_port()
    nodes = [launch(*args, "--workers", "0", "--out-dir", tmp_path / "two", cwd=tmp_path, launcher=(
        "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node), "--nproc_per_node", "1",
        "--master_addr", "127.0.0.1", "--master_port", str(port))) for node in (0, 1)]
    finish(one)
    assert "2 rank(s)" in finish(nodes[0])
    finish(nodes[1])
    a, b = read_log(tmp_path / "one"), read_log(tmp_path / "two")
    assert [e["step"] for e in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5)
    assert load(tmp_path / "one")["stream"] == load(tmp_path / "two")["stream"]


# torchrun runs this instead of train.py to stop a run as a kill would, on every rank once step 4's checkpoint is
# gathered (before it is written): ckpt.pt then holds step 2
STOP_AT_4 = f"""
import sys
sys.path.insert(0, {ROOT!r})
from plumbing import distributed
import train

real = distributed.rank_state
def rank_state(*args):
    state = real(*args)
    rank_state.calls += 1
    if rank_state.calls == 2:
        sys.exit("stopped by the test")
    return state
rank_state.calls = 0
distributed.rank_state = rank_state
train.main()
"""


def test_declip_resumes_exactly_on_two_ranks(tmp_path):
    """Each rank's queue holds its own captions: a 2-rank run stopped after 2 steps and resumed gives the weights and
    both queues of an uninterrupted one (and reads on mid-epoch from the shards)."""
    write_shards(tmp_path / "shards")
    (tmp_path / "stop.py").write_text(STOP_AT_4)
    torchrun = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
    args = ["--method", "declip", "--method-args", "queue_size=64,proj_dim=32,pred_dim=16,min_bn_batch=4",
            "--data", tmp_path / "shards", "--steps", "4", "--save-every", "2", *TINY, "--workers", "1"]
    finish(launch(os.path.join(ROOT, "train.py"), *args, "--out-dir", tmp_path / "full", cwd=tmp_path,
                  launcher=torchrun))
    stopped = launch(tmp_path / "stop.py", *args, "--out-dir", tmp_path / "resumed", cwd=tmp_path, launcher=torchrun)
    assert "stopped by the test" in stopped.communicate(timeout=600)[0] and stopped.returncode != 0
    assert load(tmp_path / "resumed")["step"] == 2
    finish(launch(os.path.join(ROOT, "train.py"), *args, "--out-dir", tmp_path / "resumed", "--resume",
                  cwd=tmp_path, launcher=torchrun))

    full, resumed = load(tmp_path / "full"), load(tmp_path / "resumed")
    queues = [r["queue"] for r in full["rank_buffers"]]
    assert not torch.equal(queues[0], queues[1])  # each rank's own captions
    assert torch.equal(queues[0], full["method"]["queue"]) and int(full["method"]["queue_filled"]) == 4 * 2 * 4
    for r in range(2):
        for k, v in full["rank_buffers"][r].items():
            torch.testing.assert_close(resumed["rank_buffers"][r][k], v, rtol=0, atol=0, msg=f"rank {r} {k}")
    for k in full["model"]:
        torch.testing.assert_close(resumed["model"][k], full["model"][k], rtol=0, atol=0, msg=k)


# --- sources that fail part-way: a command closed early, servers that cut off or answer garbage ------------------------


@pytest.fixture
def raw_http():
    """serve(answer) -> a URL whose server reads the request and writes `answer` (bytes) as it is, then closes: any
    status line, headers and body, however broken"""
    import socketserver
    import threading

    class Raw(socketserver.BaseRequestHandler):
        def handle(self):
            request = b""
            while b"\r\n\r\n" not in request:
                chunk = self.request.recv(4096)
                if not chunk:
                    return
                request += chunk
            self.request.sendall(self.server.answer)

    servers = []

    def serve(answer):
        server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Raw)
        server.answer, server.daemon_threads = answer, True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/00000.tar"
    yield serve
    for server in servers:  # as http_folder: stopped and its port closed before the next test
        server.shutdown()
        server.server_close()


def test_a_server_that_cuts_off_or_answers_garbage_is_a_bad_shard(tmp_path, raw_http):
    good = write_shards(tmp_path / "d", sizes=[3])[0]
    raw = open(good, "rb").read()
    # within sample 2's image. A body shorter than its Content-Length reads as a file cut there (samples 0 and 1); a
    # chunk cut short raises (http.client's IncompleteRead) while sample 1's run of members has not ended: sample 0
    cut = 7800
    answers = {
        "garbage": (b"garbage\r\n\r\n", None),  # not a status line: http.client's BadStatusLine
        "nothing": (b"", None),  # closed without a word
        "mid-chunk": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"%x\r\n" % len(raw) + raw[:cut],
                      "000000000"),
        "short body": (b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(raw) + raw[:cut], "000000001"),
        "error": (b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n", None),
        "good": (b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(raw) + raw, "all")}
    urls = {}
    for name, (answer, _) in answers.items():
        urls[name] = raw_http(answer)
    for name, (_, read) in answers.items():
        samples = list(tar_samples(urls[name]))
        keys = [key for key, _ in samples]
        if read == "all":
            assert keys == ["000000000", "000000001", "000000002"], name
            continue
        before = {None: [], "000000000": ["000000000"], "000000001": ["000000000", "000000001"]}[read]
        assert keys == before + [""], (name, samples)  # the samples before the cut, then why
        assert samples[-1][1] and "\n" not in samples[-1][1], name
    # in a stream: bad shards, counted, and the good one read
    stream = ShardStream([urls[n] for n in answers], ids, seed=0, readers=1, first_lane=0, sizes=[1])
    got, bad, _ = take(stream, 6)  # an epoch
    assert sorted(got) == [(0, 0), (0, 0), (0, 0), (0, 1), (0, 1), (0, 2)]
    assert {name for name, _ in bad} == {urls[n] for n in answers if n != "good"}


def test_a_command_the_reader_stops_reading_is_not_its_failure(tmp_path):
    """The reader stops at a corrupt header and closes the pipe while the command still writes: the command ends on
    SIGPIPE (itself, or its shell with 128 + 13), which says nothing of the command; the reason is the corruption."""
    # exec: the command itself, killed by the signal (-13); a pipeline: its shell's status 128 + 13
    for command in ("pipe:exec yes not-a-tar-header", "pipe:yes not-a-tar-header | cat"):
        samples = list(tar_samples(command))
        assert len(samples) == 1 and samples[0][0] == "", samples
        assert "exited" not in samples[0][1] and "status" not in samples[0][1], samples
    # a command that fails after the reader stopped for a reason of its own still says why it failed
    samples = list(tar_samples("pipe:printf 'not a tar header%.0s' $(seq 60); exit 5"))
    assert samples == [("", "the command exited with status 5")], samples
