import json
import os
import pickle
import random
import time

import numpy as np
import open_clip.tokenizer as open_clip_tokenizer  # the independent reference (requirements-dev.txt)
import pytest
import tiktoken
import torch
from PIL import Image

import data
from plumbing import samples, synthetic, tokenizer

OPEN_CLIP_BPE = open_clip_tokenizer.default_bpe()


@pytest.fixture(scope="module")
def reference():
    return open_clip_tokenizer.SimpleTokenizer()


def test_example_ids():
    ids = tokenizer.tokenize("a photo of a Dog.")
    assert ids.shape == (1, 77) and ids.dtype == torch.long
    assert ids[0, :8].tolist() == [49406, 320, 1125, 539, 320, 1929, 269, 49407]
    assert ids[0, 8:].eq(0).all()
    tok = tokenizer.get_tokenizer()
    assert (tok.vocab_size, tok.sot_id, tok.eot_id, tok.pad_id) == (49408, 49406, 49407, 0)
    assert tok.decode(ids[0].tolist()) == "a photo of a dog . "


def parity_strings():
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES
    rng = random.Random(0)
    texts = [
        "", " ", "   \t\n ", ".", "a", "A photo of a DOG!!!", "hello,world...", "what's up? it's 5 o'clock",
        "they're here; I've, you'll, he'd, I'm, 'S 'T 'RE", "''quoted'' \"double\" `back`", "3.14159 1,000,000 007",
        "e-mail: x@y.com #tag $12.50 100% (ok) [x] 2024-01-01", "café naïve résumé Ærøskøbing Straße",
        "日本語のテキスト 中文 한국어", "emoji 😀🐶🎉 👍🏽 flags 🇫🇷", "Ελληνικά русский עברית العربية हिन्दी",
        "&amp; &lt;b&gt; &amp;amp;lt; &quot;q&quot; &#39;", "aaaaaaa", "mississippi", "z" * 30, "hahahahahahaha",
        "ﬁne ligature", "Ｆｕｌｌｗｉｄｔｈ", "mojibake: cafÃ© â€œquotedâ€\x9d", "tabs\tand\nnewlines\r\nand\u00a0nbsp\u2003em",
        "<|endoftext|> <|startoftext|>", "x" * 300, " ".join(["word"] * 100), "a " + "very " * 80 + "long dog.", "ﬀ",
        "ǅ ǈ İstanbul", "Kelvin \u212a ſ 'ſ", "\x00nul \x07bell \x1fus \x7fdel", "0123456789" * 10, "x²³ ½ ⅓ Ⅻ ①",
    ]
    texts += [t(c) for c in IMAGENET_CLASSNAMES for t in rng.sample(OPENAI_IMAGENET_TEMPLATES, 2)]
    # random concatenations of vocabulary words (as text), the case where tiktoken's "any pair whose
    # concatenation is a token" rule could differ from CLIP's "listed merges only"
    words = [w for w in tokenizer.get_tokenizer().encoding.token_byte_values() if w.endswith(b"\x1f")]
    words = [w[:-1].decode("utf-8", "ignore") for w in words]
    for _ in range(3000):
        texts.append(" ".join("".join(rng.choice(words) for _ in range(rng.randint(1, 3))) for _ in range(4)))
    # random characters from several scripts, punctuation and digits
    ranges = [(32, 127), (0xC0, 0x250), (0x391, 0x3CA), (0x410, 0x450), (0x4E00, 0x4E80)]
    alphabet = [chr(c) for lo, hi in ranges for c in range(lo, hi)] + list("😀🐶🎉’“”…–—")
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(1500)]
    return texts


def test_parity_with_open_clip(reference):
    texts = parity_strings()
    assert len(texts) > 6000
    for length in (77, 400):  # 400: compare whole encodings, not just their first 75 ids
        ours, theirs = tokenizer.tokenize(texts, length), reference(texts, length)
        bad = [t for t, a, b in zip(texts, ours, theirs) if not torch.equal(a, b)]
        assert not bad, f"{len(bad)} differ, e.g. {bad[:3]}"


def test_without_ftfy(reference, monkeypatch):
    # ftfy is optional: without it, text that ftfy leaves alone still gets OpenAI's ids
    import ftfy
    monkeypatch.setattr(tokenizer, "ftfy", None)
    monkeypatch.setattr(tokenizer, "warned_without_ftfy", True)  # test_warns_once_without_ftfy checks the warning
    texts = ["A photo of a Dog.", "tabs\tand\nnewlines", "café naïve 日本語 😀", "&amp;lt; 3.5 it's"]
    assert torch.equal(tokenizer.get_tokenizer.__wrapped__()(texts), reference(texts))
    # the README's rule: every parity string that gets other ids is one that ftfy changes, and that
    # ftfy_may_change() flags; every ASCII character and entity depth is tried in two contexts
    texts = parity_strings() + [f"a{chr(c)}b{s}" for c in range(128) for s in ("", " &amp;amp;lt; <")]
    texts += ["a photo of a dog’s bed", "ﬁne ﬂour", "cafÃ©", "&amp;amp;amp; x", "a &#38;amp;lt; b", "AT&T"]
    ours = tokenizer.get_tokenizer.__wrapped__()(texts)
    theirs = reference(texts)
    differ = [t for t, a, b in zip(texts, ours, theirs) if not torch.equal(a, b)]
    assert len(differ) > 100 and all(ftfy.fix_text(t) != t and tokenizer.ftfy_may_change(t) for t in differ)
    assert "a photo of a dog’s bed" in differ and "ﬁne ﬂour" in differ and "cafÃ©" in differ
    flagged = [t for t in texts if tokenizer.ftfy_may_change(t)]
    assert not any(tokenizer.ftfy_may_change(t) for t in ["A photo of a Dog.", "tabs\tand\r\nnewlines", "AT&T &amp;lt;"])
    print(f"{len(differ)} of {len(texts)} texts differ without ftfy, {len(flagged)} flagged")


def test_warns_once_without_ftfy(monkeypatch, recwarn):
    monkeypatch.setattr(tokenizer, "ftfy", None)
    monkeypatch.setattr(tokenizer, "warned_without_ftfy", False)
    tok = tokenizer.get_tokenizer.__wrapped__()
    tok(["a photo of a dog.", "AT&T, 3 &amp; 4", "tabs\tand\nnewlines"] * 3)
    assert not recwarn  # plain ASCII: nothing ftfy would change
    tok(["a photo of a dog’s bed", "ﬁne ﬂour", "cafÃ©"])
    tok(["naïve"])
    warned = [w for w in recwarn if "ftfy" in str(w.message)]
    assert len(warned) == 1 and "pip install ftfy" in str(warned[0].message)
    assert "dog’s bed" in str(warned[0].message)


def test_every_vocabulary_word(reference):
    # each whole word of the vocabulary must come out as the same ids (tiktoken looks whole pieces up directly)
    words = [w[:-1] for w in tokenizer.get_tokenizer().encoding.token_byte_values() if w.endswith(b"\x1f")]
    texts = [w.decode("utf-8", "replace") for w in words]
    texts = [t for t in texts if "\ufffd" not in t]  # a few tokens hold part of a character
    assert len(texts) > 30000
    tok = tokenizer.get_tokenizer()
    assert [tok.encode(t) for t in texts] == [reference.encode(t) for t in texts]


def test_truncation_and_empty():
    ids = tokenizer.tokenize(["word " * 200, ""], context_length=77)
    assert ids.shape == (2, 77)
    assert ids[0, 0] == 49406 and ids[0, -1] == 49407 and ids[0].ne(0).all()
    assert ids[1, :2].tolist() == [49406, 49407] and ids[1, 2:].eq(0).all()
    short = tokenizer.tokenize("a photo of a dog", context_length=4)
    assert short.tolist() == [[49406, 320, 1125, 49407]]
    assert (ids.argmax(-1) == torch.tensor([76, 1])).all()  # the text tower pools at the EOT


def test_tokenizer_speed_and_pickle():
    tokenizer.get_tokenizer.cache_clear()
    t0 = time.perf_counter()
    tok = tokenizer.get_tokenizer()
    build = time.perf_counter() - t0
    assert build < 1.0
    captions = [f"a photo of {n} {w} dogs playing in the park near building {n * 7}" for n, w in
                zip(range(256), ["big", "small", "brown", "happy"] * 64)]
    t0 = time.perf_counter()
    first = tok(captions)
    took = time.perf_counter() - t0
    print(f"build {build * 1e3:.0f} ms, 256 new captions {took * 1e3:.1f} ms")
    assert took < 0.1
    clone = pickle.loads(pickle.dumps(tok))  # DataLoader workers receive a copy
    assert clone.cache == {} and torch.equal(clone(captions), first)


def test_vocabulary_ships_with_the_repository_and_is_checked(tmp_path):
    # the same bytes as open_clip's copy (itself OpenAI's): nothing to find or download, offline from a fresh clone
    assert open(tokenizer.BPE_PATH, "rb").read() == open(OPEN_CLIP_BPE, "rb").read()
    assert os.path.dirname(tokenizer.BPE_PATH) == os.path.dirname(os.path.abspath(tokenizer.__file__))  # beside it
    with pytest.raises(FileNotFoundError, match="missing.*git checkout"):
        tokenizer.read_bpe_merges(str(tmp_path / "bpe_simple_vocab_16e6.txt.gz"))
    pointer = tmp_path / "lfs.txt.gz"  # what a Git LFS checkout without LFS leaves
    pointer.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:924691ac\nsize 1356917\n")
    with pytest.raises(ValueError, match="sha256.*git checkout"):
        tokenizer.read_bpe_merges(str(pointer))


def test_other_encoding():
    ranks = {bytes([i]): i for i in range(256)}
    for i, merge in enumerate([b"th", b"the", b" the", b"do", b"dog"]):
        ranks[merge] = 256 + i
    enc = tiktoken.Encoding("tiny", pat_str=r"""\s?\w+|\s?[^\s\w]+|\s+""", mergeable_ranks=ranks,
                            special_tokens={"<|endoftext|>": 261})
    tok = tokenizer.get_tokenizer(enc)
    assert (tok.sot_id, tok.eot_id, tok.vocab_size, tok.pad_id) == (262, 263, 264, 0)
    ids = tok(["the dog", "The  Dog", "<|endoftext|>"], context_length=10)
    assert ids[0].tolist() == [262, 257, 32, 260, 263, 0, 0, 0, 0, 0]  # "the", " ", "dog": spaces kept, never lowered
    assert ids[1, 1:3].tolist() == [ord("T"), ord("h")]  # case kept, whitespace collapsed
    assert 261 not in ids[2].tolist()  # special-token text stays text
    assert (ids.argmax(-1) == (ids == 263).int().argmax(-1)).all()  # EOT has the largest id
    assert tok.decode(ids[1].tolist()) == "The Dog"


def test_tiktoken_encoding_by_name(monkeypatch):
    # tiktoken downloads its own files on first use (no network here), so the lookup by name gets a local encoding
    enc = tiktoken.Encoding("local", pat_str=r"""\S+|\s+""", mergeable_ranks={bytes([i]): i for i in range(256)},
                            special_tokens={"<|endoftext|>": 256})
    asked = []
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: asked.append(name) or enc)
    cache_clear = getattr(tokenizer.get_tokenizer, "cache_clear", lambda: None)
    cache_clear()
    try:
        tok = tokenizer.get_tokenizer("cl100k_base")
    finally:
        cache_clear()
    assert asked == ["cl100k_base"]
    assert (tok.sot_id, tok.eot_id, tok.vocab_size) == (257, 258, 259)
    assert tok("ab")[0, :4].tolist() == [257, 97, 98, 258]


def test_transforms():
    img = Image.new("RGB", (100, 80), (123, 117, 104))  # about the mean colour
    for t in (lambda x: data.normalise(data.train_transform(32)(x)), data.eval_transform(32)):
        x = t(img)
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
        assert x.abs().max() < 0.02
    x = data.eval_transform(48)(Image.new("RGB", (60, 60), (255, 255, 255)))
    assert torch.allclose(x[:, 0, 0], (1 - torch.tensor(data.MEAN)) / torch.tensor(data.STD), atol=1e-5)


def test_each_epoch_has_its_order_and_each_stream_position_its_seed():
    """The seeding scheme (samples.seed_of, data.Batches, data.Seeded): epoch e is its own permutation, drawn from
    (seed, e); a sample's augmentation is seeded by its position in the stream, so the same image gets new draws in
    every epoch; distinct parts give distinct seeds."""
    n = 12
    orders = [data.epoch_order(n, 0, e).tolist() for e in range(3)]
    assert all(sorted(o) == list(range(n)) for o in orders) and orders[0] != orders[1] != orders[2]
    assert data.epoch_order(n, 1, 0).tolist() != orders[0]
    batches = iter(data.Batches(n, 4, 0, 1, 0, 0))
    stream = [item for _ in range(6) for item in next(batches)]  # two epochs of (index, position)
    assert stream == [(orders[p // n][p % n], p) for p in range(2 * n)]
    # rank 1 of 2 takes the second half of each global micro-batch of 2 × 2
    assert next(iter(data.Batches(n, 2, 1, 2, 0, 1))) == [(orders[0][6], 6), (orders[0][7], 7)]

    def draw(image, caption):
        return {"draw": torch.rand(())}

    seeded = data.Seeded([(None, "a caption")] * n, draw, seed=3, group=4)
    for index, position in stream[:2] + stream[n:n + 2]:
        expected = torch.rand((), generator=torch.Generator().manual_seed(samples.seed_of(3, position)))
        assert seeded[(index, position)]["draw"] == expected
    seeds = {samples.seed_of(s, *parts) for s in (0, 1) for parts in np.ndindex(4, 4, 4)}
    assert len(seeds) == 2 * 64 and samples.seed_of(0, 7) == 7


def test_synthetic_deterministic_and_fast():
    ds = synthetic.SyntheticCaptions("train", size=50)
    assert len(ds) == 50 and len(synthetic.SyntheticCaptions("val")) > 0
    img, caption = ds[7]
    assert img.mode == "RGB" and img.size == (64, 64) and isinstance(caption, str)
    again = synthetic.SyntheticCaptions("train", size=50)[7]
    assert np.array_equal(np.asarray(img), np.asarray(again[0])) and caption == again[1]
    val = synthetic.SyntheticCaptions("val", size=50)
    assert sum(ds[i][1] != val[i][1] for i in range(50)) > 25  # the held-out split draws other scenes
    assert synthetic.SyntheticCaptions("train", image_size=32)[0][0].size == (32, 32)
    t0 = time.perf_counter()
    for i in range(200):
        ds[i % 50]
    assert (time.perf_counter() - t0) / 200 < 1e-3


def test_synthetic_captions_match_attributes():
    ds = synthetic.SyntheticCaptions("train", size=500)
    seen = set()
    for i in range(len(ds)):
        s, _ = ds.scene(i)
        caption = ds[i][1]
        words = caption.rstrip(".").split()
        seen.add((s["shape"], s["colour"], s["count"]))
        assert s["shape"] in caption
        assert all(w not in words for w in synthetic.SHAPES if w != s["shape"])
        assert all(c not in words for c in synthetic.COLOURS if c != s["colour"])
        if s["count"] != "one":
            assert s["count"] in words and s["position"] is None and s["size"] == "small"
        else:
            assert "two" not in words and "three" not in words
        for position, phrases in synthetic.POSITION_WORDS.items():
            if any(p in caption for p in phrases):
                assert position == s["position"]
    assert len(seen) > 60  # many combinations occur


def test_synthetic_captions_name_each_optional_part_as_often_as_written():
    # caption_scene names the size with p 0.5, the colour 0.8, a single object's position 0.6, the background 0.3:
    # over 4,000 scenes each rate within 0.03 (5 standard deviations) of its p
    rng, named = random.Random(0), {"size": [], "colour": [], "position": [], "background": []}
    for _ in range(4000):
        s = synthetic.sample_scene(rng)
        caption = synthetic.caption_scene(s, rng)
        words = caption.rstrip(".").split()
        named["size"].append(s["size"] in words)
        named["colour"].append(s["colour"] in words)
        named["background"].append(f"on a {s['background']} background" in caption)
        if s["position"]:
            named["position"].append(any(p in caption for p in synthetic.POSITION_WORDS[s["position"]]))
    rates = {part: np.mean(seen) for part, seen in named.items()}
    assert all(abs(rates[part] - p) < 0.03 for part, p in dict(size=0.5, colour=0.8, position=0.6,
                                                                background=0.3).items()), rates


def test_synthetic_tasks():
    assert set(synthetic.TASKS) >= {"shape", "colour", "count"}
    for task, (classnames, templates) in synthetic.TASKS.items():
        assert len(set(classnames)) == len(classnames) >= 2
        assert all(t.count("{}") == 1 for t in templates)
        ds = synthetic.SyntheticTask(task, size=60)
        labels = [ds[i][1] for i in range(len(ds))]
        assert np.bincount(labels).tolist() == [60 // len(classnames)] * len(classnames)  # balanced
        for i in range(len(ds)):
            s, _ = ds.scene(i)
            assert s[task] == classnames[labels[i]]
            assert task == "count" or s["count"] == "one"
    img, label = synthetic.SyntheticTask("colour", size=6)[0]
    assert img.mode == "RGB" and label == 0


def write_jpeg(path, colour=(200, 10, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), colour).save(path, "JPEG")


def test_coco(tmp_path):
    images = [{"id": 9, "file_name": "000000000009.jpg"}, {"id": 3, "file_name": "000000000003.jpg"}]
    annotations = [{"id": 1, "image_id": 9, "caption": "a red thing. "}, {"id": 2, "image_id": 3, "caption": "grey"},
                   {"id": 3, "image_id": 9, "caption": "another caption"}]
    with pytest.raises(FileNotFoundError, match="annotations_trainval2017.zip"):
        data.CocoCaptions(tmp_path, "val")
    (tmp_path / "annotations").mkdir()
    coco = {"images": images, "annotations": annotations}
    (tmp_path / "annotations" / "captions_val2017.json").write_text(json.dumps(coco))
    with pytest.raises(FileNotFoundError, match="val2017.zip"):
        data.CocoCaptions(tmp_path, "val")
    for im in images:
        write_jpeg(tmp_path / "val2017" / im["file_name"])
    ds = data.make_dataset("coco", data_dir=str(tmp_path), split="val")
    assert isinstance(ds, data.CocoCaptions) and len(ds) == 3
    img, caption = ds[0]  # a JPEG: read, decoded by the training transform's crop
    assert isinstance(img, samples.Jpeg) and img.size == (40, 30) and caption == "grey"
    assert img.decode().dtype == torch.uint8 and img.decode().shape == (3, 30, 40)  # torchvision.io decoded
    paths, captions, caption_image = ds.retrieval()
    assert [os.path.basename(p) for p in paths] == ["000000000003.jpg", "000000000009.jpg"]
    assert captions == ["grey", "a red thing.", "another caption"] and caption_image == [0, 1, 1]
    assert data.retrieval_set("coco", str(tmp_path)) == (paths, captions, caption_image)
    with pytest.raises(ValueError, match="data_dir"):
        data.make_dataset("coco")


def test_csv_and_tsv(tmp_path):
    write_jpeg(tmp_path / "imgs" / "a.jpg")
    write_jpeg(tmp_path / "imgs" / "b.jpg")
    rows = ["filepath,title", 'imgs/a.jpg,"a cat, sitting"', "imgs/b.jpg,  ", "imgs/b.jpg,a dog"]
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    with pytest.warns(UserWarning, match="dropped 1 of 3 rows with empty captions"):
        ds = data.make_dataset(str(tmp_path / "train.csv"))
    assert len(ds) == 2 and ds.captions == ["a cat, sitting", "a dog"]
    assert ds.paths[0] == os.path.join(str(tmp_path), "imgs/a.jpg") and ds[1][0].decode().shape[0] == 3

    (tmp_path / "list.tsv").write_text("image\tcaption\na.jpg\tred square\n")
    ds = data.CsvCaptions(str(tmp_path / "list.tsv"), root=str(tmp_path / "imgs"))
    assert ds.captions == ["red square"] and ds[0][0].decode().shape == (3, 30, 40)
    ds = data.CsvCaptions(str(tmp_path / "list.tsv"), img_key="image", caption_key="caption", sep="\t",
                          root=str(tmp_path / "imgs"))
    assert len(ds) == 1

    (tmp_path / "bad.csv").write_text("path,text2\nx.jpg,hi\n")
    with pytest.raises(ValueError, match=r"columns found: \['path', 'text2'\]") as e:
        data.CsvCaptions(str(tmp_path / "bad.csv"))
    assert "filepath" in str(e.value)
    (tmp_path / "empty.csv").write_text("filepath,title\nx.jpg,\ny.jpg, \n")
    with pytest.raises(ValueError, match="empty captions"):
        data.CsvCaptions(str(tmp_path / "empty.csv"))
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        data.make_dataset(str(tmp_path / "nope.csv"))
    with pytest.raises(ValueError, match="synthetic"):
        data.make_dataset("imagenet")
    assert isinstance(data.make_dataset("synthetic", split="val", image_size=32), synthetic.SyntheticCaptions)


def test_unreadable_images_raise_one_error_type_with_the_path(tmp_path):
    write_jpeg(tmp_path / "0.jpg")
    (tmp_path / "1.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "2.jpg").write_bytes((tmp_path / "0.jpg").read_bytes()[:100])  # truncated
    paths = [str(tmp_path / f"{i}.jpg") for i in range(3)] + [str(tmp_path / "missing.jpg")]
    ds = data.ImageCaptions(paths, [f"caption {i}" for i in range(4)])
    assert ds[0][1] == "caption 0"
    for i in (1, 2, 3):  # train.py replaces exactly these (tests/test_first_hour.py)
        with pytest.raises(samples.UnreadableImage) as e:
            ds[i]
        assert e.value.path == paths[i] and e.value.reason


def test_load_image_decodes_with_torchvision_and_falls_back_to_pil(tmp_path):
    Image.new("RGB", (20, 10), (250, 10, 10)).save(tmp_path / "a.jpg")
    Image.new("L", (20, 10), 128).save(tmp_path / "gray.png")
    Image.new("RGB", (20, 10), (10, 250, 10)).save(tmp_path / "c.tiff")  # a format torchvision.io does not read
    x = samples.load_image(tmp_path / "a.jpg")
    assert x.dtype == torch.uint8 and x.shape == (3, 10, 20) and x[0].float().mean() > 200
    assert samples.load_image(tmp_path / "gray.png").shape == (3, 10, 20)  # grayscale -> RGB
    t = samples.load_image(tmp_path / "c.tiff")
    assert isinstance(t, Image.Image) and t.mode == "RGB" and t.size == (20, 10)
    assert data.train_transform(32)(x).shape == data.train_transform(32)(t).shape == (3, 32, 32)
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(OSError):
        samples.load_image(tmp_path / "bad.jpg")


def test_16_bit_images_decode_to_their_values(tmp_path):
    # torchvision.io reads a 16-bit PNG as uint16, and the PIL fallback (a TIFF here) must give the same tensor:
    # PIL's convert("RGB") would clip every value above 255 to white
    grey = np.linspace(0, 65535, 30 * 40).reshape(30, 40).astype(np.uint16)
    Image.fromarray(grey).save(tmp_path / "g.png")
    Image.fromarray(grey).save(tmp_path / "g.tiff")
    png, tiff = samples.load_image(tmp_path / "g.png"), samples.load_image(tmp_path / "g.tiff")
    assert png.dtype == torch.uint16 and png.shape == (3, 30, 40) and torch.equal(png, tiff)
    assert all((channel.numpy() == grey).all() for channel in png)
    eight_bit = torch.from_numpy((grey / 257).round().astype(np.uint8)).expand(3, -1, -1)
    torch.testing.assert_close(data.eval_transform(32)(png), data.eval_transform(32)(eight_bit), rtol=0, atol=0.02)
