"""The step-pipeline topology: rank layout, names, refusals, and the memory plan (one cache slot a stage)."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from engine.memory_plan import kv_cache_bytes, plan_memory
from proto.model_config import get_model_preset
from proto.step_pipeline import check_step_pipeline
from proto.stream_config import StreamConfig
from proto.topology import Topology
from server.options import GroupOptions, add_group_arguments, group_options
from workers.factory import build_score_model
from workers.step_stage import StepStageDiT

STREAM = StreamConfig(height=32, width=32)


def test_stages_of_sp_groups_have_their_own_ranks_and_the_last_leader_answers() -> None:
    topo = Topology(2, "dedicated", num_heads=4, step_stages=2)
    assert topo.name == "step-pipeline 2x2+1"
    assert topo.world_size == 5
    assert topo.worker_ranks == (1, 2, 3, 4)
    assert (topo.stage_ranks(0), topo.stage_ranks(1)) == ((1, 2), (3, 4))
    assert [topo.stage_of(r) for r in range(5)] == [None, 0, 0, 1, 1]
    assert topo.sp_leader == 3
    assert topo.role(3) == "step stage 1 score worker 0 (SP leader)"
    assert topo.role(2) == "step stage 0 score worker 1"
    assert Topology(1, "dedicated", step_stages=3).role(3) == "step stage 2 score worker 0"
    with pytest.raises(ValueError, match="stage 2 is outside"):
        topo.stage_ranks(2)


def test_a_topology_without_stages_is_unchanged() -> None:
    topo = Topology(2, "dedicated")
    assert (topo.world_size, topo.worker_ranks, topo.sp_leader, topo.step_pipeline) == (3, (1, 2), 1, False)
    assert topo.stage_of(2) == 0 and topo.stage_of(0) is None


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"decoder": "colocated", "step_stages": 2}, "needs --decoder dedicated"),
        ({"step_stages": 0}, "step_stages must be a positive integer"),
    ],
)
def test_bad_stage_layouts_are_refused(kwargs: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        Topology(**kwargs)


def test_clean_context_liveact_and_a_stage_count_off_the_steps_are_refused() -> None:
    with pytest.raises(ValueError, match="needs cache_mode 'per-step'"):
        check_step_pipeline(dataclasses.replace(STREAM, cache_mode="clean-context"), 2)
    with pytest.raises(ValueError, match="one stage per denoising step: the stream has 2 steps"):
        check_step_pipeline(STREAM, 3)
    liveact = StreamConfig.for_schedule(
        get_model_preset("soulx-liveact-tiny").stream_schedule, height=32, width=32
    )
    with pytest.raises(ValueError, match="'sparse-causal' window only"):
        check_step_pipeline(liveact, liveact.num_steps, "soulx-liveact-tiny")
    with pytest.raises(ValueError, match="needs cache_mode 'per-step'"):  # the stage engine checks too
        StepStageDiT(
            build_score_model("tiny", seed=0), dataclasses.replace(STREAM, cache_mode="clean-context"), 0
        )


def test_the_memory_plan_gives_each_stage_rank_one_cache_slot() -> None:
    config = get_model_preset("tiny")
    stream = dataclasses.replace(STREAM, denoising_steps=(1000, 750, 500))
    plan = plan_memory(config, stream, Topology(1, "dedicated", step_stages=3))
    assert plan.topology_name == "step-pipeline 3x1+1" and len(plan.ranks) == 4
    kv = kv_cache_bytes(config, stream, 1, plan.dtype)
    for stage_rank in plan.ranks[1:]:
        assert stage_rank.kv_cache_per_session == kv["self_attn"] // 3 + kv["cross_attn"]
    whole = plan_memory(config, stream, Topology(1, "dedicated"))
    assert whole.ranks[1].kv_cache_per_session == kv["self_attn"] + kv["cross_attn"]


def _group(*argv: str) -> GroupOptions:
    parser = argparse.ArgumentParser()
    add_group_arguments(parser, "run", "prompt")
    return group_options(parser.parse_args(["--device", "cpu", "--random-weights", *argv]), GroupOptions)


def test_the_flag_gives_one_stage_per_step_and_a_dedicated_decoder() -> None:
    options = _group("--step-pipeline")
    topology = options.topology()
    assert (options.decoder, options.step_stages, topology.world_size) == ("dedicated", 2, 3)
    assert _group("--step-pipeline", "--steps", "3", "--score-workers", "2").topology().name == (
        "step-pipeline 3x2+1"
    )
    assert _group().topology().step_stages == 1


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--degrade", "steps"], "--degrade steps cannot be combined with --step-pipeline"),
        (["--max-batch-sessions", "2"], "--max-batch-sessions > 1 cannot be combined with --step-pipeline"),
    ],
)
def test_degradation_and_batching_are_refused_in_a_step_pipeline(argv: list[str], needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        _group("--step-pipeline", *argv)
    _group(*argv)  # each is fine without the pipeline
