"""What the KV cache holds for a key or value: the model's own dtype, or fp8 bytes.

With ``--kv-cache-dtype fp8`` (``fp8_e4m3``) or ``fp8_e5m2`` vLLM allocates the cache as
``uint8`` and its cache-update op stores each element as ``x / scale`` in that fp8 format
(``scale``: the layer's ``_k_scale_float`` / ``_v_scale_float``, 1.0 unless the checkpoint
carries KV scales); attention reads ``byte * scale`` back.  Eviction moves the bytes as they
are (a slot is a slot, whatever its element type), but scoring must read what attention
reads, so every key it takes from the cache is decoded with the layer's scale, and every key
it takes from a layer's input is rounded the way the cache would have stored it.

How a backend rounds is its own business: vLLM's CPU op (``cpu_attn_reshape_and_cache``)
truncates toward zero and saturates at the format's largest finite value, while a plain
``tensor.to(torch.float8_e5m2)`` rounds to nearest even.  :class:`KVFormat` carries the
rounding the layout probe measured through the backend's own op
(:meth:`~hae_vllm.layout.SlotLayout.probe`), and :func:`fp8_round` implements both in torch,
which is also what the HF oracle rounds with (:mod:`hae_vllm.testing.fp8`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import lru_cache

import torch

# vLLM's --kv-cache-dtype names that store one fp8 byte per element with a per-layer scale.
FP8_FORMATS: dict[str, torch.dtype] = {
    "fp8": torch.float8_e4m3fn,
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}

UNQUANTISED = ("auto", "float16", "bfloat16", "float32", "half", "float")

ROUNDINGS = ("toward_zero", "nearest")


@lru_cache(maxsize=None)
def _magnitudes(element: torch.dtype) -> torch.Tensor:
    """Every finite non-negative value of an fp8 ``element`` type, ascending.  [n] float32."""
    values = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(element).float()
    return torch.unique(values[torch.isfinite(values) & (values >= 0)])


def fp8_round(x: torch.Tensor, element: torch.dtype, rounding: str) -> torch.Tensor:
    """``x`` (any float dtype) rounded to the fp8 type ``element``, saturating at its largest
    finite value; returned as ``element``.

    ``toward_zero``: the largest magnitude not above ``|x|`` (vLLM's CPU op); ``nearest``:
    round to nearest even (torch's cast), clamped first so nothing becomes inf/NaN."""
    xf = x.float()
    mags = _magnitudes(element).to(xf.device)
    top = float(mags[-1])
    if rounding == "nearest":
        return xf.clamp(-top, top).to(element)
    if rounding != "toward_zero":
        raise ValueError(f"unknown fp8 rounding {rounding!r}; one of {ROUNDINGS}")
    idx = torch.searchsorted(mags, xf.abs().contiguous(), right=True) - 1
    q = mags[idx.clamp(min=0)]
    return torch.where(xf < 0, -q, q).to(element)


@dataclass
class KVFormat:
    """How one engine's KV cache stores an element.

    ``element`` is the fp8 type of the stored bytes (None: the cache holds ``input_dtype``
    itself); ``input_dtype`` is what the model writes and what decoded keys are returned as;
    ``scales`` maps a layer's cache tensor (``data_ptr``) to its ``(k_scale, v_scale)``.
    ``rounding`` is measured by the layout probe; until then it is unknown (None)."""

    cache_dtype: str = "auto"
    element: torch.dtype | None = None
    input_dtype: torch.dtype | None = None
    rounding: str | None = None
    scales: dict[int, tuple[float, float]] = field(default_factory=dict)

    @classmethod
    def named(cls, cache_dtype: str, input_dtype: torch.dtype | None = None, rounding: str | None = None,
              scales: dict[int, tuple[float, float]] | None = None) -> "KVFormat":
        """The format of vLLM's ``--kv-cache-dtype`` ``cache_dtype``; refuses the quantised
        formats eviction cannot read (per-token scales, fp4, MLA packings)."""
        name = str(cache_dtype)
        if name in UNQUANTISED:
            return cls(name, None, input_dtype, None, dict(scales or {}))
        if name not in FP8_FORMATS:
            raise ValueError(f"KV cache dtype {name!r} is not supported for eviction "
                             f"(supported: {', '.join(UNQUANTISED + tuple(FP8_FORMATS))})")
        return cls(name, FP8_FORMATS[name], input_dtype, rounding, dict(scales or {}))

    @classmethod
    def of_layers(cls, impl, layers, input_dtype: torch.dtype) -> "KVFormat":
        """The format of an engine's attention ``layers`` (vLLM ``Attention`` modules with
        their ``kv_cache`` bound), whose implementation ``impl`` names the cache dtype."""
        name = str(getattr(impl, "kv_cache_dtype", "auto"))
        scales = {}
        if name not in UNQUANTISED:
            for layer in layers:
                scales[layer.kv_cache.data_ptr()] = (float(layer._k_scale_float), float(layer._v_scale_float))
        return cls.named(name, input_dtype, scales=scales)

    @property
    def quantized(self) -> bool:
        return self.element is not None

    def with_rounding(self, rounding: str) -> "KVFormat":
        return replace(self, rounding=rounding)

    def scales_of(self, kv_cache: torch.Tensor) -> tuple[float, float]:
        """``(k_scale, v_scale)`` of the layer that owns ``kv_cache``."""
        if not self.quantized:
            return (1.0, 1.0)
        try:
            return self.scales[kv_cache.data_ptr()]
        except KeyError:
            raise KeyError("no KV scales recorded for this cache tensor (not an attention layer's cache?)") from None

    def encode(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        """What the cache stores for ``x`` written with ``scale``: uint8 bytes."""
        assert self.element is not None and self.rounding is not None, "encode needs a probed fp8 format"
        return fp8_round(x.float() / scale, self.element, self.rounding).view(torch.uint8)

    def decode(self, stored: torch.Tensor, scale: float) -> torch.Tensor:
        """What attention reads for ``stored`` bytes: ``fp8 value * scale`` in ``input_dtype``."""
        assert self.element is not None
        out = stored.contiguous().view(self.element).float() * scale
        return out.to(self.input_dtype or torch.float32)

    def round_trip(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        """``x`` as attention will read it back from the cache (``x`` itself when unquantised)."""
        if not self.quantized:
            return x
        return self.decode(self.encode(x, scale), scale).to(x.dtype)


def dequantized_query(query: torch.Tensor, layer, dtype: torch.dtype) -> torch.Tensor:
    """The layer's query as the model computed it, in ``dtype``.

    With an fp8 KV cache, vLLM quantizes the query before the attention backend sees it on the
    backends that accept an fp8 query (``impl.supports_quant_query_input``: FlashAttention 3,
    FlashInfer on SM100, Triton on CUDA), as ``q / layer._q_scale`` (one scale per tensor, or
    one per KV head for the query heads of that head's group: vLLM's ``QuantFP8`` with
    ``GroupShape(-1, head_size * num_heads // num_kv_heads)``).  Scoring needs the query's
    values: this undoes the scale.  Any other query is returned as it is."""
    if query.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
        return query
    scale = getattr(layer, "_q_scale", None)
    q = query.to(torch.float32)
    if scale is not None:
        scale = scale.to(q.device, torch.float32)
        if scale.numel() == 1:
            q = q * scale.reshape(())
        else:  # one scale per KV head, over that head's group of query heads
            shape = q.shape
            q = (q.reshape(shape[0], scale.numel(), -1) * scale.reshape(1, -1, 1)).reshape(shape)
    return q.to(dtype)
