"""PickScore, on a tiny random CLIP and processor saved as the Hub stores them, loaded through the real
path (a fake local Hugging Face cache: nothing is downloaded and the real cache is never read)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_clip import BOS_ID, EOS_ID, VOCAB_SIZE, fake_hub_cache, tokenizer_files, use_cache

from reward_models.laion_aesthetic import clip_preprocess
from reward_models.pickscore import FLOW_GRPO_DIVISOR, MAX_TOKENS, MODEL_REPO, PROCESSOR_REPO, PickScore
from rsm_core.records import AssetError

IMAGE_SIZE = 32
PROMPTS = ["a red cube", "two blue spheres on a table", "a cat"]


def _preprocessor_config(size: int = IMAGE_SIZE, **changes) -> dict:
    """The layout of laion/CLIP-ViT-H-14-laion2B-s32B-b79K's preprocessor_config.json (size 224 there)."""
    return {
        "crop_size": size,
        "do_center_crop": True,
        "do_normalize": True,
        "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "resample": 3,
        "size": size,
    } | changes


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    """A tiny random PickScore model and processor, each in a directory as the Hub repo holds it."""
    from transformers import CLIPConfig, CLIPModel

    root = tmp_path_factory.mktemp("pickscore")
    processor = root / "processor"
    processor.mkdir()
    tokenizer_files(processor)
    (processor / "preprocessor_config.json").write_text(json.dumps(_preprocessor_config()))

    small = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1, "num_attention_heads": 2}
    text = {**small, "vocab_size": VOCAB_SIZE, "max_position_embeddings": MAX_TOKENS}
    config = CLIPConfig(
        text_config={**text, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": EOS_ID},
        vision_config={**small, "image_size": IMAGE_SIZE, "patch_size": 8},
        projection_dim=16,
        logit_scale_init_value=4.0,  # exp = 54.6, nearer PickScore's 100 than CLIP's default 14.3
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(root / "model")
    # the processor repo also holds its CLIP's config.json, which transformers reads to load a tokenizer
    # by hub id
    shutil.copy(root / "model" / "config.json", processor)
    return {"model": root / "model", "processor": processor}


@pytest.fixture(scope="module")
def reward(saved, tmp_path_factory) -> PickScore:
    """Built with the default hub ids, found in a fake cache holding both repos."""
    cache = tmp_path_factory.mktemp("hf_cache")
    fake_hub_cache(cache, {MODEL_REPO: saved["model"], PROCESSOR_REPO: saved["processor"]})
    with pytest.MonkeyPatch.context() as monkeypatch:
        use_cache(monkeypatch, cache)
        return PickScore()


def _images(b: int = 3, h: int = 40, w: int = 52, seed: int = 2) -> torch.Tensor:
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def test_output_shape_dtype_finite_deterministic(reward) -> None:
    images = _images()
    scores = reward(images, PROMPTS)
    assert scores.shape == (3,) and scores.dtype == torch.float32
    assert torch.isfinite(scores).all()
    assert torch.equal(scores, reward(images, PROMPTS))
    assert torch.allclose(reward(images[1:2], PROMPTS[1:2]), scores[1:2], atol=1e-5)  # no batch coupling
    assert not torch.allclose(reward(images, PROMPTS[::-1]), scores)  # depends on the prompt
    assert not torch.allclose(reward(images.flip(0), PROMPTS), scores)  # and on the image
    with pytest.raises(ValueError, match="3 images but 2 prompts"):
        reward(images, PROMPTS[:2])


def test_frozen_and_eval(reward) -> None:
    assert reward.name == "pickscore" and reward.differentiable
    assert all(not p.requires_grad for p in reward.parameters())
    reward.train()
    assert not any(module.training for module in reward.modules())


def test_gradient_reaches_images(reward) -> None:
    images = _images().requires_grad_(True)
    reward(images, PROMPTS).sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all()
    assert images.grad.abs().sum() > 0
    images.grad = None
    reward(images, PROMPTS)[0].backward()  # each score depends only on its own image
    assert images.grad[0].abs().sum() > 0 and images.grad[1:].abs().sum() == 0


def test_score_is_the_logit_scaled_cosine_over_26(reward) -> None:
    """By hand, the way PickScore's authors and Flow-GRPO call the model: the processor's tokens with
    padding and truncation, the projected features, L2-normalised, their dot product times exp(logit
    scale); Flow-GRPO then divides by 26."""
    images = _images()
    clip = reward.clip
    with torch.no_grad():
        tokens = reward.processor(
            text=PROMPTS, padding=True, truncation=True, max_length=77, return_tensors="pt"
        )
        text = clip.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        image = clip.get_image_features(pixel_values=clip_preprocess(images, IMAGE_SIZE))
        text, image = (f if isinstance(f, torch.Tensor) else f.pooler_output for f in (text, image))
        cosine = torch.nn.functional.cosine_similarity(image, text, dim=-1)
        manual = clip.logit_scale.exp() * cosine
        assert torch.allclose(reward.raw(images, PROMPTS), manual, rtol=1e-5, atol=1e-5)
        assert torch.allclose(reward(images, PROMPTS), manual / FLOW_GRPO_DIVISOR, rtol=1e-5, atol=1e-6)
    assert FLOW_GRPO_DIVISOR == 26.0
    long_prompt = " ".join(["word"] * 100)  # truncated at 77 tokens instead of overflowing the positions
    assert torch.isfinite(reward(images[:1], [long_prompt])).all()


@pytest.mark.parametrize(
    ("height", "width", "noise"), [(48, 70, False), (70, 41, False), (20, 27, False), (128, 170, True)]
)
def test_preprocess_matches_the_processor(reward, height: int, width: int, noise: bool) -> None:
    """The differentiable preprocessing against the loaded CLIPImageProcessor on uint8 images: mild
    downscales of a smooth wide and tall image, an upscale, and a 4x downscale of uniform noise (as from
    1024 px to 224). Measured: at most 0.015 on these. Tolerance 0.03 in normalised units (2/255 in [0, 1]):
    PIL resamples in uint8, rounding after each of its two separable passes (0.5/255 each, 0.0075
    normalised by the smallest std 0.261), while torch's antialiased bicubic (PIL's a = -0.5 kernel) stays
    in floats. PIL also clamps between its passes; on pixel noise scaled by less than 3x that moves single
    pixels by up to 0.2, which images with any smoothness do not show."""
    if noise:
        image = torch.rand(3, height, width, generator=torch.Generator().manual_seed(0))
    else:
        yy, xx = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
        image = torch.stack([0.5 + 0.45 * (7 * xx + 3 * c).sin() * (5 * yy + c).cos() for c in range(3)])
    uint8 = (image * 255).round().clamp(0, 255).to(torch.uint8)
    reference = reward.processor.image_processor(images=[uint8.permute(1, 2, 0).numpy()], return_tensors="pt")
    reference = torch.as_tensor(np.asarray(reference["pixel_values"]))
    ours = clip_preprocess(uint8[None].float() / 255, reward.image_size)
    assert ours.shape == reference.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert (ours - reference).abs().max() < 0.03


def _one_line_naming_the_downloads(message: str) -> None:
    assert "\n" not in message
    assert f"hf download {MODEL_REPO}" in message and f"hf download {PROCESSOR_REPO}" in message


def test_missing_model_or_processor_is_one_line_naming_the_downloads(saved, tmp_path, monkeypatch) -> None:
    use_cache(monkeypatch, tmp_path / "empty_cache")
    with pytest.raises(AssetError, match="no PickScore model at 'yuvalkirstain/PickScore_v1'") as info:
        PickScore()
    _one_line_naming_the_downloads(str(info.value))

    with pytest.raises(AssetError, match=f"no CLIP processor at '{PROCESSOR_REPO}'") as info:
        PickScore(model_path=saved["model"])  # the model as a local directory, the processor missing
    _one_line_naming_the_downloads(str(info.value))

    missing = tmp_path / "no-model-here"
    with pytest.raises(AssetError, match="no PickScore model") as info:
        PickScore(model_path=missing, processor_path=saved["processor"])
    assert str(missing) in str(info.value)
    _one_line_naming_the_downloads(str(info.value))


def test_processor_with_other_image_settings_is_refused(saved, tmp_path) -> None:
    """The differentiable path replicates one configuration; another processor would silently differ."""
    other = tmp_path / "processor"
    shutil.copytree(saved["processor"], other)
    config = _preprocessor_config(resample=2, image_mean=[0.5, 0.5, 0.5], crop_size=28)
    (other / "preprocessor_config.json").write_text(json.dumps(config))
    with pytest.raises(AssetError, match="image settings") as info:
        PickScore(saved["model"], other)
    message = str(info.value)
    assert "['image_mean', 'resample', 'size']" in message  # the shortest side is no longer the crop size
    _one_line_naming_the_downloads(message)


def test_local_directories_load_the_same_reward(saved, reward) -> None:
    images = _images()
    local = PickScore(saved["model"], saved["processor"])
    assert torch.equal(local(images, PROMPTS), reward(images, PROMPTS))


def test_a_run_builds_pickscore_on_its_training_device(monkeypatch) -> None:
    import reward_models.pickscore as pickscore
    from experiments.run import ModelConfig, RunConfig, reward_functions

    devices = []
    monkeypatch.setattr(pickscore, "PickScore", lambda device="cpu": devices.append(device) or "scorer")
    config = RunConfig(model=ModelConfig(backbone="sd35"), reward="pickscore", wandb=False)
    assert reward_functions(config, device="cuda:1") == {"pickscore": "scorer"}
    assert devices == ["cuda:1"]


def test_paper_data_names_the_pickscore_downloads() -> None:
    from experiments.paper_data import load_manifest

    commands = [model["command"] for model in load_manifest().models]
    assert f"hf download {MODEL_REPO}" in commands
    assert any(command.startswith(f"hf download {PROCESSOR_REPO} --include") for command in commands)
