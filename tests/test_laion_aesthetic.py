"""The LAION aesthetic reward, on a tiny random CLIP saved to disk and loaded through the real path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from reward_models.laion_aesthetic import (
    CLIP_MEAN,
    CLIP_STD,
    HEAD_ENV,
    HEAD_FILE,
    AestheticHead,
    LAIONAesthetic,
    clip_preprocess,
)
from rsm_core.records import DATA_ENV, AssetError

PROJECTION = 16
IMAGE_SIZE = 32


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel

    small = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = CLIPConfig(
        text_config={**small, "vocab_size": 64, "max_position_embeddings": 16},
        vision_config={**small, "image_size": IMAGE_SIZE, "patch_size": 8},
        projection_dim=PROJECTION,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clip")
    CLIPModel(config).save_pretrained(path)
    return path


def _random_head_state(input_size: int = PROJECTION, seed: int = 1) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    head = AestheticHead(input_size)
    for parameter in head.parameters():  # larger than the default init so scores vary visibly
        torch.nn.init.normal_(parameter, std=0.5)
    return head.state_dict()


@pytest.fixture(scope="module")
def head_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("head") / HEAD_FILE
    torch.save(_random_head_state(), path)
    return path


@pytest.fixture(scope="module")
def reward(clip_dir, head_path):
    return LAIONAesthetic(str(clip_dir), str(head_path))


def _images(b: int = 3, h: int = 40, w: int = 52, seed: int = 2) -> torch.Tensor:
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def test_output_shape_dtype_finite_deterministic(reward):
    images = _images()
    scores = reward(images, ["a prompt"] * 3)
    assert scores.shape == (3,) and scores.dtype == torch.float32
    assert torch.isfinite(scores).all()
    assert torch.equal(scores, reward(images))
    assert not torch.allclose(scores, scores[:1].expand(3))  # depends on the image
    assert torch.allclose(reward(images[1:2]), scores[1:2], atol=1e-5)  # no batch coupling


def test_frozen_and_eval(reward):
    assert reward.name == "aesthetic" and reward.differentiable
    assert all(not p.requires_grad for p in reward.parameters())
    reward.train()  # stays in eval: dropout must never act on a reward
    assert not any(module.training for module in reward.modules())
    images = _images()
    assert torch.equal(reward(images), reward(images))


def test_gradient_reaches_images(reward):
    images = _images().requires_grad_(True)
    reward(images).sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all()
    assert images.grad.abs().sum() > 0
    # each score depends only on its own image
    images.grad = None
    reward(images)[0].backward()
    assert images.grad[0].abs().sum() > 0 and images.grad[1:].abs().sum() == 0


def test_score_is_affine_in_normalised_embedding(reward):
    """No activations: the head collapses to a single affine map w . e + b, and the whole reward is
    that map applied to the L2-normalised projected CLIP embedding."""
    images = _images()
    linears = [m for m in reward.head.layers if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 5 and len(reward.head.layers) == 8
    assert all(isinstance(reward.head.layers[i], torch.nn.Dropout) for i in (1, 3, 5))
    weight, bias = torch.eye(PROJECTION, dtype=torch.float64), torch.zeros(PROJECTION, dtype=torch.float64)
    for layer in linears:
        w, b = layer.weight.double(), layer.bias.double()
        weight, bias = w @ weight, w @ bias + b

    with torch.no_grad():
        pixels = clip_preprocess(images, IMAGE_SIZE)
        features = reward.clip.get_image_features(pixel_values=pixels)
        features = features if isinstance(features, torch.Tensor) else features.pooler_output
        normalised = features / features.norm(dim=-1, keepdim=True)
        manual = (normalised.double() @ weight.T + bias).squeeze(-1)
        assert torch.allclose(reward.embed(images), normalised, atol=1e-6)
        assert torch.allclose(reward(images).double(), manual, rtol=1e-4, atol=1e-4)

        # affine: head(a x + (1 - a) y) = a head(x) + (1 - a) head(y), also off the unit sphere
        x, y = normalised[0], 3.0 * normalised[1]
        for a in (0.25, -1.5):
            mixed = reward.head(a * x + (1 - a) * y)
            assert torch.allclose(mixed, a * reward.head(x) + (1 - a) * reward.head(y), rtol=1e-4, atol=1e-4)


def test_preprocess_geometry():
    """Shortest side to the crop size, long side truncated, centre crop rounded down, CLIP mean/std."""
    # a square image at the target size is only normalised
    image = _images(1, 32, 32)
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    assert torch.allclose(clip_preprocess(image, 32), (image - mean) / std, atol=1e-6)
    # a wide image whose height is already right: no resampling, only the centred columns survive
    wide = _images(1, 32, 45)
    assert torch.allclose(clip_preprocess(wide, 32), (wide[..., :, 6:38] - mean) / std, atol=1e-6)
    # a constant image stays constant through resize and crop, for any shape
    grey = torch.full((2, 3, 50, 37), 0.3)
    out = clip_preprocess(grey, 32)
    assert out.shape == (2, 3, 32, 32)
    assert torch.allclose(out, (0.3 - mean) / std * torch.ones_like(out), atol=1e-5)
    with pytest.raises(ValueError):
        clip_preprocess(torch.rand(2, 32, 32), 32)


def test_preprocess_close_to_the_hf_processor():
    """Within resampling differences of the reference CLIPImageProcessor (on uint8 images)."""
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor(
        size={"shortest_edge": 32},
        crop_size={"height": 32, "width": 32},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )
    # a smooth image so that the two bicubic filters agree closely
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 48), torch.linspace(0, 1, 70), indexing="ij")
    image = torch.stack([0.5 + 0.4 * torch.sin(3 * xx + c) * torch.cos(2 * yy) for c in range(3)])
    uint8 = (image * 255).round().clamp(0, 255).to(torch.uint8)
    reference = processor(images=[uint8.permute(1, 2, 0).numpy()], return_tensors="pt")["pixel_values"]
    ours = clip_preprocess(uint8[None].float() / 255, 32)
    assert ours.shape == reference.shape
    assert (ours - torch.as_tensor(np.asarray(reference))).abs().max() < 0.1


def test_missing_clip_names_it(head_path, tmp_path):
    missing = tmp_path / "no-clip-here"
    with pytest.raises(AssetError) as info:
        LAIONAesthetic(str(missing), str(head_path))
    message = str(info.value)
    assert str(missing) in message and "hf download openai/clip-vit-large-patch14" in message


def test_missing_head_names_file_and_env(clip_dir, tmp_path, monkeypatch):
    missing = tmp_path / "nowhere" / HEAD_FILE
    monkeypatch.setenv(HEAD_ENV, str(missing))
    with pytest.raises(AssetError) as info:
        LAIONAesthetic(str(clip_dir))  # head_path from the environment variable
    message = str(info.value)
    assert HEAD_FILE in message and str(missing) in message and HEAD_ENV in message
    assert "improved-aesthetic-predictor" in message

    monkeypatch.delenv(HEAD_ENV)
    monkeypatch.delenv(DATA_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # default ~/.cache/rsm_bench/<file>, absent here
    with pytest.raises(AssetError) as info:
        LAIONAesthetic(str(clip_dir))
    assert str(tmp_path / ".cache" / "rsm_bench" / HEAD_FILE) in str(info.value)
    assert "make paper-data" in str(info.value)


def test_head_from_env_var(clip_dir, head_path, monkeypatch, reward):
    monkeypatch.setenv(HEAD_ENV, str(head_path))
    images = _images()
    assert torch.equal(LAIONAesthetic(str(clip_dir))(images), reward(images))


def test_head_with_wrong_keys_or_shapes(clip_dir, tmp_path):
    state = _random_head_state()
    renamed = {key.replace("layers.", "mlp."): value for key, value in state.items()}
    path = tmp_path / "renamed.pth"
    torch.save(renamed, path)
    with pytest.raises(AssetError, match="not the LAION aesthetic head") as info:
        LAIONAesthetic(str(clip_dir), str(path))
    assert "layers.0.weight" in str(info.value) and "mlp.0.weight" in str(info.value)

    path = tmp_path / "wide.pth"
    torch.save(_random_head_state(input_size=768), path)  # the real head, for a CLIP of another width
    with pytest.raises(AssetError, match="does not fit a CLIP embedding of size 16"):
        LAIONAesthetic(str(clip_dir), str(path))

    path = tmp_path / "pickled.pth"
    torch.save({"layers": AestheticHead(PROJECTION)}, path)  # a pickled module: refused by weights_only
    with pytest.raises(AssetError, match="could not read head weights"):
        LAIONAesthetic(str(clip_dir), str(path))


def test_a_run_builds_the_aesthetic_reward_on_its_training_device(monkeypatch) -> None:
    """accelerate gives each process one CPU thread: a reward left on the CPU took an hour per epoch."""
    import reward_models.laion_aesthetic as laion
    from experiments.run import ModelConfig, RunConfig, reward_functions

    devices = []
    monkeypatch.setattr(laion, "LAIONAesthetic", lambda device="cpu": devices.append(device) or "scorer")
    config = RunConfig(model=ModelConfig(backbone="sd35"), reward="aesthetic", wandb=False)
    assert reward_functions(config, device="cuda:1") == {"aesthetic": "scorer"}
    assert devices == ["cuda:1"]
