"""The score side: the Wan 2.1 DiT with audio conditioning, its streaming engine and the worker loop."""
