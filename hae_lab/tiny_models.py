"""Tiny random-weight vision-language checkpoints that vLLM loads offline.

There is no model hub here, so tests build their own checkpoints.  Two kinds exist:

``llava``   ``LlavaForConditionalGeneration``: CLIP vision tower (224 px, patch 14,
            ``vision_feature_select_strategy="default"`` -> exactly 256 image tokens per
            image) + a 2-layer MLP projector + a Llama text model with GQA (4 query heads,
            2 KV heads, head_dim 32).
``qwen2vl`` ``Qwen2VLForConditionalGeneration`` (M-RoPE): a 2-block Qwen2-VL vision
            transformer (patch 14, 2x2 spatial merge, temporal patch 2) + a Qwen2 text model
            (4 query heads, 2 KV heads, head_dim 32, ``mrope_section=[4, 6, 6]``).  The image
            processor has ``min_pixels == max_pixels == 448*448``, so every square image is
            resized to 448x448 -> 32x32 patches -> 16x16 merged = 256 image tokens; other
            aspect ratios give roughly 256 (e.g. 336x224 -> 280).  Override per engine with
            ``mm_processor_kwargs={"min_pixels": ..., "max_pixels": ...}`` if a test needs
            variable token counts.

Everything is generated from code and a seed:

* The tokenizer is a byte-level BPE (``tokenizers``) trained on a few tens of KB of
  English-like text produced by a seeded random sentence generator, then wrapped in a
  ``PreTrainedTokenizerFast`` with the model's special tokens and a jinja chat template.
  The model's ``vocab_size`` equals the tokenizer's length, so every id decodes.
* Weights are initialised by our own seeded loop over the parameters (sorted by name),
  not by transformers' ``_init_weights``; this keeps the bytes stable across transformers
  versions.  Weight matrices of the text model use a comparatively large std (0.15) so that
  attention is far from uniform; ``lm_head`` uses 0.3 so that greedy next-token margins
  (typically 1e-2 or more) dwarf the float32 differences between HF and vLLM, which agree
  token for token.
* The ``lm_head`` rows of special tokens (EOS, image placeholders, chat markers) and of
  tokens that do not decode to printable ASCII are zero.  Greedy decoding therefore never
  stops early (it always produces ``max_tokens`` tokens) and prints readable gibberish.
  Random sampling can still pick them; pass ``ignore_eos=True`` when lengths matter.
* ``config.json`` says ``float32``; each checkpoint is about 4 MB (builds in ~10 s, mostly imports).

Checkpoint layout (key names in ``model.safetensors``):

* LLaVA uses the *hub* (pre-transformers-4.52) layout::

      language_model.model.*   language_model.lm_head.weight
      vision_tower.vision_model.*   multi_modal_projector.*

  vLLM 0.32's ``CLIPVisionModel`` wraps a ``vision_model`` submodule and only strips the
  ``model.`` prefixes of the new HF layout, so the bare ``vision_tower.*`` keys that
  transformers 5 ``save_pretrained`` writes do not load in vLLM.  transformers 5 loads the
  hub layout through its built-in conversion mapping (``llava`` renames +
  ``CLIPVisionModel`` prefix removal), so this one file works for both.
* Qwen2-VL uses the transformers >= 4.52 layout (``model.visual.*``,
  ``model.language_model.*``, ``lm_head.weight``); both HF and vLLM read it natively.

Cache: :func:`tiny_model_path` keeps checkpoints in ``$HAE_VLLM_MODEL_CACHE`` or
``<repo>/.cache/tiny_models``, in directories whose name carries a version tag
(``tiny-llava-v1``); bump ``hae_vllm.testing.inputs.TINY_MODEL_VERSIONS`` whenever a builder changes.  Builds go to a
temporary sibling directory that is renamed into place, so concurrent test processes never
see a half-written checkpoint.

Prompt formats (what the chat templates render; the raw forms work with
``LLM.generate``):

* LLaVA: ``USER: <image>\\n{text} ASSISTANT:`` (one ``<image>\\n`` per image; the tokenizer
  adds ``<s>``).
* Qwen2-VL: ``<|im_start|>user\\n<|vision_start|><|image_pad|><|vision_end|>{text}<|im_end|>\\n``
  ``<|im_start|>assistant\\n`` (one vision block per image; no BOS).

CLI: ``python -m hae_lab.tiny_models [--kind llava|qwen2vl|all] [--out DIR] [--force]``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import random
import shutil
import tempfile
from typing import Callable

from hae_vllm.testing.inputs import (  # noqa: F401  (re-exported: the builders' prompts and images)
    KINDS,
    LLAVA_IMAGE_SIZE,
    LLAVA_IMAGE_TOKENS,
    LLAVA_PATCH_SIZE,
    QWEN2VL_IMAGE_SIZE,
    QWEN2VL_IMAGE_TOKENS,
    QWEN2VL_MAX_PIXELS,
    QWEN2VL_MERGE_SIZE,
    QWEN2VL_MIN_PIXELS,
    QWEN2VL_PATCH_SIZE,
    TINY_MODEL_VERSIONS as _VERSIONS,
    llava_numbered_prompt,
    llava_prompt,
    make_test_image,
    qwen2vl_prompt,
    tiny_model_cache_root as _cache_root,
    tiny_model_dir_name as _dir_name,
)

__all__ = [
    "KINDS",
    "LLAVA_IMAGE_TOKENS",
    "QWEN2VL_IMAGE_SIZE",
    "QWEN2VL_IMAGE_TOKENS",
    "build_tiny_llava",
    "build_tiny_qwen2vl",
    "llava_numbered_prompt",
    "llava_prompt",
    "make_test_image",
    "qwen2vl_prompt",
    "tiny_model_path",
]

_VOCAB_SIZE = 512
_TEXT_STD = 0.15
_VISION_STD = 0.05
_PROJ_STD = 0.1
_LM_HEAD_STD = 0.3
_BIAS_STD = 0.02

_OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# --------------------------------------------------------------------------------------
# Prompts and chat templates
# --------------------------------------------------------------------------------------

_IMAGE_PART_TYPES = "('image', 'image_url', 'image_pil', 'image_embeds', 'input_image')"

LLAVA_CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{- 'SYSTEM: ' -}}"
    "{%- elif message['role'] == 'user' -%}{{- 'USER: ' -}}"
    "{%- else -%}{{- 'ASSISTANT: ' -}}{%- endif -%}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] in " + _IMAGE_PART_TYPES + " -%}{{- '<image>\\n' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{{- eos_token -}}{%- else -%}{{- ' ' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)

QWEN2VL_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] in " + _IMAGE_PART_TYPES + " -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] in ('video', 'video_url') -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)




# A variant that names every image before its tokens (`` image 1<image>\n image 2<image>\n``):
# all images share the vision tower's position table, so without a marker nothing in an image
# token says which image it belongs to; with one, a causal attention head can tell.
LLAVA_NUMBERED_CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- set ns = namespace(k=0) -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{- 'SYSTEM:' -}}"
    "{%- elif message['role'] == 'user' -%}{{- 'USER:' -}}"
    "{%- else -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
    "{%- if message['content'] is string -%}{{- ' ' + message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] in " + _IMAGE_PART_TYPES + " -%}"
    "{%- set ns.k = ns.k + 1 -%}{{- ' image ' + ns.k|string + '<image>\\n' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{{- eos_token -}}{%- else -%}{{- ' ' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)



# --------------------------------------------------------------------------------------
# Test images
# --------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------

_SUBJECTS = (
    "the cat", "a small dog", "the red car", "my friend", "the old man", "a young girl",
    "the picture", "this image", "the blue house", "a green tree", "the teacher", "our team",
    "the bird", "a white boat", "the city", "the river", "a yellow flower", "the machine",
)
_VERBS = (
    "shows", "sees", "has", "makes", "likes", "finds", "holds", "moves", "looks at",
    "describes", "contains", "paints", "walks to", "runs past", "waits for", "opens",
)
_OBJECTS = (
    "a bright square", "the dark corner", "two red boxes", "many colors", "a long road",
    "the open window", "some blue water", "a round table", "three people", "the small garden",
    "a tall building", "the morning light", "an orange shape", "the black line", "a soft shadow",
)
_TAILS = (
    "in the park", "near the door", "at night", "on the left side", "under the sky",
    "with great care", "every day", "in the middle", "on the right", "before the rain",
    "after lunch", "without a sound", "at the top", "along the edge",
)
_QUESTIONS = (
    "What is in the image?", "Describe the picture.", "What color is the box?",
    "How many shapes are there?", "Where is the red square?", "Is there a person?",
    "What do you see on the left?", "Compare the two images.", "Which image is brighter?",
)


def _training_corpus(seed: int, num_sentences: int = 1500) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for i in range(num_sentences):
        s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}"
        if rng.random() < 0.6:
            s += " " + rng.choice(_TAILS)
        s = s[0].upper() + s[1:] + rng.choice((".", ".", ".", "!", "?"))
        if i % 5 == 0:
            s = f"USER: {rng.choice(_QUESTIONS)} ASSISTANT: {s}"
        elif i % 7 == 0:
            s = f"user\n{rng.choice(_QUESTIONS)}\nassistant\n{s}"
        elif i % 11 == 0:
            s += f" There are {rng.randint(0, 99)} items, {rng.randint(100, 999)} in total."
        lines.append(s)
    return lines


def _train_bpe(special_tokens: list[str], seed: int, bos: str | None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_VOCAB_SIZE,
        min_frequency=2,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_corpus(seed), trainer=trainer)
    if bos is not None:
        bos_id = tok.token_to_id(bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    return tok


def _wrap_tokenizer(tok, *, chat_template: str, **special):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        chat_template=chat_template,
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
        **special,
    )


# --------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------


def _init_weights(model, seed: int, std_for: Callable[[str], float]) -> None:
    """Seeded, transformers-version-independent initialisation of every parameter."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            leaf = name.rsplit(".", 1)[-1]
            is_norm = "norm" in name.lower() or "layrnorm" in name
            if p.ndim == 1 and is_norm and leaf == "weight":
                p.fill_(1.0)
            elif p.ndim == 1 and (leaf == "bias" or is_norm):
                p.copy_(torch.randn(p.shape, generator=gen) * _BIAS_STD)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * std_for(name))


def _silenced_token_ids(tok) -> list[int]:
    """Special tokens plus every token that does not decode to printable ASCII."""
    special = set(tok.all_special_ids) | {tok.convert_tokens_to_ids(t) for t in tok.get_added_vocab()}
    silent = []
    for i in range(len(tok)):
        text = tok.decode([i])
        if i in special or not text or not (text.isascii() and text.isprintable()):
            silent.append(i)
    return silent


def _silence_tokens(model, token_ids) -> None:
    """Zero the output-embedding rows of ``token_ids``.

    Their logits are then exactly 0 while the best remaining token's logit is clearly
    positive, so greedy decoding never emits EOS, image placeholders, chat markers or
    partial UTF-8 bytes: it always runs to ``max_tokens`` and decodes to readable text.
    """
    import torch

    with torch.no_grad():
        model.get_output_embeddings().weight[list(token_ids)] = 0.0


def _save_weights(model, out: pathlib.Path, rename: Callable[[str], str]) -> None:
    from safetensors.torch import save_file

    tensors = {}
    for name, t in model.state_dict().items():
        new = rename(name)
        if new in tensors:
            raise RuntimeError(f"duplicate checkpoint key {new}")
        tensors[new] = t.detach().to("cpu").contiguous().clone()
    save_file(dict(sorted(tensors.items())), str(out / "model.safetensors"), metadata={"format": "pt"})


def _write_info(out: pathlib.Path, info: dict) -> None:
    (out / "tiny_model_info.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------------------
# LLaVA
# --------------------------------------------------------------------------------------


def _llava_key(name: str) -> str:
    for old, new in (
        ("model.language_model.", "language_model.model."),
        ("lm_head.", "language_model.lm_head."),
        ("model.vision_tower.", "vision_tower.vision_model."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
    ):
        if name.startswith(old):
            return new + name[len(old) :]
    raise KeyError(f"unexpected LLaVA parameter {name}")


def build_tiny_llava(out_dir: str | os.PathLike, *, seed: int = 0, patch_size: int = LLAVA_PATCH_SIZE,
                     added_tokens: tuple[str, ...] = (), numbered_images: bool = False,
                     image_size: int = LLAVA_IMAGE_SIZE, max_positions: int = 4096) -> pathlib.Path:
    """Write a tiny random LLaVA checkpoint (+ tokenizer and processor) into ``out_dir``.

    The keyword options change the defaults the tests use (patch 14, the plain BPE, the plain
    template) for trained models: ``patch_size`` (28 -> 64 image tokens per image),
    ``added_tokens`` (whole-word tokens, e.g. `` r2c3``, matched before the byte-level BPE) and
    ``numbered_images`` (:data:`LLAVA_NUMBERED_CHAT_TEMPLATE`), ``image_size`` (336 with patch 14:
    LLaVA-1.5's 576 tokens per image) and ``max_positions``."""
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        GenerationConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    tok = _wrap_tokenizer(
        _train_bpe(specials, seed, bos="<s>"),
        chat_template=LLAVA_CHAT_TEMPLATE,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )
    if added_tokens:
        from tokenizers import AddedToken

        tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in added_tokens])
    template = LLAVA_NUMBERED_CHAT_TEMPLATE if numbered_images else LLAVA_CHAT_TEMPLATE
    tok.chat_template = template
    ids = {t: tok.convert_tokens_to_ids(t) for t in specials}
    vocab = len(tok)
    image_tokens = (image_size // patch_size) ** 2

    vision = CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=64,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )
    text = LlamaConfig(
        vocab_size=vocab,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=max_positions,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False,
        initializer_range=_TEXT_STD,
        bos_token_id=ids["<s>"],
        eos_token_id=ids["</s>"],
        pad_token_id=ids["<pad>"],
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=ids["<image>"],
        image_seq_length=image_tokens,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        tie_word_embeddings=False,
    )
    config.architectures = ["LlavaForConditionalGeneration"]
    config.dtype = "float32"

    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()

    def std_for(name: str) -> float:
        if "vision_tower" in name:
            return _VISION_STD
        if "multi_modal_projector" in name:
            return _PROJ_STD
        return _LM_HEAD_STD if name.startswith("lm_head.") else _TEXT_STD

    _init_weights(model, seed, std_for)
    _silence_tokens(model, _silenced_token_ids(tok))
    _save_weights(model, out, _llava_key)
    config.save_pretrained(out)
    GenerationConfig(
        bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"]
    ).save_pretrained(out)

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_resize=True,
        do_center_crop=True,
        do_rescale=True,
        do_normalize=True,
        do_convert_rgb=True,
        image_mean=_OPENAI_CLIP_MEAN,
        image_std=_OPENAI_CLIP_STD,
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token="<image>",
        chat_template=template,
    )
    processor.save_pretrained(out)
    tok.save_pretrained(out)
    prompt = llava_numbered_prompt if numbered_images else llava_prompt
    info = {
        "kind": "llava",
        "version": _VERSIONS["llava"],
        "seed": seed,
        "vocab_size": vocab,
        "image_token": "<image>",
        "image_token_id": ids["<image>"],
        "image_tokens_per_image": image_tokens,
        "prompt_one_image": prompt("{text}", 1),
        "prompt_two_images": prompt("{text}", 2),
    }
    if numbered_images:
        info["prompt_style"] = "numbered"
    if added_tokens:
        info["added_tokens"] = list(added_tokens)
    _write_info(out, info)
    return out


# --------------------------------------------------------------------------------------
# Qwen2-VL
# --------------------------------------------------------------------------------------


def build_tiny_qwen2vl(out_dir: str | os.PathLike, *, seed: int = 0) -> pathlib.Path:
    """Write a tiny random Qwen2-VL checkpoint (+ tokenizer and processor) into ``out_dir``."""
    import torch
    from transformers import (
        GenerationConfig,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    specials = [
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "<|vision_start|>",
        "<|vision_end|>",
        "<|vision_pad|>",
        "<|image_pad|>",
        "<|video_pad|>",
    ]
    tok = _wrap_tokenizer(
        _train_bpe(specials, seed, bos=None),
        chat_template=QWEN2VL_CHAT_TEMPLATE,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        extra_special_tokens={
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_bos_token": "<|vision_start|>",
            "vision_eos_token": "<|vision_end|>",
        },
    )
    ids = {t: tok.convert_tokens_to_ids(t) for t in specials}
    vocab = len(tok)
    head_dim = 32

    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=vocab,
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            rms_norm_eps=1e-6,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [4, 6, 6],  # sums to head_dim // 2
            },
            tie_word_embeddings=False,
            use_sliding_window=False,
            initializer_range=_TEXT_STD,
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(
            depth=2,
            embed_dim=64,
            hidden_size=128,  # output of the patch merger = text hidden size
            num_heads=4,
            mlp_ratio=2,
            in_channels=3,
            patch_size=QWEN2VL_PATCH_SIZE,
            spatial_merge_size=QWEN2VL_MERGE_SIZE,
            temporal_patch_size=2,
            hidden_act="quick_gelu",
            initializer_range=_VISION_STD,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    assert sum(config.text_config.rope_parameters["mrope_section"]) * 2 == head_dim
    assert config.text_config.hidden_size // config.text_config.num_attention_heads == head_dim
    config.architectures = ["Qwen2VLForConditionalGeneration"]
    config.dtype = "float32"
    # Flat copies that older readers (and vLLM's token-id lookups) look for at the top level.
    config.vision_token_id = ids["<|vision_pad|>"]
    config.bos_token_id = ids["<|endoftext|>"]
    config.eos_token_id = ids["<|im_end|>"]

    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).eval()

    def std_for(name: str) -> float:
        if ".visual." in name or name.startswith("visual."):
            return _PROJ_STD if ".merger." in name else _VISION_STD
        return _LM_HEAD_STD if name.startswith("lm_head.") else _TEXT_STD

    _init_weights(model, seed, std_for)
    _silence_tokens(model, _silenced_token_ids(tok))
    _save_weights(model, out, lambda n: n)
    config.save_pretrained(out)
    GenerationConfig(
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
    ).save_pretrained(out)

    common = dict(
        patch_size=QWEN2VL_PATCH_SIZE,
        temporal_patch_size=2,
        merge_size=QWEN2VL_MERGE_SIZE,
        image_mean=_OPENAI_CLIP_MEAN,
        image_std=_OPENAI_CLIP_STD,
    )
    image_processor = Qwen2VLImageProcessor(
        min_pixels=QWEN2VL_MIN_PIXELS, max_pixels=QWEN2VL_MAX_PIXELS, **common
    )
    video_processor = Qwen2VLVideoProcessor(
        min_pixels=28 * 28 * 4,
        max_pixels=QWEN2VL_MAX_PIXELS,
        cap_pixels_per_frame=False,  # explicit, silences a transformers 5.x FutureWarning
        **common,
    )
    processor = Qwen2VLProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        video_processor=video_processor,
        chat_template=QWEN2VL_CHAT_TEMPLATE,
    )
    processor.save_pretrained(out)
    tok.save_pretrained(out)
    _write_info(
        out,
        {
            "kind": "qwen2vl",
            "version": _VERSIONS["qwen2vl"],
            "seed": seed,
            "vocab_size": vocab,
            "image_token": "<|image_pad|>",
            "image_token_id": ids["<|image_pad|>"],
            "image_size": QWEN2VL_IMAGE_SIZE,
            "image_tokens_per_image": QWEN2VL_IMAGE_TOKENS,
            "prompt_one_image": qwen2vl_prompt("{text}", 1),
            "prompt_two_images": qwen2vl_prompt("{text}", 2),
        },
    )
    return out


# --------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------

_BUILDERS: dict[str, Callable[..., pathlib.Path]] = {
    "llava": build_tiny_llava,
    "qwen2vl": build_tiny_qwen2vl,
}


def _build_atomically(kind: str, root: pathlib.Path, force: bool) -> pathlib.Path:
    final = root / _dir_name(kind)
    if final.is_dir() and not force:
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700
    try:
        _BUILDERS[kind](tmp)
        if force and final.is_dir():
            trash = pathlib.Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=root))
            try:
                os.rename(final, trash / "old")
            except FileNotFoundError:
                pass
            shutil.rmtree(trash, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process finished first; its checkpoint is identical (same seed).
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def tiny_model_path(kind: str) -> pathlib.Path:
    """Directory of the cached ``kind`` checkpoint (``"llava"`` or ``"qwen2vl"``), built if missing."""
    if kind not in _BUILDERS:
        raise ValueError(f"unknown tiny model kind {kind!r}; expected one of {KINDS}")
    return _build_atomically(kind, _cache_root(), force=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hae_lab.tiny_models",
        description="Build the tiny random-weight VLM checkpoints used by the tests.",
    )
    parser.add_argument("--kind", choices=[*KINDS, "all"], default="all")
    parser.add_argument(
        "--out",
        default=None,
        help="cache root to write tiny-<kind>-v<N>/ into "
        "(default: $HAE_VLLM_MODEL_CACHE or <repo>/.cache/tiny_models)",
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    args = parser.parse_args(argv)
    root = pathlib.Path(args.out).expanduser() if args.out else _cache_root()
    for kind in KINDS if args.kind == "all" else (args.kind,):
        print(_build_atomically(kind, root, force=args.force))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


def long_context_path(kind: str, positions: int, layers: int | None = None) -> pathlib.Path:
    """The ``kind`` tiny checkpoint declared for ``positions`` positions (RoPE computes any
    position; only the declared maximum changes): its files linked, ``config.json`` rewritten.
    For benchmarks of long prompts (``benchmarks/scaling.py``).

    ``layers``: a text model of that many decoder layers, layer ``i`` a copy of layer
    ``i mod n`` of the ``n``-layer checkpoint (the same width; for timing at a realistic depth,
    where first-layer scoring is ``1/layers`` of the forward instead of ``1/4``)."""
    base = tiny_model_path(kind)
    out = base.parent / (f"{base.name}-pos{positions}" + ("" if layers is None else f"-l{layers}"))
    if (out / "config.json").is_file():
        return out
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=base.parent))
    try:
        cfg = json.loads((base / "config.json").read_text())
        for part in (cfg, cfg.get("text_config") or {}):
            if "max_position_embeddings" in part:
                part["max_position_embeddings"] = positions
        skip = {"config.json"}
        if layers is not None:
            _deepen(base / "model.safetensors", tmp / "model.safetensors", cfg, layers)
            skip.add("model.safetensors")
        for f in base.iterdir():
            if f.name not in skip:
                (tmp / f.name).symlink_to(f.resolve())
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        try:
            tmp.rename(out)
        except OSError:  # another process made it first (same content)
            if not (out / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _deepen(src: pathlib.Path, dst: pathlib.Path, cfg: dict, layers: int) -> None:
    """Write ``src``'s weights with its text model's decoder layers repeated to ``layers``
    (layer ``i`` = layer ``i mod n``) and set the config's layer count."""
    from safetensors.torch import load_file, save_file

    text = cfg.get("text_config") or cfg
    n = text["num_hidden_layers"]
    weights = load_file(str(src))
    pattern = re.compile(r"^(.*\.layers\.)(\d+)(\..*)$")
    out = {}
    for name, t in weights.items():
        m = pattern.match(name)
        if m is None or "vision" in name:
            out[name] = t
            continue
        for i in range(int(m.group(2)), layers, n):
            out[f"{m.group(1)}{i}{m.group(3)}"] = t.clone()
    save_file(out, str(dst), metadata={"format": "pt"})
    text["num_hidden_layers"] = layers
