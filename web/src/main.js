// The talkingmachines call page: join a LiveKit room, show the avatar big and the caller's camera small,
// send the microphone, show the connection state and the round-trip time.
//
// Query parameters fill the form: room, name, livekit (LiveKit URL when the server does not hand one out),
// autojoin=1 (join at once). Keys never go in the URL: type the access key into the form, or open a call
// link (POST /v1/call/link), whose short-lived ticket rides in the fragment (#ticket=...), which browsers
// never send to the server; the page drops it from the address bar once read.
// window.talkingmachinesCall exposes the room and stats() for diagnostics and automated checks.
import {
  ConnectionQuality,
  ConnectionState,
  Room,
  RoomEvent,
  Track,
} from "livekit-client";

const PUBLISH_ON_BEHALF = "lk.publish_on_behalf"; // attribute of an avatar participant
const STATS_INTERVAL_MS = 1000;

const $ = (id) => document.getElementById(id);
const ui = {
  avatarVideo: $("avatar-video"),
  avatarAudio: $("avatar-audio"),
  placeholder: $("avatar-placeholder"),
  selfVideo: $("self-video"),
  state: $("connection-state"),
  latency: $("latency"),
  quality: $("quality"),
  mic: $("mic-button"),
  camera: $("camera-button"),
  startAudio: $("audio-button"),
  hangup: $("hangup-button"),
  form: $("join-form"),
  room: $("room-input"),
  name: $("name-input"),
  key: $("key-input"),
  livekit: $("livekit-input"),
  error: $("error"),
};

const STATE_LABELS = {
  [ConnectionState.Disconnected]: "Not connected",
  [ConnectionState.Connecting]: "Connecting…",
  [ConnectionState.Connected]: "Connected",
  [ConnectionState.Reconnecting]: "Reconnecting…",
  [ConnectionState.SignalReconnecting]: "Reconnecting…",
};

const QUALITY_LABELS = {
  [ConnectionQuality.Excellent]: "Quality: excellent",
  [ConnectionQuality.Good]: "Quality: good",
  [ConnectionQuality.Poor]: "Quality: poor",
  [ConnectionQuality.Lost]: "Quality: lost",
};

let room = null;
let avatarVideoTrack = null; // the RemoteVideoTrack shown big
let avatarAudioTracks = []; // every remote audio track (the avatar speaks through one)
let statsTimer = null;
let lastStats = { rttMs: null, audioBytesReceived: 0, audioLevel: 0, videoFramesDecoded: 0 };

function showError(message) {
  ui.error.textContent = message;
  ui.error.hidden = !message;
}

function setState(state) {
  ui.state.dataset.state = state === ConnectionState.SignalReconnecting ? "reconnecting" : state;
  ui.state.textContent = STATE_LABELS[state] ?? state;
}

function isAvatar(participant) {
  return Boolean(participant.attributes?.[PUBLISH_ON_BEHALF]);
}

function showAvatarVideo(track, participant) {
  // An avatar (a participant publishing on behalf of an agent) takes the stage from any other video.
  if (avatarVideoTrack && avatarVideoTrack !== track && !isAvatar(participant)) return;
  if (avatarVideoTrack && avatarVideoTrack !== track) avatarVideoTrack.detach(ui.avatarVideo);
  avatarVideoTrack = track;
  track.attach(ui.avatarVideo);
  ui.avatarVideo.setAttribute("aria-label", `${participant.name || participant.identity}'s video`);
  ui.placeholder.hidden = true;
}

function onTrackSubscribed(track, _publication, participant) {
  if (track.kind === Track.Kind.Video) {
    showAvatarVideo(track, participant);
  } else if (track.kind === Track.Kind.Audio) {
    avatarAudioTracks.push(track);
    track.attach(ui.avatarAudio);
  }
}

function onTrackUnsubscribed(track) {
  track.detach();
  if (track === avatarVideoTrack) {
    avatarVideoTrack = null;
    ui.placeholder.hidden = false;
  }
  avatarAudioTracks = avatarAudioTracks.filter((t) => t !== track);
}

async function collectStats() {
  const stats = { rttMs: null, audioBytesReceived: 0, audioLevel: 0, videoFramesDecoded: 0 };
  const tracks = [avatarVideoTrack, ...avatarAudioTracks].filter(Boolean);
  for (const track of tracks) {
    const report = await track.getRTCStatsReport();
    if (!report) continue;
    report.forEach((entry) => {
      if (entry.type === "candidate-pair" && entry.nominated && entry.currentRoundTripTime !== undefined) {
        stats.rttMs = entry.currentRoundTripTime * 1000;
      } else if (entry.type === "inbound-rtp" && entry.kind === "audio") {
        stats.audioBytesReceived += entry.bytesReceived ?? 0;
        stats.audioLevel = Math.max(stats.audioLevel, entry.audioLevel ?? 0);
      } else if (entry.type === "inbound-rtp" && entry.kind === "video") {
        stats.videoFramesDecoded += entry.framesDecoded ?? 0;
      }
    });
  }
  lastStats = stats;
  ui.latency.textContent = stats.rttMs === null ? "RTT –" : `RTT ${Math.round(stats.rttMs)} ms`;
  return stats;
}

function setToggle(button, on, onLabel, offLabel) {
  button.setAttribute("aria-pressed", String(on));
  button.textContent = on ? onLabel : offLabel;
}

async function fetchToken(roomName, name, key) {
  const headers = { "Content-Type": "application/json" };
  if (key) headers.Authorization = `Bearer ${key}`;
  const response = await fetch("/v1/call/token", {
    method: "POST",
    headers,
    body: JSON.stringify({ room: roomName, name }),
  });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    throw new Error(`the server refused a call token (${response.status}): ${body.detail ?? response.statusText}`);
  }
  return body;
}

async function join(event) {
  event?.preventDefault();
  showError("");
  ui.form.querySelectorAll("input, button").forEach((el) => (el.disabled = true));
  setState(ConnectionState.Connecting);
  try {
    const grant = await fetchToken(ui.room.value.trim(), ui.name.value.trim(), ui.key.value || ticket);
    const url = ui.livekit.value.trim() || grant.url;
    if (!url) {
      throw new Error("no LiveKit URL: the server has no livekit_public_url, so enter one (ws:// or wss://)");
    }
    room = new Room({ adaptiveStream: true, dynacast: true });
    room
      .on(RoomEvent.ConnectionStateChanged, setState)
      .on(RoomEvent.TrackSubscribed, onTrackSubscribed)
      .on(RoomEvent.TrackUnsubscribed, onTrackUnsubscribed)
      .on(RoomEvent.AudioPlaybackStatusChanged, () => {
        ui.startAudio.hidden = room.canPlaybackAudio;
      })
      .on(RoomEvent.ConnectionQualityChanged, (quality, participant) => {
        if (participant.isLocal) ui.quality.textContent = QUALITY_LABELS[quality] ?? "";
      })
      .on(RoomEvent.LocalTrackPublished, (publication) => {
        if (publication.track?.kind === Track.Kind.Video) publication.track.attach(ui.selfVideo);
      })
      .on(RoomEvent.Disconnected, () => leave());
    await room.connect(url, grant.token);
    ui.form.hidden = true;
    ui.hangup.disabled = false;
    ui.startAudio.hidden = room.canPlaybackAudio;
    await enableDevices();
    statsTimer = setInterval(() => collectStats().catch(() => {}), STATS_INTERVAL_MS);
  } catch (error) {
    showError(error.message ?? String(error));
    await leave();
  }
}

async function enableDevices() {
  try {
    await room.localParticipant.setMicrophoneEnabled(true);
    ui.mic.disabled = false;
    setToggle(ui.mic, true, "Mute", "Unmute");
  } catch (error) {
    showError(`microphone unavailable: ${error.message}; the avatar cannot hear you`);
  }
  try {
    await room.localParticipant.setCameraEnabled(true);
    ui.camera.disabled = false;
    setToggle(ui.camera, true, "Camera off", "Camera on");
  } catch {
    // No camera (or refused): the call goes on audio-only from this side.
    setToggle(ui.camera, false, "Camera off", "Camera on");
    ui.camera.disabled = false;
    ui.selfVideo.hidden = true;
  }
}

// Back to the join form (hang-up, a failed join, or the room closing on us).
async function leave() {
  clearInterval(statsTimer);
  statsTimer = null;
  const closing = room;
  room = null;
  avatarVideoTrack = null;
  avatarAudioTracks = [];
  ui.placeholder.hidden = false;
  ui.latency.textContent = "RTT –";
  ui.quality.textContent = "";
  [ui.mic, ui.camera, ui.hangup].forEach((b) => (b.disabled = true));
  if (closing) await closing.disconnect();
  setState(ConnectionState.Disconnected);
  ui.form.hidden = false;
  ui.form.querySelectorAll("input, button").forEach((el) => (el.disabled = false));
}

ui.mic.addEventListener("click", async () => {
  const on = !room.localParticipant.isMicrophoneEnabled;
  await room.localParticipant.setMicrophoneEnabled(on);
  setToggle(ui.mic, on, "Mute", "Unmute");
});
ui.camera.addEventListener("click", async () => {
  const on = !room.localParticipant.isCameraEnabled;
  await room.localParticipant.setCameraEnabled(on);
  ui.selfVideo.hidden = !on;
  setToggle(ui.camera, on, "Camera off", "Camera on");
});
ui.startAudio.addEventListener("click", () => room?.startAudio());
ui.hangup.addEventListener("click", () => leave());
ui.form.addEventListener("submit", join);

const params = new URLSearchParams(window.location.search);
const ticket = new URLSearchParams(window.location.hash.slice(1)).get("ticket") ?? "";
if (ticket) history.replaceState(null, "", window.location.pathname + window.location.search);
ui.room.value = params.get("room") ?? "";
ui.name.value = params.get("name") ?? "";
ui.livekit.value = params.get("livekit") ?? "";
setState(ConnectionState.Disconnected);

window.talkingmachinesCall = {
  get room() {
    return room;
  },
  stats: () => (room ? collectStats() : Promise.resolve(lastStats)),
};

if (params.get("autojoin") === "1" && ui.room.value) join();
