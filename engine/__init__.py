"""The engine: how the master runs sessions' chunks on a serving group (vLLM-style scheduler → executor →
outputs).

- ``engine.scheduler``: which session's chunk goes next (earliest deadline first, bounded ahead of playout);
- ``engine.executor``: the transport to the score side, one interface for the disaggregated and the
  self-contained topologies (``DedicatedExecutor``, ``ColocatedExecutor``);
- ``engine.step_pipeline``: ``StepPipelineExecutor``, the step-pipeline topology's (one stage per denoising
  step, one chunk in flight per stage);
- ``engine.pipeline``: ``ChunkEngine``, the pipelined loop (submit t+1, decode t, prepare t+2, collect t+1);
- ``engine.publish``: the publish thread (outputs, TTBC and stage timings, late chunks);
- ``engine.batching``: ``BatchChunkEngine``, the same loop over batches of sessions' chunks scored in one
  forward (``--max-batch-sessions``; ``engine.scheduler.pick_batch`` picks them).

``talkingmachines serve`` (``server.live_backend``) runs its live sessions on it.
"""
