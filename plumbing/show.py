"""
eval_zeroshot.py --show N: what a checkpoint retrieves, as one self-contained HTML page (docs/see.md): N captions and N
images of a retrieval set with their top 5 of the other kind, N mistakes of a classification set with their top 5
classes, the correct items marked.
"""

import base64
import html
import io

import torch
from PIL import Image
from torchvision.transforms.functional import to_pil_image

import data
from plumbing import evalsets
from plumbing.evalsets import cat, class_embeddings, loader

K = 5  # items shown per query


def spread(total, n):
    """min(n, total) indices spread evenly over range(total): the queries shown (a sorted set's first N look alike)."""
    n = min(n, total)
    return [i * total // n for i in range(n)]


def shortfall(task, panels, asked):
    """Why the page shows fewer queries than --show N asked, in words; None when it shows N."""
    if task["task"] != "retrieval" and len(panels) < asked:
        return f"{len(panels)} mistakes (of {len(task['images'])} images) shown of the {asked} asked"
    if task["task"] == "retrieval" and min(len(task["captions"]), len(task["images"])) < asked:
        return (f"{min(asked, len(task['captions']))} captions and {min(asked, len(task['images']))} images shown of "
                f"the {asked} asked per direction: the set has no more")


def take(embeddings, index):  # rows of an embedding, a tensor or (FILIP) a tuple of tensors
    return tuple(e[index] for e in embeddings) if isinstance(embeddings, tuple) else embeddings[index]


def panel(direction, query, scores, correct):
    """A query's scores (items,) and correct items -> its panel: top K [(index, score)], a correct item's best rank."""
    scores = scores.float().cpu()
    order = scores.argsort(descending=True, stable=True)
    rank = 1 + min((order == c).nonzero().item() for c in correct)
    top = [(i, scores[i].item()) for i in order[:K].tolist()]
    return dict(direction=direction, query=query, top=top, correct=correct, rank=rank)


@torch.no_grad()
def rankings(method, tokenizer, task, device, n, batch_size=256, workers=0):
    """A task of eval_zeroshot.prepare -> [dict(direction, query, top=[(index, score)], correct, rank)]: for
    retrieval, n text→image then n image→text queries; for classification, the first n images (evenly spread)
    whose top-1 class is wrong."""
    method.eval()
    if task["task"] == "retrieval":
        captions, caption_image = task["captions"], torch.as_tensor(task["caption_image"])
        L = method.model.context_length
        texts = cat([method.embed_texts(tokenizer(captions[i:i + batch_size], L).to(device))
                     for i in range(0, len(captions), batch_size)])
        transform = data.eval_transform(method.model.image_resolution)
        images = cat([method.embed_images(b.to(device))
                      for b in loader(evalsets.Images(task["images"], transform), batch_size, workers)])
        panels = [panel("text->image", c, method.similarity(images, take(texts, [c]))[:, 0], [caption_image[c].item()])
                  for c in spread(len(captions), n)]
        for i in spread(len(task["images"]), n):  # every caption of the image is correct
            own = (caption_image == i).nonzero()[:, 0].tolist()
            panels.append(panel("image->text", i, method.similarity(take(images, [i]), texts)[0], own))
        return panels
    classes = class_embeddings(method, tokenizer, task["classnames"], task["templates"], device)
    batches = [(method.similarity(method.embed_images(images.to(device)), classes).float().cpu(), labels)
               for images, labels in loader(task["images"], batch_size, workers)]
    scores, labels = torch.cat([s for s, _ in batches]), torch.cat([y for _, y in batches])
    wrong = (scores.argmax(dim=1) != labels).nonzero()[:, 0].tolist()
    return [panel("mistake", i, scores[i], [labels[i].item()]) for i in [wrong[j] for j in spread(len(wrong), n)]]


def thumbnail(image, size=112):
    """A path, PIL image or image tensor -> an <img> with the JPEG inlined."""
    if isinstance(image, str):
        image = evalsets.read_image(image)
    if isinstance(image, torch.Tensor):
        image = to_pil_image(image)
    image = image.convert("RGB")
    image.thumbnail((size, size), Image.Resampling.BICUBIC)
    if max(image.size) < size:  # the synthetic images are 64 px: enlarged, without blurring
        scale = size / max(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=85)
    return f'<img src="data:image/jpeg;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def section(task, panels, note=None):
    """One task's panels as HTML; note: why fewer are shown than --show N asked (shortfall)."""
    retrieval = task["task"] == "retrieval"
    text = task["captions"] if retrieval else task["classnames"]

    def image(i):  # as read, before the evaluation transform
        return task["images"][i] if retrieval else task["images"].dataset[i][0]
    out = [] if panels else [f"<h2>{html.escape(task['dataset'])}: no mistakes</h2>"]
    if note:
        out.append(f"<p>{html.escape(task['dataset'])}: {html.escape(note)}</p>")
    for direction in ("text->image", "image->text", "mistake"):
        shown = [p for p in panels if p["direction"] == direction]
        if not shown:
            continue
        title = {"mistake": "zero-shot classification mistakes"}.get(direction, direction.replace("->", " → "))
        out.append(f"<h2>{html.escape(task['dataset'])}: {title}</h2>")
        for p in shown:
            query = html.escape(text[p["query"]]) if direction == "text->image" else thumbnail(image(p["query"]))
            if direction == "mistake":
                query += f"<br>true class: {html.escape(text[p['correct'][0]])}"
            items = []
            for rank, (i, score) in enumerate(p["top"], 1):
                item = thumbnail(image(i)) if direction == "text->image" else html.escape(text[i])
                mark = ' class="correct"' if i in p["correct"] else ""
                items.append(f"<div{mark}>{'✓ ' if mark else ''}{rank}. {item}<br><small>{score:.1f}</small></div>")
            note = "" if p["rank"] <= K else f"<div>correct at rank {p['rank']}</div>"
            out.append(f'<div class="panel"><div class="query">{query}</div>{"".join(items)}{note}</div>')
    return "\n".join(out)


STYLE = """body { font-family: sans-serif; font-size: 13px; } .panel { display: flex; gap: 8px; margin: 6px 0;
align-items: flex-start; } .panel > div { width: 130px; padding: 4px; border: 2px solid #ddd; }
.panel > .query { width: 200px; background: #f4f4f4; } .panel > .correct { border-color: #2a2; background: #efe; }"""


def write(path, checkpoint, sections):
    page = (f"<!doctype html><meta charset=utf-8><title>{html.escape(checkpoint)}</title><style>{STYLE}</style>"
            f"<h1>{html.escape(checkpoint)}</h1><p>top {K} by the model's similarity (×100); the correct items in "
            f"green</p>\n" + "\n".join(sections))
    evalsets.write_output(path, page)
