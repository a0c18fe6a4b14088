"""Soak: does ``talkingmachines serve`` keep its memory flat over many sessions? (issue 20: ~0.3 MiB per
create/delete cycle on the master before)

One real serving group (``python -m server.cli serve``, tiny preset, CPU, disaggregated 1+1 by default: the
master process and one score-worker process) runs for ``--duration-s``. Each *cycle* creates a session with
a file output, pushes audio (``--http-s`` seconds over HTTP, ``--ws-s`` over the audio WebSocket with credit
flow control), lets it play ``--play-s``, DELETEs it (with audio still pending, so the drop accounting runs
too), removes its MP4, and then samples the resident memory (``VmRSS`` from ``/proc``) of the master and of
every score worker. The memory slope is the least-squares line through the **second half** of the cycles
(the first half includes warm-up, allocator pools and the ``_ENDED_KEPT`` = 256 ended sessions' infos the
registry keeps), in MiB per cycle and MiB per hour. Every cycle's DELETE answer is also checked:
``accepted = played + dropped`` (seconds, 1e-6).

    nice -n 10 python -m benchmarks.soak --out benchmarks/results/soak_cpu.json   # 30 min, + soak_cpu.png

Target: flat (|slope| well under the 0.3 MiB per cycle measured before).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from benchmarks.provenance import provenance

REPO = Path(__file__).resolve().parents[1]
API_KEY = "soak-benchmark-key-0123456789"
RATE = 16_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float | None:
    """Resident set size of process ``pid`` in MiB (``/proc/PID/status``); None when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def worker_pids(master: int) -> list[int]:
    """The score-worker ranks the server spawned: its children running the serve entry."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == master and "server.serve:main" in cmdline:
            pids.append(int(entry.name))
    return sorted(pids)


def slope(x: np.ndarray, y: np.ndarray) -> float | None:
    """Least-squares slope of y over x (None with fewer than 3 points)."""
    if len(x) < 3 or np.ptp(x) == 0:
        return None
    return float(np.polyfit(x, y, 1)[0])


def _tone(seconds: float) -> bytes:
    t = np.arange(round(seconds * RATE)) / RATE
    return (0.3 * np.sin(2 * np.pi * 220 * t) * 32767).astype("<i2").tobytes()


def _ws_push(port: int, session_id: str, seconds: float) -> None:
    """Stream ``seconds`` of audio over the audio WebSocket in 100 ms frames within the server's credit."""
    from tests.serve.ws_client import WsClient  # wsproto, a runtime dependency

    ws = WsClient(
        "127.0.0.1",
        port,
        f"/v1/sessions/{session_id}/audio?sample_rate={RATE}&flow_control=credit",
        headers=[("authorization", f"Bearer {API_KEY}")],
    )
    try:
        ready = ws.recv_json()
        window, sent, frame = ready["accepted_s"] + ready["credit_s"], 0.0, _tone(0.1)
        while sent < seconds - 1e-9:
            if sent + 0.1 <= window + 1e-9:
                ws.send_bytes(frame)
                sent += 0.1
                continue
            message = ws.recv_json(timeout=30)
            if message["type"] == "ack":
                window = message["accepted_s"] + message["credit_s"]
        ws.send_text(json.dumps({"type": "flush"}))
        while ws.recv_json(timeout=30)["type"] != "flushed":
            pass
    finally:
        ws.close()


def cycle(client: httpx.Client, port: int, out: Path, index: int, args: argparse.Namespace) -> dict[str, Any]:
    """One create → push → play → DELETE cycle; the DELETE's audio accounting."""
    image = base64.b64encode((REPO / "examples" / "portrait.png").read_bytes()).decode()
    name = f"soak-{index}.mp4"
    created = client.post("/v1/sessions", json={"image": image, "output": {"type": "file", "path": name}})
    created.raise_for_status()
    session_id = created.json()["id"]
    if args.http_s > 0:
        pushed = client.post(
            f"/v1/sessions/{session_id}/audio",
            content=_tone(args.http_s),
            headers={"Content-Type": f"audio/pcm; rate={RATE}; channels=1"},
        )
        pushed.raise_for_status()
    if args.ws_s > 0:
        _ws_push(port, session_id, args.ws_s)
    time.sleep(args.play_s)
    deleted = client.delete(f"/v1/sessions/{session_id}")
    deleted.raise_for_status()
    (out / name).unlink(missing_ok=True)
    return deleted.json()["audio"]


def plot(document: dict[str, Any], path: Path) -> Path | None:
    """RSS of the master and the workers per cycle, with the second half's fitted lines."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = document["samples"]
    cycles = np.array([s["cycle"] for s in samples])
    fig, ax = plt.subplots(figsize=(7, 3.8))
    half = len(samples) // 2
    series = (("master_rss_mib", "master", "C0"), ("workers_rss_mib", "score worker(s)", "C1"))
    for key, label, color in series:
        values = np.array([s[key] for s in samples], dtype=float)
        ax.plot(cycles, values, ".", ms=2, color=color, label=label)
        fit = document["summary"][key.replace("_rss_mib", "")]
        if fit["mib_per_cycle"] is not None:
            x = cycles[half:]
            ax.plot(x, fit["intercept_mib"] + fit["mib_per_cycle"] * x, "-", color="black", lw=1)
            ax.annotate(
                f"{fit['mib_per_cycle'] * 1e3:+.1f} KiB/cycle ({fit['mib_per_hour']:+.1f} MiB/h)",
                (x[-1], fit["intercept_mib"] + fit["mib_per_cycle"] * x[-1]),
                fontsize=8,
                ha="right",
                va="bottom",
            )
    ax.set_xlabel("create/delete cycle")
    ax.set_ylabel("RSS (MiB)")
    ax.set_title(f"serve soak: {len(samples)} cycles in {document['summary']['duration_s'] / 60:.0f} min")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _fit(cycles: np.ndarray, hours: np.ndarray, values: np.ndarray) -> dict[str, float | None]:
    half = len(values) // 2
    per_cycle = slope(cycles[half:], values[half:])
    intercept = None
    if per_cycle is not None:
        intercept = float(np.polyfit(cycles[half:], values[half:], 1)[1])
    return {
        "mib_per_cycle": per_cycle,
        "mib_per_hour": slope(hours[half:], values[half:]),
        "intercept_mib": intercept,
        "first_mib": float(values[0]) if len(values) else None,
        "last_mib": float(values[-1]) if len(values) else None,
        "first_half_mib_per_cycle": slope(cycles[:half], values[:half]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="results JSON (a .png is drawn beside it)")
    parser.add_argument("--duration-s", type=float, default=1800.0, help="how long to cycle (s)")
    parser.add_argument("--decoder", choices=("dedicated", "colocated"), default="dedicated")
    parser.add_argument("--resolution", default="32x32")
    parser.add_argument("--http-s", type=float, default=2.0, help="audio pushed over HTTP per cycle (s)")
    parser.add_argument("--ws-s", type=float, default=1.0, help="audio streamed over the WebSocket (s)")
    parser.add_argument("--play-s", type=float, default=1.5, help="wait before the DELETE (s)")
    args = parser.parse_args(argv)
    port = _free_port()
    samples: list[dict[str, Any]] = []
    mismatches = 0
    totals = {"accepted_s": 0.0, "played_s": 0.0, "dropped_s": 0.0}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        out = folder / "out"
        out.mkdir()
        config = folder / "serve.toml"
        config.write_text(f'[api]\napi_key = "{API_KEY}"\ndrain_timeout_s = 0\nfile_output_dir = "{out}"\n')
        cmd = [
            sys.executable, "-m", "server.cli", "serve", "--config", str(config), "--port", str(port),
            "--resolution", args.resolution, "--score-workers", "1", "--decoder", args.decoder,
            "--device", "cpu", "--threads", "1",
        ]  # fmt: skip
        log_path = folder / "serve.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 300
            while True:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"serve did not get ready:\n{log_path.read_text()[-3000:]}")
                try:
                    if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
            workers = worker_pids(proc.pid)
            started = time.monotonic()
            auth = {"Authorization": f"Bearer {API_KEY}"}
            with httpx.Client(base_url=url, headers=auth, timeout=60) as client:
                index = 0
                while time.monotonic() - started < args.duration_s:
                    audio = cycle(client, port, out, index, args)
                    for key in totals:
                        totals[key] += audio[key]
                    if abs(audio["accepted_s"] - audio["played_s"] - audio["dropped_s"]) > 1e-6:
                        mismatches += 1
                    master = rss_mib(proc.pid)
                    worker = [rss_mib(pid) for pid in workers]
                    if master is None or any(w is None for w in worker):
                        raise RuntimeError(f"a server process is gone:\n{log_path.read_text()[-3000:]}")
                    samples.append(
                        {
                            "cycle": index,
                            "t_s": round(time.monotonic() - started, 3),
                            "master_rss_mib": round(master, 2),
                            "workers_rss_mib": round(sum(worker), 2),  # type: ignore[arg-type]
                        }
                    )
                    if index % 25 == 0:
                        print(f"soak: cycle {index} at {samples[-1]['t_s']:.0f} s: master {master:.1f} MiB, "
                              f"workers {sum(worker):.1f} MiB", file=sys.stderr, flush=True)  # type: ignore[arg-type]
                    index += 1
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
    cycles = np.array([s["cycle"] for s in samples], dtype=float)
    hours = np.array([s["t_s"] for s in samples], dtype=float) / 3600
    summary = {
        "cycles": len(samples),
        "duration_s": samples[-1]["t_s"] if samples else 0.0,
        "seconds_per_cycle": samples[-1]["t_s"] / len(samples) if samples else None,
        "master": _fit(cycles, hours, np.array([s["master_rss_mib"] for s in samples])),
        "workers": _fit(cycles, hours, np.array([s["workers_rss_mib"] for s in samples])),
        "audio_totals_s": {k: round(v, 3) for k, v in totals.items()},
        "cycles_where_accepted_is_not_played_plus_dropped": mismatches,
        "baseline_master_mib_per_cycle_before": 0.3,
    }
    document = {
        "benchmark": "soak",
        "what": f"talkingmachines serve, tiny preset {args.resolution} on CPU, --decoder {args.decoder} "
        f"(1 score worker), one torch thread per rank; per cycle: create a file session, push "
        f"{args.http_s:g} s over HTTP and {args.ws_s:g} s over the WebSocket, wait {args.play_s:g} s, "
        "DELETE; RSS sampled after each DELETE; slopes fitted over the second half of the cycles",
        **provenance("benchmarks.soak", argv),
        "summary": summary,
        "samples": samples,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=1) + "\n")
    picture = plot(document, args.out.with_suffix(".png"))
    master, workers = summary["master"], summary["workers"]
    print(
        f"soak: {summary['cycles']} cycles in {summary['duration_s']:.0f} s; second-half slope: master "
        f"{master['mib_per_cycle']} MiB/cycle ({master['mib_per_hour']} MiB/h), workers "
        f"{workers['mib_per_cycle']} MiB/cycle ({workers['mib_per_hour']} MiB/h); accounting mismatches "
        f"{mismatches}; wrote {args.out}" + (f" and {picture}" if picture else ""),
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
