"""`wan-i2v decode`: saved latents to an mp4 again."""

from __future__ import annotations

from pathlib import Path

import torch

from wan_i2v import session as runs
from wan_i2v.commands.common import mp4_path
from wan_i2v.errors import WanError
from wan_i2v.execution import torch_dtype
from wan_i2v.models.spec import SPECS, spec_of_checkpoint
from wan_i2v.options import options_from
from wan_i2v.pipeline import decode_latents, load_vae_for
from wan_i2v.video import check_writable, write_mp4


def run(args) -> int:
    source = Path(args.latents)
    if not source.is_file():
        raise WanError(f"latents file not found: {source}", "give the file written by --save-latents")
    try:
        saved = torch.load(source, map_location="cpu", weights_only=True)
    except Exception:
        # (torch's own message spans lines and suggests unpickling untrusted code: not for users)
        raise WanError(f"cannot read latents file {source}: not a wan-i2v latents file, or cut short", "give the file written by --save-latents, or generate again") from None
    latents = saved.get("latents") if isinstance(saved, dict) and saved.get("format") == runs.LATENTS_FORMAT else None
    if not isinstance(latents, torch.Tensor) or latents.ndim != 4 or latents.shape[0] not in {spec.latent_channels for spec in SPECS.values()}:
        raise WanError(f"{source} is not a wan-i2v latents file", "give the file written by --save-latents")
    save_file = mp4_path(args.save_file, "--save-file")
    if save_file.exists() and not args.overwrite:
        raise WanError(f"{save_file} exists", "give another --save-file, or add --overwrite to replace it")
    check_writable(save_file)
    device = args.device or runs.default_device()
    runs.check_device(device)

    ckpt_dir = runs.checkpoint_dir(options_from(args))
    spec = spec_of_checkpoint(ckpt_dir)
    if latents.shape[0] != spec.latent_channels:
        raise WanError(f"{source} holds latents of another model than {spec.name}'s in {ckpt_dir}", "give --ckpt-dir the checkpoint that made them")
    vae = load_vae_for(ckpt_dir / spec.files.vae, torch.device(device), torch_dtype(args.decode_dtype, device), spec=spec)

    video = decode_latents(vae, latents, torch.device(device), progress=not args.quiet)
    settings = saved.get("settings") or {}
    write_mp4(video, save_file, fps=settings.get("fps", spec.fps), metadata=settings)  # (a file saved before the fps setting: the model's)
    print(save_file)
    return 0
