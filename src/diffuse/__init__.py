"""diffuse: train image diffusion models from scratch, fast, and use what you trained.

Start here (docs/python.md has every function and runnable examples; `diffuse --help` the CLI):

    import diffuse
    run = diffuse.fit(data="digits", steps=2000, out="runs/digits")  # train, as `diffuse train`
    model = diffuse.load(run)                     # a run, checkpoint, .safetensors or diffusers folder
    images = model.sample(16, seed=0)             # uint8 [16, H, W, C], as `diffuse sample`
    model.save_grid(images, "grid.png")
    print(diffuse.fid_kid(images, run)["fid"])    # FID against the run's training data

Also: diffuse.fit_distilled(run, out, nfe=2) (a few-step student, as `diffuse distill`),
diffuse.train_config(**settings) (the config fit would use), diffuse.Model (what load
returns: .sample, .save_grid, .config, .class_names, .image_size, .channels, .device) and
diffuse.DiffuseError (every bad input raises it, with a one-line message).
"""

from .errors import DiffuseError

from .version import __version__

# The public API lives in diffuse.api, which imports torch; it loads on first use, so that
# `import diffuse` and the CLI's startup stay light.
_API = ("fit", "train_config", "fit_distilled", "load", "fid_kid", "Model")
__all__ = [*_API, "DiffuseError", "__version__"]


def __getattr__(name: str):
    if name in _API:
        from . import api
        return getattr(api, name)
    raise AttributeError(f"module 'diffuse' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})
