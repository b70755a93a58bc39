"""The names a config may use, and what each stands for: plain data, importable without torch, so
that every command (even `repa status`) refuses an unknown name before anything runs."""

from __future__ import annotations

# ----------------------------------------------------------------------------------------------
#                                          Models
# ----------------------------------------------------------------------------------------------

# name -> (architecture, size, patch); pipeline/models/registry.py gives each architecture's sizes.
# Every name is written out so that it can be found with grep.
MODELS: dict[str, tuple[str, str, int | None]] = {
    "SiT-T/2": ("SiT", "T", 2), "SiT-T/4": ("SiT", "T", 4),
    "SiT-S/2": ("SiT", "S", 2), "SiT-S/4": ("SiT", "S", 4), "SiT-S/8": ("SiT", "S", 8),
    "SiT-B/2": ("SiT", "B", 2), "SiT-B/4": ("SiT", "B", 4), "SiT-B/8": ("SiT", "B", 8),
    "SiT-L/2": ("SiT", "L", 2), "SiT-L/4": ("SiT", "L", 4), "SiT-L/8": ("SiT", "L", 8),
    "SiT-XL/2": ("SiT", "XL", 2), "SiT-XL/4": ("SiT", "XL", 4), "SiT-XL/8": ("SiT", "XL", 8),
    "SiTDown-T/2": ("SiTDown", "T", 2), "SiTDown-T/4": ("SiTDown", "T", 4),
    "SiTDown-XS/2": ("SiTDown", "XS", 2), "SiTDown-XS/4": ("SiTDown", "XS", 4),
    "SiTDown-B/2": ("SiTDown", "B", 2),
    "SiTDown-L/2": ("SiTDown", "L", 2),
    "SiTDown-XL/2": ("SiTDown", "XL", 2),
    "UNet-T": ("UNet", "T", None),
    "UNet-S": ("UNet", "S", None),
    "UNet-B": ("UNet", "B", None),
    "MMDiT-T/2": ("MMDiT", "T", 2), "MMDiT-T/4": ("MMDiT", "T", 4),
    "MMDiT-S/2": ("MMDiT", "S", 2), "MMDiT-B/2": ("MMDiT", "B", 2),
    "MMDiT-R/2": ("MMDiT", "R", 2),  # REPA's text-to-image model (see pipeline/models/registry.py)
}


# ----------------------------------------------------------------------------------------------
#                                   Teachers and autoencoders
# ----------------------------------------------------------------------------------------------

# Meta's torch.hub names -> timm model names (pretrained tag lvd142m: the LVD-142M DINOv2 weights).
TEACHERS: dict[str, str] = {
    "dinov2_vits14": "vit_small_patch14_dinov2.lvd142m",
    "dinov2_vitb14": "vit_base_patch14_dinov2.lvd142m",
    "dinov2_vitl14": "vit_large_patch14_dinov2.lvd142m",
    "dinov2_vitg14": "vit_giant_patch14_dinov2.lvd142m",
    "dinov2_vits14_reg": "vit_small_patch14_reg4_dinov2.lvd142m",
    "dinov2_vitb14_reg": "vit_base_patch14_reg4_dinov2.lvd142m",
    "dinov2_vitl14_reg": "vit_large_patch14_reg4_dinov2.lvd142m",
    "dinov2_vitg14_reg": "vit_giant_patch14_reg4_dinov2.lvd142m",
}

# Width, heads and blocks of each DINOv2 size (the ViT-S/B/L/g of the DINOv2 paper), by timm name stem.
TEACHER_SIZES: dict[str, tuple[int, int, int]] = {
    "vit_small": (384, 6, 12), "vit_base": (768, 12, 12), "vit_large": (1024, 16, 24), "vit_giant": (1536, 24, 40),
}

PATCH_SIZE = 14  # DINOv2's patch: resolution r gives an (r // 14)^2 patch grid

# VAE name -> (latent channels c, downsampling factor): moments are [2c, H / f, W / f].
VAES: dict[str, tuple[int, int]] = {"sd-vae-ft-ema": (4, 8), "sd-vae-ft-mse": (4, 8), "identity": (3, 1),
                                    "tiny-random": (4, 2)}


def timm_name(name: str) -> str:
    """The timm model name for a Meta hub name (`dinov2_vitb14`) or a timm name (with or without tag)."""
    if name in TEACHERS:
        return TEACHERS[name]
    timm_names = set(TEACHERS.values())
    if name in timm_names:
        return name
    tagged = f"{name}.lvd142m"
    if tagged in timm_names:
        return tagged
    allowed = sorted(TEACHERS) + sorted(timm_names)
    raise ValueError(f"teacher name {name!r} is unknown; allowed: {', '.join(allowed)}")


def patch_grid(resolution: int) -> tuple[int, int]:
    """The (gh, gw) patch grid of a DINOv2 teacher at `resolution` pixels."""
    return (resolution // PATCH_SIZE, resolution // PATCH_SIZE)


def teacher_geometry(name: str, resolution: int) -> dict[str, int | list[int]]:
    """What a teacher of this name gives at this resolution, without building it:
    {"dim": D, "heads": H, "depth": blocks, "grid": [gh, gw]}."""
    stem = "_".join(timm_name(name).split("_")[:2])
    dim, heads, depth = TEACHER_SIZES[stem]
    return {"dim": dim, "heads": heads, "depth": depth, "grid": list(patch_grid(resolution))}
