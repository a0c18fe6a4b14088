"""Model front-ends: what turns a session's inputs into model inputs, shared by the server, the engine and
training.

- ``frontends.audio_io``: audio decoding and resampling to 16 kHz mono;
- ``frontends.audio_features``: wav2vec2 features per video frame over a rolling buffer (streaming);
- ``frontends.conditioning``: CLIP image tokens and umT5 prompt context (Wan's encoders, tiny random ones);
- ``frontends.faces``: face boxes (detection, fallback) for the per-character audio masks;
- ``frontends.image_io``: reference image decoding with bounded size;
- ``frontends.model_bundle``: trained model bundles (weights and the stream settings that travel with them).

It imports nothing of ours but ``proto`` (and ``decoder`` is not needed either): ``workers``, ``decoder`` and
these meet in the engine.
"""
