"""Inputs the self-check, the tests and the benchmarks share: raw prompts of the tiny test
checkpoints, deterministic test images and videos, and where the tiny checkpoints are cached.

The checkpoints themselves are built by ``python -m hae_lab.tiny_models`` (a source checkout's
``scripts/setup.sh`` runs it); nothing here builds or trains a model.
"""

from __future__ import annotations

import pathlib

import numpy as np

# Bump a version whenever the corresponding builder output changes (hae_lab.tiny_models).
TINY_MODEL_VERSIONS = {"llava": 1, "qwen2vl": 1}
KINDS = tuple(TINY_MODEL_VERSIONS)

LLAVA_IMAGE_SIZE = 224
LLAVA_PATCH_SIZE = 14
LLAVA_IMAGE_TOKENS = (LLAVA_IMAGE_SIZE // LLAVA_PATCH_SIZE) ** 2  # 256 (CLS dropped)

QWEN2VL_PATCH_SIZE = 14
QWEN2VL_MERGE_SIZE = 2
QWEN2VL_IMAGE_SIZE = 448
QWEN2VL_MAX_PIXELS = QWEN2VL_IMAGE_SIZE * QWEN2VL_IMAGE_SIZE
QWEN2VL_MIN_PIXELS = QWEN2VL_MAX_PIXELS
QWEN2VL_IMAGE_TOKENS = (QWEN2VL_IMAGE_SIZE // (QWEN2VL_PATCH_SIZE * QWEN2VL_MERGE_SIZE)) ** 2  # 256


def tiny_model_cache_root() -> pathlib.Path:
    """``$HAE_VLLM_MODEL_CACHE``, else ``<checkout>/.cache/tiny_models`` in a source checkout,
    else ``~/.cache/hae_vllm/tiny_models`` (an installed package has no checkout)."""
    from hae_vllm import envs

    env = envs.model_cache()
    if env:
        return pathlib.Path(env).expanduser()
    checkout = pathlib.Path(__file__).resolve().parents[2]
    if (checkout / "pyproject.toml").is_file() and (checkout / "hae_vllm").is_dir():
        return checkout / ".cache" / "tiny_models"
    return pathlib.Path.home() / ".cache" / "hae_vllm" / "tiny_models"


def tiny_model_dir_name(kind: str) -> str:
    return f"tiny-{kind}-v{TINY_MODEL_VERSIONS[kind]}"


def tiny_model_dir(kind: str) -> pathlib.Path:
    """Directory of the built ``kind`` checkpoint; a clear error when it was never built."""
    if kind not in TINY_MODEL_VERSIONS:
        raise ValueError(f"unknown tiny model kind {kind!r}; expected one of {KINDS}")
    path = tiny_model_cache_root() / tiny_model_dir_name(kind)
    if not path.is_dir():
        raise FileNotFoundError(
            f"tiny test checkpoint {path} does not exist: build it with "
            f"`python -m hae_lab.tiny_models --kind {kind}` in a source checkout (scripts/setup.sh does)"
        )
    return path


def llava_prompt(text: str, num_images: int = 1) -> str:
    """Raw LLaVA prompt (what the chat template renders, minus ``<s>``)."""
    return "USER: " + "<image>\n" * num_images + text + " ASSISTANT:"


def llava_numbered_prompt(text: str, num_images: int = 1) -> str:
    """Raw prompt of the numbered LLaVA chat template (``hae_lab.tiny_models``; minus ``<s>``):
    every image is named before its tokens."""
    return "USER:" + "".join(f" image {k}<image>\n" for k in range(1, num_images + 1)) + text + " ASSISTANT:"


def qwen2vl_prompt(text: str, num_images: int = 1, num_videos: int = 0) -> str:
    """Raw Qwen2-VL prompt (what the chat template renders): images first, then videos."""
    vision = "<|vision_start|><|image_pad|><|vision_end|>" * num_images
    vision += "<|vision_start|><|video_pad|><|vision_end|>" * num_videos
    return f"<|im_start|>user\n{vision}{text}<|im_end|>\n<|im_start|>assistant\n"


def make_test_image(seed: int, size: int = 224):
    """A deterministic ``size`` x ``size`` RGB image of random coloured rectangles."""
    from PIL import Image

    rs = np.random.RandomState(seed)
    img = np.empty((size, size, 3), dtype=np.uint8)
    img[:] = rs.randint(0, 256, size=3, dtype=np.uint8)
    for _ in range(int(rs.randint(4, 12))):
        y0, y1 = sorted(int(v) for v in rs.randint(0, size + 1, size=2))
        x0, x1 = sorted(int(v) for v in rs.randint(0, size + 1, size=2))
        img[y0 : max(y1, y0 + 1), x0 : max(x1, x0 + 1)] = rs.randint(0, 256, size=3, dtype=np.uint8)
    # A little per-pixel noise so that no two patches are exactly identical.
    noise = rs.randint(-8, 9, size=img.shape)
    img = np.clip(img.astype(np.int16) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(img, mode="RGB")


def make_test_video(seed: int, num_frames: int = 8, size: int = 224) -> np.ndarray:
    """A deterministic video, ``[num_frames, size, size, 3]`` uint8: a test image panning
    right by ``size // 16`` pixels a frame, with fresh noise in every frame (frames differ,
    and consecutive ones share most of their content, as in a real clip)."""
    base = np.asarray(make_test_image(seed, size), dtype=np.int16)
    rs = np.random.RandomState(seed + 7919)
    frames = [np.roll(base, t * (size // 16), axis=1) + rs.randint(-4, 5, size=base.shape) for t in range(num_frames)]
    return np.clip(np.stack(frames), 0, 255).astype(np.uint8)
