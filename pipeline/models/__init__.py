"""Diffusion backbones: SiT (DiT-style transformer), SiT-down (U-REPA's U-shaped SiT) and a small
ADM-style convolutional U-Net, all returning ModelOutput(velocity, hidden, attn_logits)."""

from pipeline.models.output import ModelOutput
from pipeline.models.registry import build_model, model_names
from pipeline.models.sit import SiT
from pipeline.models.sit_down import SiTDown
from pipeline.models.unet import UNet

__all__ = ["ModelOutput", "SiT", "SiTDown", "UNet", "build_model", "model_names"]
