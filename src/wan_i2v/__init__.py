"""wan-i2v: Wan2.2-I2V-A14B image-to-video, fast and dependable on one GPU or many."""

from wan_i2v.config import GenerationSettings
from wan_i2v.errors import WanError
from wan_i2v.models.spec import DEFAULT_SPEC, SPECS, ModelSpec, spec_for

PRESETS = spec_for(DEFAULT_SPEC).presets  # the default model's sizes (``spec_for(name).presets`` another's)


def __getattr__(name):
    # The pipeline pulls in torch, transformers and the models: import it only when asked for.
    if name in ("I2VPipeline", "GenerationResult"):
        from wan_i2v import pipeline

        return getattr(pipeline, name)
    raise AttributeError(name)


__all__ = ["DEFAULT_SPEC", "I2VPipeline", "GenerationResult", "GenerationSettings", "ModelSpec", "PRESETS", "SPECS", "WanError", "spec_for"]
