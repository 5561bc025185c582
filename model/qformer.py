"""MA-LMM's memory-augmented Q-Former, built from transformers' InstructBLIP Q-Former modules.

The modules here own no per-stream tensors. Each call gets the memories it reads and writes:

- a `VisualContext`: the visual memory bank plus the current frame, flattened to [B, K, C_vis], which
  every cross-attention layer attends to (keys/values computed once per context and layer, so several
  questions stepping over the same frame share them); or the keys/values already projected
  (`MemoryQFormer.project_visual`), which the streaming visual bank keeps per entry and merges with
  the entries' weights (a Linear layer commutes with a convex combination), so a step projects its
  new frame only;
- one `LayerMemory` per Q-Former layer: the query memory bank of that layer's self-attention. It stores
  the layer's input hidden states of this step (queries and instruction tokens, [B, Q+L, C]) and hands
  back the keys/values source: the bank's entries plus the current hidden states.

Parameter names mirror `InstructBlipQFormerModel` (`embeddings.*`, `encoder.layer.{i}.attention.attention.query.*`
...), so a state dict of this module is a transformers Q-Former state dict.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.instructblip.modeling_instructblip import (
    InstructBlipQFormerAttention,
    InstructBlipQFormerLayer,
    InstructBlipQFormerModel,
)


class LayerMemory(Protocol):
    """The query memory bank of one Q-Former self-attention layer, for one call."""

    def exchange(self, hidden: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Store this step's layer input and return what self-attention reads keys/values from.

        hidden: [B, L, C] the layer's input hidden states (queries then instruction tokens);
        mask: [B, L] bool (True = real token) or None when all are real.
        Returns (source [B, K, C], source_mask [B, K] bool or None): the stored entries (<= M past
        steps, compressed) and the current hidden states, in any order.
        """
        ...


def _flatten(entries: torch.Tensor, valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """entries [B, S, N, C], valid [B, S, N] or None -> [B, S*N, C], [B, S*N] or None."""
    B, S, N, C = entries.shape
    return entries.reshape(B, S * N, C), None if valid is None else valid.reshape(B, S * N)


def _cat_masks(parts: list[tuple[int, torch.Tensor | None]], batch: int, device) -> torch.Tensor | None:
    """Concatenate per-part masks ([B, n] or None = all real) along tokens; None when all are real."""
    if all(m is None for _, m in parts):
        return None
    full = [torch.ones(batch, n, dtype=torch.bool, device=device) if m is None else m.bool() for n, m in parts]
    return torch.cat(full, dim=1)


@dataclass
class VisualContext:
    """What the cross-attention layers attend to: the visual bank and the current frame, flattened.

    states: [U, K, C_vis] for U distinct streams (K = entries x tokens per frame), or None when
    `projected` is given: per cross-attention layer, its keys and values [U, K, C_q] already projected
    (`MemoryQFormer.split_visual`); mask: [U, K] bool or None; index: [B] long picking a stream per
    Q-Former batch row (None: row b uses stream b). Keys and values are computed once per layer and
    reused by every pass over this context.
    """

    states: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    index: torch.Tensor | None = None
    projected: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None
    _kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if (self.states is None) == (self.projected is None):
            raise ValueError("a VisualContext takes either states or projected keys/values")

    def key_value(self, layer: int, key: nn.Linear, value: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected keys and values [B, K, C_q] for a cross-attention layer (cached unless training)."""
        if layer in self._kv:
            return self._kv[layer]
        if self.projected is not None:
            k, v = (t.to(key.weight.dtype) for t in self.projected[layer])
        else:
            states = self.states.to(key.weight.dtype)
            k, v = key(states), value(states)
        if self.index is not None:
            k, v = (t.expand(len(self.index), -1, -1) if t.shape[0] == 1 else t.index_select(0, self.index)
                    for t in (k, v))  # one stream read by every row: a view, no copy per row
        if not torch.is_grad_enabled():
            self._kv[layer] = (k, v)
        return k, v

    def rows_mask(self) -> torch.Tensor | None:
        if self.mask is None or self.index is None:
            return self.mask
        if self.mask.shape[0] == 1:
            return self.mask.expand(len(self.index), -1)
        return self.mask.index_select(0, self.index)


def _attend(
    module: nn.Module,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None,
    heads: int,
    dropout: float,
) -> torch.Tensor:
    """Multi-head attention. q [B, Lq, C], k/v [B, K, C], key_mask [B, K] bool or None -> [B, Lq, C]."""
    B, Lq, C = q.shape
    d = C // heads
    qh = q.view(B, Lq, heads, d).transpose(1, 2)  # (B, h, Lq, d)
    kh = k.view(B, -1, heads, d).transpose(1, 2)  # (B, h, K, d)
    vh = v.view(B, -1, heads, d).transpose(1, 2)
    attn_mask = None if key_mask is None else key_mask[:, None, None, :]
    out = F.scaled_dot_product_attention(
        qh, kh, vh, attn_mask=attn_mask, dropout_p=dropout if module.training else 0.0
    )
    return out.transpose(1, 2).reshape(B, Lq, C)


class MemorySelfAttention(nn.Module):
    """Q-Former self-attention whose keys/values also come from the layer's query memory bank.

    Reuses the `query`, `key`, `value` Linear modules and the `output` block (dense, dropout,
    LayerNorm with residual) of a transformers `InstructBlipQFormerAttention`; the names stay the same.
    """

    def __init__(self, hf_attention: InstructBlipQFormerAttention) -> None:
        super().__init__()
        self.attention = hf_attention.attention  # query/key/value Linear layers
        self.output = hf_attention.output
        self.heads = self.attention.num_attention_heads
        self.dropout = self.attention.attention_dropout

    def forward(
        self, hidden: torch.Tensor, mask: torch.Tensor | None, memory: LayerMemory | None
    ) -> torch.Tensor:
        """hidden [B, L, C] (queries then text), mask [B, L] bool or None -> [B, L, C]."""
        if memory is None:
            source, source_mask = hidden, mask
        else:
            source, source_mask = memory.exchange(hidden, mask)
            source = source.to(hidden.dtype)
        a = self.attention
        context = _attend(self, a.query(hidden), a.key(source), a.value(source), source_mask, self.heads, self.dropout)
        return self.output(context, hidden)


class VisualCrossAttention(nn.Module):
    """Cross-attention of the query tokens to a `VisualContext` (a transformers Q-Former cross-attention)."""

    def __init__(self, hf_attention: InstructBlipQFormerAttention, layer: int) -> None:
        super().__init__()
        self.attention = hf_attention.attention
        self.output = hf_attention.output
        self.layer = layer
        self.heads = self.attention.num_attention_heads
        self.dropout = self.attention.attention_dropout

    def forward(self, queries: torch.Tensor, visual: VisualContext) -> torch.Tensor:
        """queries [B, Q, C_q] -> [B, Q, C_q]."""
        a = self.attention
        k, v = visual.key_value(self.layer, a.key, a.value)
        context = _attend(self, a.query(queries), k, v, visual.rows_mask(), self.heads, self.dropout)
        return self.output(context, queries)


class MemoryQFormerLayer(nn.Module):
    """One Q-Former layer: memory self-attention, cross-attention (every other layer), feed-forwards."""

    def __init__(self, hf_layer: InstructBlipQFormerLayer) -> None:
        super().__init__()
        self.attention = MemorySelfAttention(hf_layer.attention)
        self.has_cross_attention = hf_layer.has_cross_attention
        if self.has_cross_attention:
            self.crossattention = VisualCrossAttention(hf_layer.crossattention, hf_layer.layer_idx)
        self.intermediate = hf_layer.intermediate
        self.output = hf_layer.output
        self.intermediate_query = hf_layer.intermediate_query
        self.output_query = hf_layer.output_query

    def forward(
        self,
        hidden: torch.Tensor,
        mask: torch.Tensor | None,
        num_queries: int,
        visual: VisualContext,
        memory: LayerMemory | None,
    ) -> torch.Tensor:
        """hidden [B, Q+L, C] -> [B, Q+L, C]; the first num_queries tokens are the learned queries."""
        attended = self.attention(hidden, mask, memory)
        queries = attended[:, :num_queries]
        if self.has_cross_attention:
            queries = self.crossattention(queries, visual)
        out = self.output_query(self.intermediate_query(queries), queries)
        if attended.shape[1] > num_queries:
            text = attended[:, num_queries:]
            out = torch.cat([out, self.output(self.intermediate(text), text)], dim=1)
        return out


class _Encoder(nn.Module):
    def __init__(self, layers: list[MemoryQFormerLayer]) -> None:
        super().__init__()
        self.layer = nn.ModuleList(layers)


class MemoryQFormer(nn.Module):
    """InstructBLIP's Q-Former with MA-LMM's memory banks, reusing a transformers Q-Former's modules."""

    def __init__(self, hf_qformer: InstructBlipQFormerModel) -> None:
        super().__init__()
        self.config = hf_qformer.config
        self.embeddings = hf_qformer.embeddings
        self.encoder = _Encoder([MemoryQFormerLayer(layer) for layer in hf_qformer.encoder.layer])

    @property
    def num_layers(self) -> int:
        return len(self.encoder.layer)

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def cross_attention_layers(self) -> list[int]:
        """Indices of the layers with cross-attention to the visual context."""
        return [i for i, layer in enumerate(self.encoder.layer) if layer.has_cross_attention]

    @property
    def visual_kv_channels(self) -> int:
        """Channels per visual token of `project_visual`: keys and values of every cross-attention layer."""
        return 2 * self.hidden_size * len(self.cross_attention_layers)

    def project_visual(self, states: torch.Tensor) -> torch.Tensor:
        """Cross-attention keys and values of visual tokens: states [..., C_vis] -> [..., visual_kv_channels].

        Layer by layer (in `cross_attention_layers` order), keys then values, C_q channels each; affine
        in the states, so it commutes with the memory bank's count-weighted merge.
        """
        parts = []
        for i in self.cross_attention_layers:
            a = self.encoder.layer[i].crossattention.attention
            x = states.to(a.key.weight.dtype)
            parts += [a.key(x), a.value(x)]
        return torch.cat(parts, dim=-1)

    def split_visual(self, projected: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """projected [U, K, visual_kv_channels] -> {layer: (keys, values) [U, K, C_q]} (views, no copy)."""
        C = self.hidden_size
        if projected.shape[-1] != self.visual_kv_channels:
            raise ValueError(f"projected visual tokens need {self.visual_kv_channels} channels, got {projected.shape[-1]}")
        return {
            layer: (projected[..., 2 * j * C : (2 * j + 1) * C], projected[..., (2 * j + 1) * C : (2 * j + 2) * C])
            for j, layer in enumerate(self.cross_attention_layers)
        }

    def forward(
        self,
        query_tokens: torch.Tensor,
        input_ids: torch.Tensor,
        text_mask: torch.Tensor | None,
        visual: VisualContext,
        memories: list[LayerMemory] | None = None,
    ) -> torch.Tensor:
        """One Q-Former step.

        query_tokens: [B, Q, C_q]; input_ids: [B, L] instruction tokens; text_mask: [B, L] (1 = real
        token) or None; memories: one LayerMemory per layer, or None (no query memory).
        Returns the last hidden states [B, Q+L, C_q] (the first Q rows are the query outputs).
        """
        num_queries = query_tokens.shape[1]
        hidden = self.embeddings(input_ids=input_ids, query_embeds=query_tokens)
        mask = None
        if text_mask is not None and not bool(text_mask.bool().all()):
            ones = torch.ones(hidden.shape[0], num_queries, dtype=torch.bool, device=hidden.device)
            mask = torch.cat([ones, text_mask.bool()], dim=1)
        if memories is not None and len(memories) != self.num_layers:
            raise ValueError(f"need one query memory per Q-Former layer ({self.num_layers}), got {len(memories)}")
        for i, layer in enumerate(self.encoder.layer):
            hidden = layer(hidden, mask, num_queries, visual, None if memories is None else memories[i])
        return hidden


# ---------------------------------------------------------------- LayerMemory implementations


class ConcatMemory:
    """MA-LMM's clip-time query bank as plain tensors: concatenate, attend, compress when over length.

    Used by the offline clip pass (training keeps gradients through the current step; stored entries
    are detached, as in MA-LMM, unless detach=False). entries: [B, T, N, C], sizes: [B, T, N].
    """

    def __init__(self, capacity: int, detach: bool = True) -> None:
        self.capacity = capacity
        self.detach = detach
        self.entries: torch.Tensor | None = None
        self.sizes: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None  # [B, N] bool: the instruction's padding, the same every step

    def exchange(self, hidden, mask):
        from mixmalmm.kernels import memory_bank_compress

        B, N, _ = hidden.shape
        if self.entries is None:
            source, source_mask = hidden, mask
        else:
            past, _ = _flatten(self.entries, None)
            source = torch.cat([past.to(hidden.dtype), hidden], dim=1)
            reps = self.entries.shape[1]
            source_mask = None if mask is None else torch.cat([mask] * (reps + 1), dim=1)
        new = (hidden.detach() if self.detach else hidden)[:, None]
        ones = torch.ones(B, 1, N, dtype=torch.int32, device=hidden.device)
        if self.entries is None:
            self.entries, self.sizes = new, ones
        else:
            self.entries = torch.cat([self.entries, new], dim=1)
            self.sizes = torch.cat([self.sizes, ones], dim=1)
        if self.entries.shape[1] > self.capacity:
            self.entries, self.sizes = memory_bank_compress(self.entries, self.sizes)
        return source, source_mask


class ReadOnlyMemory:
    """Past entries that are read but never written: the ad-hoc question pass.

    entries: [B, S, N, C] (the default instruction's bank, without its newest entry); valid: [B, S, N]
    or None. The current hidden states (any token count) are attended beside them.
    """

    def __init__(self, entries: torch.Tensor | None, valid: torch.Tensor | None = None) -> None:
        self.entries = entries
        self.valid = valid

    def exchange(self, hidden, mask):
        if self.entries is None or self.entries.shape[1] == 0:
            return hidden, mask
        past, past_mask = _flatten(self.entries, self.valid)
        source = torch.cat([past.to(hidden.dtype), hidden], dim=1)
        source_mask = _cat_masks([(past.shape[1], past_mask), (hidden.shape[1], mask)], hidden.shape[0], hidden.device)
        return source, source_mask


class BankMemory:
    """Streaming query memory: one `StreamingMemoryBank` (batch 1) per Q-Former batch row.

    exchange appends row b's hidden states to bank b (which first merges when it holds M+1 entries)
    and attends over each bank's view, which then holds <= M past entries plus the current one: exactly
    MA-LMM's [bank, current]. All banks must hold the same count (rows are grouped that way).
    """

    def __init__(self, banks: list, time: list[float]) -> None:
        self.banks = banks
        self.time = time

    def exchange(self, hidden, mask):
        if mask is not None:
            raise ValueError("streaming query banks take unpadded instructions (one per row)")
        views = []
        for b, bank in enumerate(self.banks):
            bank.append(hidden[b : b + 1], self.time[b])
            entries, valid = bank.view()
            if valid is not None:
                raise RuntimeError("a streaming bank's view holds free slots right after append")
            views.append(entries)
        if len({v.shape[1] for v in views}) != 1:
            raise ValueError("query banks stepped together must hold the same number of entries")
        source, _ = _flatten(torch.cat(views, dim=0), None)
        return source, None
