"""`wan-i2v serve`: the HTTP server over one run session (under torchrun rank 0 serves, the others follow)."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from wan_i2v import session as runs
from wan_i2v.commands import home, is_main
from wan_i2v.commands.common import check_fits, keep_compiled_code, loras_from, run_model, tell
from wan_i2v.config import SamplingDefaults, check_frame_num, parse_size, sampling_given
from wan_i2v.errors import WanError
from wan_i2v.execution import torch_dtype
from wan_i2v.options import options_from
from wan_i2v.parallel.groups import launched
from wan_i2v.parallel.plan import model_sizes
from wan_i2v.server import check_binding, serve, server_tokens
from wan_i2v.server.capacity import Capacity


def run(args) -> int:
    options = options_from(args)
    spec = run_model(options)  # the jobs' defaults are its model card's
    recipe = SamplingDefaults.recipe(args.distilled, spec.name)
    defaults = recipe.given(**sampling_given(args))
    max_area, _ = parse_size(defaults.size, spec)
    check_frame_num(defaults.frame_num)
    tokens = server_tokens(args.token or _read_token_file(args.token_file) or os.environ.get("WAN_I2V_TOKEN") or None, args.tokens)
    queue = args.queue or os.environ.get("WAN_I2V_QUEUE") or None
    if is_main():
        check_binding(args.host, args.port, tokens)
        if queue is not None and not queue.startswith(("postgresql://", "postgres://")):
            raise WanError("the queue URL (--queue or WAN_I2V_QUEUE) is not a PostgreSQL URL (postgresql://USER:PASSWORD@HOST:PORT/DATABASE)",
                           "leave it out for the queue in --state-dir (the servers of one machine)")  # fmt: skip
    height, width = spec.planned_size(max_area)  # planned for videos of the default size and length
    session_plan = runs.plan(replace(options, loras=loras_from(options.loras, spec)), height=height, width=width, frame_num=defaults.frame_num,
                             guided=any(scale != 1 for scale in defaults.guide_scale))  # fmt: skip
    tell(session_plan)
    check_fits(session_plan)
    keep_compiled_code()
    options, planned = session_plan.options, session_plan.planned

    def open_session():
        return runs.RunSession.open(session_plan, progress=True)

    if not is_main():  # under torchrun: rank 0 serves, the other ranks run its jobs
        with open_session() as session:
            session.follow()
        return 0
    state_dir = Path(args.state_dir) if args.state_dir else home() / "server"
    # (the sizes as plan_for read them: the requests are estimated on the plan it made)
    capacity = Capacity(planned, model_sizes(options.ckpt_dir if Path(options.ckpt_dir).is_dir() else None,
                                             torch_dtype(options.dtype, options.device).itemsize, fp8=planned.plan.fp8, spec=spec),
                        spawned=session_plan.world > 1 and not launched())  # fmt: skip
    return serve(open_session, state_dir=state_dir, host=args.host, port=args.port, tokens=tokens, defaults=defaults,
                 max_queued=args.max_queue, max_upload_mb=args.max_upload_mb, queue_url=queue, capacity=capacity,
                 allowed_hosts=tuple(args.allowed_hosts), step_cache=planned.plan.step_cache)  # fmt: skip


def _read_token_file(path: str | None) -> str | None:
    """--token-file's token: its first line (a token on the command line shows in ps)."""
    if path is None:
        return None
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise WanError(f"cannot read --token-file {path}: {getattr(exc, 'strerror', None) or exc}", "give a readable text file with the token on its first line") from None
    if not lines or not lines[0].strip():
        raise WanError(f"--token-file {path} has no token on its first line", "write the token there")
    return lines[0].strip()
