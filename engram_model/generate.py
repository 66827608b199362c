"""Token-by-token decoding of an EngramLM with caches, running the model's own submodules.

What a step needs from the past, per sequence of the batch:

* attention: every block's keys and values (``k``, ``v``: (B, H, t, hd));
* N-gram hashing: the last ``max_ngram - 1`` compressed ids (``ngram``), left-padded with the
  compressed pad id exactly as ``NgramHasher`` pads (so the first positions hash the same);
* the Engram short conv (kernel 4, dilation ``max_ngram``): its last ``(kernel-1)*dilation``
  normed inputs per Engram layer (``conv[L]``: (B, pad, M*D), zeros before the first token,
  as the full forward's zero padding);
* the position: positions are learned up to ``max_seq_len``; a step past it is an error.

``step`` compresses and hashes the new tokens and issues ``prefetch`` for every Engram layer
*before* running any block (the rows are fetched behind the earlier blocks' compute), then
waits only at each Engram layer. ``prefill`` is a step from the empty state; both return
logits for the tokens they were given. ``generate`` is greedy or sampled decoding on top.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from engram_store.errors import EngramStoreError, InvalidRowIdsError


@dataclass
class DecodeState:
    """Caches of one batch of sequences; ``pos`` tokens have been consumed."""

    pos: int
    k: list[torch.Tensor]  # per block: (B, H, pos, hd)
    v: list[torch.Tensor]
    ngram: torch.Tensor | None = None  # (B, max_ngram-1) last compressed ids, on the CPU
    conv: dict[int, torch.Tensor] = field(default_factory=dict)  # per Engram layer: (B, pad, M*D)


def _device(model) -> torch.device:
    return model.tok_emb.weight.device


def init_state(model, batch: int) -> DecodeState:
    """The state before any token: empty caches, the N-gram context all pad, conv inputs zero."""
    cfg, dev, dtype = model.config, _device(model), model.tok_emb.weight.dtype
    hd = cfg.d_model // cfg.n_heads
    empty = [torch.empty(batch, cfg.n_heads, 0, hd, device=dev, dtype=dtype) for _ in model.blocks]
    state = DecodeState(0, empty, [t.clone() for t in empty])
    if model.hash_config is not None:
        hc = model.hash_config
        state.ngram = torch.full((batch, hc.max_ngram - 1), hc.pad_id, dtype=torch.int64)
        for L in cfg.engram_layers:
            conv = model.engrams[str(L)].short_conv
            pad = (conv.kernel_size - 1) * conv.dilation
            state.conv[L] = torch.zeros(batch, pad, conv.weight.shape[0], device=dev, dtype=dtype)
    return state


def _check_ids(model, state: DecodeState, ids: torch.Tensor) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise InvalidRowIdsError(f"token ids must be a LongTensor [B, T], got {getattr(ids, 'shape', type(ids))}")
    B, T = ids.shape
    if B != state.k[0].shape[0]:
        raise InvalidRowIdsError(f"the state holds {state.k[0].shape[0]} sequences, got ids for {B}")
    if T < 1:
        raise InvalidRowIdsError("a step needs at least one token")
    limit = model.config.max_seq_len
    if state.pos + T > limit:
        raise EngramStoreError(
            f"position {state.pos + T - 1} is past the model's max_seq_len {limit} (positions are learned): "
            f"start a new sequence or keep prompt + new tokens <= {limit}"
        )
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise InvalidRowIdsError(f"token ids must be integers, got {ids.dtype}")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= model.config.vocab_size:
        raise InvalidRowIdsError(f"token id {lo if lo < 0 else hi} is outside the vocabulary [0, {model.config.vocab_size})")
    return ids.to(torch.int64)


def _prefetch(model, state: DecodeState, ids_cpu: torch.Tensor) -> dict:
    """Hash the new tokens with their N-gram context and prefetch every Engram layer's rows."""
    if not model._memory:
        return {}
    n_ctx = state.ngram.shape[1]
    comp = torch.as_tensor(model.compression.compress(ids_cpu))  # (B, T) compressed ids
    window = torch.cat([state.ngram, comp], dim=1)  # (B, n_ctx + T)
    rows = model.hasher.row_ids(window)  # per layer (B, n_ctx + T, K); the first n_ctx are context
    pending = {L: model._memory[L].prefetch(rows[L][:, n_ctx:]) for L in model.config.engram_layers}
    state.ngram = window[:, -n_ctx:].clone()
    return pending


def _attention(attn, x: torch.Tensor, state: DecodeState, i: int) -> torch.Tensor:
    B, T, D = x.shape
    H = attn.n_heads
    q, k, v = attn.qkv(x).view(B, T, 3, H, D // H).permute(2, 0, 3, 1, 4)  # (B, H, T, hd)
    past = state.k[i].shape[2]
    k = torch.cat([state.k[i], k], dim=2)  # (B, H, past + T, hd)
    v = torch.cat([state.v[i], v], dim=2)
    state.k[i], state.v[i] = k, v
    if past == 0:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    elif T == 1:
        y = F.scaled_dot_product_attention(q, k, v)  # one query sees every key
    else:
        allowed = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    return attn.proj(y.transpose(1, 2).reshape(B, T, D))


def _short_conv(conv, x: torch.Tensor, state: DecodeState, L: int) -> torch.Tensor:
    """``ShortConv.forward`` on new positions only, with the cached normed inputs as left context."""
    B, T, M, D = x.shape
    normed = torch.cat([conv.norms[m](x[:, :, m, :]) for m in range(M)], dim=-1)  # (B, T, M*D)
    window = torch.cat([state.conv[L], normed], dim=1)  # (B, pad + T, M*D)
    state.conv[L] = window[:, window.shape[1] - state.conv[L].shape[1]:].clone()
    y = F.conv1d(window.transpose(1, 2), conv.weight, dilation=conv.dilation, groups=M * D)  # (B, M*D, T)
    return F.silu(y).transpose(1, 2).reshape(B, T, M, D)


def _engram(engram, hidden: torch.Tensor, emb: torch.Tensor, state: DecodeState, L: int) -> torch.Tensor:
    """``Engram.forward`` with the short conv's state; hidden (B, T, M, D), emb (B, T, K, hd)."""
    if emb.dim() == 4:
        emb = emb.flatten(start_dim=-2)
    emb = emb.to(hidden.dtype)
    value = engram.gates(hidden, emb) * engram.value_proj(emb).unsqueeze(2)  # (B, T, M, D)
    return value + _short_conv(engram.short_conv, value, state, L)


@torch.no_grad()
def step(model, state: DecodeState, next_ids: torch.Tensor) -> torch.Tensor:
    """Consume ``next_ids`` (B, T) (usually T = 1), update ``state``; logits (B, T, vocab)."""
    ids_cpu = _check_ids(model, state, next_ids.cpu() if isinstance(next_ids, torch.Tensor) else next_ids)
    pending = _prefetch(model, state, ids_cpu)  # as soon as the tokens are known, before any block
    dev = _device(model)
    ids = ids_cpu.to(dev, non_blocking=True)
    T = ids.shape[1]
    pos = torch.arange(state.pos, state.pos + T, device=dev)
    h = model.tok_emb(ids) + model.pos_emb(pos)  # (B, T, D)
    for i, block in enumerate(model.blocks):
        if i in pending:
            rows = pending.pop(i).wait().to(h.device)  # (B, T, K, head_dim)
            h = h + _engram(model.engrams[str(i)], h.unsqueeze(2), rows, state, i).squeeze(2)
        h = h + _attention(block.attn, block.norm1(h), state, i)
        h = h + block.mlp(block.norm2(h))
    state.pos += T
    return model.head(model.norm_f(h))


def prefill(model, ids: torch.Tensor) -> tuple[DecodeState, torch.Tensor]:
    """Run the prompt ``ids`` (B, T) from the empty state: ``(state, logits (B, T, vocab))``."""
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise InvalidRowIdsError(f"prompt ids must be a LongTensor [B, T], got {getattr(ids, 'shape', type(ids))}")
    state = init_state(model, ids.shape[0])
    return state, step(model, state, ids)


@torch.no_grad()
def generate(model, prompt_ids: torch.Tensor, max_new_tokens: int, greedy: bool = True, temperature: float = 1.0,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Prompt (B, P) -> (B, P + max_new_tokens): greedy (argmax) or sampled at ``temperature``.

    Each new token is fed to ``step`` as soon as it is chosen, which prefetches its rows for every
    Engram layer before running the blocks. Needs ``P + max_new_tokens - 1 <= max_seq_len``.
    """
    if max_new_tokens < 0:
        raise EngramStoreError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    P = prompt_ids.shape[-1]
    limit = model.config.max_seq_len
    if P + max_new_tokens - 1 > limit:
        raise EngramStoreError(
            f"prompt of {P} tokens + {max_new_tokens} new tokens needs {P + max_new_tokens - 1} positions, "
            f"the model has {limit} (max_seq_len): shorten the prompt or generate fewer tokens"
        )
    if max_new_tokens == 0:
        return prompt_ids
    if not greedy and not (temperature > 0 and math.isfinite(temperature)):
        raise EngramStoreError(f"temperature must be > 0, got {temperature}")
    state, logits = prefill(model, prompt_ids)
    out = [prompt_ids.cpu()]
    for n in range(max_new_tokens):
        last = logits[:, -1].float()  # (B, vocab)
        if greedy:
            nxt = last.argmax(dim=-1, keepdim=True)
        else:
            probs = torch.softmax(last / temperature, dim=-1)
            nxt = torch.multinomial(probs.cpu(), 1, generator=generator)
        nxt = nxt.cpu()
        out.append(nxt)
        if n + 1 < max_new_tokens:
            logits = step(model, state, nxt)
    return torch.cat(out, dim=1)
