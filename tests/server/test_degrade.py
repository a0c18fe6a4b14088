"""engine.degrade: the hysteresis policy (enter below −enter, leave above +leave, hold in between), the
steps a degraded chunk keeps, the start-up checks of the options, and the wire field that carries the
choice."""

from pathlib import Path

import pytest

from engine.degrade import ChunkCost, DegradeConfig, DegradePolicy, Slack, reduced_step_indices
from proto.wire import ChunkRequest, decode_header


def _run(policy: DegradePolicy, slacks: list[float | None]) -> list[bool]:
    degraded, out = False, []
    for slack in slacks:
        degraded = policy.decide(degraded, slack)
        out.append(degraded)
    return out


def test_switches_down_below_minus_enter_and_back_above_leave_only():
    policy = DegradePolicy(DegradeConfig(mode="steps", enter_s=0.1, leave_s=0.3))
    slacks = [0.5, 0.0, -0.05, -0.2, -0.5, 0.0, 0.25, 0.3, 0.31, 0.2, -0.1, -0.11]
    expected = [False, False, False, True, True, True, True, True, False, False, False, True]
    assert _run(policy, slacks) == expected


def test_a_slack_hovering_inside_the_band_never_flaps():
    policy = DegradePolicy(DegradeConfig(mode="steps", enter_s=0.1, leave_s=0.3))
    wobble = [0.05, -0.05, 0.2, -0.09, 0.29] * 4
    assert _run(policy, wobble) == [False] * 20  # full stays full
    assert _run(policy, [-0.2, *wobble]) == [True] * 21  # degraded stays degraded


def test_off_and_unknown_slack_are_full():
    assert _run(DegradePolicy(DegradeConfig()), [-5.0, -5.0]) == [False, False]
    on = DegradePolicy(DegradeConfig(mode="steps"))
    assert on.decide(False, None) is False
    assert on.decide(True, None) is False  # no estimate (a fresh engine after a restart): full


def test_slack_is_buffer_plus_pending_minus_expected():
    assert Slack(0.5, 0.75, 1.5).seconds == pytest.approx(-0.25)


def test_the_cost_is_an_average_of_full_chunks():
    cost = ChunkCost(weight=0.5)
    assert cost.expected_s is None
    cost.observe(1.0)
    cost.observe(2.0)
    assert cost.expected_s == pytest.approx(1.5)


@pytest.mark.parametrize(
    ("steps", "keep", "indices"),
    [(2, 1, (0,)), (4, 1, (0,)), (4, 2, (0, 3)), (4, 3, (0, 2, 3)), (3, 2, (0, 2)), (5, 4, (0, 1, 3, 4))],
)
def test_reduced_steps_start_at_pure_noise_and_end_at_the_last_step(steps, keep, indices):
    assert reduced_step_indices(steps, keep) == indices


def test_the_options_are_checked_against_the_schedule():
    DegradeConfig(mode="steps", steps=1).check(2)
    assert DegradeConfig(mode="steps", steps=1).step_indices(2) == (0,)
    assert DegradeConfig(steps=1).step_indices(2) == ()
    with pytest.raises(ValueError, match="--degrade-steps must be between 1 and 1"):
        DegradeConfig(mode="steps", steps=2).check(2)
    with pytest.raises(ValueError, match="one-step schedule cannot degrade"):
        DegradeConfig(mode="steps", steps=1).check(1)
    with pytest.raises(ValueError, match="--degrade must be one of off, steps"):
        DegradeConfig(mode="decoder").check(2)
    with pytest.raises(ValueError, match="--degrade-leave"):
        DegradeConfig(mode="steps", enter_s=0.1, leave_s=-0.2).check(2)
    with pytest.raises(ValueError, match="sparse-causal window only"):
        DegradeConfig(mode="steps").check(3, window="convkv-memory")
    DegradeConfig().check(3, window="convkv-memory")  # off is fine everywhere


def test_step_indices_travel_on_the_wire_and_default_to_the_full_schedule():
    request = ChunkRequest("s", 3, ((True, False),), noise_seed=9, step_indices=(0, 2))
    assert decode_header(request.to_bytes()) == request
    assert decode_header(ChunkRequest("s", 3, ((True,),), noise_seed=9).to_bytes()).step_indices == ()


def test_run_and_serve_take_the_degrade_flags_and_refuse_a_bad_one_at_start_up(tmp_path: Path):
    from server.run_options import parse_run_options
    from server.serve import parse_serve_options

    config = tmp_path / "serve.toml"
    config.write_text('[api]\napi_key = "k"\n')
    flags = ["--device", "cpu", "--random-weights", "--steps", "3"]
    flags += ["--degrade", "steps", "--degrade-steps", "2"]
    serve = parse_serve_options(["--config", str(config), *flags, "--degrade-enter", "0.1"])
    assert serve.degrade == DegradeConfig(mode="steps", steps=2, enter_s=0.1)
    run = parse_run_options(["--image", "a.png", "--audio", "a.wav", "--out", "a.mp4", *flags])
    assert run.degrade == DegradeConfig(mode="steps", steps=2)  # accepted; run_stream never degrades
    with pytest.raises(ValueError, match="--degrade-steps must be between 1 and 2"):
        parse_serve_options(["--config", str(config), *flags[:-1], "3"])
    assert parse_serve_options(["--config", str(config), "--device", "cpu"]).degrade == DegradeConfig()
    with pytest.raises(ValueError, match=r"--degrade-leave 0\.8 is never reached"):  # buffer < --ahead
        parse_serve_options(["--config", str(config), *flags, "--ahead", "0.75", "--degrade-leave", "0.8"])
