"""Faults seen through a real zeroth-order arm (tempflow-grpo at a small smoke size, in this process):
a GenEval reward server that fails mid-epoch, after answering the epoch's first reward call, stops the
collection with a RewardServerError naming the server and the fix; one that comes back within the
client's retries changes nothing. And the first microbatch of an epoch is on-policy: its importance
ratio is 1 up to float32 rounding, so the trainer's precision warning stays silent."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
from fake_geneval_server import FakeGenEvalServer
from fault_injection import CLIENT, SMALL, Watched, fast_client, go_bad

from baselines import registry
from experiments import run as run_module
from reward_models.geneval_server import URL_ENV, GenEvalServerReward, RewardServerError
from rsm_core.budget import Budget
from rsm_core.config import load_config
from rsm_core.interfaces import Arm
from rsm_core.trainer import LoopConfig, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")
METHOD = "tempflow-grpo"
ATTEMPTS = CLIENT["retries"] + 1


@pytest.fixture(scope="module")
def world() -> tuple[run_module.Sections, run_module.Parts]:
    """The run's sections and parts (backbone, prompts), built once; each test builds its own arm."""
    method = registry.get(METHOD)
    overrides = [f"method={METHOD}", "reward=geneval-server", *SMALL[METHOD]]
    config = load_config(run_module.RunConfig, *run_module.scale_files(method, "smoke"), overrides=overrides)
    resolved = run_module.sections(config)
    return resolved, run_module.build_parts(resolved.run)


def arm_scored_by(world, url: str, before_call: Callable[[], None] = lambda: None) -> Arm:
    """A fresh arm (same seed, same rollouts) whose reward is the GenEval client of the server at ``url``."""
    resolved, parts = world
    client = fast_client(GenEvalServerReward(url, wire=resolved.run.geneval_wire))
    rewards = {resolved.run.reward: Watched(client, before_call)}
    return run_module.build_arm(resolved, run_module.Parts(parts.backbone, rewards, parts.train, parts.test))


def turning_bad_at_second_call(server: FakeGenEvalServer, fault: str) -> Callable[[], None]:
    """A hook that counts reward calls and breaks ``server`` just before the second."""
    calls = 0

    def before_call() -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            assert server.requests == 1, "the server has not answered the epoch's first call"
            go_bad(server, fault)

    return before_call


@pytest.mark.parametrize(
    ("fault", "detail", "requests"),
    [
        ("geneval-down", "Connection refused", 1),  # the retries find the port closed
        ("geneval-slow", "timed out", 1 + ATTEMPTS),
        ("geneval-garbage", "malformed JSON response", 2),  # a broken answer is not retried
    ],
)
def test_a_geneval_server_failing_mid_epoch_stops_the_collection_naming_it(
    world, fault, detail, requests
) -> None:
    server = FakeGenEvalServer()
    with server as url:
        arm = arm_scored_by(world, url, turning_bad_at_second_call(server, fault))
        with pytest.raises(RewardServerError) as failure:
            arm.collect(Budget())
    message = str(failure.value)
    assert f"GenEval reward server at {url}" in message and detail in message, message
    assert URL_ENV in message, "the message does not say how to point the run at a server"
    if fault != "geneval-garbage":
        assert (
            f"failed after {ATTEMPTS} attempt(s)" in message and "Start the GenEval reward server" in message
        )
    assert server.requests == requests


def test_a_geneval_server_back_within_the_retries_changes_nothing(world) -> None:
    healthy = FakeGenEvalServer()
    with healthy as url:
        expected = arm_scored_by(world, url).collect(Budget())
    flaky = FakeGenEvalServer()
    with flaky as url:
        arm = arm_scored_by(world, url, turning_bad_at_second_call(flaky, "geneval-flaky"))
        batch = arm.collect(Budget())
    assert flaky.requests == healthy.requests + CLIENT["retries"]  # two failed attempts, then answers
    assert arm.batch_stats(batch) == arm.batch_stats(expected)


def test_the_first_microbatch_of_an_epoch_is_on_policy(world) -> None:
    server = FakeGenEvalServer()
    with server as url, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = Trainer([arm_scored_by(world, url)], LoopConfig(epochs=1, updates_per_epoch=2))
        row = trainer.train_epoch()
    # the rollout and the training forward run in the same precision: only float32 rounding remains
    assert 0 <= row["first_ratio_deviation"] <= 8 * torch.finfo(torch.float32).eps
    assert not [w for w in caught if "first_ratio_deviation" in str(w.message)]
