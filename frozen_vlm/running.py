"""Step-wise decoding for serving: prefill a group at one insertion layer, then decode a running batch.

:class:`RunningBatch` is what a continuous-batching scheduler drives::

    rb = RunningBatch(vlm)
    logits = rb.prefill(ids, input_ids, attention_mask, pixel_values, insert_layer=k)  # (g, V)
    ... pick tokens ...
    logits = rb.step({rid: token, ...})     # (B, V), rows in rb.ids order
    rb.remove(rid)                           # between steps, any time

Requests join (:meth:`prefill`) and leave (:meth:`remove`) between decode steps. A group
is prefilled with the engine's own prefill (one k per group, so the layers below k run on
the short text-only batch), then its cache rows move into a :class:`~deepinsert.frozen_vlm.layers.SlotCache`
where each row keeps its own length per layer (text only below its k, text + image from k
on). Every decode step runs the whole running batch, whatever the rows' k, as one
``(B, 1, D)`` pass; new tokens take position ``n_real + t`` like :meth:`FrozenVLM.generate`,
so a row decodes the same tokens alone or in any batch (up to float summation order).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch

from deepinsert.errors import InputError
from deepinsert.frozen_vlm.engine import FrozenVLM
from deepinsert.frozen_vlm.layers import SlotCache
from deepinsert.frozen_vlm.prepare import prepare


class RunningBatch:
    """The rows being decoded together; one model worker owns it (not thread-safe)."""

    def __init__(self, vlm: FrozenVLM) -> None:
        self.vlm = vlm
        self._parts = vlm._parts
        self.cache = SlotCache(vlm.num_layers, vlm.device, vlm.dtype)
        self.ids: list[Hashable] = []  # row -> request id
        self._pos = torch.zeros(0, dtype=torch.long, device=vlm.device)  # (B,) next position per row
        self._min = float(torch.finfo(vlm.dtype).min)

    def __len__(self) -> int:
        return len(self.ids)

    def kv_bytes(self) -> int:
        """Bytes of KV cache the rows really hold."""
        return self.cache.bytes_in_use()

    @torch.inference_mode()
    def prefill(
        self,
        ids: Sequence[Hashable],
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None,
        insert_layer: int | Sequence[int],
        *,
        image_features: torch.Tensor | None = None,
        **image_inputs: Any,
    ) -> torch.Tensor:
        """Prefill ``g`` left-padded prompts and add them as rows ``ids``.

        Args:
            ids: ``g`` new, distinct request ids.
            input_ids, attention_mask: ``(g, L)`` left padded, image placeholders expanded.
            pixel_values: ``(I, 3, H, W)`` or ``None`` (``insert_layer = N`` needs no image).
            insert_layer: the group's k, or one k per prompt. Only the layers below the
                smallest k run on the short text-only batch, so a scheduler groups by k when
                the compute matters more than one more call.
            image_inputs: the processor's extra outputs (``image_sizes``; ``image_grid_thw``,
                ``mm_token_type_ids``), as in :meth:`FrozenVLM.forward`.

        Returns:
            ``(g, V)`` logits of each prompt's last position (they pick the first new token).
        """
        if len(set(ids)) != len(ids) or set(ids) & set(self.ids):
            raise InputError("request ids must be new and distinct")
        prep = prepare(self._parts, input_ids, pixel_values, attention_mask, insert_layer, image_features,
                       image_inputs)
        if len(ids) != prep.attention_mask.shape[0]:
            raise InputError(f"{len(ids)} ids for {prep.attention_mask.shape[0]} prompts")
        if bool((prep.attention_mask[:, -1] == 0).any()):
            raise InputError("prefill needs left padding (every prompt's last position a real token)")
        if bool((prep.is_image[:, -1] & (prep.k > 0)).any()):
            raise InputError("a prompt ends with an image token; it must end with text")
        cache = self._parts.new_cache()
        h, masks = self.vlm._prefill(prep, cache)
        self.cache.add_rows(cache, masks)
        self.ids.extend(ids)
        self._pos = torch.cat([self._pos, prep.next_position().squeeze(1)])
        return self.vlm._logits(h[:, -1])

    @torch.inference_mode()
    def step(self, tokens: Mapping[Hashable, int]) -> torch.Tensor:
        """Feed each row its last token; ``(B, V)`` logits of the next one, rows in :attr:`ids` order."""
        if not self.ids:
            raise InputError("the running batch is empty")
        missing = [i for i in self.ids if i not in tokens]
        if missing:
            raise InputError(f"no token given for rows {missing}")
        x = torch.tensor([int(tokens[i]) for i in self.ids], dtype=torch.long, device=self.vlm.device)
        h = self._parts.embed_tokens(x.unsqueeze(1))  # (B, 1, D)
        pos = self._pos.unsqueeze(1)  # (B, 1)
        masks = self.cache.begin_step(self._min)
        pe = self._parts.rotary(h, pos)
        for layer in range(self.vlm.num_layers):
            h = self._parts.run_layer(layer, h, masks[layer], pos, pe, self.cache)
        self.cache.end_step()
        self._pos = self._pos + 1
        return self.vlm._logits(h[:, -1])

    @torch.inference_mode()
    def remove(self, rid: Hashable) -> None:
        """Drop request ``rid`` from the batch (its cache memory is reused)."""
        row = self.ids.index(rid)
        last = len(self.ids) - 1
        self.cache.remove_row(row)
        self.ids[row] = self.ids[last]
        self.ids.pop()
        pos = self._pos.clone()
        pos[row] = pos[last]
        self._pos = pos[:last]

    def info(self) -> dict[str, Any]:
        """Sizes for metrics: rows, KV bytes held and allocated."""
        return {"rows": len(self.ids), "kv_bytes": self.cache.bytes_in_use(),
                "kv_bytes_allocated": self.cache.bytes_allocated()}
