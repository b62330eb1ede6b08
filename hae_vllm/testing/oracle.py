"""The correctness oracle (DESIGN.md §2): HuggingFace generation with KV entries removed.

For any eviction set, vLLM with eviction must reproduce what HuggingFace produces when the
same positions are deleted from every layer of its ``DynamicCache`` right after prefill, and
decoding continues at the true (logical) positions.  This module runs that reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass
class OracleResult:
    prompt_token_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]  # log-prob of each generated token
    kv_len_after_eviction: int


class HFOracle:
    """Greedy HF generation for a tiny VLM checkpoint, with optional KV eviction after prefill."""

    def __init__(self, model_path: str, dtype: torch.dtype = torch.float32):
        from transformers import AutoConfig, AutoProcessor

        cfg = AutoConfig.from_pretrained(model_path)
        arch = cfg.architectures[0]
        import transformers

        cls = getattr(transformers, arch)
        self.model = cls.from_pretrained(model_path, dtype=dtype, attn_implementation="eager").eval()
        self.processor = AutoProcessor.from_pretrained(model_path)
        self.is_mrope = "Qwen2VL" in arch or "Qwen2_5_VL" in arch

    def inputs(self, prompt: str, images: Sequence) -> dict:
        kw = {"text": [prompt], "return_tensors": "pt"}
        if images:
            kw["images"] = list(images)
        return dict(self.processor(**kw))

    @torch.no_grad()
    def generate(
        self,
        prompt: str,
        images: Sequence,
        max_new_tokens: int,
        evicted_positions: Sequence[int] = (),
        events: Sequence[tuple[int, Sequence[int]]] | None = None,
    ) -> OracleResult:
        """Greedy generation of ``max_new_tokens``.

        ``evicted_positions`` are removed from the cache right after the prompt's prefill.
        ``events`` generalises this to what an engine with preemption does: each
        ``(num_tokens, positions)`` means "the first ``num_tokens`` tokens (prompt + outputs so
        far) were (re)computed from scratch, then ``positions`` were evicted".  Between events
        decoding continues at logical positions.
        """
        inputs = self.inputs(prompt, images)
        prompt_ids = inputs["input_ids"][0].tolist()
        L = len(prompt_ids)
        plan = {L: list(evicted_positions)}
        if events is not None:
            plan = {int(n): list(pos) for n, pos in events}
        tokens: list[int] = []
        logprobs: list[float] = []
        cache, logits = None, None
        while len(tokens) < max_new_tokens:
            n = L + len(tokens)  # tokens whose KV exists once this step's input is fed
            if cache is None or n in plan:
                cache, logits = self._prefill(inputs, tokens)
                if plan.get(n):
                    keep = torch.ones(n, dtype=torch.bool)
                    keep[torch.as_tensor(plan[n], dtype=torch.long)] = False
                    remove_positions(cache, keep)
                kv_len = cache.get_seq_length()
            tok = _greedy(logits, tokens, logprobs)
            if len(tokens) == max_new_tokens:
                break
            if (L + len(tokens)) in plan:
                continue  # recomputed from scratch at the top of the loop
            logits = self._decode(cache, tok, L + len(tokens) - 1)
        return OracleResult(prompt_ids, tokens, logprobs, kv_len)

    def _prefill(self, inputs: dict, generated: list[int]):
        kw = dict(inputs)
        if generated:
            extra = torch.tensor([generated], dtype=kw["input_ids"].dtype)
            kw["input_ids"] = torch.cat([kw["input_ids"], extra], dim=1)
            if "attention_mask" in kw:
                kw["attention_mask"] = torch.ones_like(kw["input_ids"])
            if "mm_token_type_ids" in kw:
                kw["mm_token_type_ids"] = torch.cat(
                    [kw["mm_token_type_ids"], torch.zeros_like(extra)], dim=1
                )
        if self.is_mrope:
            self.model.model.rope_deltas = None  # HF caches it on the module across calls
        out = self.model(**kw, use_cache=True)
        return out.past_key_values, out.logits[0, -1].float()

    def _decode(self, cache, tok: int, pos: int, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Feed ``tok`` at logical position ``pos``; return the next logits.  Without a mask
        every cached entry is attended."""
        kw = dict(
            input_ids=torch.tensor([[tok]]),
            past_key_values=cache,
            use_cache=True,
            cache_position=torch.tensor([pos]),
        )
        if self.is_mrope:
            # Text after the images continues M-RoPE from the model's rope delta.
            delta = self.model.model.rope_deltas
            p = torch.tensor([[pos]]) + (delta if delta is not None else 0)
            kw["position_ids"] = p.view(1, 1, 1).expand(3, 1, 1)
        else:
            kw["position_ids"] = torch.tensor([[pos]])
        if attention_mask is None:
            attention_mask = torch.ones(1, cache.get_seq_length() + 1, dtype=torch.long)
        kw["attention_mask"] = attention_mask
        out = self.model(**kw)
        return out.logits[0, -1].float()


class MaskedReplay:
    """Replays an engine's eviction trace on a full HF cache with an attention mask.

    Evicting, parking and restoring only change which cached positions attention may read, so
    the reference keeps every entry and masks the ones vLLM does not read: masked keys get no
    attention weight, exactly as if removed.  Events are ``(num_tokens, kind, positions)``,
    applied before the token at position ``num_tokens`` is fed:

    * ``prefill``: the first ``num_tokens`` tokens were (re)computed, then ``positions`` evicted;
    * ``park``: ``positions`` leave the attention set (recycle bin);
    * ``restore``: ``positions`` come back.
    """

    def __init__(self, oracle: HFOracle):
        self.o = oracle

    @torch.no_grad()
    def generate(self, prompt: str, images: Sequence, max_new_tokens: int, events) -> OracleResult:
        o = self.o
        inputs = o.inputs(prompt, images)
        prompt_ids = inputs["input_ids"][0].tolist()
        L = len(prompt_ids)
        by_n: dict[int, list] = {}
        for n, kind, pos in events:
            by_n.setdefault(int(n), []).append((kind, list(pos)))
        live = torch.ones(L + max_new_tokens, dtype=torch.bool)
        cache, logits = o._prefill(inputs, [])
        tokens: list[int] = []
        logprobs: list[float] = []
        while True:
            tok = _greedy(logits, tokens, logprobs)
            if len(tokens) == max_new_tokens:
                break
            p = L + len(tokens) - 1  # position of the token fed next
            for kind, pos in by_n.get(p, ()):
                idx = torch.as_tensor(pos, dtype=torch.long)
                if kind == "prefill":
                    live[:p] = True
                    live[idx] = False
                elif kind == "park":
                    live[idx] = False
                elif kind == "restore":
                    live[idx] = True
                else:
                    raise ValueError(f"unknown event kind {kind!r}")
            # DynamicCache grows in place, so the same object serves every step.
            logits = o._decode(cache, tok, p, attention_mask=live[: p + 1].long()[None, :])
        return OracleResult(prompt_ids, tokens, logprobs, int(live[: L + len(tokens) - 1].sum()))


def events_from_trace(records) -> list[tuple[int, str, list[int]]]:
    """(num_tokens, kind, positions) from a request's trace records (prefill and decode)."""
    out = []
    for r in records:
        kind = r.get("kind", "prefill")
        pos = r["evicted_positions"] if kind == "prefill" else r["positions"]
        out.append((r["num_tokens"], kind, pos))
    return out


def _greedy(logits: torch.Tensor, tokens: list[int], logprobs: list[float]) -> int:
    """Append the argmax token and its log-probability."""
    tok = int(torch.argmax(logits))
    tokens.append(tok)
    logprobs.append(float(torch.log_softmax(logits, dim=-1)[tok]))
    return tok


def remove_positions(cache, keep: torch.Tensor) -> None:
    """Delete the positions where ``keep`` is False from every layer of a DynamicCache."""
    for layer in cache.layers:
        layer.keys = layer.keys[:, :, keep].contiguous()
        layer.values = layer.values[:, :, keep].contiguous()
