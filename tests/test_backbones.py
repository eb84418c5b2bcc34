"""The backbone interface on the tiny models: prompts, cache, CFG, adapter on/off, flows."""

from __future__ import annotations

import pytest
import torch

from rsm_core.backbones.text import TinyTextEncoder, UnknownWordError
from rsm_core.backbones.tiny import TinyDiffusion, TinyFlow, TinyFlowConfig

VOCAB = ["a", "photo", "of", "red", "blue", "circle", "square", "and"]


@pytest.fixture(scope="module")
def text_encoder() -> TinyTextEncoder:
    torch.manual_seed(0)
    return TinyTextEncoder(VOCAB)


def _time(backbone) -> torch.Tensor:
    return torch.tensor([0.3, 0.9]) if backbone.flow.kind == "rf-v" else torch.tensor([300, 900])


def _backbones(text_encoder):
    torch.manual_seed(0)
    return [TinyFlow(text_encoder, TinyFlowConfig(layers=1)), TinyDiffusion(text_encoder)]


def test_unknown_word_names_the_vocabulary(text_encoder) -> None:
    with pytest.raises(UnknownWordError, match="vocabulary: .*circle"):
        text_encoder(["a photo of a green circle"])


def test_empty_prompt_is_the_begin_token_only(text_encoder) -> None:
    ids, mask = text_encoder.tokenizer(["", "a red circle"])
    assert mask.sum(1).tolist() == [1, 4]
    cond = text_encoder(["", "a red circle"])
    assert cond.tokens.shape == (2, 16, 64) and cond.pooled.shape == (2, 64)
    assert torch.all(cond.tokens[0, 1:] == 0)


def test_encode_is_cached_per_prompt(text_encoder) -> None:
    backbone = _backbones(text_encoder)[0]
    first = backbone.encode(["a red circle", "a blue square"])
    calls = []
    backbone._encode = lambda prompts: calls.append(prompts)  # any further encoding would be recorded
    again = backbone.encode(["a blue square", "a red circle", "a red circle"])
    assert calls == []
    assert torch.equal(again.pooled[1], first.pooled[0]) and torch.equal(again.pooled[0], first.pooled[1])


@pytest.mark.parametrize("index", [0, 1], ids=["flow", "diffusion"])
def test_cfg_combines_the_two_branches(text_encoder, index: int) -> None:
    backbone = _backbones(text_encoder)[index]
    x, t = torch.randn(2, 3, 32, 32), _time(backbone)
    cond = backbone.encode(["a red circle", "a blue square"])
    guided = backbone.native(x, t, cond, cfg=4.5)
    f_cond = backbone.native(x, t, cond)
    f_uncond = backbone.native(x, t, backbone.encode(["", ""]))
    torch.testing.assert_close(guided, f_uncond + 4.5 * (f_cond - f_uncond), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("index", [0, 1], ids=["flow", "diffusion"])
def test_adapter_off_is_the_pretrained_model_after_training(text_encoder, index: int) -> None:
    backbone = _backbones(text_encoder)[index]
    x, t = torch.randn(2, 3, 32, 32), _time(backbone)
    cond = backbone.encode(["a red circle", "a blue square"])
    with torch.no_grad():
        before = backbone.native(x, t, cond, cfg=2.0)
    backbone.add_lora(rank=4, alpha=4)
    params = backbone.adapter_parameters()
    trainable = [p for p in backbone.model.parameters() if p.requires_grad]
    assert params and {id(p) for p in params} == {id(p) for p in trainable}  # only LoRA trains
    optimizer = torch.optim.SGD(params, lr=0.1)
    for _ in range(2):  # LoRA B starts at zero: two steps make both factors move
        optimizer.zero_grad()
        backbone.native(x, t, cond, cfg=2.0).square().mean().backward()
        optimizer.step()
    with torch.no_grad():
        policy = backbone.native(x, t, cond, cfg=2.0)
        reference = backbone.native(x, t, cond, cfg=2.0, adapter=None)
    assert not torch.allclose(policy, before)
    assert torch.equal(reference, before)


def test_detached_unconditional_branch_carries_no_gradient(text_encoder) -> None:
    backbone = _backbones(text_encoder)[0]
    x = torch.randn(1, 3, 32, 32, requires_grad=True)
    cond = backbone.encode(["a red circle"])
    (grad_full,) = torch.autograd.grad(backbone.native(x, 0.5, cond, cfg=3.0).sum(), x)
    (grad_detached,) = torch.autograd.grad(
        backbone.native(x, 0.5, cond, cfg=3.0, detach_uncond=True).sum(), x
    )
    (grad_cond,) = torch.autograd.grad(backbone.native(x, 0.5, cond).sum(), x)
    torch.testing.assert_close(grad_detached, 3.0 * grad_cond, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(grad_full, grad_detached)


def test_flow_specs_map_time_to_the_model_and_to_rsm_core(text_encoder) -> None:
    flow, diffusion = _backbones(text_encoder)
    t = torch.tensor([0.25])
    assert flow.flow.model_timestep(t).item() == 250.0
    assert flow.flow.point(t).kappa.item() == pytest.approx(-3.0)
    assert flow.flow.grid(10)[0].item() == 1.0 and len(flow.flow.grid(10)) == 11
    point = diffusion.flow.point(torch.tensor([999]))
    assert point.alpha.item() ** 2 == pytest.approx(diffusion.flow.alphas_cumprod[999].item())
    assert diffusion.flow.grid(50)[0].item() == 981
