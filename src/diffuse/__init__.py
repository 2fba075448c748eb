"""diffuse: train image diffusion models from scratch, fast, and use what you trained."""

__version__ = "0.1.0"
