"""Autoencoder wrapper: identity round trip, tiny random shapes and math, local loading, no hub."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL

from pipeline.vae.autoencoder import TINY_CONFIG, load_vae


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread avoids oversubscribing a shared CPU (much faster here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def images(b: int = 2, size: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, size, size), generator=g, dtype=torch.uint8)


def test_identity_round_trips_uint8_exactly():
    vae = load_vae("identity", "hub")
    assert (vae.scaling_factor, vae.latent_channels, vae.downsample) == (1.0, 3, 1)
    x = torch.arange(256, dtype=torch.uint8).repeat(3 * 4 * 64 // 256 * 4).reshape(4, 3, 16, 16)
    moments = vae.encode_moments(x)
    assert moments.shape == (4, 6, 16, 16) and moments.dtype == torch.float32
    mean, std = moments.chunk(2, dim=1)
    assert torch.equal(std, torch.zeros_like(std))
    assert torch.allclose(mean, x.float() / 127.5 - 1)
    z = mean * vae.scaling_factor  # std = 0: every posterior sample is the mean
    back = ((vae.decode(z) + 1.0) * 127.5).round().to(torch.uint8)  # the exact inverse of x / 127.5 - 1
    assert torch.equal(back, x)


def test_tiny_random_shapes_and_posterior_math():
    vae = load_vae("tiny-random", "random")
    assert (vae.latent_channels, vae.downsample, vae.scaling_factor) == (4, 2, 0.18215)
    x = images(2, 16)
    moments = vae.encode_moments(x)
    assert moments.shape == (2, 8, 8, 8) and moments.dtype == torch.float32
    # independent check against diffusers' own posterior
    dist = vae.vae.encode(x.float() / 127.5 - 1).latent_dist
    torch.testing.assert_close(moments[:, :4], dist.mean.detach())
    torch.testing.assert_close(moments[:, 4:], torch.exp(0.5 * dist.logvar.clamp(-30, 20)).detach())
    eps = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    z = (moments[:, :4] + moments[:, 4:] * eps) * 0.5  # a posterior sample, scaled
    # decode takes the scaled latent and divides by the scaling factor
    out = vae.decode(z[:, :, :4, :4])
    assert out.shape == (2, 3, 8, 8) and out.min() >= -1 and out.max() <= 1
    ref = vae.vae.decode(z[:, :, :4, :4] / 0.18215).sample.clamp(-1, 1)
    torch.testing.assert_close(out, ref.detach())
    # seeded: the same weights every time, whatever the global RNG did
    torch.manual_seed(123)
    again = load_vae("tiny-random", "random")
    assert torch.equal(again.encode_moments(x), moments)
    with pytest.raises(ValueError, match="divisible"):
        vae.encode_moments(images(1, 15))
    with pytest.raises(ValueError, match="uint8"):
        vae.encode_moments(x.float())


def test_local_directory_and_state_dict_file(tmp_path, monkeypatch):
    ref = load_vae("tiny-random", "random", seed=7)
    ref.vae.save_pretrained(tmp_path / "vae")

    def no_hub(*args, **kwargs):
        raise AssertionError("the hub must not be contacted for local weights")

    real = AutoencoderKL.from_pretrained.__func__
    monkeypatch.setattr(AutoencoderKL, "from_pretrained",
                        classmethod(lambda cls, p, **kw: real(cls, p, **kw) if kw.get("local_files_only") else no_hub()))
    x = images(1, 16)
    from_dir = load_vae("sd-vae-ft-ema", str(tmp_path / "vae"))  # architecture from the directory's config.json
    assert from_dir.downsample == 2 and from_dir.latent_channels == 4
    torch.testing.assert_close(from_dir.encode_moments(x), ref.encode_moments(x))

    from safetensors.torch import save_file

    save_file(ref.vae.state_dict(), str(tmp_path / "tiny.safetensors"))
    from_file = load_vae("tiny-random", str(tmp_path / "tiny.safetensors"))
    torch.testing.assert_close(from_file.encode_moments(x), ref.encode_moments(x))
    torch.save(ref.vae.state_dict(), tmp_path / "tiny.pt")
    assert torch.equal(load_vae("tiny-random", str(tmp_path / "tiny.pt")).encode_moments(x), ref.encode_moments(x))

    with pytest.raises(ValueError, match="do not match the sd-vae-ft-mse architecture"):
        load_vae("sd-vae-ft-mse", str(tmp_path / "tiny.safetensors"))


def test_errors_name_the_fix(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="not found.*save_pretrained"):
        load_vae("sd-vae-ft-ema", str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_vae("sd-vae-ft-ema", str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="unknown"):
        load_vae("sd-vae-ft-xl", "hub")
    calls = []

    def offline(cls, repo, **kwargs):
        calls.append(repo)
        raise OSError("offline")

    monkeypatch.setattr(AutoencoderKL, "from_pretrained", classmethod(offline))
    with pytest.raises(FileNotFoundError, match="stabilityai/sd-vae-ft-mse.*vae.weights"):
        load_vae("sd-vae-ft-mse", "hub")
    assert calls == ["stabilityai/sd-vae-ft-mse"]
    load_vae("tiny-random", "hub")  # nothing to download: seeded init
    load_vae("identity", "hub")
    assert calls == ["stabilityai/sd-vae-ft-mse"]
    assert TINY_CONFIG["block_out_channels"] == (32, 32)
