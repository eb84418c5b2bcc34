"""SD35 / SD15 through their real loading path, on tiny random pipelines of the real diffusers and
transformers classes saved with ``save_pretrained`` (no weights or network needed)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from tiny_pipelines import CLIP_LENGTH, PROMPTS, RESOLUTION, T5_LENGTH, save_sd3, save_sd15, save_taesd3

from rsm_core import flows
from rsm_core.backbones.base import POLICY
from rsm_core.backbones.lora_export import export_lora
from rsm_core.backbones.stable_diffusion import SD15, SD35
from rsm_core.records import AssetError, current_umask

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("pipelines")
    save_sd3(root / "sd35")
    save_sd15(root / "sd15")
    save_taesd3(root / "taesd3")
    return {"sd35": root / "sd35", "sd15": root / "sd15", "taesd3": root / "taesd3"}


def _load(saved: dict[str, Path], name: str, **kwargs):
    if name == "sd35":
        return SD35(saved[name], resolution=RESOLUTION, max_sequence_length=T5_LENGTH, **kwargs)
    return SD15(saved[name], resolution=RESOLUTION, **kwargs)


@pytest.fixture(scope="module")
def loaded(saved) -> dict[str, SD35 | SD15]:
    return {name: _load(saved, name) for name in ("sd35", "sd15")}


def _time(backbone) -> torch.Tensor:
    return torch.tensor([0.3, 0.9]) if backbone.flow.kind == "rf-v" else torch.tensor([300, 900])


BOTH = pytest.mark.parametrize("name", ["sd35", "sd15"])


# --- loading ------------------------------------------------------------------------------------


def test_sd35_flow_and_latents_come_from_the_saved_pipeline(loaded) -> None:
    backbone = loaded["sd35"]
    assert backbone.flow.kind == "rf-v" and backbone.flow.shift == 2.5
    assert backbone.latent_shape == (16, 4, 4)
    assert not any(
        p.requires_grad for p in backbone.model.parameters()
    )  # everything frozen until a LoRA is added


def test_sd15_flow_is_the_schedulers_vp_schedule(loaded) -> None:
    backbone = loaded["sd15"]
    assert backbone.flow.kind == "vp-eps" and backbone.flow.alphas_cumprod.dtype == torch.float32
    torch.testing.assert_close(
        backbone.flow.alphas_cumprod, flows.vp_alphas_cumprod(dtype=torch.float32), rtol=1e-6, atol=1e-7
    )
    assert backbone.latent_shape == (4, 4, 4)
    assert not any(p.requires_grad for p in backbone.model.parameters())


def test_resolution_must_fit_the_latent_grid(saved) -> None:
    with pytest.raises(ValueError, match="multiple of 16"):
        SD35(saved["sd35"], resolution=40)


# --- conditioning -------------------------------------------------------------------------------


def test_sd35_encode_is_the_pipelines_clip_and_t5_conditioning(loaded) -> None:
    backbone = loaded["sd35"]
    cond = backbone.encode(PROMPTS)
    assert cond.tokens.shape == (2, CLIP_LENGTH + T5_LENGTH, 32) and cond.pooled.shape == (2, 8 + 12)
    assert cond.mask.dtype == torch.bool and bool(cond.mask.all())
    # CLIP-L (8) and CLIP-G (12) penultimate states side by side, zero-padded to T5's width
    assert (
        torch.all(cond.tokens[:, :CLIP_LENGTH, 20:] == 0)
        and cond.tokens[:, :CLIP_LENGTH, :20].abs().sum() > 0
    )
    tokens, _, pooled, _ = backbone.pipe.encode_prompt(
        PROMPTS, None, None, do_classifier_free_guidance=False, max_sequence_length=T5_LENGTH
    )
    torch.testing.assert_close(cond.tokens, tokens)
    torch.testing.assert_close(cond.pooled, pooled)
    assert not torch.allclose(cond.pooled[0], cond.pooled[1])


def test_sd15_encode_is_the_clip_token_states(loaded) -> None:
    backbone = loaded["sd15"]
    cond = backbone.encode(PROMPTS)
    assert cond.tokens.shape == (2, CLIP_LENGTH, 8) and bool(cond.mask.all())
    ids = backbone.pipe.tokenizer(PROMPTS, padding="max_length", max_length=CLIP_LENGTH, return_tensors="pt")
    torch.testing.assert_close(cond.tokens, backbone.pipe.text_encoder(ids.input_ids)[0])
    torch.testing.assert_close(cond.pooled, cond.tokens[:, 0])


@BOTH
def test_embeddings_are_served_from_the_disk_cache(saved, tmp_path, name: str) -> None:
    first = _load(saved, name, cache_dir=tmp_path)
    reference = first.encode(PROMPTS)
    assert len(list(tmp_path.glob("*.safetensors"))) == 2

    second = _load(saved, name, cache_dir=tmp_path)  # empty in-memory cache, same files
    calls: list[list[str]] = []
    encode_prompts = second._encode_prompts
    second._encode_prompts = lambda prompts: calls.append(list(prompts)) or encode_prompts(prompts)
    again = second.encode([PROMPTS[1], "a cat", PROMPTS[0]])
    assert calls == [["a cat"]]  # only the prompt that was never encoded reaches the text encoders
    assert torch.equal(again.tokens[0], reference.tokens[1]) and torch.equal(
        again.tokens[2], reference.tokens[0]
    )
    assert torch.equal(again.pooled[2], reference.pooled[0]) and again.mask.dtype == torch.bool
    assert len(list(tmp_path.glob("*.safetensors"))) == 3


def test_the_disk_cache_key_includes_the_max_length(saved, tmp_path) -> None:
    SD35(saved["sd35"], resolution=RESOLUTION, max_sequence_length=T5_LENGTH, cache_dir=tmp_path).encode(
        ["a"]
    )
    longer = SD35(saved["sd35"], resolution=RESOLUTION, max_sequence_length=12, cache_dir=tmp_path)
    assert longer.encode(["a"]).tokens.shape[1] == CLIP_LENGTH + 12
    assert len(list(tmp_path.glob("*.safetensors"))) == 2


# --- prediction, images, LoRA -------------------------------------------------------------------


@BOTH
def test_native_with_cfg_combines_both_branches(loaded, name: str) -> None:
    backbone = loaded[name]
    torch.manual_seed(1)
    x, t = torch.randn(2, *backbone.latent_shape), _time(backbone)
    cond = backbone.encode(PROMPTS)
    with torch.no_grad():
        guided = backbone.native(x, t, cond, cfg=4.5)
        f_cond = backbone.native(x, t, cond)
        f_uncond = backbone.native(x, t, backbone.encode(["", ""]))
    assert guided.shape == x.shape
    assert not torch.allclose(f_cond, f_uncond)
    torch.testing.assert_close(guided, f_uncond + 4.5 * (f_cond - f_uncond), rtol=1e-4, atol=1e-5)


@BOTH
def test_sample_ode_runs_on_the_backbones_grid(loaded, name: str) -> None:
    backbone = loaded[name]
    first = backbone.sample_ode(PROMPTS, 2, 4.5, torch.Generator().manual_seed(4))
    again = backbone.sample_ode(PROMPTS, 2, 4.5, torch.Generator().manual_seed(4))
    assert first.shape == (2, *backbone.latent_shape) and bool(first.isfinite().all())
    torch.testing.assert_close(first, again)


@BOTH
def test_decode_gives_differentiable_images_in_the_unit_range(loaded, name: str) -> None:
    backbone = loaded[name]
    torch.manual_seed(2)
    latents = torch.randn(2, *backbone.latent_shape, requires_grad=True)
    images = backbone.decode(latents)
    assert images.shape == (2, 3, RESOLUTION, RESOLUTION)
    assert images.min() >= 0 and images.max() <= 1
    images.mean().backward()
    assert latents.grad is not None and latents.grad.abs().sum() > 0

    config = backbone.vae.config
    unscaled = latents / config.scaling_factor + (config.shift_factor or 0.0)
    with torch.no_grad():
        expected = (backbone.vae.decode(unscaled).sample / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(images.detach(), expected)


@BOTH
def test_adapter_off_is_the_reference_after_lora_training(saved, name: str) -> None:
    backbone = _load(saved, name)
    torch.manual_seed(3)
    x, t = torch.randn(2, *backbone.latent_shape), _time(backbone)
    cond = backbone.encode(PROMPTS)
    with torch.no_grad():
        before = backbone.native(x, t, cond)

    backbone.add_lora(rank=2, alpha=2.0)
    params = backbone.adapter_parameters()
    names = [n for n, p in backbone.model.named_parameters() if p.requires_grad]
    assert params and all("lora_" in n for n in names)
    optimiser = torch.optim.SGD(params, lr=0.5)
    for _ in range(2):  # lora_B starts at zero: the first step moves B only, the second moves A as well
        optimiser.zero_grad()
        backbone.native(x, t, cond).pow(2).mean().backward()
        optimiser.step()

    with torch.no_grad():
        policy = backbone.native(x, t, cond)
        reference = backbone.native(x, t, cond, adapter=None)
        policy_again = backbone.native(x, t, cond)
    assert not torch.allclose(policy, before, atol=1e-5)
    torch.testing.assert_close(reference, before, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(policy_again, policy)  # the adapter is back on afterwards


def test_sd35_lora_wraps_the_joint_attention_and_not_attn2(saved) -> None:
    backbone = _load(saved, "sd35")
    backbone.add_lora(rank=2, alpha=2.0)
    wrapped = {n.rsplit(".lora_A", 1)[0] for n, _ in backbone.model.named_parameters() if ".lora_A." in n}
    kinds = {name.split("attn.", 1)[1] for name in wrapped}
    assert kinds == {t.split(".", 1)[1] for t in SD35.lora_targets}  # add_* included: the text stream
    assert not any(".attn2." in name for name in wrapped)


@BOTH
def test_an_exported_lora_loads_into_the_diffusers_pipeline(saved, name: str, tmp_path) -> None:
    """What a user does with a run's lora/ folder: pipe.load_lora_weights. alpha != rank, so a
    file without the adapter's config would load at the wrong scale."""
    backbone = _load(saved, name)
    backbone.add_lora(rank=2, alpha=8.0)
    with torch.no_grad():
        for p in backbone.adapter_parameters():
            p.normal_(0, 0.5)  # B = 0 at init: give the adapter an effect
    directory = tmp_path / "lora"
    weights = export_lora(backbone.model, POLICY, directory)
    assert weights.name == "pytorch_lora_weights.safetensors"
    assert not [p for p in tmp_path.iterdir() if p.name != "lora"]  # no staging folder left behind
    assert directory.stat().st_mode & 0o777 == 0o777 & ~current_umask()

    loaded = _load(saved, name)
    loaded.pipe.load_lora_weights(directory)
    torch.manual_seed(3)
    x, t = torch.randn(2, *backbone.latent_shape), _time(backbone)
    cond = backbone.encode(PROMPTS)
    with torch.no_grad():
        ours = backbone.native(x, t, cond)
        theirs = loaded._forward(x, loaded.flow.model_timestep(t), loaded.encode(PROMPTS))
        reference = backbone.native(x, t, cond, adapter=None)
    assert not torch.allclose(ours, reference, atol=1e-4)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_a_paper_run_records_fingerprints_of_its_weights_and_prompt_files(saved, tmp_path) -> None:
    """inputs.json is what tells a sweep that a finished run used other weights or prompts."""
    from experiments.run import ModelConfig, PromptConfig, RunConfig, run_inputs

    weights = tmp_path / "sd35"
    shutil.copytree(saved["sd35"], weights)
    train, test = tmp_path / "train.txt", tmp_path / "test.txt"
    train.write_text("a cat\na dog\n")
    test.write_text("a bird\n")
    config = RunConfig(
        model=ModelConfig(backbone="sd35", path=str(weights)),
        prompts=PromptConfig(source="files", train_file=str(train), test_file=str(test)),
    )
    inputs = run_inputs(config)
    assert set(inputs) == {"model", "prompts"} and set(inputs["prompts"]) == {"train", "test"}
    assert run_inputs(config) == inputs
    test.write_text("a fish\n")
    assert run_inputs(config)["prompts"]["test"] != inputs["prompts"]["test"]
    (weights / "transformer" / "config.json").write_text(
        (weights / "transformer" / "config.json").read_text().replace('"num_layers": 2', '"num_layers": 1')
    )
    assert run_inputs(config)["model"] != inputs["model"]


def test_precomputed_embeddings_let_the_text_encoders_go(saved, tmp_path) -> None:
    backbone = _load(saved, "sd35", cache_dir=tmp_path / "cache")
    with torch.no_grad():
        expected = backbone._encode_prompts([*PROMPTS, ""])
    assert backbone.precompute([*PROMPTS, "", PROMPTS[0]], batch=2) == 3
    assert len(list((tmp_path / "cache").iterdir())) == 3 and not backbone._cache  # on disk only
    assert backbone.precompute(PROMPTS) == 0
    backbone.drop_text_encoders()
    assert all(getattr(backbone.pipe, name) is None for name in backbone.TEXT_ENCODERS)
    cond = backbone.encode([PROMPTS[1], ""])
    torch.testing.assert_close(cond.tokens, expected.tokens[1:])
    assert cond.tokens.shape[1] == CLIP_LENGTH + T5_LENGTH  # CLIP tokens, then T5 at its max length
    with pytest.raises(AssetError, match=r"'a bird'; .*\(make paper-embeddings\)"):
        backbone.encode(["a bird"])


def test_the_memory_cache_of_a_paper_backbone_is_bounded(saved, monkeypatch) -> None:
    backbone = _load(saved, "sd35")
    monkeypatch.setattr(backbone, "memory_cache_prompts", 2)
    backbone.encode(["a cat"])
    backbone.encode(["a dog", "a bird"])
    assert list(backbone._cache) == ["a dog", "a bird"]
    backbone.encode(["a dog", "a fish"])  # the least recently used goes
    assert list(backbone._cache) == ["a dog", "a fish"]


def test_runs_embed_t5_at_the_published_length() -> None:
    from experiments.run import ModelConfig

    assert ModelConfig().t5_max_length == 128


def test_make_paper_embeddings_fills_the_cache_a_run_reads(saved, tmp_path, capsys) -> None:
    from experiments import embeddings

    train, test = tmp_path / "train.txt", tmp_path / "test.txt"
    train.write_text("a cat\na dog\n")
    test.write_text("a dog\na bird\n")
    cache = tmp_path / "embeddings"
    settings = [
        f"run.model.path={saved['sd35']}",
        f"run.model.embedding_cache={cache}",
        f"run.model.t5_max_length={T5_LENGTH}",
        f"run.prompts.train_file={train}",
        f"run.prompts.test_file={test}",
    ]
    command = [
        "--figure",
        "fig3",
        "--scale",
        "paper",
        "--allow-cpu",
        *(x for s in settings for x in ("--set", s)),
    ]
    embeddings.main(command)
    assert "4 prompts embedded, 0 were already" in capsys.readouterr().out  # 3 distinct and ""
    assert len(list(cache.iterdir())) == 4
    embeddings.main(command)
    assert "0 prompts embedded, 4 were already" in capsys.readouterr().out


def saved_activation_bytes(backbone, x, t, cond) -> int:
    """Bytes the autograd graph of one training forward keeps for the backward pass."""
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        backbone.native(x, t, cond).pow(2).mean().backward()
    return total


def test_half_precision_keeps_lora_fp32_and_checkpointing_cuts_saved_activations(saved) -> None:
    """The paper path's precision on the CPU with bf16 (fp16 autocast needs a GPU): frozen denoiser
    and text encoders in bf16, LoRA and outputs fp32, VAE fp32; gradients reach the adapter."""
    plain = _load(saved, "sd35", precision="bf16")
    checkpointed = _load(saved, "sd35", precision="bf16", gradient_checkpointing=True)
    for backbone in (plain, checkpointed):
        torch.manual_seed(0)
        backbone.add_lora(rank=2, alpha=4.0)
        assert {p.dtype for p in backbone.adapter_parameters()} == {torch.float32}
        frozen = {p.dtype for n, p in backbone.model.named_parameters() if "lora_" not in n}
        assert frozen == {torch.bfloat16}
        assert {p.dtype for p in backbone.vae.parameters()} == {torch.float32}
    torch.manual_seed(3)
    x, t = torch.randn(2, *plain.latent_shape), _time(plain)
    cond = plain.encode(PROMPTS)
    assert cond.tokens.dtype == torch.bfloat16
    out = plain.native(x, t, cond, cfg=4.5)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert plain.decode(x).dtype == torch.float32
    full = saved_activation_bytes(plain, x, t, cond)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in plain.adapter_parameters())
    reduced = saved_activation_bytes(checkpointed, x, t, checkpointed.encode(PROMPTS))
    assert reduced < full / 2, (reduced, full)
    torch.testing.assert_close(
        [p.grad for p in checkpointed.adapter_parameters()], [p.grad for p in plain.adapter_parameters()]
    )


def test_the_published_fp32_frozen_weights_are_a_switch(saved) -> None:
    """half_frozen_weights=False is the published storage: fp32 frozen weights under half autocast."""
    backbone = _load(saved, "sd35", precision="bf16", half_frozen_weights=False)
    backbone.add_lora(rank=2, alpha=4.0)
    frozen = {p.dtype for n, p in backbone.model.named_parameters() if "lora_" not in n}
    assert frozen == {torch.float32} and backbone.autocast_dtype == torch.bfloat16
    torch.manual_seed(3)
    x, t = torch.randn(2, *backbone.latent_shape), _time(backbone)
    with torch.no_grad():
        out = backbone.native(x, t, backbone.encode(PROMPTS))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_guidance_in_the_half_dtype_rounds_the_guided_velocity(saved) -> None:
    """The published rollout casts both raw outputs to its half embedding dtype before CFG, so the
    guided velocity is the half-precision combination; without the cast it is the float32 one."""
    backbone = _load(saved, "sd35", precision="bf16")
    torch.manual_seed(3)
    x, t = torch.randn(2, *backbone.latent_shape), _time(backbone)
    cond = backbone.encode(PROMPTS)
    with torch.no_grad():
        f_cond, f_uncond = backbone.native(x, t, cond), backbone.native(x, t, backbone.encode(["", ""]))
        rounded = backbone.native(x, t, cond, cfg=4.5, guidance_dtype=torch.bfloat16)
        full = backbone.native(x, t, cond, cfg=4.5)
    half_cond, half_uncond = f_cond.bfloat16(), f_uncond.bfloat16()
    assert rounded.dtype == torch.float32
    assert torch.equal(rounded, (half_uncond + 4.5 * (half_cond - half_uncond)).float())
    assert torch.equal(full, f_uncond + 4.5 * (f_cond - f_uncond))
    assert not torch.equal(rounded, full)


# --- missing weights ----------------------------------------------------------------------------


def test_missing_component_folder_is_named(saved, tmp_path) -> None:
    broken = tmp_path / "sd35"
    shutil.copytree(saved["sd35"], broken)
    shutil.rmtree(broken / "transformer")
    with pytest.raises(
        AssetError, match=r"missing transformer/;.*hf download stabilityai/stable-diffusion-3\.5"
    ):
        SD35(broken, resolution=RESOLUTION)


def test_missing_weights_file_and_index_are_named(saved, tmp_path) -> None:
    broken = tmp_path / "sd15"
    shutil.copytree(saved["sd15"], broken)
    for weights in (broken / "unet").glob("*.safetensors"):
        weights.unlink()
    (broken / "model_index.json").unlink()
    with pytest.raises(AssetError, match=r"missing model_index\.json, unet/\*\.safetensors") as error:
        SD15(broken, resolution=RESOLUTION)
    assert "vae" not in str(error.value).split("missing")[1].split(";")[0]


def _fake_hub_cache(cache: Path, repo: str, pipeline: Path, monkeypatch) -> Path:
    """The Hugging Face cache layout (refs/main -> snapshots/<commit>/) holding a saved pipeline."""
    import huggingface_hub.constants

    commit = "0" * 40
    storage = cache / f"models--{repo.replace('/', '--')}"
    (storage / "refs").mkdir(parents=True)
    (storage / "refs" / "main").write_text(commit)
    shutil.copytree(pipeline, storage / "snapshots" / commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return storage / "snapshots" / commit


def test_a_hub_id_loads_from_the_local_cache(saved, tmp_path, monkeypatch) -> None:
    _fake_hub_cache(tmp_path, "rsm-bench-tests/tiny-sd15", saved["sd15"], monkeypatch)
    backbone = SD15("rsm-bench-tests/tiny-sd15", resolution=RESOLUTION)
    assert backbone.latent_shape == (4, 4, 4)


def test_an_incomplete_hub_cache_names_the_missing_folder(saved, tmp_path, monkeypatch) -> None:
    snapshot = _fake_hub_cache(tmp_path, "rsm-bench-tests/tiny-sd35", saved["sd35"], monkeypatch)
    shutil.rmtree(snapshot / "text_encoder_3")
    with pytest.raises(AssetError, match=r"missing text_encoder_3/;"):
        SD35("rsm-bench-tests/tiny-sd35", resolution=RESOLUTION)


@pytest.mark.parametrize("source", ["rsm-bench-tests/no-such-model", "/no/such/sd35/dir"])
def test_unknown_hub_id_or_path_raises_an_asset_error(source: str) -> None:
    with pytest.raises(AssetError, match="not a directory and not a hub id.*hf download"):
        SD35(source)


# --- the first-order runs' loading: TAESD3 decoder, SD1.5 through the run config ------------------


def test_taesd3_decodes_every_image_with_bf16_rounded_weights_in_fp32(saved) -> None:
    """Spec §0.2: TAESD3 loaded in bf16, cast to fp32, decoding latent / scaling_factor + shift_factor
    (the decoder config's) into clamp((y + 1) / 2, 0, 1); the pipeline's VAE is gone."""
    from diffusers import AutoencoderTiny

    backbone = _load(saved, "sd35", decoder="taesd3", decoder_path=saved["taesd3"])
    assert isinstance(backbone.vae, AutoencoderTiny) and backbone.pipe.vae is backbone.vae
    assert {p.dtype for p in backbone.vae.parameters()} == {torch.float32}
    original = AutoencoderTiny.from_pretrained(saved["taesd3"])  # fp32 as saved
    for ours, theirs in zip(backbone.vae.parameters(), original.parameters(), strict=True):
        assert torch.equal(ours, theirs.to(torch.bfloat16).float())
    assert backbone.latent_shape == (16, 4, 4)  # the pipeline's latent grid, not the decoder's

    torch.manual_seed(5)
    latents = torch.randn(2, *backbone.latent_shape, requires_grad=True)
    images = backbone.decode(latents)
    assert images.shape == (2, 3, RESOLUTION, RESOLUTION) and images.min() >= 0 and images.max() <= 1
    images.mean().backward()
    assert latents.grad is not None and latents.grad.abs().sum() > 0
    with torch.no_grad():
        decoded = backbone.vae.decode(latents / 1.5 + 0.1).sample  # save_taesd3's scale and shift
    torch.testing.assert_close(images.detach(), ((decoded + 1) / 2).clamp(0, 1))
    assert decoded.min() < 0  # TAESD's output is in the [-1, 1] convention, as the VAE's


@pytest.mark.parametrize("missing", ["folder", "weights"])
def test_a_missing_taesd3_is_one_line_naming_the_download(saved, tmp_path, missing: str) -> None:
    decoder = tmp_path / "taesd3"
    if missing == "weights":
        shutil.copytree(saved["taesd3"], decoder)
        for weights in decoder.glob("*.safetensors"):
            weights.unlink()
    with pytest.raises(AssetError) as error:
        _load(saved, "sd35", decoder="taesd3", decoder_path=decoder if missing == "weights" else "/no/taesd3")
    message = str(error.value)
    assert "\n" not in message and "`hf download madebyollin/taesd3 --local-dir DIR`" in message
    assert "model.decoder_path" in message


def test_run_configs_load_either_paper_backbone_and_fingerprint_the_decoder(saved, tmp_path) -> None:
    from experiments.run import ModelConfig, RunConfig, load_paper_backbone, run_inputs

    sd15 = ModelConfig(
        backbone="sd15", path=str(saved["sd15"]), resolution=RESOLUTION, embedding_cache=str(tmp_path)
    )
    backbone = load_paper_backbone(sd15, "cpu")
    assert isinstance(backbone, SD15) and backbone.latent_shape == (4, 4, 4)
    sd35 = ModelConfig(
        backbone="sd35",
        path=str(saved["sd35"]),
        resolution=RESOLUTION,
        t5_max_length=T5_LENGTH,
        decoder="taesd3",
        decoder_path=str(saved["taesd3"]),
        embedding_cache=str(tmp_path),
    )
    assert type(load_paper_backbone(sd35, "cpu").vae).__name__ == "AutoencoderTiny"
    inputs = run_inputs(RunConfig(model=sd35))
    assert set(inputs) == {"model", "decoder"}
    assert set(run_inputs(RunConfig(model=sd15))) == {"model"}


class Brightness:
    """A differentiable stand-in reward (the paper's HPSv2.1 needs its weights): mean pixel value."""

    differentiable = True
    name = "brightness"

    def __call__(self, images: torch.Tensor, prompts, metas) -> torch.Tensor:
        return images.mean(dim=(1, 2, 3))


@pytest.mark.parametrize(
    ("method", "backbone"),
    [("reward-score-distillation-flow", "sd35"), ("vgg-flow", "sd35"), ("residual-nabla-db", "sd15")],
)
def test_first_order_arms_train_on_the_paper_backbones(saved, tmp_path, method: str, backbone: str) -> None:
    """The Figure 5/6 path on tiny real classes: SD3.5-M decoding through TAESD3 (terminal and Tweedie
    gradients) and SD1.5 (the lookahead through the UNet), one collection and one microbatch's loss."""
    from experiments.run import ModelConfig, Parts, RunConfig, build_arm, build_backbone, sections
    from rsm_core.budget import Budget

    model = ModelConfig(
        backbone=backbone,
        path=str(saved[backbone]),
        resolution=RESOLUTION,
        t5_max_length=T5_LENGTH,
        decoder="taesd3" if backbone == "sd35" else "vae",
        decoder_path=str(saved["taesd3"]),
        embedding_cache=str(tmp_path),
        lora_rank=2,
        lora_alpha=2.0,
    )
    sizes = {"sampler_steps": 5, "trajectories_per_epoch": 2, "collection_batch": 2, "decode_chunk": 2}
    config = RunConfig(method=method, model=model, reward="brightness", arm={**sizes, "microbatch_rows": 2})
    resolved = sections(config)
    torch.manual_seed(0)
    parts = Parts(
        build_backbone(resolved.run.model, 0),
        {"brightness": Brightness()},
        [{"prompt": p} for p in PROMPTS],
        [],
    )
    arm = build_arm(resolved, parts)
    batch = arm.collect(Budget())
    assert batch.states.shape[:2] == (2, 6) and torch.isfinite(batch.reward).all()
    loss, stats = arm.loss(arm.microbatches(batch, 1)[0])
    loss.backward()
    grads = [p.grad for p in parts.backbone.adapter_parameters() if p.grad is not None]
    assert torch.isfinite(loss) and grads and any(g.abs().sum() > 0 for g in grads)
    assert stats["reward_grad_norm"] > 0
