"""The wire contract between the master and the score workers: versioned headers plus declared tensors.

Every message is a header — a frozen dataclass serialised as JSON into a uint8 tensor, sent on the gloo
``control`` group as ``[int64 length]`` then ``[uint8 payload]`` — optionally followed by tensors on the
``data`` group, in the order and with the shapes/dtypes the header declares (``TensorSpec``). Headers on
gloo first means a receiver never parks inside NCCL waiting for a message that may not come, and tensors
only travel once both sides know their exact layout.

Receivers validate everything (version, kind, session, chunk index, shapes, dtypes) and raise ``WireError``
naming the field and both values. The helpers take process groups; they never create them.

Message flow (ranks are global; ``src``/``dst`` as in ``torch.distributed``):

- master -> all (broadcast on control, then data): ``SessionOpen`` (+ conditioning tensors),
  ``ChunkRequest`` (+ audio features, …), ``SessionClose``, ``Shutdown``;
- SP leader -> master (send/recv): ``ChunkResult`` (+ latent ``[16, F, h, w]``), or ``WorkerFailed``.

CUDA streams: pass ``stream`` to run the tensor ops on a side stream. The side stream first waits for the
caller's current stream (the producer); tensors it touches are ``record_stream``-ed so the caching
allocator does not recycle them early; the returned ``Transfer`` lets the consumer stream wait for the
transfer's end without a device-wide synchronisation. On CPU (gloo) the ops finish before returning.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar, TypeVar

import torch
import torch.distributed as dist

from proto.liveness import wait_with_timeout

WIRE_VERSION = 1

# A header larger than this is a bug (headers carry ids, flags and tensor specs, never data).
MAX_HEADER_BYTES = 1 << 20


class WireError(ValueError):
    """A received message does not match what the receiver expects (field, expected and received values)."""


def _mismatch(where: str, field_name: str, expected: object, got: object) -> WireError:
    return WireError(f"{where}.{field_name}: expected {expected!r}, received {got!r}")


# ---- tensor specs ---------------------------------------------------------------------------------


_DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name)
    for name in ("float32", "float16", "bfloat16", "float64", "uint8", "int8", "int32", "int64", "bool")
}


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of one tensor that follows a header on the ``data`` group."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise WireError(f"tensor {self.name!r}: dtype {self.dtype!r} is not one of {sorted(_DTYPES)}")
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        if any(s < 0 for s in self.shape):
            raise WireError(f"tensor {self.name!r}: negative dimension in shape {self.shape}")

    @classmethod
    def of(cls, name: str, tensor: torch.Tensor) -> TensorSpec:
        return cls(name=name, shape=tuple(tensor.shape), dtype=str(tensor.dtype).removeprefix("torch."))

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    def empty(self, device: torch.device | str = "cpu") -> torch.Tensor:
        return torch.empty(self.shape, dtype=self.torch_dtype, device=device)

    def check(self, tensor: torch.Tensor, where: str = "tensor") -> None:
        """Raise ``WireError`` if ``tensor`` does not have this spec's shape and dtype."""
        got = TensorSpec.of(self.name, tensor)
        if got.shape != self.shape:
            raise _mismatch(f"{where}[{self.name!r}]", "shape", self.shape, got.shape)
        if got.dtype != self.dtype:
            raise _mismatch(f"{where}[{self.name!r}]", "dtype", self.dtype, got.dtype)


def check_specs(where: str, expected: Sequence[TensorSpec], received: Sequence[TensorSpec]) -> None:
    """Raise ``WireError`` unless ``received`` declares ``expected`` (names, order, shapes, dtypes)."""
    exp_names = [s.name for s in expected]
    got_names = [s.name for s in received]
    if exp_names != got_names:
        raise _mismatch(where, "tensors", exp_names, got_names)
    for exp, got in zip(expected, received, strict=True):
        if exp.shape != got.shape:
            raise _mismatch(f"{where}.tensors[{exp.name!r}]", "shape", exp.shape, got.shape)
        if exp.dtype != got.dtype:
            raise _mismatch(f"{where}.tensors[{exp.name!r}]", "dtype", exp.dtype, got.dtype)


# ---- messages -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Message:
    """Base of every header. ``kind`` names the subclass on the wire."""

    kind: ClassVar[str] = ""

    def to_bytes(self) -> bytes:
        body = {"version": WIRE_VERSION, "kind": self.kind, **asdict(self)}
        return json.dumps(body, separators=(",", ":")).encode()

    def expect(self, **expected: object) -> None:
        """Raise ``WireError`` for the first field whose value differs from ``expected[field]``."""
        for name, value in expected.items():
            got = getattr(self, name)
            if got != value:
                raise _mismatch(type(self).__name__, name, value, got)


@dataclass(frozen=True)
class SessionOpen(Message):
    """Start a session on the workers. Tensors: the session's conditioning (``y``, CLIP tokens, text…)."""

    kind: ClassVar[str] = "session_open"
    session_id: str
    latent_height: int
    latent_width: int
    num_characters: int = 1
    tensors: tuple[TensorSpec, ...] = ()


@dataclass(frozen=True)
class SessionClose(Message):
    """Free a session's KV caches and conditioning on the workers. No tensors."""

    kind: ClassVar[str] = "session_close"
    session_id: str


@dataclass(frozen=True)
class ChunkRequest(Message):
    """Denoise chunk ``chunk_index`` of a session.

    ``speaking[c][f]`` is True when character ``c`` speaks in latent frame ``f`` of the chunk (False: the
    silence embedding replaces its audio). ``noise_seed`` seeds the chunk's initial and re-noising noise.
    ``step_indices``: the denoising steps to run (empty: all; ``engine.degrade``).
    Tensors: audio features for the chunk's window and anything else per chunk, as declared.
    """

    kind: ClassVar[str] = "chunk_request"
    session_id: str
    chunk_index: int
    speaking: tuple[tuple[bool, ...], ...]
    noise_seed: int
    tensors: tuple[TensorSpec, ...] = ()
    # Indices of the denoising steps this chunk runs, increasing from 0; () = the full schedule. A degraded
    # chunk (engine.degrade) runs a subset; the workers check it against their schedule.
    step_indices: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.chunk_index < 0:
            raise WireError(f"ChunkRequest.chunk_index must be >= 0, got {self.chunk_index}")
        frames = {len(row) for row in self.speaking}
        if len(frames) > 1:
            raise WireError(
                f"ChunkRequest.speaking must have one flag per latent frame for every character, "
                f"got rows of lengths {sorted(frames)}"
            )


@dataclass(frozen=True)
class ChunkBatchRequest(Message):
    """Denoise one chunk of each of several sessions together (``workers.batched``: one forward per pass).

    ``requests``: ordinary ``ChunkRequest`` headers of distinct sessions, each validated as if sent alone.
    Tensors: every request's declared tensors in request order, named ``"{b}/{name}"`` (``split_batch``
    gives them back per request). The SP leader answers with one ``ChunkResult`` per request, in order.
    """

    kind: ClassVar[str] = "chunk_batch_request"
    requests: tuple[ChunkRequest, ...]

    def __post_init__(self) -> None:
        if not self.requests:
            raise WireError("ChunkBatchRequest.requests must hold at least one ChunkRequest")
        ids = [r.session_id for r in self.requests]
        if len(set(ids)) != len(ids):
            raise WireError(
                f"ChunkBatchRequest.requests: session ids {ids} repeat; a batch holds one chunk per session"
            )

    @property
    def tensors(self) -> tuple[TensorSpec, ...]:
        return tuple(
            TensorSpec(f"{b}/{spec.name}", spec.shape, spec.dtype)
            for b, request in enumerate(self.requests)
            for spec in request.tensors
        )

    def join(self, per_request: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The batch's tensors from each request's (in request order, names prefixed)."""
        return {f"{b}/{name}": t for b, tensors in enumerate(per_request) for name, t in tensors.items()}

    def split(self, tensors: Mapping[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """Each request's tensors (its own names, in its declared order) from the batch's."""
        return [
            {
                spec.name: tensors[f"{b}/{spec.name}"]
                for spec in request.tensors
                if f"{b}/{spec.name}" in tensors
            }
            for b, request in enumerate(self.requests)
        ]


@dataclass(frozen=True)
class ChunkResult(Message):
    """The clean latent of one chunk, from the SP leader. Tensors: ``latent`` ``[16, F, h, w]``.

    ``score_seconds`` is the workers' wall time for the chunk (all denoising steps), in seconds.
    """

    kind: ClassVar[str] = "chunk_result"
    session_id: str
    chunk_index: int
    score_seconds: float
    tensors: tuple[TensorSpec, ...] = ()

    def expect_reply_to(self, request: ChunkRequest) -> None:
        """Raise ``WireError`` unless this result answers ``request`` (same session and chunk)."""
        self.expect(session_id=request.session_id, chunk_index=request.chunk_index)


@dataclass(frozen=True)
class WorkerFailed(Message):
    """Sent by a worker instead of a result when it caught an exception, so the master can name it."""

    kind: ClassVar[str] = "worker_failed"
    rank: int
    error: str


@dataclass(frozen=True)
class Shutdown(Message):
    """Stop the worker loops; the workers leave the world cleanly."""

    kind: ClassVar[str] = "shutdown"
    reason: str = ""


MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.kind: cls
    for cls in (
        SessionOpen,
        SessionClose,
        ChunkRequest,
        ChunkResult,
        WorkerFailed,
        Shutdown,
        ChunkBatchRequest,
    )
}

M = TypeVar("M", bound=Message)


def _tuplify(value: Any) -> Any:
    """JSON gives lists; headers are frozen and hashable, so nested lists become tuples."""
    if isinstance(value, list):
        return tuple(_tuplify(v) for v in value)
    return value


def decode_header(payload: bytes) -> Message:
    """Parse a header; raise ``WireError`` on a wrong version, unknown kind, or missing/extra fields."""
    try:
        body = json.loads(payload.decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WireError(f"header is not valid JSON ({exc}); sender and receiver are out of step") from exc
    version = body.pop("version", None)
    if version != WIRE_VERSION:
        raise _mismatch("header", "version", WIRE_VERSION, version)
    kind = body.pop("kind", None)
    if kind not in MESSAGE_TYPES:
        raise WireError(f"header.kind: expected one of {sorted(MESSAGE_TYPES)}, received {kind!r}")
    cls = MESSAGE_TYPES[kind]
    names = {f.name for f in fields(cls)}
    if set(body) != names:
        missing, extra = sorted(names - set(body)), sorted(set(body) - names)
        raise WireError(f"{cls.__name__} header: missing fields {missing}, unexpected fields {extra}")
    if "tensors" in body:
        body["tensors"] = tuple(TensorSpec(s["name"], tuple(s["shape"]), s["dtype"]) for s in body["tensors"])
    if cls is ChunkBatchRequest:  # nested ChunkRequest headers, each decoded (and checked) as one
        requests = body.get("requests")
        if not isinstance(requests, list) or not all(isinstance(r, dict) for r in requests):
            raise WireError(
                f"ChunkBatchRequest.requests: expected a list of ChunkRequest headers, got {requests!r}"
            )
        body["requests"] = tuple(
            decode_header(json.dumps({"version": WIRE_VERSION, "kind": ChunkRequest.kind, **r}).encode())
            for r in requests
        )
        return cls(**body)
    return cls(**{k: _tuplify(v) for k, v in body.items()})


# ---- headers on the control group -----------------------------------------------------------------


def _header_tensors(message: Message) -> tuple[torch.Tensor, torch.Tensor]:
    payload = message.to_bytes()
    if len(payload) > MAX_HEADER_BYTES:
        raise WireError(
            f"{type(message).__name__} header is {len(payload)} bytes, over {MAX_HEADER_BYTES}; "
            "headers carry specs, not data"
        )
    body = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    return torch.tensor([len(payload)], dtype=torch.int64), body


def _check_kind(message: Message, expect: type[M] | tuple[type[Message], ...] | None, where: str) -> None:
    if expect is None:
        return
    allowed = expect if isinstance(expect, tuple) else (expect,)
    if not isinstance(message, allowed):
        names = [c.__name__ for c in allowed]
        raise WireError(
            f"{where}: expected {' or '.join(names)}, received {type(message).__name__} ({message!r})"
        )


def send_header(message: Message, group: dist.ProcessGroup, dst: int) -> None:
    """Send one header to global rank ``dst`` on ``group`` (the gloo control group)."""
    length, body = _header_tensors(message)
    dist.send(length, dst=dst, group=group)
    dist.send(body, dst=dst, group=group)


def post_header(message: Message, group: dist.ProcessGroup, dst: int) -> list[dist.Work]:
    """Start sending one header to global rank ``dst`` (``send_header`` without the wait); the caller keeps
    the returned works and waits for them later. Sends to one rank are received in the order posted."""
    length, body = _header_tensors(message)
    return [dist.isend(length, dst=dst, group=group), dist.isend(body, dst=dst, group=group)]


def recv_header(
    group: dist.ProcessGroup,
    src: int,
    expect: type[M] | tuple[type[Message], ...] | None = None,
    timeout_s: float | None = None,
) -> Message:
    """Receive one header from global rank ``src``; check its kind against ``expect``.

    With ``timeout_s``, raise ``proto.liveness.PeerError`` if the header has not arrived by then.
    """
    what = f"header from rank {src}"
    length = torch.zeros(1, dtype=torch.int64)
    wait_with_timeout(dist.irecv(length, src=src, group=group), timeout_s, what)
    body = _checked_body(length, what)
    wait_with_timeout(dist.irecv(body, src=src, group=group), timeout_s, what)
    message = decode_header(body.numpy().tobytes())
    _check_kind(message, expect, what)
    return message


def broadcast_header(
    message: Message | None,
    group: dist.ProcessGroup,
    src: int,
    expect: type[M] | tuple[type[Message], ...] | None = None,
    timeout_s: float | None = None,
) -> Message:
    """Broadcast a header from global rank ``src`` to every rank of ``group``; returns it on every rank.

    ``src`` passes the message; the others pass ``None`` and get the received, kind-checked message.
    """
    rank = dist.get_rank()
    what = f"header broadcast from rank {src}"
    if rank == src:
        if message is None:
            raise ValueError("broadcast_header: the source rank must pass the message")
        length, body = _header_tensors(message)
    else:
        length = torch.zeros(1, dtype=torch.int64)
    wait_with_timeout(dist.broadcast(length, src=src, group=group, async_op=True), timeout_s, what)
    if rank != src:
        body = _checked_body(length, what)
    wait_with_timeout(dist.broadcast(body, src=src, group=group, async_op=True), timeout_s, what)
    if rank == src:
        return message  # type: ignore[return-value]
    received = decode_header(body.numpy().tobytes())
    _check_kind(received, expect, what)
    return received


def _checked_body(length: torch.Tensor, what: str) -> torch.Tensor:
    n = int(length.item())
    if not 0 < n <= MAX_HEADER_BYTES:
        raise WireError(
            f"{what}: header length {n} is outside 1..{MAX_HEADER_BYTES}; sender and receiver are out of step"
        )
    return torch.empty(n, dtype=torch.uint8)


# ---- tensors on the data group --------------------------------------------------------------------


@dataclass
class Transfer:
    """The tensors of one transfer, and on CUDA the event marking its end on the side stream."""

    tensors: dict[str, torch.Tensor]
    event: torch.cuda.Event | None = None

    def wait(self, consumer: torch.cuda.Stream | None = None) -> dict[str, torch.Tensor]:
        """Make ``consumer`` (default: the current stream) wait for the transfer; return the tensors.

        Host is not blocked. Tensors allocated on the side stream are marked as used by the consumer so
        the allocator keeps them until the consumer's work on them is done.
        """
        if self.event is not None:
            stream = consumer if consumer is not None else torch.cuda.current_stream()
            stream.wait_event(self.event)
            for t in self.tensors.values():
                t.record_stream(stream)
        return self.tensors


def _on_cuda(tensors: Sequence[torch.Tensor], device: torch.device | None) -> bool:
    return any(t.is_cuda for t in tensors) or (device is not None and torch.device(device).type == "cuda")


def _run_transfer(
    ops: Any, tensors: dict[str, torch.Tensor], stream: torch.cuda.Stream | None, cuda: bool
) -> Transfer:
    """Run ``ops()`` (which issues the collectives) on ``stream`` if given and on CUDA, else inline."""
    if stream is None or not cuda:
        ops()
        return Transfer(tensors)
    stream.wait_stream(torch.cuda.current_stream())  # rule 1: the producer's writes come first
    with torch.cuda.stream(stream):
        ops()
        for t in tensors.values():
            t.record_stream(stream)  # rule 3: not recycled while the side stream still uses it
        event = torch.cuda.Event()
        event.record(stream)
    return Transfer(tensors, event=event)


def _check_outgoing(specs: Sequence[TensorSpec], tensors: Mapping[str, torch.Tensor], where: str) -> None:
    if [s.name for s in specs] != list(tensors):
        raise _mismatch(where, "tensors", [s.name for s in specs], list(tensors))
    for spec in specs:
        spec.check(tensors[spec.name], where)
        if not tensors[spec.name].is_contiguous():
            raise WireError(f"{where}[{spec.name!r}] is not contiguous; call .contiguous() before sending")


def broadcast_tensors(
    specs: Sequence[TensorSpec],
    group: dist.ProcessGroup,
    src: int,
    tensors: Mapping[str, torch.Tensor] | None = None,
    device: torch.device | str = "cpu",
    stream: torch.cuda.Stream | None = None,
) -> Transfer:
    """Broadcast the tensors a header declared, from global rank ``src`` to all ranks of ``group``.

    The source passes ``tensors`` (in ``specs`` order, checked against them); receivers get fresh tensors
    allocated on ``device`` (on ``stream`` when given). Every rank must pass the same ``specs``.
    """
    rank = dist.get_rank()
    if rank == src:
        if tensors is None:
            raise ValueError("broadcast_tensors: the source rank must pass the tensors")
        _check_outgoing(specs, tensors, f"broadcast from rank {src}")
        out = dict(tensors)
        cuda = _on_cuda(list(out.values()), None)
    else:
        out = {}
        cuda = _on_cuda([], torch.device(device))

    def ops() -> None:
        for spec in specs:
            if rank != src:
                out[spec.name] = spec.empty(device)
            dist.broadcast(out[spec.name], src=src, group=group)

    return _run_transfer(ops, out, stream, cuda)


def send_tensors(
    specs: Sequence[TensorSpec],
    tensors: Mapping[str, torch.Tensor],
    group: dist.ProcessGroup,
    dst: int,
    stream: torch.cuda.Stream | None = None,
) -> Transfer:
    """Send the tensors a header declared to global rank ``dst`` (checked against ``specs``, in order)."""
    _check_outgoing(specs, tensors, f"send to rank {dst}")
    out = dict(tensors)

    def ops() -> None:
        for spec in specs:
            dist.send(out[spec.name], dst=dst, group=group)

    return _run_transfer(ops, out, stream, _on_cuda(list(out.values()), None))


def recv_tensors(
    specs: Sequence[TensorSpec],
    group: dist.ProcessGroup,
    src: int,
    device: torch.device | str = "cpu",
    stream: torch.cuda.Stream | None = None,
    timeout_s: float | None = None,
) -> Transfer:
    """Receive the tensors a header declared from global rank ``src`` into fresh tensors on ``device``.

    ``timeout_s`` bounds each receive on gloo (CPU tensors); NCCL receives are issued only after their
    header arrived on the control group, so they are imminent and need no host-side deadline.
    """
    out: dict[str, torch.Tensor] = {}
    cuda = _on_cuda([], torch.device(device))

    def ops() -> None:
        for spec in specs:
            out[spec.name] = spec.empty(device)
            if cuda:
                dist.recv(out[spec.name], src=src, group=group)
            else:
                work = dist.irecv(out[spec.name], src=src, group=group)
                wait_with_timeout(work, timeout_s, f"tensor {spec.name!r} from rank {src}")

    return _run_transfer(ops, out, stream, cuda)
