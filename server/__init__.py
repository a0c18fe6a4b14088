"""The master: CLI and launcher, scheduler, audio front-end, sessions, HTTP API, publishers, metrics."""
