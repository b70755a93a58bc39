"""The image autoencoder of latent diffusion: SD-VAE (diffusers AutoencoderKL), pixel space, or a
tiny random one for tests.

Conventions (the latents store and training rely on them):
    images    uint8 [B, 3, H, W] in, float in [-1, 1] out (x / 127.5 - 1 on the way in).
    moments   float32 [B, 2c, h, w] = (posterior mean, posterior std) concatenated on channels, what
              the latents store keeps (std = exp(logvar / 2), logvar clamped to [-30, 20]).
    latent    the SCALED latent z = (mean + std * eps) * scaling_factor that the diffusion model sees
              (drawn by pipeline.train.data); `decode` takes z and divides by scaling_factor itself.

Names:
    sd-vae-ft-ema, sd-vae-ft-mse   stabilityai/sd-vae-ft-{ema,mse}: c = 4, downsample 8, scale 0.18215
    identity                       pixel space: moments = (x / 127.5 - 1, 0), c = 3, downsample 1, scale 1
    tiny-random                    a 2-level AutoencoderKL (32 channels, c = 4, downsample 2), seeded init

Weights (`load_vae(name, weights)`): "hub" downloads the named repository (only then is the network
touched); a local directory written by `save_pretrained` (config.json + weights); a local state-dict
file (.safetensors / .bin / .pt / .ckpt, diffusers or original LDM key names) loaded into the named
architecture; "random" a seeded random init of the named architecture. identity ignores weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pipeline.weights import from_hub, local_file, read_state_dict
from schemas.names import VAES

HUB_REPOS = {"sd-vae-ft-ema": "stabilityai/sd-vae-ft-ema", "sd-vae-ft-mse": "stabilityai/sd-vae-ft-mse"}
NAMES = (*HUB_REPOS, "identity", "tiny-random")

# The AutoencoderKL configuration of stabilityai/sd-vae-ft-{ema,mse} (their config.json).
SD_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=256,
    scaling_factor=0.18215,
)
TINY_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    block_out_channels=(32, 32),
    layers_per_block=1,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=32,
    scaling_factor=0.18215,
)


def geometry(name: str) -> tuple[int, int]:
    """(latent channels c, downsampling factor) of the VAE `name`, without loading it."""
    if name not in VAES:
        raise ValueError(f"unknown VAE {name!r}; expected one of {', '.join(NAMES)}")
    return VAES[name]


# ----------------------------------------------------------------------------------------------
#                                         Wrapper
# ----------------------------------------------------------------------------------------------


class Autoencoder(nn.Module):
    """A frozen autoencoder with the project's image and latent conventions (module docstring).

    vae: a diffusers AutoencoderKL, or None for pixel space (identity).
    Attributes: name, scaling_factor, latent_channels (c), downsample (H / h).
    """

    def __init__(self, name: str, vae: nn.Module | None):
        super().__init__()
        self.name = name
        self.vae = vae
        if vae is None:
            self.scaling_factor, self.latent_channels, self.downsample = 1.0, 3, 1
        else:
            cfg = vae.config
            self.scaling_factor = float(cfg.scaling_factor)
            self.latent_channels = int(cfg.latent_channels)
            self.downsample = 2 ** (len(cfg.block_out_channels) - 1)
            vae.eval()
            vae.requires_grad_(False)

    @torch.no_grad()
    def encode_moments(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images [B, 3, H, W] -> float32 moments [B, 2c, H / downsample, W / downsample]."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be uint8 [B, 3, H, W]; got dtype {images.dtype} and shape {tuple(images.shape)}")
        if images.shape[-1] % self.downsample or images.shape[-2] % self.downsample:
            raise ValueError(f"image size {tuple(images.shape[-2:])} is not divisible by the {self.name} VAE's "
                             f"downsampling factor {self.downsample}")
        x = images.float() / 127.5 - 1.0
        if self.vae is None:
            return torch.cat([x, torch.zeros_like(x)], dim=1)
        x = x.to(next(self.vae.parameters()).dtype)
        dist = self.vae.encode(x).latent_dist
        return torch.cat([dist.mean, dist.std], dim=1).float()

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """SCALED latents z [B, c, h, w] -> images float32 [B, 3, h * downsample, w * downsample] in [-1, 1]."""
        if z.ndim != 4 or z.shape[1] != self.latent_channels:
            raise ValueError(f"latents must be [B, {self.latent_channels}, h, w] for the {self.name} VAE, "
                             f"got shape {tuple(z.shape)}")
        z = z.float() / self.scaling_factor
        if self.vae is None:
            return z.clamp(-1.0, 1.0)
        z = z.to(next(self.vae.parameters()).dtype)
        return self.vae.decode(z).sample.float().clamp(-1.0, 1.0)


# ----------------------------------------------------------------------------------------------
#                                          Loading
# ----------------------------------------------------------------------------------------------


def load_vae(name: str, weights: str = "hub", *, device: str | torch.device = "cpu", seed: int = 0) -> Autoencoder:
    """The autoencoder `name` (see NAMES) with `weights` (module docstring), frozen, on `device`."""
    if name not in NAMES:
        raise ValueError(f"vae.name {name!r} is unknown; allowed: {', '.join(NAMES)}")
    if name == "identity":
        return Autoencoder(name, None).to(device)
    config = TINY_CONFIG if name == "tiny-random" else SD_VAE_CONFIG
    if weights == "random" or (name == "tiny-random" and weights == "hub"):
        vae = _random_vae(config, seed)
    elif weights == "hub":
        vae = _from_hub(name)
    else:
        vae = _from_local(name, Path(weights).expanduser(), config)
    return Autoencoder(name, vae).to(device)


def _random_vae(config: dict, seed: int) -> nn.Module:
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL(**config)


def _from_hub(name: str) -> nn.Module:
    from diffusers import AutoencoderKL

    repo = HUB_REPOS[name]
    return from_hub(lambda: AutoencoderKL.from_pretrained(repo), f"the {name} VAE (repository {repo})",
                    f"set vae.weights to a local directory holding config.json and "
                    f"diffusion_pytorch_model.safetensors from huggingface.co/{repo}")


def _from_local(name: str, path: Path, config: dict) -> nn.Module:
    from diffusers import AutoencoderKL

    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"VAE directory {str(path)!r} has no config.json; vae.weights must be a directory written by "
                f"AutoencoderKL.save_pretrained (config.json + diffusion_pytorch_model.safetensors), e.g. a "
                f"download of huggingface.co/{HUB_REPOS.get(name, 'stabilityai/sd-vae-ft-ema')}"
            )
        return AutoencoderKL.from_pretrained(str(path), local_files_only=True)
    path = local_file(str(path), "VAE weights",
                      f"vae.weights must be 'hub', 'random', a directory from AutoencoderKL.save_pretrained "
                      f"(config.json + diffusion_pytorch_model.safetensors, e.g. from "
                      f"huggingface.co/{HUB_REPOS.get(name, 'stabilityai/sd-vae-ft-ema')}) or a state-dict file")
    vae = AutoencoderKL(**config)
    state = read_state_dict(path, "VAE weights file")
    if not any(k.startswith("encoder.down_blocks.") for k in state):
        state = _convert_ldm(state, vae, path)
    try:
        vae.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"VAE weights {str(path)!r} do not match the {name} architecture: {err}") from err
    return vae


def _convert_ldm(state: dict[str, torch.Tensor], vae: nn.Module, path: Path) -> dict[str, torch.Tensor]:
    """Original (CompVis LDM) key names, e.g. vae-ft-mse-840000-ema-pruned, -> diffusers names."""
    try:
        from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    except ImportError as err:
        raise ValueError(
            f"VAE weights {str(path)!r} use the original LDM key names and this diffusers version cannot "
            f"convert them; save the VAE with AutoencoderKL.save_pretrained and point vae.weights at that directory"
        ) from err
    return convert_ldm_vae_checkpoint(state, dict(vae.config))
