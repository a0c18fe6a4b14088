"""What the step-pipeline topology (``--step-pipeline``) asks of the stream, checked once at start-up.

Step-pipeline parallelism (LiveAct's timestep-forcing pipeline parallelism): stage s of S runs denoising
step s of every chunk on its own per-step KV cache slot and hands the re-noised latent to stage s + 1, so S
chunks are in flight at once and throughput is up to S times one rank's while a chunk still takes a whole
pass (``workers.step_stage`` has the data flow, ``engine.step_pipeline`` the master's side).

It needs, and ``check_step_pipeline`` refuses anything else with the fix:

- one stage per denoising step (S = ``len(stream.denoising_steps)``);
- ``cache_mode="per-step"``: stage s only ever reads and writes step s's keys/values, so stage 0 can start
  chunk t + 1 as soon as it has finished chunk t's step 0. ``clean-context`` shares one cache slot, written by
  an extra σ = 0 pass on chunk t's final x0, which every step of chunk t + 1 reads: stage 0 would have to
  wait for chunk t to leave the last stage (and then run the refresh itself, on its own copy), so the
  stages could never overlap and the pipeline would only add hops. It is refused rather than run slower;
- the ``sparse-causal`` window. LiveAct's ``convkv-memory`` window (per-step slots plus null-audio slots for
  audio CFG, a memory update per slot) would split the same way, but is not implemented here.
"""

from __future__ import annotations

from proto.stream_config import StreamConfig


def check_step_pipeline(stream: StreamConfig, stages: int, preset: str | None = None) -> None:
    """Raise ``ValueError`` unless ``stream`` can be split into ``stages`` step stages (module docstring)."""
    which = f"preset {preset!r}" if preset else "the stream"
    if stream.window != "sparse-causal":
        raise ValueError(
            f"--step-pipeline supports the 'sparse-causal' window only; {which} streams the "
            f"{stream.window!r} window (SoulX-LiveAct); leave out --step-pipeline"
        )
    if stream.cache_mode != "per-step":
        raise ValueError(
            f"--step-pipeline needs cache_mode 'per-step' (each stage keeps its own step's keys/values); "
            f"{which} uses {stream.cache_mode!r}, where one cache slot refreshed after the last step is read "
            "by every step of the next chunk, so the stages could not overlap; leave out --step-pipeline"
        )
    if stages != stream.num_steps:
        raise ValueError(
            f"--step-pipeline runs one stage per denoising step: {which} has {stream.num_steps} steps "
            f"{stream.denoising_steps}, but {stages} stages were asked for"
        )
