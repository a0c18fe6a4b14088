"""The master's chunk pipeline: score chunk t+1 while decoding chunk t and publishing chunk t−1.

Schedule (overlapped, the disaggregated topologies): a transport thread submits chunk t+1's request as soon
as the main thread has taken chunk t for decoding, prepares chunk t+2's inputs while the workers denoise,
and receives chunk t+1's latent, while the main thread decodes chunk t and copies its frames to host memory,
and a publish thread hands the frames of chunk t−1 to the sink (x264/AAC encoding for the file publisher).
The main thread's critical path is the decode alone, and steady-state TTBC is about max(score + transfer,
decode, publish), not their sum. The workers run at most one chunk ahead of the decoder (one chunk of
buffer, as in ARCHITECTURE.md §3), and at most one decoded chunk waits for the publisher (bounded queue);
chunks are published in order, and an error on any of the three threads ends the run with that error.

Without overlap (the self-contained topologies: one device denoises and decodes in turn) the same steps run
in sequence on the main thread.

CUDA (the master's device is a GPU): the latent arrives on the executor's receive stream (``Transfer``
event); the decode stream waits for that event, never the device; the frames are copied on a copy stream
that waits for the decode stream into pinned host memory (non-blocking), the allocator is told which
streams use which tensors (``record_stream``), and the host waits for the copy's event alone before it
publishes. On CPU the same schedule runs with the thread and no streams.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from decoder.streaming import DecodeSession
from engine.executor import Executor, ScoredChunk
from proto.wire import ChunkRequest
from server.stats import ChunkTiming, StreamStats

# How often a waiting thread checks whether another one gave up, seconds.
_POLL_S = 0.1

# Decoded chunks that may wait for the publish thread. One keeps the decoder running while a chunk is
# encoded; more would only add latency.
_PUBLISH_QUEUE = 1


@dataclass
class PreparedChunk:
    """A chunk's request, ready to go out.

    tensors: the request's tensors, in the order its header declares.
    pcm: ``[frames * samples_per_frame]`` float32 audio of the chunk's output frames.
    keep_frames: how many of the decoded frames to publish (the last chunk stops where the audio stops).
    prepare_s: seconds the master spent building it.
    """

    request: ChunkRequest
    tensors: dict[str, torch.Tensor]
    pcm: np.ndarray
    keep_frames: int
    prepare_s: float


class FrameSink(Protocol):
    """What the pipeline publishes to (``server.publishers.file.Mp4FilePublisher`` is one)."""

    def write(self, frames: np.ndarray, audio: np.ndarray) -> None: ...


@dataclass
class _Failure:
    error: BaseException


@dataclass
class _Decoded:
    """A chunk's frames ``[T, H, W, 3]`` uint8 in host memory, ready to publish, and its timings so far."""

    prepared: PreparedChunk
    scored: ScoredChunk
    frames: np.ndarray
    decode_s: float


_END = object()


class _PublishThread:
    """Publishes decoded chunks on its own thread, in order, through a bounded queue.

    ``submit`` blocks while the queue is full and raises the publish thread's error, if it failed, so a
    failing sink stops the decoder; ``close`` publishes what is queued, joins the thread and raises its error.
    """

    def __init__(self, emit: Callable[[_Decoded], None], depth: int) -> None:
        self._emit = emit
        self._queue: queue.Queue[object] = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="master-publish", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is _END:
                return
            try:
                self._emit(item)  # type: ignore[arg-type]
            except BaseException as exc:
                self.error = exc
                return

    def submit(self, item: _Decoded) -> None:
        while True:
            if self.error is not None:
                raise self.error
            try:
                self._queue.put(item, timeout=_POLL_S)
                return
            except queue.Full:
                continue

    def close(self, raise_error: bool = True) -> None:
        """Publish the queued chunks and stop; raise the thread's error unless ``raise_error`` is False (the
        caller is already failing with its own)."""
        while self._thread.is_alive():
            try:
                self._queue.put(_END, timeout=_POLL_S)
                break
            except queue.Full:
                continue
        self._thread.join()
        if raise_error and self.error is not None:
            raise self.error


class ChunkPipeline:
    """Runs a stream's chunks through an executor, the decoder and a sink, recording ``ChunkTiming`` rows.

    Args:
        executor: the transport to the score side (``engine.executor``).
        decoder: the session's streaming VAE decoder (on the master's device).
        sink: the publisher; ``write(frames [T, H, W, 3] uint8, audio [T * spf] float32)``.
        overlap: run the transport and the publishing on their own threads (disaggregated) or everything
            in turn (self-contained).
        samples_per_frame: audio samples per video frame (1000 at 16 kHz and 16 fps).
        memory: returns ``{rank: RSS bytes}`` after each chunk (None: not measured).
        on_chunk: called with each chunk's timing once it is published (progress display; on the publish
            thread when ``overlap``).
    """

    def __init__(
        self,
        executor: Executor,
        decoder: DecodeSession,
        sink: FrameSink,
        *,
        overlap: bool,
        samples_per_frame: int,
        memory: Callable[[], dict[int, int]] | None = None,
        on_chunk: Callable[[ChunkTiming], None] | None = None,
    ) -> None:
        self.executor = executor
        self.decoder = decoder
        self.sink = sink
        self.overlap = overlap
        self.samples_per_frame = samples_per_frame
        self.memory = memory
        self.on_chunk = on_chunk
        self.cuda = decoder.device.type == "cuda"
        if self.cuda:
            self.decode_stream = torch.cuda.Stream(decoder.device)
            self.copy_stream = torch.cuda.Stream(decoder.device)
        # Pinned host buffers per frame shape, used in turn. With the publish thread, one chunk is being
        # published and _PUBLISH_QUEUE wait while the next is copied in, so that many + 2 never collide.
        self._pinned: dict[tuple[int, ...], list[torch.Tensor]] = {}
        self._pinned_ring = _PUBLISH_QUEUE + 2 if overlap else 1
        self._pinned_next = 0
        self._stream_start = 0.0
        self._last_publish: float | None = None

    def run(self, chunks: Iterable[PreparedChunk], stats: StreamStats) -> None:
        """Score, decode and publish every chunk of ``chunks`` (consumed lazily, in order)."""
        self._stream_start = time.perf_counter()
        self._last_publish = None
        if self.overlap:
            self._run_overlapped(iter(chunks), stats)
        else:
            for prepared in chunks:
                self.executor.submit(prepared.request, prepared.tensors)
                scored = self.executor.collect(prepared.request)
                self._publish(self._decode_chunk(prepared, scored), stats)

    # ---- overlapped schedule -------------------------------------------------------------------------

    def _run_overlapped(self, chunks: Iterator[PreparedChunk], stats: StreamStats) -> None:
        results: queue.Queue[object] = queue.Queue(maxsize=1)
        taken = threading.Semaphore(0)
        stop = threading.Event()
        thread = threading.Thread(
            target=self._transport, args=(chunks, results, taken, stop), name="master-transport", daemon=True
        )
        thread.start()
        publisher = _PublishThread(lambda decoded: self._publish(decoded, stats), _PUBLISH_QUEUE)
        try:
            while True:
                item = results.get()
                taken.release()
                if item is _END:
                    break
                if isinstance(item, _Failure):
                    raise item.error
                prepared, scored = item  # type: ignore[misc]
                publisher.submit(self._decode_chunk(prepared, scored))
        except BaseException:
            publisher.close(raise_error=False)  # publish what was decoded; the first error is the one raised
            raise
        else:
            publisher.close()
        finally:
            stop.set()
        thread.join()

    def _transport(
        self,
        chunks: Iterator[PreparedChunk],
        results: queue.Queue[object],
        taken: threading.Semaphore,
        stop: threading.Event,
    ) -> None:
        """Submit t+1 once the decoder took t; prepare t+2 while the workers denoise t+1; receive t+1."""
        try:
            current = next(chunks, None)
            while current is not None and not stop.is_set():
                self.executor.submit(current.request, current.tensors)
                following = next(chunks, None)
                scored = self.executor.collect(current.request)
                results.put((current, scored))
                if not self._wait(taken, stop):
                    return
                current = following
            if not stop.is_set():
                results.put(_END)
        except BaseException as exc:
            results.put(_Failure(exc))

    @staticmethod
    def _wait(taken: threading.Semaphore, stop: threading.Event) -> bool:
        while not taken.acquire(timeout=_POLL_S):
            if stop.is_set():
                return False
        return True

    # ---- decode and publish --------------------------------------------------------------------------

    def _decode_chunk(self, prepared: PreparedChunk, scored: ScoredChunk) -> _Decoded:
        start = time.perf_counter()
        frames = self._decode(scored)
        return _Decoded(prepared, scored, frames, time.perf_counter() - start)

    def _publish(self, decoded: _Decoded, stats: StreamStats) -> None:
        """Write the chunk to the sink and record its timing (on the publish thread when overlapped)."""
        prepared, scored = decoded.prepared, decoded.scored
        start = time.perf_counter()
        keep = prepared.keep_frames
        self.sink.write(decoded.frames[:keep], prepared.pcm[: keep * self.samples_per_frame])
        published = time.perf_counter()
        ttbc = None if self._last_publish is None else published - self._last_publish
        self._last_publish = published
        timing = ChunkTiming(
            chunk_index=prepared.request.chunk_index,
            frames=keep,
            prepare_s=prepared.prepare_s,
            score_s=scored.score_s,
            transfer_s=max(0.0, scored.roundtrip_s - scored.score_s),
            decode_s=decoded.decode_s,
            publish_s=published - start,
            published_at_s=published - self._stream_start,
            ttbc_s=ttbc,
            rss_bytes=self.memory() if self.memory is not None else {},
        )
        stats.add(timing)
        if self.on_chunk is not None:
            self.on_chunk(timing)

    def _decode(self, scored: ScoredChunk) -> np.ndarray:
        """The chunk's frames as uint8 ``[T, H, W, 3]`` in host memory."""
        if not self.cuda:
            return self.decoder.decode_chunk(scored.latent).numpy()
        if scored.transfer is not None:
            latent = scored.transfer.wait(self.decode_stream)["latent"]
        else:
            # Produced on this thread's current stream (colocated): order the decode after it.
            self.decode_stream.wait_stream(torch.cuda.current_stream(self.decoder.device))
            latent = scored.latent
        frames = self.decoder.decode_chunk(latent, stream=self.decode_stream)
        self.copy_stream.wait_stream(self.decode_stream)
        host = self._pinned_buffer(tuple(frames.shape))
        with torch.cuda.stream(self.copy_stream):
            host.copy_(frames, non_blocking=True)
            frames.record_stream(self.copy_stream)
            copied = torch.cuda.Event()
            copied.record(self.copy_stream)
        copied.synchronize()  # the host waits for this copy only, not for the device
        return host.numpy()

    def _pinned_buffer(self, shape: tuple[int, ...]) -> torch.Tensor:
        """The next of ``_pinned_ring`` page-locked host buffers of this frame shape; reused once the chunk
        that last held it is published (publishing copies out of it)."""
        ring = self._pinned.setdefault(shape, [])
        slot = self._pinned_next % self._pinned_ring
        self._pinned_next += 1
        while len(ring) <= slot:
            ring.append(torch.empty(shape, dtype=torch.uint8, pin_memory=True))
        return ring[slot]
