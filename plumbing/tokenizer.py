"""
CLIP's tokenizer: OpenAI's BPE (49,408 tokens), run by tiktoken. get_tokenizer("clip") gives exactly OpenAI's ids
(tests/test_data.py checks ~250k strings against open_clip's copy of OpenAI's tokenizer); another tiktoken encoding
("cl100k_base", ...) trains a model from scratch with its own vocabulary.

    tokenizer(["a photo of a dog."], context_length=77) -> (1, 77) LongTensor: [SOT] ids [EOT] 0 0 ...
"""

import gzip
import hashlib
import html
import os
import warnings
from functools import lru_cache

import numpy as np
import regex  # installed with tiktoken; unlike `re` it knows \p{L} and \p{N}, which CLIP's pre-tokeniser uses
import tiktoken
import torch

try:
    import ftfy  # optional: OpenAI fixes mojibake with it before tokenising
except ImportError:
    ftfy = None

# OpenAI's BPE merges, shipped next to this file (MIT licence: see NOTICE), so that the tokenizer works offline and
# needs no package beyond requirements.txt. The hash catches a truncated copy or a Git LFS pointer, which would
# otherwise load as a wrong vocabulary.
BPE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bpe_simple_vocab_16e6.txt.gz")
BPE_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
# OpenAI's pre-tokeniser minus its two special-token alternatives: a caption that literally contains
# "<|endoftext|>" is plain text here (as in open_clip), so no caption can inject an EOT and move the pooled token.
CLIP_PAT = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE)
# CLIP's BPE marks a word's last symbol with "</w>" ("dog</w>" and "dog" are different tokens); tiktoken's works on
# bytes, so "</w>" becomes one byte appended to each word: 0x1f, which cleaned text never holds (str.split() takes it
# for whitespace), so that OpenAI's tokenizer never gives its own token (id 219) either, and no merge contains it.
EOW = "\x1f"


def read_bpe_merges(path=BPE_PATH):
    """The merges file's text, after checking its sha256."""
    restore = f"restore it with `git checkout -- {os.path.basename(path)}` (it ships with this repository)"
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CLIP's BPE vocabulary {path} is missing: {restore}")
    with open(path, "rb") as f:
        raw = f.read()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != BPE_SHA256:
        raise ValueError(f"CLIP's BPE vocabulary {path} has sha256 {digest}, not {BPE_SHA256}: {restore}")
    return gzip.decompress(raw).decode("utf-8")


def bytes_to_unicode():
    """GPT-2's table of 256 printable characters standing for the 256 bytes, in the order that gives CLIP's ids."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs = bs[:]
    for b in range(256):
        if b not in bs:  # the 68 unprintable bytes get the characters 256, 257, ...
            bs.append(b)
            cs.append(256 + len(cs) - 188)  # 188 = number of printable bytes, listed first
    return dict(zip(bs, map(chr, cs)))


def clip_encoding():
    """OpenAI's 49,408-token CLIP BPE as a tiktoken Encoding whose rank of each token is its CLIP id."""
    merges = read_bpe_merges().split("\n")[1:49152 - 256 - 2 + 1]
    char_to_byte = {c: b for b, c in bytes_to_unicode().items()}
    # ids: the 256 bytes, the 256 bytes ending a word, then one token per merge in merge order
    vocab = list(char_to_byte) + [c + "</w>" for c in char_to_byte] + [m.replace(" ", "") for m in merges]
    ranks = {}
    for i, token in enumerate(vocab):
        word = token.removesuffix("</w>")
        ranks[bytes(char_to_byte[c] for c in word) + (EOW.encode() if word != token else b"")] = i
    assert len(ranks) == len(vocab) == 49406, "unexpected BPE file"
    # Merge i makes token 512 + i, so tiktoken's merge order (lowest rank of the concatenation first) is CLIP's
    # (lowest merge index first). They could still differ: tiktoken also merges an adjacent pair that is not a
    # listed merge when its concatenation is a token. That never happens on the ~250k strings checked against
    # OpenAI's tokenizer (tests/test_data.py checks every vocabulary word and thousands of captions).
    # Words arrive already split by CLIP_PAT and end-marked, so tiktoken's pattern only cuts after each marker.
    return tiktoken.Encoding("clip", pat_str=r"[^\x1f]+\x1f", mergeable_ranks=ranks,
                             special_tokens={"<|startoftext|>": 49406, "<|endoftext|>": 49407})


def clean_text(text, lower=True):
    """OpenAI's cleaning: ftfy, html.unescape twice, collapse whitespace, lower-case."""
    # ftfy costs ~15 us a caption and leaves printable ASCII without entities unchanged, so skip it there
    if ftfy is not None and not (text.isascii() and text.isprintable() and "&" not in text):
        text = ftfy.fix_text(text)
    text = " ".join(html.unescape(html.unescape(text)).split())
    return text.lower() if lower else text


# Text whose tokens ftfy.fix_text leaves unchanged, so that it gets OpenAI's ids without ftfy (docs/data.md): printable
# ASCII (tabs, line breaks and form feeds are whitespace either way) whose HTML entities two unescapes resolve (ftfy
# unescapes until none is left, unless the text has a "<").
LINE_SPACE = str.maketrans("", "", "\t\n\r\x0c")
warned_without_ftfy = False


def ftfy_may_change(text):
    if not text.isascii() or not text.translate(LINE_SPACE).isprintable():
        return True
    twice = html.unescape(html.unescape(text))
    return html.unescape(twice) != twice


def warn_without_ftfy(text):
    global warned_without_ftfy  # once per process: a dataset of accented captions would repeat it per caption
    if not warned_without_ftfy:
        warned_without_ftfy = True
        warnings.warn(f"ftfy is not installed, and text such as {text[:40]!r} may get other ids than OpenAI's "
                      f"tokenizer gives (it fixes text with ftfy first): `pip install ftfy` to get exactly its ids")


class Tokenizer:
    """texts -> (N, context_length) LongTensor: [SOT] ids [EOT] then 0-padding; EOT holds the row's largest id."""

    def __init__(self, encoding, sot_id, eot_id, clip_bpe=False):
        self.encoding, self.sot_id, self.eot_id, self.clip_bpe, self.pad_id = encoding, sot_id, eot_id, clip_bpe, 0
        self.vocab_size = max(encoding.n_vocab, sot_id + 1, eot_id + 1)
        self.cache = {}  # text -> ids: synthetic captions and prompt templates repeat a lot

    def encode(self, text):
        ids = self.cache.get(text)
        if ids is None:
            if self.clip_bpe:
                if ftfy is None and ftfy_may_change(text):
                    warn_without_ftfy(text)
                words = CLIP_PAT.findall(clean_text(text))
                ids = self.encoding.encode_ordinary(EOW.join(words) + EOW) if words else []
            else:  # GPT-style byte BPEs keep case and spaces; special-token text stays plain text
                ids = self.encoding.encode_ordinary(clean_text(text, lower=False))
            if len(self.cache) >= 20_000:  # ~1 kB an entry, in every DataLoader worker
                self.cache.clear()
            self.cache[text] = ids
        return ids

    def decode(self, ids):
        ids = [i for i in ids if i not in (self.sot_id, self.eot_id, self.pad_id)]
        data = self.encoding.decode_bytes(ids)
        return (data.replace(EOW.encode(), b" ") if self.clip_bpe else data).decode("utf-8", errors="replace")

    def __call__(self, texts, context_length=77):
        texts = [texts] if isinstance(texts, str) else texts
        out = np.zeros((len(texts), context_length), dtype=np.int64)
        for row, text in zip(out, texts):
            ids = [self.sot_id] + self.encode(text)[:context_length - 2] + [self.eot_id]  # too long: cut, end in EOT
            row[:len(ids)] = ids
        return torch.from_numpy(out)

    def __getstate__(self):  # DataLoader workers get a copy without the cache
        return {**self.__dict__, "cache": {}}


@lru_cache(maxsize=None)
def get_tokenizer(name="clip"):
    """"clip" (OpenAI's BPE), a tiktoken encoding name ("cl100k_base", "gpt2", ...) or a tiktoken.Encoding."""
    if name == "clip":
        return Tokenizer(clip_encoding(), sot_id=49406, eot_id=49407, clip_bpe=True)
    encoding = name if isinstance(name, tiktoken.Encoding) else tiktoken.get_encoding(name)
    # the text tower pools at argmax(ids), so SOT and EOT get two new ids above the encoding's vocabulary
    return Tokenizer(encoding, sot_id=encoding.n_vocab, eot_id=encoding.n_vocab + 1)


def tokenize(texts, context_length=77):
    return get_tokenizer("clip")(texts, context_length)
