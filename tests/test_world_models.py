"""The tiny world's learned parts and scripts, on smoke-sized settings (the shipped weights are
measured by `make tiny-check`)."""

from __future__ import annotations

import json

import pytest
import torch

from experiments import tiny_assets, tiny_check
from experiments.tiny_world import load_world
from reward_models.shapes_aesthetic import AestheticNet, degrade
from reward_models.shapes_clip import TinyCLIP, contrastive_loss
from rsm_core.backbones.base import BackboneBase, FlowSpec
from rsm_core.backbones.text import Cond
from rsm_core.records import AssetError
from rsm_core.world import prompts
from rsm_core.world.dataset import SceneSampler
from rsm_core.world.diagnostics import branch_reward_variance
from rsm_core.world.pretrain import update_ema

REQUIRED_KEYS = (
    "detector_accuracy_min",
    "flow_geneval",
    "diffusion_geneval",
    "flow_aesthetic",
    "diffusion_aesthetic",
    "flow_clip",
    "diffusion_clip",
    "diagnostic_variance",
)


def test_degradations_lower_the_target_and_clean_images_keep_ten() -> None:
    generator = torch.Generator().manual_seed(0)
    images, _, _ = SceneSampler(prompts.split()[0])(generator, 64)
    degraded, target = degrade(images, generator)
    change = (degraded - images).abs().amax(dim=(1, 2, 3))
    clean = target == 10.0
    assert clean.any() and (~clean).any()
    assert torch.all(change[clean] < 1e-6), "a full score must mean an untouched image"
    assert torch.all(change[target < 9.0] > 1e-3), "a lowered score must come with a visible change"


def test_aesthetic_features_see_only_a_local_patch() -> None:
    """The scorer judges texture: a feature depends on a 7 px patch, so far-away content (which
    objects are drawn elsewhere) cannot change it, only its share of the pooled average."""
    torch.manual_seed(0)
    net = AestheticNet()
    images = torch.rand(1, 3, 32, 32)
    changed = images.clone()
    changed[..., 16:, :] = torch.rand(1, 3, 16, 32)
    with torch.no_grad():
        before, after = net.features(images * 2 - 1), net.features(changed * 2 - 1)
    # stride-2 features: row r sees input rows 2r-3 .. 2r+3, so rows <= 6 see only rows <= 15
    torch.testing.assert_close(before[..., :7, :], after[..., :7, :])
    assert not torch.allclose(before[..., 8:, :], after[..., 8:, :])


def test_contrastive_loss_treats_repeated_prompts_as_positives() -> None:
    """Swapping two images of the same prompt cannot change the loss (it would with a one-hot target)."""
    torch.manual_seed(0)
    model = TinyCLIP(prompts.vocabulary())
    images = torch.rand(4, 3, 32, 32)
    texts = ["a photo of a circle", "a photo of a circle", "a photo of a square", "a photo of a square"]
    loss = contrastive_loss(model, images, texts)
    swapped = contrastive_loss(model, images[[1, 0, 2, 3]], texts)
    torch.testing.assert_close(loss, swapped)
    assert not torch.allclose(loss, contrastive_loss(model, images[[2, 1, 0, 3]], texts))


def test_ema_forgets_the_initialisation() -> None:
    model, ema = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    start = (ema.weight - model.weight).abs().max()
    for step in range(300):
        update_ema(ema, model, step, max_decay=0.999)
    # the warm-up keeps prod_n (1 + n)/(10 + n) ~ 2e-17 of the start; a constant 0.999 would keep 74 %
    assert (ema.weight - model.weight).abs().max() < 1e-6 * start


@pytest.fixture(scope="module")
def smoke_world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    tiny_assets.main(["--smoke", "--out", str(out)])
    return out


def test_assets_round_trip_and_refuse_altered_files(smoke_world, tmp_path) -> None:
    manifest = json.loads((smoke_world / "manifest.json").read_text())
    assert set(manifest["files"]) == {"clip", "aesthetic", "flow", "diffusion"}
    assert manifest["git_sha"] and manifest["command"].startswith("python -m experiments.tiny_assets")
    assert {"flow_geneval", "diffusion_geneval", "detector_accuracy_min"} <= set(manifest["quality"])
    train = prompts.read_jsonl(smoke_world / manifest["prompts"]["train"]["file"])
    test = prompts.read_jsonl(smoke_world / manifest["prompts"]["test"]["file"])
    assert train and test and not {m["prompt"] for m in train} & {m["prompt"] for m in test}
    world = load_world(smoke_world)
    text, clip_text = world.flow.text_encoder.state_dict(), world.nets.clip.text.state_dict()
    assert text.keys() == clip_text.keys()  # the CLIP text tower conditions the backbones
    assert all(torch.equal(text[k], clip_text[k]) for k in text)
    assert world.flow.text_encoder is world.diffusion.text_encoder
    altered = tmp_path / "world"
    altered.mkdir()
    for path in smoke_world.glob("*.*"):
        (altered / path.name).write_bytes(path.read_bytes())
    data = bytearray((altered / "tiny_flow.safetensors").read_bytes())
    data[-1] ^= 1
    (altered / "tiny_flow.safetensors").write_bytes(bytes(data))
    with pytest.raises(AssetError, match="sha256"):
        load_world(altered)
    with pytest.raises(AssetError, match="make tiny-assets"):
        load_world(tmp_path / "missing")


@pytest.mark.slow  # make test stays under 10 minutes (measured 11:08 with it)
def test_tiny_check_writes_the_report_and_figures(smoke_world, tmp_path) -> None:
    tiny_check.main(["--smoke", "--assets", str(smoke_world), "--results", str(tmp_path)])
    report = json.loads((tmp_path / "tables" / "tiny_check.json").read_text())
    for key in REQUIRED_KEYS:
        assert key in report, key
    assert set(report["snr_split"]) == {"flow", "diffusion"}
    for backbone in ("flow", "diffusion"):
        diag = report["diagnostic_variance"][backbone]
        assert set(diag) == {"t", "step_std", "shapes_geneval", "shapes_aesthetic", "shapes_clip"}
        assert all(s > 0 for s in diag["step_std"])
        assert all(v >= 0 for v in diag["shapes_aesthetic"])
    assert (tmp_path / "figures" / "tiny_samples.png").exists()
    assert (tmp_path / "figures" / "tiny_reward_sensitivity.png").exists()


def _diag(early: list[float], late: list[float]) -> dict:
    steps = len(early)
    return {
        "flow": {
            "t": [1 - i / steps for i in range(steps)],
            "step_std": [1.0] * steps,
            "shapes_geneval": early,
            "shapes_aesthetic": late,
        }
    }


def test_snr_split_compares_where_the_rewards_are_decided() -> None:
    front, back = [4.0, 2.0, 1.0, 1.0, 9.0], [1.0, 1.0, 2.0, 4.0, 9.0]  # last (untrained) step ignored
    split = tiny_check.snr_split(tiny_check.sensitivity_frame(_diag(front, back)))["flow"]
    assert split["split_holds"]
    assert split["mean_step"]["shapes_geneval"] == pytest.approx((2 + 2 + 3) / 8)
    assert split["mean_step"]["shapes_aesthetic"] == pytest.approx((1 + 4 + 12) / 8)
    assert not tiny_check.snr_split(tiny_check.sensitivity_frame(_diag(back, front)))["flow"]["split_holds"]
    flat = tiny_check.snr_split(tiny_check.sensitivity_frame(_diag([0.0] * 5, back)))["flow"]
    assert flat["mean_step"]["shapes_geneval"] is None and not flat["split_holds"]


class _StillBackbone(BackboneBase):
    """A velocity model that always predicts 0: the ODE leaves states where they are, so the only
    randomness in a branch is the one SDE step."""

    flow = FlowSpec("rf-v", shift=3.0)
    latent_shape = (1, 2, 2)

    def _encode(self, prompts):
        zeros = torch.zeros(len(prompts), 1, 4)
        return Cond(zeros, torch.ones(len(prompts), 1, dtype=torch.bool), zeros[:, 0])

    def _forward(self, x, timestep, cond):
        return torch.zeros_like(x)

    def decode(self, latents):
        return latents


def test_branch_variance_is_the_sde_step_variance_for_a_still_model() -> None:
    """With v = 0 and reward sum(x), the children of step i differ by nu_i eps: variance 4 nu_i^2."""
    backbone, steps, children = _StillBackbone(), 5, 4000
    variances = branch_reward_variance(
        backbone,
        {"sum": lambda images, p, m: images.flatten(1).sum(1)},
        ["", ""],
        [{}, {}],
        steps,
        children,
        cfg=1.0,
        generator=torch.Generator().manual_seed(0),
    )["sum"]
    nu = backbone.flow.sde_grid(steps).kernel.nu.float()
    torch.testing.assert_close(variances, 4 * nu**2, rtol=0.1, atol=0)
