"""The Wan 2.1 VAE: session encode for image-to-video and streaming, cache-carrying decode."""
