"""wan-i2v: Wan2.2-I2V-A14B image-to-video, fast and dependable on one GPU or many."""

from wan_i2v.config import PRESETS, GenerationSettings
from wan_i2v.errors import WanError


def __getattr__(name):
    # The pipeline pulls in torch, transformers and the models: import it only when asked for.
    if name in ("I2VPipeline", "GenerationResult"):
        from wan_i2v import pipeline

        return getattr(pipeline, name)
    raise AttributeError(name)


__all__ = ["I2VPipeline", "GenerationResult", "GenerationSettings", "PRESETS", "WanError"]
