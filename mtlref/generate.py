"""generate(): batched greedy or sampled decoding for the decoders (LLaMA, MPT) and for T5.

Decoders: prompts of different lengths are LEFT-padded, so that every row's next token is
read from the last column; the attention mask hides the padding and the model counts
positions over real tokens only. With the KV cache the prompt is run once (prefill) and then
one token per step; use_cache=False recomputes the whole sequence each step (same tokens).
T5: the encoder reads the (right-padded) prompts once; the decoder starts from
decoder_start_token_id and extends all rows together, so it needs no padding.

Returned: only the new tokens of each row, up to and WITHOUT its EOS.
"""
from __future__ import annotations

import torch

from mtlref.models.attention import KVCache


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """logits [B, V] -> the same with every token outside the top-k set and outside the nucleus
    set to -inf. Nucleus (top-p): the smallest set of most likely tokens whose probability
    reaches p, i.e. a token is kept when the tokens ranked above it hold less than p; the most
    likely token is always kept."""
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]   # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        ranked, order = logits.sort(dim=-1, descending=True)                     # (B, V)
        probs = ranked.softmax(dim=-1)
        above = probs.cumsum(dim=-1) - probs                                     # mass ranked above each
        drop = above >= top_p
        drop[:, 0] = False
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    return logits


def next_token(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
               top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] of the last position -> token ids [B]: argmax when temperature == 0, else a
    sample from softmax(filter(logits / temperature))."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _padded(prompts: list[list[int]], pad: int, left: bool, device) -> tuple[torch.Tensor, torch.Tensor]:
    """token lists -> ids, mask [B, L], padded on the left or on the right."""
    L = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), L), pad, dtype=torch.long, device=device)
    mask = torch.zeros(len(prompts), L, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        cols = slice(L - len(p), L) if left else slice(0, len(p))
        ids[b, cols] = torch.tensor(p, dtype=torch.long, device=device)
        mask[b, cols] = 1
    return ids, mask


@torch.inference_mode()
def generate(model, tok, prompt_ids, max_new_tokens: int = 32, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, task_ids=None,
             generator: torch.Generator | None = None, use_cache: bool = True,
             eos_id: int | None = None) -> list[list[int]] | list[int]:
    """prompt_ids: one token list, or a list of them (a batch). Returns the new tokens: one
    list, or one list per prompt. Stops a row at EOS (tok.eos_id unless eos_id is given), and
    the whole batch when every row has stopped or after max_new_tokens. task_ids: an int for
    every row, or one per row. `tok` needs only .eos_id and .pad_id (None: pass eos_id)."""
    if isinstance(prompt_ids, torch.Tensor):
        prompt_ids = prompt_ids.tolist()
    single = len(prompt_ids) > 0 and isinstance(prompt_ids[0], int)
    prompts = [list(prompt_ids)] if single else [list(p) for p in prompt_ids]
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token (for LLaMA, start with tok.bos_id)")
    if temperature < 0 or (top_k is not None and top_k < 1) or (top_p is not None and not 0 < top_p <= 1):
        raise ValueError(f"generate: need temperature >= 0, top_k >= 1, 0 < top_p <= 1; got "
                         f"temperature={temperature}, top_k={top_k}, top_p={top_p}")
    eos = eos_id if eos_id is not None else getattr(tok, "eos_id", None)
    pad = getattr(tok, "pad_id", None)
    pad = pad if pad is not None and pad >= 0 else 0
    device = next(model.parameters()).device
    B = len(prompts)
    if task_ids is not None:
        task_ids = torch.as_tensor(task_ids, dtype=torch.long, device=device)
        if task_ids.numel() not in (1, B):
            raise ValueError(f"generate: task_ids has {task_ids.numel()} entries for {B} prompts; give one per "
                             "prompt or a single int for all")
        task_ids = task_ids.reshape(-1).expand(B).contiguous()
    encoder_decoder = getattr(model, "is_encoder_decoder", False)
    ids, mask = _padded(prompts, pad, left=not encoder_decoder, device=device)
    cache = KVCache() if use_cache else None

    if encoder_decoder:                          # T5: encode once; the decoder sequence grows
        enc = model.encode(ids, attention_mask=mask, task_ids=task_ids)          # (B, S, C)
        seq = torch.full((B, 1), model.config.decoder_start_token_id, dtype=torch.long, device=device)

        def step_logits(seq, fresh):
            return model(input_ids=None, attention_mask=mask, decoder_input_ids=fresh if use_cache else seq,
                         task_ids=task_ids, encoder_out=enc, cache=cache)
    else:                                        # decoder: prompt + new tokens, left-padded
        limit = getattr(model, "max_positions", None)
        if limit is not None and ids.shape[1] + max_new_tokens - 1 > limit:
            raise ValueError(f"generate: a prompt of {ids.shape[1]} tokens + {max_new_tokens} new tokens is "
                             f"longer than the model's {limit} positions; lower max_new_tokens")
        seq = ids

        def step_logits(seq, fresh):
            full_mask = torch.cat([mask, mask.new_ones(B, seq.shape[1] - mask.shape[1])], dim=1)
            return model(fresh if use_cache else seq, attention_mask=full_mask, task_ids=task_ids, cache=cache)

    out: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    fresh = seq                                  # what the cache has not seen yet
    for _ in range(max_new_tokens):
        logits = step_logits(seq, fresh)[:, -1]                                  # (B, V)
        nxt = next_token(logits, temperature, top_k, top_p, generator)           # (B,)
        for b, t in enumerate(nxt.tolist()):
            if not done[b]:
                done[b] = t == eos
                if not done[b]:
                    out[b].append(t)
        if all(done):
            break
        fresh = nxt[:, None]
        seq = torch.cat([seq, fresh], dim=1)
    return out[0] if single else out
