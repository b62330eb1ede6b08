"""A small prefix-aware router over vLLM instances, built as llm-d's precise prefix-cache scorer
and NVIDIA Dynamo's KV router are: it learns what each instance holds only from the instance's
KV-event stream (``--kv-events-config``, ZMQ publisher).  A request's overlap with an instance
is the longest consecutive chain of its block hashes the instance announced; the request goes
where Dynamo's KV router cost is lowest: ``overlap_weight x blocks to prefill there + blocks
active there`` (the blocks of the requests in flight, tracked by the router; Dynamo's
documented cost with its default weight 1; ties: fewer requests in flight).  The hashes are computed here with vLLM's own renderer (chat template, tokenizer,
multimodal processor: images as their ``mm_hash`` extra keys) and block hasher, from the same
model, block size and hash algorithm as the instances.

Per instance the router keeps a ledger of the live hashes and counts what a faithful stream
never does: a ``BlockRemoved`` of a hash not live (``orphan_removes``) and a ``BlockStored``
whose parent is not live (``orphan_parents``).  Used by ``benchmarks/fleet.py``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field


@dataclass
class InstanceView:
    name: str
    base_url: str
    events_endpoint: str
    live: set = field(default_factory=set)
    orphan_removes: int = 0
    orphan_parents: int = 0
    stores: int = 0
    session_stores: int = 0  # stores marked as an eviction session (session_id "hae-session:...")
    removes: int = 0
    batches: int = 0
    in_flight: int = 0
    active_blocks: int = 0  # blocks of the requests in flight here (the router's own count)

    def apply(self, event) -> None:
        kind = type(event).__name__
        if kind == "BlockStored":
            self.stores += len(event.block_hashes)
            if (getattr(event, "session_id", None) or "").startswith("hae-session:"):
                self.session_stores += len(event.block_hashes)
            if event.parent_block_hash is not None and event.parent_block_hash not in self.live:
                self.orphan_parents += 1
            self.live.update(event.block_hashes)
        elif kind == "BlockRemoved":
            for h in event.block_hashes:
                self.removes += 1
                if h in self.live:
                    self.live.discard(h)
                else:
                    self.orphan_removes += 1
        elif kind == "AllBlocksCleared":
            self.live.clear()

    def match(self, hashes: list) -> int:
        n = 0
        while n < len(hashes) and hashes[n] in self.live:
            n += 1
        return n


class EventSubscriber:
    """One thread reading every instance's ZMQ event stream into its :class:`InstanceView`."""

    def __init__(self, instances: list[InstanceView], lock: threading.Lock) -> None:
        import zmq

        self.instances = instances
        self.lock = lock
        self.ctx = zmq.Context()
        self.sockets = []
        for inst in instances:  # the instances' publishers bind (tcp://*:port)
            sock = self.ctx.socket(zmq.SUB)
            sock.setsockopt(zmq.SUBSCRIBE, b"")
            sock.connect(inst.events_endpoint)
            self.sockets.append((sock, inst))
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        import msgspec
        import zmq
        from vllm.distributed.kv_events import KVEventBatch

        decoder = msgspec.msgpack.Decoder(type=KVEventBatch)
        poller = zmq.Poller()
        for sock, _ in self.sockets:
            poller.register(sock, zmq.POLLIN)
        by_sock = {id(s): inst for s, inst in self.sockets}
        while not self._stop.is_set():
            for sock, _ in poller.poll(100):
                _topic, _seq, payload = sock.recv_multipart()
                batch = decoder.decode(payload)
                inst = by_sock[id(sock)]
                with self.lock:
                    inst.batches += 1
                    for ev in batch.events:
                        inst.apply(ev)

    def close(self) -> None:
        self._stop.set()
        self.thread.join(timeout=5)
        for sock, _ in self.sockets:
            sock.close(linger=0)
        self.ctx.term()


class RequestHasher:
    """The block hashes vLLM computes for a chat request, in this process: vLLM's renderer and
    block hasher on the instances' model, block size and hash algorithm."""

    def __init__(self, model: str, block_size: int, max_model_len: int = 2048) -> None:
        from vllm.engine.arg_utils import EngineArgs
        from vllm.renderers.registry import renderer_from_config
        from vllm.utils.hashing import get_hash_fn_by_name
        from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash

        cfg = EngineArgs(model=model, max_model_len=max_model_len, block_size=block_size,
                         enforce_eager=True).create_engine_config()
        self.block_size = block_size
        self.model_config = cfg.model_config
        self.renderer = renderer_from_config(cfg)
        hash_fn = get_hash_fn_by_name(cfg.cache_config.prefix_caching_hash_algo)
        init_none_hash(hash_fn)
        self.hasher = get_request_block_hasher(block_size, hash_fn)
        self.lock = threading.Lock()

    def __call__(self, body: dict) -> tuple[list, int]:
        """(external block hashes as the KV events write them, prompt tokens) of the chat
        completion request ``body``, rendered with the parameters the server derives from it."""
        from vllm import SamplingParams
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.multimodal.inputs import MultiModalFeatureSpec
        from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash
        from vllm.v1.request import Request

        req = ChatCompletionRequest(**body)
        chat_params = req.build_chat_params(None, "auto")
        tok_params = req.build_tok_params(self.model_config)
        with self.lock:  # the renderer is not meant for concurrent use
            _, (prompt,) = self.renderer.render_chat([req.messages], chat_params, tok_params, skip_mm_cache=True)
        features = []
        for modality, hashes in (prompt.get("mm_hashes") or {}).items():
            for h, pos in zip(hashes, prompt["mm_placeholders"][modality]):
                features.append(MultiModalFeatureSpec(data=None, modality=modality, identifier=h, mm_position=pos))
        features.sort(key=lambda f: f.mm_position.offset)
        req = Request("router", list(prompt["prompt_token_ids"]), SamplingParams(max_tokens=1), None,
                      mm_features=features or None, block_hasher=self.hasher)
        return [maybe_convert_block_hash(h) for h in req.block_hashes], len(prompt["prompt_token_ids"])


class PrefixRouter:
    def __init__(self, instances: list[InstanceView], hasher: RequestHasher, overlap_weight: float = 1.0) -> None:
        self.instances = instances
        self.hasher = hasher
        self.overlap_weight = overlap_weight
        self.lock = threading.Lock()
        self.subscriber = EventSubscriber(instances, self.lock)

    def route(self, body: dict) -> tuple[InstanceView, int, int, int]:
        """(instance, blocks matched there, prompt tokens, blocks charged) for chat request
        ``body``; marks the request in flight there.  A match never counts the prompt's last
        token: vLLM computes at least one token of every prompt."""
        hashes, num_tokens = self.hasher(body)
        bs = self.hasher.block_size
        hashes = hashes[: (num_tokens - 1) // bs]
        blocks = -(-(num_tokens + int(body.get("max_tokens") or 0)) // bs)
        with self.lock:
            scored = []
            for i, inst in enumerate(self.instances):
                matched = inst.match(hashes)
                cost = self.overlap_weight * (-(-num_tokens // bs) - matched) + inst.active_blocks
                scored.append((cost, inst.in_flight, i, matched, inst))
            _, _, _, matched, best = min(scored, key=lambda s: s[:3])
            best.in_flight += 1
            best.active_blocks += blocks
        return best, matched, num_tokens, blocks

    def done(self, inst: InstanceView, blocks: int) -> None:
        with self.lock:
            inst.in_flight -= 1
            inst.active_blocks -= blocks

    def close(self) -> None:
        self.subscriber.close()
