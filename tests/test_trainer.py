"""The shared trainer and backbone for what comes after the zeroth-order arm: named LoRA adapters,
parameter groups with their own optimiser settings, a switchable EMA in the published order, and
checkpoints that hold every group and resume exactly — on the tiny world's flow model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from rsm_core.backbones.base import POLICY
from rsm_core.budget import Budget
from rsm_core.collectives import Collectives, WrongDevice, on_device
from rsm_core.interfaces import ParamGroup
from rsm_core.trainer import LoopConfig, Trainer
from rsm_core.world.assets import load_backbones

PROMPTS = ["a red circle", "two blue squares"]


@pytest.fixture
def flow():
    """The shipped tiny flow model with two adapters: the policy and a second network ("value")."""
    backbone = load_backbones().flow
    torch.manual_seed(0)
    backbone.add_lora(4, 4.0, name=POLICY)
    backbone.add_lora(4, 4.0, name="value", init=False)  # B != 0 from the start: its output differs
    return backbone


def outputs(backbone, adapter):
    x = torch.randn(2, *backbone.latent_shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return backbone.native(
            x, torch.tensor([0.7, 0.3]), backbone.encode(PROMPTS), cfg=2.0, adapter=adapter
        )


def test_named_adapters_switch_and_stay_trainable(flow) -> None:
    policy, value = flow.adapter_parameters(POLICY), flow.adapter_parameters("value")
    assert policy and value and not {id(p) for p in policy} & {id(p) for p in value}
    reference, with_policy, with_value = outputs(flow, None), outputs(flow, POLICY), outputs(flow, "value")
    assert torch.equal(reference, with_policy)  # gaussian init: B = 0, the policy starts at the reference
    assert not torch.allclose(reference, with_value)
    for p in value:  # train only the value adapter
        p.data.add_(0.05)
    assert torch.equal(outputs(flow, POLICY), with_policy) and torch.equal(outputs(flow, None), reference)
    assert not torch.allclose(outputs(flow, "value"), with_value)
    assert all(p.requires_grad for p in policy + value), "switching adapters froze one of them"
    assert flow._current_adapter == POLICY  # the policy is what native runs by default
    with pytest.raises(KeyError, match="no LoRA adapter named 'bogus'"):
        outputs(flow, "bogus")


class TwoNetworkArm:
    """A minimal arm on the tiny flow model that trains the policy adapter and a value adapter, as the
    first-order methods will: the policy regresses a target, the value net its own target."""

    def __init__(self, backbone, value_lr: float, value_ema: bool = False) -> None:
        self.backbone, self.value_lr, self.value_ema = backbone, value_lr, value_ema
        self.generator = torch.Generator().manual_seed(3)
        self.draws = 0

    def param_groups(self) -> list[ParamGroup]:
        return [
            ParamGroup("policy", self.backbone.adapter_parameters(POLICY)),
            ParamGroup(
                "value",
                self.backbone.adapter_parameters("value"),
                lr=self.value_lr,
                weight_decay=0.0,
                max_grad_norm=0.5,
                ema=self.value_ema,
            ),
        ]

    def collect(self, budget: Budget) -> Tensor:
        self.draws += 1
        return torch.randn(4, *self.backbone.latent_shape, generator=self.generator)

    def microbatches(self, batch: Tensor, count_multiple: int) -> list[Tensor]:
        return list(batch.chunk(2 * count_multiple))

    def loss(self, microbatch: Tensor) -> tuple[Tensor, dict[str, float]]:
        cond = self.backbone.encode(PROMPTS[:1] * microbatch.shape[0])
        t = torch.full((microbatch.shape[0],), 0.5)
        policy = self.backbone.native(microbatch, t, cond, adapter=POLICY)
        value = self.backbone.native(microbatch, t, cond, adapter="value")
        loss = ((policy - microbatch) ** 2).mean() + ((value + microbatch) ** 2).mean()
        return loss, {"loss": float(loss.detach())}

    def batch_stats(self, batch: Tensor) -> dict[str, float]:
        return {"batch_mean": float(batch.mean())}

    def evaluate(self, part: int, parts: int) -> dict[str, Tensor]:
        return {"policy_out": outputs(self.backbone, POLICY).flatten(1).mean(1)}

    def state(self) -> dict:
        return {"draws": self.draws}

    def state_tensors(self) -> dict:
        return {}

    def load_state(self, state: dict, tensors: dict) -> None:
        self.draws = state["draws"]


LOOP = LoopConfig(epochs=2, lr=1e-3, updates_per_epoch=2, ema_every=1, eval_every=1, checkpoint_every=1)


def test_parameter_groups_have_their_own_lr_decay_clip_and_ema(flow) -> None:
    trainer = Trainer([TwoNetworkArm(flow, value_lr=1e-2)], LOOP)
    policy, value = trainer.optimizer.param_groups
    assert (policy["lr"], policy["weight_decay"]) == (1e-3, 1e-4)
    assert (value["lr"], value["weight_decay"]) == (1e-2, 0.0)
    assert trainer.groups[0].ema is not None and trainer.groups[1].ema is None  # the value net keeps none
    for p in trainer.groups[1].params:
        p.grad = torch.ones_like(p)
    norm = trainer._clip(trainer.groups[1])
    clipped = torch.cat([p.grad.flatten() for p in trainer.groups[1].params]).norm()
    assert norm > 0.5 and float(clipped) == pytest.approx(0.5, rel=1e-5)  # its own clip, 0.5
    row = trainer.train_epoch()
    assert {"grad_norm", "grad_norm_value", "loss", "batch_mean"} <= set(row)


def test_an_epoch_logs_its_peak_memory(flow) -> None:
    """On the CPU the process's peak resident set (GiB): at least the live weights, far below the
    machine; on a GPU the epoch's peak allocation (reset each epoch)."""
    trainer = Trainer([TwoNetworkArm(flow, value_lr=1e-2)], LOOP)
    weights = sum(p.numel() * p.element_size() for p in flow.model.parameters()) / 2**30
    peak = trainer.train_epoch()["peak_memory_gib"]
    assert weights < peak < 64


def test_evaluation_swaps_in_the_ema_only_where_one_is_kept(flow) -> None:
    trainer = Trainer([TwoNetworkArm(flow, value_lr=1e-2)], LOOP)
    trainer.train_epoch()  # ema_every = 1: the policy's EMA now lags its trained weights
    trained = [[p.detach().clone() for p in g.params] for g in trainer.groups]
    policy_ema = trainer.groups[0].ema
    assert any(not torch.equal(e, p) for e, p in zip(policy_ema, trained[0], strict=True))
    seen = {}

    def evaluate(part: int, parts: int) -> dict[str, Tensor]:
        seen["policy"] = [p.detach().clone() for p in trainer.groups[0].params]
        seen["value"] = [p.detach().clone() for p in trainer.groups[1].params]
        return {}

    trainer.shards[0].evaluate = evaluate
    trainer.evaluate()
    assert all(torch.equal(a, b) for a, b in zip(seen["policy"], policy_ema, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(seen["value"], trained[1], strict=True))  # no EMA kept
    for group, before in zip(trainer.groups, trained, strict=True):  # the trained weights come back
        assert all(torch.equal(p, b) for p, b in zip(group.params, before, strict=True))
    no_ema = Trainer([TwoNetworkArm(flow, value_lr=1e-2)], LoopConfig(ema=False))
    assert all(group.ema is None for group in no_ema.groups)


def test_an_evaluation_of_one_image_logs_a_nan_spread_without_a_warning(flow) -> None:
    """The spread of one value is undefined: NaN in the row, not torch's degrees-of-freedom warning."""
    import warnings

    trainer = Trainer([TwoNetworkArm(flow, value_lr=1e-2)], LOOP)
    trainer.shards[0].evaluate = lambda part, parts: {"reward": torch.tensor([0.5, 1.5]), "kl": torch.ones(1)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        row = trainer.evaluate()
    assert row["eval_reward"] == 1.0 and row["eval_reward_std"] == pytest.approx(2**0.5 / 2)
    assert row["eval_kl"] == 1.0 and row["eval_kl_std"] != row["eval_kl_std"]  # NaN


class ScalarArm:
    """One scalar parameter that every optimizer step moves by +lr (loss -w: Adam's first steps are
    sign steps): a loop whose weights after every step are known, to pin down when the EMA reads them."""

    def __init__(self) -> None:
        self.weight = nn.Parameter(torch.zeros(1))
        self.generator = torch.Generator()

    def param_groups(self):
        return [ParamGroup("policy", [self.weight])]

    def collect(self, budget):
        return None

    def microbatches(self, batch, count_multiple):
        return [None] * count_multiple

    def loss(self, microbatch):
        return -self.weight.sum(), {}

    def batch_stats(self, batch):
        return {}


@pytest.mark.parametrize("timing", ["before_step", "after_step"])
def test_the_ema_fires_at_every_8th_step_on_the_weights_the_published_order_says(timing: str) -> None:
    """Published: at optimizer step m = 8 the EMA averages the weights from before that step (after
    step 7) with decay min((1 + 7)/(10 + 7), 0.9); "after_step" takes the weights step 8 produced."""
    arm = ScalarArm()
    config = LoopConfig(epochs=1, lr=0.1, weight_decay=0.0, updates_per_epoch=8, ema_timing=timing)
    trainer = Trainer([arm], config)
    history = []
    step = trainer.optimizer.step

    def recording_step(*args, **kwargs):
        history.append(float(arm.weight.detach()))  # the weights before this step
        return step(*args, **kwargs)

    trainer.optimizer.step = recording_step
    trainer.train_epoch()
    history.append(float(arm.weight.detach()))
    read = history[7] if timing == "before_step" else history[8]  # after 7 steps / after 8 steps
    decay = min(8 / 17, 0.9)
    assert float(trainer.groups[0].ema[0]) == pytest.approx((1 - decay) * read, rel=1e-6)
    assert history[7] != history[8]


def test_a_checkpoint_holds_every_group_and_resumes_exactly(tmp_path: Path) -> None:
    def fresh() -> Trainer:
        backbone = load_backbones().flow
        torch.manual_seed(0)
        backbone.add_lora(4, 4.0, name=POLICY)
        backbone.add_lora(4, 4.0, name="value", init=False)
        return Trainer([TwoNetworkArm(backbone, value_lr=1e-2, value_ema=True)], LOOP)

    straight = fresh()
    straight.train_epoch()
    straight.train_epoch()
    interrupted = fresh()
    interrupted.train_epoch()
    interrupted.save(tmp_path / "checkpoint.safetensors")
    resumed = fresh()
    resumed.load(tmp_path / "checkpoint.safetensors")
    assert resumed.epoch == 1 and resumed.shards[0].draws == 1
    resumed.train_epoch()
    for a, b in zip(straight.groups, resumed.groups, strict=True):
        assert all(torch.equal(p, q) for p, q in zip(a.params, b.params, strict=True)), a.spec.name
        assert all(torch.equal(p, q) for p, q in zip(a.ema, b.ema, strict=True)), a.spec.name
    mismatched = fresh()
    mismatched.groups[1].ema = None  # another config: the value net keeps no EMA
    with pytest.raises(RuntimeError, match="holds the parameter groups"):
        mismatched.load(tmp_path / "checkpoint.safetensors")


class RecordingAccelerator:
    """Stands in for accelerate with ``processes`` identical processes on ``device``: a sum is the
    tensor times the process count, a mean the tensor itself; it records what each collective got."""

    def __init__(self, device: str, processes: int = 2) -> None:
        self.device, self.num_processes, self.process_index = torch.device(device), processes, 0
        self.seen: list[torch.device] = []

    def reduce(self, tensor: Tensor, op: str) -> Tensor:
        self.seen.append(tensor.device)
        return tensor * self.num_processes if op == "sum" else tensor


def test_collectives_refuse_a_tensor_off_the_accelerators_device() -> None:
    collectives = Collectives(RecordingAccelerator("cuda:0"))
    with pytest.raises(WrongDevice, match=r"tensor on cpu, but the processes communicate on cuda:0"):
        collectives.reduce(torch.zeros(2, dtype=torch.float64), "sum")
    assert collectives.accelerator.seen == []  # refused before it reached the backend
    assert Collectives(RecordingAccelerator("meta")).reduce(torch.ones(2, device="meta"), "sum").is_meta
    assert on_device(torch.device("cuda", 1), torch.device("cuda"))
    assert not on_device(torch.device("cuda", 1), torch.device("cuda", 0))
    assert not on_device(torch.device("cpu"), torch.device("cuda"))
    assert on_device(torch.device("cpu"), torch.device("cpu", 0))  # accelerate's CPU device under gloo


def test_one_process_checks_the_device_too() -> None:
    """A single-GPU run has no collective to fail, so the check must not depend on the process count."""
    with pytest.raises(WrongDevice):
        Collectives(RecordingAccelerator("cuda:0", processes=1)).reduce(torch.zeros(1), "mean")


def test_every_collective_of_an_epoch_gets_a_tensor_on_the_accelerators_device(flow) -> None:
    accelerator = RecordingAccelerator("cpu:0")  # what accelerate reports for a gloo process
    trainer = Trainer([TwoNetworkArm(flow, value_lr=1e-2)], LOOP, accelerator)
    trainer.train_epoch()
    trainer._budget_row()
    gradients = len(trainer.params) * LOOP.updates_per_epoch
    finite_votes = LOOP.updates_per_epoch  # every update asks whether any process saw a NaN or inf
    # the gradients, the votes, the epoch's means and the counts
    assert len(accelerator.seen) == gradients + finite_votes + 2
    assert set(accelerator.seen) == {torch.device("cpu")}


def test_a_model_left_on_the_cpu_under_a_gpu_accelerator_fails_at_the_first_collective(flow) -> None:
    """What NCCL would do at the first epoch of a GPU run, shown on the CPU: the LoRA gradients are
    on the CPU while the processes communicate on the accelerator's device."""
    trainer = Trainer([TwoNetworkArm(flow, value_lr=1e-2)], LOOP, RecordingAccelerator("meta"))
    with pytest.raises(WrongDevice, match="tensor on cpu"):
        trainer.train_epoch()


class TwoRanks:
    """Rank 0 of two processes whose other rank holds ``other``: enough of accelerate's gather."""

    device, num_processes, process_index = torch.device("cpu"), 2, 0

    def __init__(self, other: Tensor) -> None:
        self.other = other

    def gather(self, tensor: Tensor) -> Tensor:
        if tensor.dtype == torch.int64:  # the lengths
            return torch.cat([tensor, torch.tensor([self.other.numel()])])
        other = torch.zeros_like(tensor)
        other[: self.other.numel()] = self.other
        return torch.cat([tensor, other])


def test_gather_concatenates_parts_of_different_lengths_in_rank_order() -> None:
    collectives = Collectives(TwoRanks(torch.tensor([7.0, 8.0, 9.0], dtype=torch.float64)))
    gathered = collectives.gather(torch.tensor([1.0, 2.0], dtype=torch.float64))
    assert gathered.tolist() == [1.0, 2.0, 7.0, 8.0, 9.0]
    with pytest.raises(WrongDevice):
        Collectives(RecordingAccelerator("cuda:0")).gather(torch.zeros(2))


def test_loss_scaling_gives_the_unscaled_update_and_skips_an_overflowing_step(flow) -> None:
    """fp16 forwards need dynamic loss scaling; the scale is a power of two, so in fp32 the scaled,
    then unscaled, gradients and hence the update are exactly the plain ones."""
    adapters = flow.adapter_parameters(POLICY) + flow.adapter_parameters("value")
    weights = [p.detach().clone() for p in adapters]

    def trained(loss_scaling: bool) -> tuple[list[Tensor], float, Trainer]:
        with torch.no_grad():
            for p, w in zip(adapters, weights, strict=True):
                p.copy_(w)
        trainer = Trainer([TwoNetworkArm(flow, value_lr=1e-2)], LOOP, loss_scaling=loss_scaling)
        row = trainer.train_epoch()
        return [p.detach().clone() for p in trainer.params], row["grad_norm"], trainer

    plain, plain_norm, _ = trained(False)
    scaled, scaled_norm, trainer = trained(True)
    assert all(torch.equal(a, b) for a, b in zip(plain, scaled, strict=True))
    assert scaled_norm == plain_norm  # clipping and logging see the unscaled gradients

    scale = trainer.scaler.get_scale()
    arm = trainer.shards[0]
    original_loss = arm.loss
    arm.loss = lambda mb: (original_loss(mb)[0] * float("inf"), {})
    before = [p.detach().clone() for p in trainer.params]
    trainer.train_epoch()
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.params, strict=True)), (
        "an inf step was taken"
    )
    assert trainer.scaler.get_scale() < scale  # the scale backed off


def test_a_checkpoint_keeps_the_loss_scale(flow, tmp_path: Path) -> None:
    trainer = Trainer([TwoNetworkArm(flow, value_lr=1e-2)], LOOP, loss_scaling=True)
    trainer.train_epoch()
    trainer.scaler.update(new_scale=1024.0)  # not the initial 65536
    trainer.save(tmp_path / "checkpoint.safetensors")
    resumed = Trainer([TwoNetworkArm(flow, value_lr=1e-2)], LOOP, loss_scaling=True)
    resumed.load(tmp_path / "checkpoint.safetensors")
    assert resumed.scaler.get_scale() == trainer.scaler.get_scale() == 1024.0
