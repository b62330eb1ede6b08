"""The correctness oracle (DESIGN.md §2): HuggingFace generation with KV entries removed.

For any eviction set, vLLM with eviction must reproduce what HuggingFace produces when the
same positions are deleted from every layer of its ``DynamicCache`` right after prefill, and
decoding continues at the true (logical) positions.  This module runs that reference.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Sequence

import torch


@dataclass
class OracleResult:
    prompt_token_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]  # log-prob of each generated token
    kv_len_after_eviction: int
    # Each token's log-prob minus the best other token's: the lead of the oracle's choice
    # (>= 0), or, for a token the oracle was made to follow, how far it trails (< 0).  Within
    # a dtype's rounding noise another implementation may legitimately pick the other token.
    margins: list[float] = field(default_factory=list)


def _reference_text_positions(inner) -> None:
    """Text after an image or video continues at the largest M-RoPE position before it + 1, as
    the Qwen2-VL reference and vLLM compute it (``vllm/model_executor/models/qwen2_vl.py``:
    ``st_idx = llm_pos_ids_list[-1].max() + 1``).  transformers 5.x's ``get_rope_index``
    continues at ``max(h, w) // merge`` past the block's start instead, leaving out its
    temporal extent: for a video with more temporal patches than spatial ones (more than 16
    frames at 224 pixels) the text after it reuses temporal positions, and HF's generation
    disagrees with vLLM's with no eviction at all.  Wraps ``inner.get_rope_index``."""
    original = inner.get_rope_index

    def get_rope_index(input_ids, mm_token_type_ids, *args, **kwargs):
        pos, _ = original(input_ids, mm_token_type_ids, *args, **kwargs)
        mask = kwargs.get("attention_mask", args[2] if len(args) > 2 else None)
        if mask is not None and not bool(mask.all()):
            raise NotImplementedError("the oracle's position fix-up assumes no padding")
        pos = pos.clone()
        deltas = []
        for b in range(pos.shape[1]):
            start = 0
            groups = itertools.groupby(enumerate(mm_token_type_ids[b].tolist()), key=lambda x: x[1])
            for kind, group in groups:
                idx = [i for i, _ in group]
                lo, hi = idx[0], idx[-1] + 1
                if kind == 0:  # text: consecutive positions from ``start``
                    pos[:, b, lo:hi] = torch.arange(hi - lo, device=pos.device) + start
                else:  # an image or video: its own (t, h, w) grid, shifted to begin at ``start``
                    pos[:, b, lo:hi] += start - int(pos[:, b, lo:hi].min())
                start = int(pos[:, b, lo:hi].max()) + 1
            deltas.append(start - pos.shape[2])
        return pos, torch.tensor(deltas, device=pos.device).unsqueeze(1)

    get_rope_index.__wrapped__ = original
    inner.get_rope_index = get_rope_index


class HFOracle:
    """Greedy HF generation for a tiny VLM checkpoint, with optional KV eviction after prefill."""

    def __init__(self, model_path: str, dtype: torch.dtype | str = torch.float32,
                 device: str | torch.device = "cpu"):
        from transformers import AutoConfig, AutoProcessor

        cfg = AutoConfig.from_pretrained(model_path)
        arch = cfg.architectures[0]
        import transformers

        cls = getattr(transformers, arch)
        self.dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        self.device = torch.device(device)
        self.model = cls.from_pretrained(model_path, dtype=self.dtype, attn_implementation="eager")
        self.model = self.model.to(self.device).eval()
        self.processor = AutoProcessor.from_pretrained(model_path)
        self.is_mrope = "Qwen2VL" in arch or "Qwen2_5_VL" in arch
        if self.is_mrope:
            _reference_text_positions(self.model.model)

    def inputs(self, prompt: str, images: Sequence) -> dict:
        """Processor outputs for ``prompt`` and its media: PIL images, and videos as
        ``[frames, H, W, 3]`` uint8 arrays (the form vLLM takes offline), in prompt order
        within each kind."""
        kw = {"text": [prompt], "return_tensors": "pt"}
        videos = [m for m in images if getattr(m, "ndim", 0) == 4]
        images = [m for m in images if getattr(m, "ndim", 0) != 4]
        if images:
            kw["images"] = list(images)
        if videos:
            kw["videos"] = videos
        return {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in self.processor(**kw).items()}

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
        margins: list[float] = []
        cache, logits = None, None
        while len(tokens) < max_new_tokens:
            n = L + len(tokens)  # tokens whose KV exists once this step's input is fed
            if cache is None or n in plan:
                cache, logits = self._prefill(inputs, tokens)
                if plan.get(n):
                    keep = torch.ones(n, dtype=torch.bool, device=self.device)
                    keep[torch.as_tensor(plan[n], dtype=torch.long, device=self.device)] = False
                    remove_positions(cache, keep)
                kv_len = cache.get_seq_length()
            tok = _greedy(logits, tokens, logprobs, margins)
            if len(tokens) == max_new_tokens:
                break
            if (L + len(tokens)) in plan:
                continue  # recomputed from scratch at the top of the loop
            logits = self._decode(cache, tok, L + len(tokens) - 1)
        return OracleResult(prompt_ids, tokens, logprobs, kv_len, margins)

    def _prefill(self, inputs: dict, generated: list[int]):
        kw = self._extended(inputs, generated)
        if self.is_mrope:
            self.model.model.rope_deltas = None  # HF caches it on the module across calls
        out = self.model(**kw, use_cache=True)
        return out.past_key_values, out.logits[0, -1].float()

    def _extended(self, inputs: dict, generated: list[int]) -> dict:
        """Model inputs of the prompt followed by ``generated`` tokens."""
        kw = dict(inputs)
        if generated:
            extra = torch.tensor([generated], dtype=kw["input_ids"].dtype, device=self.device)
            kw["input_ids"] = torch.cat([kw["input_ids"], extra], dim=1)
            if "attention_mask" in kw:
                kw["attention_mask"] = torch.ones_like(kw["input_ids"])
            if "mm_token_type_ids" in kw:
                kw["mm_token_type_ids"] = torch.cat(
                    [kw["mm_token_type_ids"], torch.zeros_like(extra)], dim=1
                )
        return kw

    @torch.no_grad()
    def embed(self, inputs: dict, generated: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input embeddings [1, n, hidden], position ids) of the prompt plus ``generated``, as
        the language model receives them (image features merged, M-RoPE positions computed)."""
        kw = self._extended(inputs, generated)
        captured: dict = {}

        def grab(module, args, kwargs):
            captured.update(kwargs)
            raise _Captured

        lm = self.model.model.language_model
        handle = lm.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            if self.is_mrope:
                self.model.model.rope_deltas = None
            self.model(**kw, use_cache=False)
        except _Captured:
            pass
        finally:
            handle.remove()
        embeds = captured["inputs_embeds"]
        n = embeds.shape[1]
        positions = captured.get("position_ids")
        if positions is None:
            positions = torch.arange(n, device=self.device)[None, :]
        return embeds, positions

    def _decode(self, cache, tok: int, pos: int, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Feed ``tok`` at logical position ``pos``; return the next logits.  Without a mask
        every cached entry is attended."""
        dev = self.device
        kw = dict(
            input_ids=torch.tensor([[tok]], device=dev),
            past_key_values=cache,
            use_cache=True,
            cache_position=torch.tensor([pos], device=dev),
        )
        if self.is_mrope:
            # Text after the images continues M-RoPE from the model's rope delta.
            delta = self.model.model.rope_deltas
            p = torch.tensor([[pos]], device=dev) + (delta if delta is not None else 0)
            kw["position_ids"] = p.view(1, 1, 1).expand(3, 1, 1)
        else:
            kw["position_ids"] = torch.tensor([[pos]], device=dev)
        if attention_mask is None:
            attention_mask = torch.ones(1, cache.get_seq_length() + 1, dtype=torch.long, device=dev)
        kw["attention_mask"] = attention_mask
        out = self.model(**kw)
        return out.logits[0, -1].float()


class _Captured(Exception):
    """Stops a forward once the language model's inputs are known (:meth:`HFOracle.embed`)."""


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
    def generate(self, prompt: str, images: Sequence, max_new_tokens: int, events,
                 follow: Sequence[int] | None = None) -> OracleResult:
        """Greedy generation under ``events``.  With ``follow`` (an engine's output tokens)
        those tokens are fed instead of the oracle's own choices: the oracle then scores
        every step of the engine's sequence, and ``margins`` say how far each followed token
        is from the oracle's choice (negative: another token was preferred)."""
        o = self.o
        if follow is not None:
            max_new_tokens = len(follow)
        inputs = o.inputs(prompt, images)
        prompt_ids = inputs["input_ids"][0].tolist()
        L = len(prompt_ids)
        by_n: dict[int, list] = {}
        for n, kind, pos in events:
            by_n.setdefault(int(n), []).append((kind, list(pos)))
        live = torch.ones(L + max_new_tokens, dtype=torch.bool, device=o.device)
        cache, logits = o._prefill(inputs, [])
        tokens: list[int] = []
        logprobs: list[float] = []
        margins: list[float] = []
        while True:
            tok = _greedy(logits, tokens, logprobs, margins,
                          None if follow is None else follow[len(tokens)])
            if len(tokens) == max_new_tokens:
                break
            p = L + len(tokens) - 1  # position of the token fed next
            for kind, pos in by_n.get(p, ()):
                idx = torch.as_tensor(pos, dtype=torch.long, device=o.device)
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
        return OracleResult(prompt_ids, tokens, logprobs, int(live[: L + len(tokens) - 1].sum()), margins)


class SessionReplay:
    """Replays a conversation whose turns continue from the cache earlier turns kept
    (``hae_vllm.engine.sessions``), on one HF cache with an attention mask.

    Each :meth:`generate` is one request.  Its events are ``(num_tokens, kind, payload)``,
    applied when the request holds ``num_tokens`` tokens (prompt + outputs so far):

    * ``("prefill", positions)``: the tokens were computed from scratch (full attention), then
      ``positions`` evicted (a first turn, or a recompute after preemption);
    * ``("session", hit_tokens)``: the KV of the first ``hit_tokens`` tokens is the cache the
      previous request of this replay (or this request before it was preempted) kept - its
      evicted positions stay masked - and the tokens from ``hit_tokens`` on are computed in one
      chunk attending to it.

    A request with no event at its prompt length starts from scratch without eviction."""

    def __init__(self, oracle: HFOracle):
        self.o = oracle
        self.ids: list[int] = []  # tokens whose KV the cache holds, by position
        self.cache = None
        self.live: torch.Tensor | None = None  # [len(ids)] bool: attended positions

    @torch.no_grad()
    def generate(self, prompt: str, images: Sequence, events, follow: Sequence[int]) -> OracleResult:
        o = self.o
        inputs = o.inputs(prompt, images)
        prompt_ids = inputs["input_ids"][0].tolist()
        L = len(prompt_ids)
        by_n = {int(n): (kind, payload) for n, kind, payload in events}
        tokens: list[int] = []
        logprobs: list[float] = []
        margins: list[float] = []
        logits = None
        while True:
            n = L + len(tokens)  # tokens whose KV exists once this step's input is fed
            kind, payload = by_n.get(n, (None, None))
            if kind == "session":
                logits = self._resume(inputs, tokens, int(payload))
            elif kind == "prefill" or logits is None:
                self.cache, logits = o._prefill(inputs, tokens)
                self.ids = prompt_ids + tokens
                self.live = torch.ones(n, dtype=torch.bool, device=o.device)
                if kind == "prefill" and len(payload):
                    self.live[torch.as_tensor(list(payload), dtype=torch.long, device=o.device)] = False
            tok = _greedy(logits, tokens, logprobs, margins, follow[len(tokens)])
            if len(tokens) == len(follow):
                break
            if L + len(tokens) in by_n:
                continue  # the next event recomputes this token's KV
            p = L + len(tokens) - 1
            self.ids.append(tok)
            self.live = torch.cat([self.live, self.live.new_ones(1)])
            logits = o._decode(self.cache, tok, p, attention_mask=self.live.long()[None, :])
        return OracleResult(prompt_ids, tokens, logprobs, int(self.live.sum()), margins)

    def _resume(self, inputs: dict, generated: list[int], hit: int) -> torch.Tensor:
        """Keep the first ``hit`` positions of the cache (and their mask), compute the rest of
        the request's tokens (prompt ``inputs`` + ``generated``) attending to them; the
        next-token logits.  The chunk may start inside an image: its embeddings and positions
        are those of the whole sequence (what the engine's encoder gives the chunk)."""
        o = self.o
        seq = inputs["input_ids"][0].tolist() + list(generated)
        if self.cache is None or len(self.ids) < hit or self.ids[:hit] != seq[:hit]:
            raise AssertionError("the session's tokens are not a prefix of the request's: the engine "
                                 "served a hit the conversation does not support")
        embeds, positions = o.embed(inputs, generated)
        if self.cache.get_seq_length() > hit:
            self.cache.crop(hit - self.cache.get_seq_length())
        m = len(seq) - hit
        self.live = torch.cat([self.live[:hit], self.live.new_ones(m)])
        pos = torch.arange(hit, hit + m, device=o.device)
        out = o.model(inputs_embeds=embeds[:, hit:], past_key_values=self.cache, use_cache=True, cache_position=pos,
                      position_ids=positions[..., hit:], attention_mask=self.live.long()[None, :])
        self.ids = seq
        return out.logits[0, -1].float()


def session_events(records) -> list[tuple[int, str, object]]:
    """:class:`SessionReplay` events from a request's trace records (rank 0)."""
    out = []
    for r in records:
        kind = r.get("kind", "prefill")
        if kind == "prefill":
            out.append((r["num_tokens"], "prefill", r["evicted_positions"]))
        elif kind == "session":
            out.append((r["num_tokens"], "session", r["hit_tokens"]))
        else:
            raise ValueError(f"SessionReplay does not replay {kind!r} events (no decode stage in sessions)")
    return out


def events_from_trace(records) -> list[tuple[int, str, list[int]]]:
    """(num_tokens, kind, positions) from a request's trace records (prefill and decode)."""
    out = []
    for r in records:
        kind = r.get("kind", "prefill")
        if kind == "session":
            raise ValueError("a request that continued a session is replayed by SessionReplay")
        pos = r["evicted_positions"] if kind == "prefill" else r["positions"]
        out.append((r["num_tokens"], kind, pos))
    return out


def _greedy(logits: torch.Tensor, tokens: list[int], logprobs: list[float],
            margins: list[float] | None = None, forced: int | None = None) -> int:
    """Append the argmax token (or ``forced``), its log-probability and, to ``margins``, its
    log-prob minus the best other token's: the argmax's lead over the runner-up (>= 0), or
    how far a forced token trails the argmax (< 0).  ``logits``: [vocab]."""
    lp = torch.log_softmax(logits, dim=-1)
    tok = int(torch.argmax(logits)) if forced is None else int(forced)
    tokens.append(tok)
    logprobs.append(float(lp[tok]))
    if margins is not None:
        others = lp.clone()
        others[tok] = -math.inf
        margins.append(float(lp[tok] - others.max()))
    return tok


def remove_positions(cache, keep: torch.Tensor) -> None:
    """Delete the positions where ``keep`` is False from every layer of a DynamicCache."""
    for layer in cache.layers:
        layer.keys = layer.keys[:, :, keep].contiguous()
        layer.values = layer.values[:, :, keep].contiguous()


# ----------------------------------------------------------------------------------------
# Engine against oracle, per dtype
# ----------------------------------------------------------------------------------------

# Rounding noise of one log-prob, engine against an oracle run in the same dtype.  The two
# implementations round differently (kernel order, fused ops, what stays in float32), so in
# 16-bit dtypes neither log-probs nor nearly tied argmaxes agree exactly.  Measured on the tiny
# LLaVA and Qwen2-VL with vLLM on CPU (avx512_bf16, no AMX): eight requests per model (images,
# text only, `none`, prefill eviction, decode parks and restores), every engine token scored
# by the oracle, 384 positions per model; "worst" is the largest |log-prob difference| or the
# largest amount by which the oracle preferred another token, whichever is larger:
#   bfloat16  worst 0.31 (llava) / 0.29 (qwen2vl), 99th percentile 0.21.  HF bf16 against HF
#             fp32 alone differs by 0.30 / 0.63 on the same tokens: the dtype's rounding.
#   float16   worst 0.031 / 0.042 (HF fp16 against fp32: 0.046 / 0.039).
# Replaying a wrong eviction set (every position shifted by one) gives a worst of at least 2.4
# (bf16) / 1.7 (fp16) in every request that evicts.  Each level is ~1.6x the worst correct
# case, for kernels that round differently elsewhere (AMX, GPUs: `--noise` overrides it), and
# still far below what wrong evictions cause.
DTYPE_NOISE = {"float32": 1e-3, "bfloat16": 0.5, "float16": 0.07}


@dataclass(frozen=True)
class Tolerance:
    """How closely an engine must follow the oracle.

    ``logprob``: largest |engine - oracle| log-prob of the same token in the same context.
    ``near_tie``: an engine token the oracle ranks below its own choice by less than this is a
    near-tie (rounding may flip it) and accepted; 0 means the tokens must be identical.
    """

    logprob: float
    near_tie: float

    @classmethod
    def for_dtype(cls, dtype: str, noise: float | None = None) -> "Tolerance":
        """float32 must match token for token; 16-bit dtypes within their noise (or ``noise``)."""
        dtype = str(dtype).removeprefix("torch.")
        if dtype not in DTYPE_NOISE:
            raise ValueError(f"no noise level known for dtype {dtype!r}; pass one explicitly")
        level = DTYPE_NOISE[dtype] if noise is None else noise
        return cls(logprob=level, near_tie=0.0 if dtype == "float32" else level)


@dataclass(frozen=True)
class Agreement:
    """How one request's engine output compares with the oracle's, at a :class:`Tolerance`.

    When the oracle followed the engine's tokens (``MaskedReplay.generate(follow=...)``) every
    position is compared.  Otherwise the two sequences may part at a near-tie; positions after
    it have different contexts and are not compared (``compared < num_tokens``).
    """

    num_tokens: int  # tokens the engine generated
    compared: int  # positions whose token and log-prob were compared
    equal: int  # compared positions where the engine's token is the oracle's choice
    near_ties: int  # compared positions where it is not, within the near-tie margin
    max_logprob_diff: float  # over compared positions
    tolerance: Tolerance
    problem: str | None  # the first disagreement beyond tolerance, None when there is none

    @property
    def ok(self) -> bool:
        return self.problem is None


def compare_with_oracle(engine: dict, ref: OracleResult, tolerance: Tolerance) -> Agreement:
    """Compare an engine result (``prompt_token_ids``, ``token_ids``, ``logprobs``, as the
    scenario records them) with an oracle replay of the same request."""
    tokens, lps = list(engine["token_ids"]), list(engine["logprobs"])
    n = len(tokens)
    problems: list[str] = []
    if list(engine["prompt_token_ids"]) != list(ref.prompt_token_ids):
        problems.append("prompt tokens differ")
    if len(lps) != n:
        problems.append("the engine returned no log-probs")
    compared = equal = near = 0
    max_diff = 0.0
    for i in range(min(n, len(ref.token_ids))):
        margin = ref.margins[i]
        if ref.token_ids[i] != tokens[i]:
            # The oracle generated on its own and took the other branch of a tie: what follows
            # has different contexts.
            if margin >= tolerance.near_tie:
                problems.append(f"token {i}: engine {tokens[i]}, oracle {ref.token_ids[i]} "
                                f"(leading by {margin:.3g} > near-tie {tolerance.near_tie:g})")
            break
        compared += 1
        if margin >= 0:
            equal += 1
        elif -margin < tolerance.near_tie:
            near += 1
        else:
            problems.append(f"token {i}: the oracle prefers another token by {-margin:.3g} "
                            f"(> near-tie {tolerance.near_tie:g})")
        if i < len(lps):
            diff = abs(lps[i] - ref.logprobs[i])
            max_diff = max(max_diff, diff)
            if diff > tolerance.logprob:
                problems.append(f"log-prob {i} differs by {diff:.3g} (> {tolerance.logprob:g})")
    return Agreement(n, compared, equal, near, max_diff, tolerance, problems[0] if problems else None)
