"""HPSv2.1 on transformers' CLIPModel, checked against a small independent open_clip-layout reference
network with random weights, saved the way HPSv2 saves its checkpoint ({'state_dict': ...})."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny_clip import BOS_ID, CHARS, EOS_ID, VOCAB_SIZE, fake_hub_cache, tokenizer_files, use_cache
from torch import Tensor, nn

from reward_models.hpsv2 import (
    HPS_FILE,
    HPS_REPO,
    MAX_TOKENS,
    TOKENIZER_REPO,
    HPSv2,
    hps_preprocess,
    load_hps_clip,
    read_checkpoint,
    resize_max_size,
)
from reward_models.laion_aesthetic import CLIP_MEAN, CLIP_STD
from rsm_core.records import DATA_ENV, AssetError

IMAGE_SIZE, PATCH = 32, 8
VISION_WIDTH, TEXT_WIDTH, EMBED, LAYERS, HEADS = 32, 24, 16, 2, 2
PROMPTS = ["a red cube", "two blue spheres on a table", "a cat"]


# ------------------------------------------------------------------------------------------------
# A small open_clip CLIP, written from open_clip's layout: nn.MultiheadAttention blocks (packed
# in_proj_weight, out_proj), pre-norm, GELU MLP c_fc / c_proj, sequence-first transformer.
# ------------------------------------------------------------------------------------------------


class RefBlock(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict(c_fc=nn.Linear(width, 4 * width), gelu=nn.GELU(), c_proj=nn.Linear(4 * width, width))
        )

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:  # (L, N, D)
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class RefTransformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(RefBlock(width, heads) for _ in range(layers))

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:  # (N, L, D) in and out
        x = x.permute(1, 0, 2)
        for block in self.resblocks:
            x = block(x, mask)
        return x.permute(1, 0, 2)


class RefVisual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        grid = IMAGE_SIZE // PATCH
        self.conv1 = nn.Conv2d(3, VISION_WIDTH, PATCH, stride=PATCH, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(VISION_WIDTH))
        self.positional_embedding = nn.Parameter(torch.randn(grid * grid + 1, VISION_WIDTH))
        self.ln_pre = nn.LayerNorm(VISION_WIDTH)
        self.transformer = RefTransformer(VISION_WIDTH, LAYERS, HEADS)
        self.ln_post = nn.LayerNorm(VISION_WIDTH)
        self.proj = nn.Parameter(torch.randn(VISION_WIDTH, EMBED))

    def forward(self, pixels: Tensor) -> Tensor:
        x = self.conv1(pixels).flatten(2).permute(0, 2, 1)  # (N, grid², width)
        x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + self.positional_embedding
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj


class RefCLIP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.visual = RefVisual()
        self.transformer = RefTransformer(TEXT_WIDTH, LAYERS, HEADS)
        self.token_embedding = nn.Embedding(VOCAB_SIZE, TEXT_WIDTH)
        self.positional_embedding = nn.Parameter(torch.randn(MAX_TOKENS, TEXT_WIDTH))
        self.ln_final = nn.LayerNorm(TEXT_WIDTH)
        self.text_projection = nn.Parameter(torch.randn(TEXT_WIDTH, EMBED))
        self.logit_scale = nn.Parameter(torch.tensor(4.6))
        causal = torch.full((MAX_TOKENS, MAX_TOKENS), float("-inf")).triu(1)
        self.register_buffer("attn_mask", causal, persistent=False)

    def encode_text(self, tokens: Tensor) -> Tensor:
        x = self.token_embedding(tokens) + self.positional_embedding
        x = self.ln_final(self.transformer(x, self.attn_mask))
        return x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)] @ self.text_projection  # EOT: largest id


def reference_tokens(prompts: list[str]) -> Tensor:
    """open_clip's tokenize for the tiny single-character BPE, by hand: start token, each word's
    characters (the last one word-final), end token; truncated to 77 keeping the end token last;
    padded with 0."""
    result = torch.zeros(len(prompts), MAX_TOKENS, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids = [BOS_ID]
        for word in prompt.lower().split():
            ids += [CHARS.index(c) for c in word[:-1]] + [len(CHARS) + CHARS.index(word[-1])]
        ids = [*ids[: MAX_TOKENS - 1], EOS_ID]
        result[row, : len(ids)] = torch.tensor(ids)
    return result


def tiny_config():
    from transformers import CLIPConfig

    common = {"num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "hidden_act": "gelu"}
    return CLIPConfig(
        vision_config={
            **common,
            "hidden_size": VISION_WIDTH,
            "intermediate_size": 4 * VISION_WIDTH,
            "image_size": IMAGE_SIZE,
            "patch_size": PATCH,
        },
        text_config={
            **common,
            "hidden_size": TEXT_WIDTH,
            "intermediate_size": 4 * TEXT_WIDTH,
            "max_position_embeddings": MAX_TOKENS,
            "vocab_size": VOCAB_SIZE,
            "bos_token_id": BOS_ID,
            "eos_token_id": EOS_ID,
            "pad_token_id": EOS_ID,
        },
        projection_dim=EMBED,
    )


@pytest.fixture(scope="module")
def reference() -> RefCLIP:
    torch.manual_seed(0)
    model = RefCLIP()
    with torch.no_grad():  # every parameter random, LayerNorm gains near 1 and biases nonzero
        for name, parameter in model.named_parameters():
            if ".ln_" in name or name.startswith("ln_"):
                parameter.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(parameter))
            else:
                parameter.normal_(0.0, 0.3 if parameter.ndim > 1 else 0.5)
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def saved(reference, tmp_path_factory) -> dict[str, Path]:
    """The reference's state dict saved as HPSv2's checkpoint is, and the tiny tokenizer."""
    root = tmp_path_factory.mktemp("hpsv2")
    torch.save({"state_dict": reference.state_dict()}, root / HPS_FILE)
    (root / "tokenizer").mkdir()
    tokenizer_files(root / "tokenizer")
    return {"checkpoint": root / HPS_FILE, "tokenizer": root / "tokenizer"}


@pytest.fixture(scope="module")
def reward(saved) -> HPSv2:
    return HPSv2(saved["checkpoint"], saved["tokenizer"], config=tiny_config())


def _images(b: int = 3, h: int = 40, w: int = 52, seed: int = 2) -> Tensor:
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _features(output) -> Tensor:
    return output if isinstance(output, Tensor) else output.pooler_output


# ------------------------------------------------------------------------------------------------
# 1. The conversion: same embeddings and scores as the open_clip-layout reference
# ------------------------------------------------------------------------------------------------


def test_converted_clip_matches_the_open_clip_reference(reference, saved) -> None:
    """In float64, image and text embeddings agree to 1e-10 relative; a wrong q/k/v split order or a
    missing transpose of a projection makes this fail."""
    clip = load_hps_clip(read_checkpoint(saved["checkpoint"]), tiny_config()).double().eval()
    ref = reference.double()
    try:
        pixels = torch.randn(4, 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.float64)
        with torch.no_grad():
            ours, theirs = _features(clip.get_image_features(pixel_values=pixels)), ref.visual(pixels)
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10 * theirs.abs().max().item())

        tokens = reference_tokens([*PROMPTS, "b"])
        with torch.no_grad():  # open_clip's zero padding: the same ids up to the end token
            ours = _features(clip.get_text_features(input_ids=tokens))
            theirs = ref.encode_text(tokens)
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10 * theirs.abs().max().item())
        assert torch.equal(clip.logit_scale, ref.logit_scale)
    finally:
        reference.float()


def test_scores_match_the_reference_cosine(reference, reward) -> None:
    """End to end in fp32: the reward's tokenizer (end-token padding) and preprocessing against the
    reference network on open_clip's tokens; agreement to 1e-5."""
    long_prompt = " ".join(["word"] * 30)  # 150 characters: truncated to 77 tokens
    prompts = [*PROMPTS, long_prompt]
    images = _images(b=4)
    with torch.no_grad():
        image = F.normalize(reference.visual(hps_preprocess(images, IMAGE_SIZE)), dim=-1)
        text = F.normalize(reference.encode_text(reference_tokens(prompts)), dim=-1)
        expected = (image * text).sum(-1)
        tokens = reward.tokenizer(prompts, padding="max_length", truncation=True, max_length=MAX_TOKENS)
    assert tokens["input_ids"][-1][-1] == EOS_ID  # truncation keeps the end token
    torch.testing.assert_close(reward.embed_prompts(prompts), text, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(reward(images, prompts), expected, rtol=1e-5, atol=1e-6)
    assert expected.abs().min() > 1e-3  # nonzero cosines: the comparison is not vacuous


# ------------------------------------------------------------------------------------------------
# 2. Strict loading
# ------------------------------------------------------------------------------------------------


def test_missing_unexpected_or_misshapen_keys_are_errors(reference) -> None:
    state = reference.state_dict()
    config = tiny_config()

    missing = {k: v for k, v in state.items() if k != "visual.ln_post.bias"}
    with pytest.raises(AssetError, match=r"missing \['vision_model.post_layernorm.bias'\], unexpected \[\]"):
        load_hps_clip(missing, config)

    extra_layer = {**state, "visual.transformer.resblocks.2.ln_1.weight": torch.ones(VISION_WIDTH)}
    unexpected = r"unexpected \['vision_model.encoder.layers.2.layer_norm1.weight'\]"
    with pytest.raises(AssetError, match=unexpected):
        load_hps_clip(extra_layer, config)

    with pytest.raises(AssetError, match=r"not part of open_clip's ViT CLIP: \['score_head.weight'\]"):
        load_hps_clip({**state, "score_head.weight": torch.ones(1)}, config)

    with pytest.raises(AssetError, match="does not fit this CLIP"):
        load_hps_clip({**state, "visual.proj": torch.ones(VISION_WIDTH, EMBED + 1)}, config)

    causal = reference.attn_mask.clone()
    with_mask = load_hps_clip({**state, "attn_mask": causal}, config)  # a saved causal mask is harmless
    assert torch.equal(with_mask.visual_projection.weight, state["visual.proj"].t())
    with pytest.raises(AssetError, match="not a causal mask"):
        load_hps_clip({**state, "attn_mask": torch.zeros_like(causal)}, config)


def test_checkpoint_forms(reference, tmp_path) -> None:
    """Under 'state_dict' (HPSv2's form) or bare, with or without DataParallel's 'module.' prefix."""
    state = reference.state_dict()
    for name, content in {
        "bare.pt": state,
        "module.pt": {"state_dict": {f"module.{k}": v for k, v in state.items()}},
    }.items():
        torch.save(content, tmp_path / name)
        loaded = read_checkpoint(tmp_path / name)
        assert loaded.keys() == state.keys()
        assert all(torch.equal(loaded[k], state[k]) for k in state)

    torch.save([torch.ones(1)], tmp_path / "list.pt")
    with pytest.raises(AssetError, match="holds no state dict"):
        read_checkpoint(tmp_path / "list.pt")
    (tmp_path / "corrupt.pt").write_bytes(b"not a torch file")
    with pytest.raises(AssetError, match="could not read") as info:
        read_checkpoint(tmp_path / "corrupt.pt")
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------------
# 3. Preprocessing
# ------------------------------------------------------------------------------------------------


def test_square_images_are_resized_bicubic() -> None:
    images = torch.rand(2, 3, 512, 512, generator=torch.Generator().manual_seed(0))
    out = resize_max_size(images, 224)
    expected = F.interpolate(images, size=(224, 224), mode="bicubic", align_corners=False, antialias=True)
    assert out.shape == (2, 3, 224, 224)
    assert torch.equal(out, expected)
    assert torch.equal(resize_max_size(out, 224), out)  # already the size: untouched


@pytest.mark.parametrize(
    ("height", "width", "inner", "before"),
    [
        (100, 50, (40, 20), (0, 10)),
        (33, 100, (13, 40), (13, 0)),
        (60, 30, (40, 20), (0, 10)),
        (8, 10, (32, 40), (4, 0)),
        (40, 20, (40, 20), (0, 10)),  # the longer side is already the size: padded only
    ],
)
def test_non_square_images_are_resized_by_the_longer_side_and_padded(height, width, inner, before) -> None:
    """The longer side becomes the size (the shorter rounded), then centred zero padding, the odd pixel
    after (33 x 100 -> 13 x 40 with 13 rows above and 14 below); 8 x 10 is an upscale. open_clip leaves
    an image whose longer side is already the size unpadded (it skips both steps); here it is padded."""
    size = 40
    images = torch.rand(2, 3, height, width, generator=torch.Generator().manual_seed(1)) + 0.5
    out = resize_max_size(images, size)
    assert out.shape == (2, 3, size, size)
    top, left = before
    content = out[..., top : top + inner[0], left : left + inner[1]]
    expected = F.interpolate(images, size=inner, mode="bicubic", align_corners=False, antialias=True)
    assert torch.equal(content, expected)
    padding = torch.ones_like(out, dtype=torch.bool)
    padding[..., top : top + inner[0], left : left + inner[1]] = False
    assert out[padding].abs().max() == 0 and expected.abs().min() > 0


def test_hps_preprocess_clamps_pads_black_normalises_and_passes_gradients() -> None:
    images = torch.rand(3, 3, 48, 64, generator=torch.Generator().manual_seed(3)) * 1.4 - 0.2
    images.requires_grad_(True)  # values in [-0.2, 1.2]: some are clamped
    pixels = hps_preprocess(images, 224)
    assert pixels.shape == (3, 3, 224, 224)
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    # 48 x 64 -> 168 x 224: 28 rows of black above and below
    black = ((0 - mean) / std).expand(3, 3, 28, 224)
    assert torch.equal(pixels[..., :28, :], black) and torch.equal(pixels[..., -28:, :], black)
    by_hand = (resize_max_size(images.detach().clamp(0, 1), 224) - mean) / std
    torch.testing.assert_close(pixels, by_hand)
    pixels.sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    inside = (images > 0) & (images < 1)
    assert (images.grad[~inside] == 0).all()  # clamped pixels get no gradient


# ------------------------------------------------------------------------------------------------
# 4. Missing assets
# ------------------------------------------------------------------------------------------------


def _empty_places(monkeypatch, tmp_path: Path) -> None:
    use_cache(monkeypatch, tmp_path / "empty_cache")
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "empty_data"))


def test_missing_checkpoint_is_one_line_naming_the_download(saved, tmp_path, monkeypatch) -> None:
    _empty_places(monkeypatch, tmp_path)
    with pytest.raises(AssetError, match=f"no HPS v2.1 checkpoint {HPS_FILE}") as info:
        HPSv2(tokenizer_path=saved["tokenizer"], config=tiny_config())
    message = str(info.value)
    assert "\n" not in message and f"hf download {HPS_REPO} {HPS_FILE}" in message
    assert str(tmp_path / "empty_data") in message

    missing = tmp_path / "elsewhere" / HPS_FILE
    with pytest.raises(AssetError, match=f"no HPS checkpoint at {missing}") as info:
        HPSv2(missing, saved["tokenizer"], config=tiny_config())
    assert "\n" not in str(info.value) and f"hf download {HPS_REPO} {HPS_FILE}" in str(info.value)


def test_missing_tokenizer_is_one_line_naming_the_download(saved, tmp_path, monkeypatch) -> None:
    _empty_places(monkeypatch, tmp_path)
    with pytest.raises(AssetError, match=f"no CLIP tokenizer at '{TOKENIZER_REPO}'") as info:
        HPSv2(saved["checkpoint"], config=tiny_config())
    message = str(info.value)
    assert "\n" not in message and f"hf download {TOKENIZER_REPO} --include '*.json' '*.txt'" in message


def test_defaults_find_the_data_root_or_the_hub_cache(saved, reward, tmp_path, monkeypatch) -> None:
    images = _images()
    expected = reward(images, PROMPTS)

    cache = tmp_path / "hf_cache"
    (tmp_path / "hps_repo").mkdir()
    (tmp_path / "hps_repo" / HPS_FILE).write_bytes(saved["checkpoint"].read_bytes())
    fake_hub_cache(cache, {HPS_REPO: tmp_path / "hps_repo", TOKENIZER_REPO: saved["tokenizer"]})
    use_cache(monkeypatch, cache)
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "empty_data"))
    torch.testing.assert_close(HPSv2(config=tiny_config())(images, PROMPTS), expected, rtol=0, atol=0)

    use_cache(monkeypatch, tmp_path / "empty_cache")
    monkeypatch.setenv(DATA_ENV, str(saved["checkpoint"].parent))
    from_root = HPSv2(tokenizer_path=saved["tokenizer"], config=tiny_config())
    torch.testing.assert_close(from_root(images, PROMPTS), expected, rtol=0, atol=0)


def test_a_tokenizer_that_does_not_fit_is_refused(saved, tmp_path) -> None:
    config = tiny_config()
    config.text_config.eos_token_id = BOS_ID
    with pytest.raises(AssetError, match="does not fit the model"):
        HPSv2(saved["checkpoint"], saved["tokenizer"], config=config)


# ------------------------------------------------------------------------------------------------
# 5. The reward
# ------------------------------------------------------------------------------------------------


def test_scores_are_cosines_with_finite_nonzero_image_gradients(reward) -> None:
    images = _images().requires_grad_(True)
    scores = reward(images, PROMPTS)
    assert scores.shape == (3,) and scores.dtype == torch.float32
    assert (scores.abs() <= 1 + 1e-6).all()
    scores.sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    images.grad = None
    reward(images, PROMPTS)[0].backward()  # each score depends only on its own image
    assert images.grad[0].abs().sum() > 0 and images.grad[1:].abs().sum() == 0
    with torch.no_grad():
        assert not torch.allclose(reward(images, PROMPTS[::-1]), scores)  # depends on the prompt
    with pytest.raises(ValueError, match="3 images but 2 prompts"):
        reward(images, PROMPTS[:2])


def test_frozen_eval_fp32(reward) -> None:
    assert reward.name == "hpsv2" and reward.differentiable
    assert all(not p.requires_grad and p.dtype == torch.float32 for p in reward.parameters())
    reward.train()
    assert not any(module.training for module in reward.modules())


def test_a_run_builds_hpsv2_on_its_training_device(monkeypatch) -> None:
    import reward_models.hpsv2 as hpsv2
    from experiments.run import ModelConfig, RunConfig, reward_functions

    devices = []
    monkeypatch.setattr(hpsv2, "HPSv2", lambda device="cpu": devices.append(device) or "scorer")
    config = RunConfig(model=ModelConfig(backbone="sd35"), reward="hpsv2", wandb=False)
    assert reward_functions(config, device="cuda:1") == {"hpsv2": "scorer"}
    assert devices == ["cuda:1"]


def test_a_run_records_the_checkpoint_it_scores_with(saved, tmp_path, monkeypatch) -> None:
    from experiments.run import ModelConfig, RunConfig, run_inputs
    from rsm_core.records import content_fingerprint

    config = RunConfig(model=ModelConfig(backbone="tiny-flow"), reward="hpsv2", wandb=False)
    _empty_places(monkeypatch, tmp_path)
    assert "hpsv2_checkpoint" not in run_inputs(config)  # the reward's loader names what is missing
    monkeypatch.setenv(DATA_ENV, str(saved["checkpoint"].parent))
    assert run_inputs(config)["hpsv2_checkpoint"] == content_fingerprint(saved["checkpoint"])


def test_paper_data_names_the_hpsv2_downloads() -> None:
    from experiments.paper_data import load_manifest

    commands = [model["command"] for model in load_manifest().models]
    assert f"hf download {HPS_REPO} {HPS_FILE}" in commands
    assert f"hf download {TOKENIZER_REPO} --include '*.json' '*.txt'" in commands
