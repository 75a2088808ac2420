"""From OpenAI messages to what the model runs: the image, the prompt ids, the router's question.

- Images come as ``data:image/...;base64,`` URLs (``http(s)`` only with ``allow_remote``).
  The header is read first: an image larger than ``max_pixels`` is refused before it is
  decoded, so a tiny PNG claiming 40000×40000 costs nothing.
- At most one image per conversation (LLaVA-1.5 was trained with one).
- The prompt is the model's chat template over the whole history (multi-turn), rendered
  with content parts ``{"type": "image"}`` / ``{"type": "text"}``; without a chat
  template the frozen_vlm ``PROMPT_TEMPLATE`` format is used for a single user turn.
- ``<image>`` is expanded to the model's image-token count here, by the tokenizer alone:
  a request routed to k = N never runs the image processor or the vision tower.
- The router sees the last user message's text (the question), as in training.
"""

from __future__ import annotations

import base64
import binascii
import io
import threading
from dataclasses import dataclass
from typing import Any

from deepinsert.serving.protocol import APIError, ChatRequest, ImagePart, TextPart

IMAGE_TOKEN = "<image>"


@dataclass
class Conversation:
    """A parsed request.

    prompt_ids: the prompt's token ids, ``<image>`` expanded to ``n_image`` placeholders.
    image: the decoded RGB PIL image, or ``None``.
    question: the last user message's text (what the router sees).
    n_text, n_image: text and image token counts of the prompt.
    """

    prompt_ids: list[int]
    image: Any
    question: str
    n_text: int
    n_image: int


def decode_image(url: str, *, max_pixels: int, allow_remote: bool, max_bytes: int) -> Any:
    """A ``data:`` (or, if allowed, ``http(s)``) image URL -> RGB PIL image; :class:`APIError` if unusable."""
    from PIL import Image

    param = "messages.content.image_url"
    if url.startswith("data:"):
        head, sep, payload = url.partition(",")
        if not sep or ";base64" not in head:
            raise APIError("image data URLs must look like data:image/png;base64,<data>", param=param)
        try:
            raw = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise APIError(f"the image data URL is not valid base64 ({e})", param=param) from e
    elif url.startswith(("http://", "https://")):
        if not allow_remote:
            raise APIError("remote image URLs are refused; send the image as a data URL "
                           "(or start the server with --allow-remote-images)", param=param)
        raw = _fetch(url, max_bytes)
    else:
        raise APIError("image_url.url must be a data: URL (or http(s) with --allow-remote-images)", param=param)
    if len(raw) > max_bytes:
        raise APIError(f"the image is {len(raw)} bytes; the limit is {max_bytes}", param=param)
    try:
        with Image.open(io.BytesIO(raw)) as im:  # reads the header only
            w, h = im.size
            if w * h > max_pixels:
                raise APIError(f"the image is {w}x{h} pixels; the limit is {max_pixels} pixels", param=param)
            im.load()
            return im.convert("RGB")
    except APIError:
        raise
    except Image.DecompressionBombError as e:
        raise APIError(f"the image is too large: {e}", param=param) from e
    except Exception as e:  # PIL raises many types for bad data
        raise APIError(f"the image could not be decoded ({type(e).__name__}: {e})", param=param) from e


def _fetch(url: str, max_bytes: int) -> bytes:
    import httpx

    try:
        with httpx.stream("GET", url, timeout=10.0, follow_redirects=True) as r:
            r.raise_for_status()
            out = bytearray()
            for chunk in r.iter_bytes():
                out += chunk
                if len(out) > max_bytes:
                    raise APIError(f"the remote image exceeds {max_bytes} bytes", param="messages.content.image_url")
            return bytes(out)
    except httpx.HTTPError as e:
        raise APIError(f"could not fetch the image: {e}", param="messages.content.image_url") from e


class PromptBuilder:
    """Renders and tokenizes requests for one model (thread-safe: the tokenizer is behind a lock)."""

    def __init__(self, processor: Any, n_image_tokens: int, max_positions: int | None, *,
                 max_pixels: int = 4096 * 4096, allow_remote_images: bool = False,
                 max_image_bytes: int = 16 * 1024 * 1024) -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.n_image_tokens = int(n_image_tokens)
        self.max_positions = max_positions
        self.max_pixels = int(max_pixels)
        self.allow_remote = bool(allow_remote_images)
        self.max_image_bytes = int(max_image_bytes)
        self.lock = threading.Lock()
        self.has_template = bool(getattr(processor, "chat_template", None) or
                                 getattr(self.tokenizer, "chat_template", None))

    def parse(self, req: ChatRequest) -> Conversation:
        """Validate the messages, decode the image, render the template, tokenize."""
        msgs = req.messages
        if msgs[-1].role != "user":
            raise APIError("the last message must come from the user", param="messages")
        conv: list[dict[str, Any]] = []
        image = None
        question = ""
        for i, m in enumerate(msgs):
            parts: list[dict[str, Any]] = []
            content = m.content
            if content is None:
                raise APIError(f"messages[{i}] has no content", param=f"messages[{i}].content")
            if isinstance(content, str):
                content = [TextPart(type="text", text=content)]
            texts = []
            for p in content:
                if isinstance(p, ImagePart):
                    if m.role != "user":
                        raise APIError(f"messages[{i}]: only user messages may carry images",
                                       param=f"messages[{i}].content")
                    if image is not None:
                        raise APIError("at most one image per conversation is supported (LLaVA-1.5)",
                                       param="messages")
                    image = decode_image(p.image_url.url, max_pixels=self.max_pixels,
                                         allow_remote=self.allow_remote, max_bytes=self.max_image_bytes)
                    parts.append({"type": "image"})
                else:
                    try:
                        p.text.encode("utf-8")
                    except UnicodeEncodeError as e:  # a lone surrogate ("\ud800" in the JSON): no tokenizer takes it
                        raise APIError(f"messages[{i}] is not valid Unicode text (a lone surrogate at position "
                                       f"{e.start})", param=f"messages[{i}].content") from None
                    parts.append({"type": "text", "text": p.text})
                    texts.append(p.text)
            if m.role == "user":
                question = " ".join(t.strip() for t in texts if t.strip())
            conv.append({"role": m.role, "content": parts})
        if not any(p["type"] == "text" and p["text"].strip() for p in conv[-1]["content"]):
            raise APIError("the last user message has no text", param="messages")
        text = self._render(conv)
        if image is not None and text.count(IMAGE_TOKEN) != 1:
            raise APIError("the chat template did not place the image exactly once", param="messages")
        expanded = text.replace(IMAGE_TOKEN, IMAGE_TOKEN * self.n_image_tokens)
        with self.lock:
            ids = [int(t) for t in self.tokenizer(expanded)["input_ids"]]
        n_image = self.n_image_tokens if image is not None else 0
        if self.max_positions is not None and len(ids) >= self.max_positions:
            raise APIError(f"the prompt is {len(ids)} tokens; this model handles at most {self.max_positions} "
                           "positions (prompt + answer)", param="messages", code="context_length_exceeded")
        return Conversation(ids, image, question, len(ids) - n_image, n_image)

    def _render(self, conv: list[dict[str, Any]]) -> str:
        if self.has_template:
            target = self.processor if getattr(self.processor, "chat_template", None) else self.tokenizer
            with self.lock:
                return target.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
        from deepinsert.frozen_vlm.batching import PROMPT_TEMPLATE, TEXT_PROMPT_TEMPLATE

        if len(conv) != 1:
            raise APIError("this model has no chat template: send one user message", param="messages")
        has_image = any(p["type"] == "image" for p in conv[0]["content"])
        q = " ".join(p["text"] for p in conv[0]["content"] if p["type"] == "text")
        return (PROMPT_TEMPLATE if has_image else TEXT_PROMPT_TEMPLATE).format(question=q)

    def decode(self, ids: list[int]) -> str:
        """Token ids -> text (special tokens dropped), under the tokenizer lock."""
        with self.lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

    def pixel_values(self, images: list[Any]) -> Any:
        """One image-processor call for a group's images -> ``(I, 3, H, W)``."""
        return self.processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
