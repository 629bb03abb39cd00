"""The adapter method shape (erasure/adapters.py, AdapterMethod): adapters train through the shared session, the
teacher stays the base model, a saved adapter delta reloads into a fresh base and reproduces the trained UNet bit for
bit, and the fingerprint check still refuses a delta for another base."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from erasure.adapters import ADAPTER_CHILD, attach, attached, described, layers_inside
from erasure.config import validate
from erasure.delta import apply_delta, load_delta, read_delta, save_delta
from erasure.errors import UserError
from erasure.method import AdapterMethod, BaseMethodConfig
from erasure.models import load_models, unet_fingerprint
from erasure.params import select_params
from erasure.session import Session, seed_everything
from tests.conftest import compose_cfg

LAYERS = ("attn2.to_k", "attn2.to_v")


@dataclasses.dataclass
class PullConfig(BaseMethodConfig):
    name: str = "pull"
    lr: float = 1e-2


class Pull(AdapterMethod):
    """A minimal adapter method: LoRAs of rank 2 on every cross-attention key/value projection, trained to pull the
    UNet's output on one fixed input towards zero (not registered: the session takes the class directly)."""

    name = "pull"
    Config = PullConfig

    @classmethod
    def build_adapters(cls, cfg, models, concept, generator):
        layers = [n for n in layers_inside(models.unet, ["Transformer2DModel"]) if n.endswith(LAYERS)]
        return [attach(models.unet, "pull", layers, rank=2, alpha=4.0, generator=generator)]

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(1, *ctx.models.latent_shape, generator=g)
        self.emb = ctx.embed(["nudity"])

    def training_step(self, step):
        out = self.ctx.unet(self.x, torch.tensor(500), encoder_hidden_states=self.emb).sample
        return {"loss": out.pow(2).mean()}


def session(models, steps: int = 3):
    cfg = compose_cfg(["model=tiny", "concept=nudity", "params=none", "trainer.preview_every=0"])
    seed_everything(0)
    s = Session.create(cfg, models, Pull, Pull.Config())
    for step in range(1, steps + 1):
        s.step(step)
    return s


def unet_out(models, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, *models.latent_shape, generator=g)
    with torch.no_grad():
        return models.unet(x, torch.tensor([100, 700]), encoder_hidden_states=models.encode_text(["nudity", ""])).sample


def test_adapters_train_in_the_session_and_the_teacher_stays_the_base_model(tiny_models):
    base_out = unet_out(tiny_models)
    fingerprint = tiny_models.fingerprint
    s = session(tiny_models)
    pull = attached(tiny_models.unet)["pull"]
    assert set(s.trainable) == set(pull.named_parameters())  # params=none: the adapters only
    assert all(f".{ADAPTER_CHILD}.pull." in n for n in s.trainable)
    n_blocks = sum(type(m).__name__ == "Transformer2DModel" for m in tiny_models.unet.modules())
    assert len(pull.targets) == 2 * n_blocks  # to_k and to_v of every transformer block
    assert not pull.is_identity()  # trained
    assert not torch.equal(unet_out(tiny_models), base_out)
    # the teacher (the trained tensors' starting values swapped in) computes the base model exactly
    x = torch.randn(1, *tiny_models.latent_shape)
    emb = tiny_models.encode_text(["nudity"])
    with pull.multiplied(0.0):
        plain = tiny_models.unet(x, torch.tensor(500), encoder_hidden_states=emb).sample
    torch.testing.assert_close(s.teacher(x, torch.tensor(500), emb), plain, rtol=0, atol=0)
    # adapters are not part of the base: the fingerprint of the adapted UNet is the base's
    assert unet_fingerprint(tiny_models.unet) == fingerprint


def test_saved_adapter_delta_reloads_bit_for_bit_and_refuses_another_base(tiny_models, tmp_path):
    s = session(tiny_models)
    trained_out = unet_out(tiny_models)
    params = s.method.export_params()
    meta = dict(base_fingerprint=tiny_models.fingerprint, method="pull", params="none")
    path = save_delta(tmp_path / "delta.safetensors", params, {**meta, "adapters": described(tiny_models.unet, params)})
    tensors, read_meta = read_delta(path)
    assert read_meta["format"] == "erasure-delta/2"
    assert read_meta["adapters"][0]["targets"] == attached(tiny_models.unet)["pull"].targets
    assert read_meta["adapters"][0]["rank"] == 2 and read_meta["adapters"][0]["alpha"] == 4.0

    fresh = load_models(compose_cfg(["model=tiny"]).model, "cpu")
    base_out = unet_out(fresh)
    tensors, _ = load_delta(fresh, path)  # attaches the set as the identity
    assert "pull" in attached(fresh.unet)
    torch.testing.assert_close(unet_out(fresh), base_out, rtol=0, atol=0)  # nothing copied yet: still the base
    apply_delta(fresh, path)
    assert torch.equal(unet_out(fresh), trained_out)  # bit for bit
    # through a standard diffusers pipeline around the reloaded UNet
    assert fresh.pipeline().unet is fresh.unet

    other = load_models(compose_cfg(["model=tiny", "model.seed=7"]).model, "cpu")
    with pytest.raises(UserError, match="fingerprint"):
        apply_delta(other, path)
    assert not attached(other.unet)  # refused before anything was attached


def test_low_rank_adapter_is_up_down_times_alpha_over_rank():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3), nn.Conv2d(3, 6, 3, padding=1))
    s = attach(model, "a", ["0", "1"], rank=2, alpha=3.0, generator=torch.Generator().manual_seed(0))
    lin, conv = s.modules["0"], s.modules["1"]
    with torch.no_grad():
        for a in (lin, conv):
            a.up.weight.normal_()
    x = torch.randn(4, 5)
    y = model[0](x)
    expected = F.linear(x, model[0].weight, model[0].bias) + 1.5 * (x @ lin.down.weight.T) @ lin.up.weight.T
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(lin.delta_weight(), 1.5 * lin.up.weight @ lin.down.weight)
    img = torch.randn(2, 3, 4, 4)
    got = model[1](img)
    want = F.conv2d(img, model[1].weight, model[1].bias, padding=1) + 1.5 * F.conv2d(
        F.conv2d(img, conv.down.weight, padding=1), conv.up.weight)
    torch.testing.assert_close(got, want)
    # per-row multipliers, tiled over a batch that repeats its rows (classifier-free guidance)
    s.set_multiplier(torch.tensor([0.0, 2.0]))
    y2 = model[0](x)
    base = F.linear(x, model[0].weight, model[0].bias)
    torch.testing.assert_close(y2, base + torch.tensor([0.0, 2.0, 0.0, 2.0])[:, None] * (expected - base))


def test_params_none_is_for_adapter_methods_only(tiny_models):
    assert select_params(tiny_models.unet, compose_cfg(["params=none"]).params) == {}
    with pytest.raises(UserError, match="params=none selects no UNet parameter"):
        validate(compose_cfg(["model=tiny", "concept=nudity", "method=esd", "params=none"]))
