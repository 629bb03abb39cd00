import pytest
import torch

from erasure.errors import UserError
from erasure.models import SD_SCHEDULER_CONFIG, load_models
from erasure.tokenizer import build_clip_tokenizer
from tests.conftest import compose_cfg


def test_clip_tokenizer_matches_sd14_ids():
    tok = build_clip_tokenizer()
    # ids SD v1.4's tokenizer (openai/clip-vit-large-patch14 vocabulary) gives for this prompt
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(tok) == 49408
    padded = tok("a photo of a cat", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[7:] == [49407] * 70


def test_tiny_model_builds_offline_with_sd_scheduler(tiny_models):
    m = tiny_models
    assert type(m.unet).__name__ == "UNet2DConditionModel"
    assert type(m.vae).__name__ == "AutoencoderKL"
    assert type(m.text_encoder).__name__ == "CLIPTextModel"
    assert m.latent_shape == (4, 16, 16)
    cfg = m.scheduler.config
    for key, value in SD_SCHEDULER_CONFIG.items():
        assert cfg[key] == value, key
    assert cfg["clip_sample"] is False
    emb = m.encode_text(["a photo of a cat", ""])
    assert emb.shape == (2, 77, m.unet.config.cross_attention_dim)
    # the same seed gives the same weights (fingerprint is a pure function of the weights)
    again = load_models(compose_cfg(["model=tiny"]).model, "cpu")
    assert again.fingerprint == m.fingerprint
    other = load_models(compose_cfg(["model=tiny", "model.seed=1"]).model, "cpu")
    assert other.fingerprint != m.fingerprint


def test_sd14_without_weights_is_one_clear_sentence(tmp_path):
    cfg = compose_cfg(["model=sd14", f"model.path={tmp_path / 'nowhere'}"])
    with pytest.raises(UserError, match="does not exist"):
        load_models(cfg.model, "cpu")
    cfg = compose_cfg(["model=sd14"])  # hub id, nothing in the local cache, no hub reachable
    with pytest.raises(UserError, match="not on this machine"):
        load_models(cfg.model, "cpu")


def test_fingerprint_changes_with_any_weight(tiny_models):
    before = tiny_models.fingerprint
    from erasure.models import unet_fingerprint

    with torch.no_grad():
        next(iter(tiny_models.unet.parameters())).view(-1)[0] += 1e-3
    assert unet_fingerprint(tiny_models.unet) != before
