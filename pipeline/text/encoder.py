"""Caption encoders behind one interface: captions -> token states, mask and a pooled vector.

    encoder = load_text_encoder(name, weights, max_length)
    out = encoder.encode(["a photo of a cat", ...], device)
        out["tokens"]  float32 [B, L, D]  the last hidden state, padded to L = max_length
        out["mask"]    bool    [B, L]     True on real tokens
        out["pooled"]  float32 [B, D]     CLIP: the text tower's pooled (end-of-text) state;
                                          others: the mean of the real tokens' states (the pooling of
                                          sentence-transformers and a common choice for T5)

name:    the Hugging Face id, e.g. openai/clip-vit-large-patch14 (the papers' choice: its text tower,
         77 tokens x 768), google/t5-v1_1-xl, sentence-transformers/all-MiniLM-L6-v2.
weights: "hub"     download `name` through transformers (cached after the first time);
         "minilm"  the offline all-MiniLM-L6-v2 copy that `repa weights` unpacks (pipeline.text.minilm);
         a path    a local directory in the Hugging Face layout (config.json, weights, tokenizer).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pipeline.weights import from_hub


class TextEncoder(nn.Module):
    """A frozen tokenizer + encoder pair; `encode` pads every caption to `max_length` tokens."""

    def __init__(self, tokenizer, model: nn.Module, max_length: int, clip: bool):
        super().__init__()
        self.tokenizer, self.model, self.max_length, self.clip = tokenizer, model.eval().requires_grad_(False), \
            int(max_length), clip

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size if hasattr(self.model.config, "hidden_size")
                   else self.model.config.d_model)

    @torch.no_grad()
    def encode(self, captions: list[str], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        batch = self.tokenizer(list(captions), padding="max_length", truncation=True, max_length=self.max_length,
                               return_tensors="pt").to(device)
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        tokens = out.last_hidden_state.float()
        mask = batch["attention_mask"].bool()
        if self.clip:
            pooled = out.pooler_output.float()
        else:
            weights = mask.float()[..., None]
            pooled = (tokens * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return {"tokens": tokens, "mask": mask, "pooled": pooled}


def load_text_encoder(name: str, weights: str = "hub", max_length: int = 77) -> TextEncoder:
    """The encoder `name` with `weights` (module docstring), frozen, on the CPU."""
    from transformers import AutoConfig, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per stage is ours; the library's would add one per load

    if weights == "minilm":
        from pipeline.text import minilm

        source = minilm.model_dir()
        if not (source / "config.json").is_file():
            raise FileNotFoundError(minilm.missing_message())
        source, local = str(source), True
    elif weights == "hub":
        source, local = name, False
    else:
        path = Path(weights).expanduser()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"text.weights {str(path)!r} is not a Hugging Face model directory (no "
                                    "config.json): give 'hub', 'minilm' or such a directory")
        source, local = str(path), True

    def build():
        config = AutoConfig.from_pretrained(source, local_files_only=local)
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local)
        kind = config.model_type
        if kind == "clip":
            from transformers import CLIPTextModel as cls
        elif kind in ("t5", "umt5", "mt5"):
            from transformers import T5EncoderModel as cls
        else:
            from transformers import AutoModel as cls
        return tokenizer, cls.from_pretrained(source, local_files_only=local), kind == "clip"

    if local:
        tokenizer, model, clip = build()
    else:
        tokenizer, model, clip = from_hub(build, f"the text encoder {name}",
                                          "set text.weights to a local Hugging Face model directory")
    if max_length > getattr(model.config, "max_position_embeddings", max_length):
        raise ValueError(f"text.max_length = {max_length} exceeds {name}'s {model.config.max_position_embeddings} "
                         "positions")
    return TextEncoder(tokenizer, model, max_length, clip)
