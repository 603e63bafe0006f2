"""One DiT forward (one expert, one CFG branch) at full size, random weights: ours vs diffusers, one run.

    python bench/dit_forward.py                       # 480P and 720P, 40 layers
    python bench/dit_forward.py --layers 2 --sizes 480P --repeats 1   # smoke test

For each size: median seconds per forward over --repeats after a warm-up (CUDA
events), peak memory above the weights, and the floor the machine allows (FLOPs
over the bf16 matmul rate and the cuDNN attention rate, both measured here). Then
the relative error of each bf16 forward against an fp32 forward of the same
weights (before bf16 rounding) and inputs, at a shorter video so fp32 stays cheap.
Needs a CUDA GPU and diffusers (the reference).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch
from common import GB, free, measure, random_model
from torch._dynamo.utils import counters

from wan_i2v.transforms.compile import apply_compile
from wan_i2v.transforms.fused_gelu import apply_fused_gelu
from wan_i2v.transforms.fused_norms import apply_fused_norms
from wan_i2v.transforms.fp8 import apply_fp8
from wan_i2v.models.attention import set_attention_kernel
from diffusers_names import diffusers_transformer_kwargs

from wan_i2v.loading.names import official_to_diffusers
from wan_i2v.execution import ExecutionPlan, apply_plan
from wan_i2v.options import RunOptions
from wan_i2v.models.dit import DiT, DiTConfig, NormRope, keeps_fp32

LATENT_GRIDS = {"480P": (21, 60, 104), "720P": (21, 90, 160)}


def build_ours(config: DiTConfig, dtype: torch.dtype) -> DiT:
    return random_model(lambda: DiT(config), dtype, keeps_fp32)


def build_diffusers(ours: DiT):
    """diffusers' model over the same weights (shared storage; its fp32 islands cast to bf16, as it runs)."""
    from diffusers import WanTransformer3DModel

    kwargs = diffusers_transformer_kwargs(ours.config)
    with torch.device("meta"):
        reference = WanTransformer3DModel(**kwargs)
    state = {official_to_diffusers(k): v.to(torch.bfloat16) for k, v in ours.state_dict().items()}
    reference.load_state_dict(state, strict=True, assign=True)
    # Its RoPE tables are buffers made in __init__: rebuild them off the meta device.
    reference.rope = type(reference.rope)(kwargs["attention_head_dim"], kwargs["patch_size"], 1024).cuda()
    return reference.eval().requires_grad_(False)


def load_official_model(repo: Path, ours: DiT):
    """The official WanModel from a Wan2.2 checkout, over our weights (same names, shared storage).

    Its attention entry point needs flash-attn, which is not installed here; it is replaced by
    torch SDPA with the official casts (q, k, v to bf16, output in q's dtype), as in shared/ANCHORS.md.
    """
    import importlib.util
    import types

    modules = repo / "wan" / "modules"
    package = types.ModuleType("wan_official")
    package.__path__ = [str(modules)]
    sys.modules["wan_official"] = package
    for name in ("attention", "model"):
        spec = importlib.util.spec_from_file_location(f"wan_official.{name}", modules / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    official = sys.modules["wan_official.model"]

    def sdpa_attention(q, k, v, q_lens=None, k_lens=None, dropout_p=0.0, softmax_scale=None, q_scale=None,
                       causal=False, window_size=(-1, -1), deterministic=False, dtype=torch.bfloat16, version=None):
        out_dtype = q.dtype
        q, k, v = (x.to(dtype).transpose(1, 2) for x in (q, k, v))
        return torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).type(out_dtype)

    official.flash_attention = sdpa_attention
    c = ours.config
    with torch.device("meta"):
        model = official.WanModel(model_type="i2v", in_dim=c.in_dim, dim=c.dim, ffn_dim=c.ffn_dim, freq_dim=c.freq_dim,
                                  text_dim=c.text_dim, out_dim=c.out_dim, num_heads=c.num_heads, num_layers=c.num_layers,
                                  text_len=c.text_len, eps=c.eps)
    model.load_state_dict(ours.state_dict(), strict=True, assign=True)
    d = c.head_dim
    model.freqs = torch.cat([official.rope_params(1024, d - 4 * (d // 6)), official.rope_params(1024, 2 * (d // 6)),
                             official.rope_params(1024, 2 * (d // 6))], dim=1)
    return model.eval().requires_grad_(False)


@torch.no_grad()
def gelu_epilogue_check() -> dict:
    """Which GELU the fused epilogue computes: its difference from tanh-GELU and from erf-GELU, in fp32."""
    x = torch.randn(4096, 1024, device="cuda")
    layer = torch.nn.Linear(1024, 2048, device="cuda")
    fused = torch._addmm_activation(layer.bias, x, layer.weight.t(), use_gelu=True)
    plain = layer(x)
    return {approximate: (fused - torch.nn.functional.gelu(plain, approximate=approximate)).abs().max().item()
            for approximate in ("tanh", "none")}


@torch.no_grad()
def fused_norm_check(tokens: int = 32760, channels: int = 5120) -> dict:
    """The one-pass kernels against the plain modules they replace, on each of the block's uses:
    relative difference of the sum and of the normed output (of the rotated query)."""
    from wan_i2v.transforms.fused_norms import FusedNormRope, FusedResidualNorm
    from wan_i2v.models.dit import FP32LayerNorm, ResidualNorm, RMSNorm, rope_tables

    g = torch.Generator(device="cuda").manual_seed(3)

    def rand(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g, device="cuda").to(dtype)

    affine = FP32LayerNorm(channels, 1e-6, elementwise_affine=True).cuda()
    affine.weight.copy_(rand(channels)), affine.bias.copy_(rand(channels))
    plain_norm = FP32LayerNorm(channels, 1e-6, elementwise_affine=False)
    shift, scale, gate = (rand(1, 1, channels) * 0.1 for _ in range(3))
    uses = {
        "norm1 (bf16 stream, modulated)": (rand(1, tokens, channels, dtype=torch.bfloat16), None, None, plain_norm, shift, scale),
        "add gated + norm3 (affine)": (rand(1, tokens, channels), rand(1, tokens, channels, dtype=torch.bfloat16), gate, affine, None, None),
        "add + norm2 (modulated)": (rand(1, tokens, channels), rand(1, tokens, channels, dtype=torch.bfloat16), None, plain_norm, shift, scale),
    }
    report = {}
    for name, args in uses.items():
        expected = ResidualNorm()(*args, torch.bfloat16)
        got = FusedResidualNorm()(*args, torch.bfloat16)
        report[name] = [((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip(got, expected)]
    heads = 40
    rms = RMSNorm(channels, 1e-6).cuda()
    rms.weight.copy_(rand(channels))
    projection = rand(1, tokens, channels, dtype=torch.bfloat16) * 4
    rope = rope_tables((21, 30, 52), channels // heads, "cuda")  # 480P's 32,760 tokens
    for name, table in {"q norm + RoPE": rope, "cross-attention q norm": None}.items():
        expected = NormRope()(projection, rms, table, heads, torch.bfloat16).float()
        got = FusedNormRope()(projection, rms, table, heads, torch.bfloat16).float()
        report[name] = [((got - expected).norm() / expected.norm()).item()]
    return report


def make_inputs(config: DiTConfig, grid, seed=7):
    g = torch.Generator(device="cuda").manual_seed(seed)
    f, h, w = grid
    latent = torch.randn(1, config.out_dim, f, h, w, generator=g, device="cuda")
    condition = torch.randn(1, config.in_dim - config.out_dim, f, h, w, generator=g, device="cuda")
    context = torch.randn(1, config.text_len, config.text_dim, generator=g, device="cuda")
    context[:, 120:] = 0  # a 120-token prompt, zero-padded as the pipeline feeds it
    return latent, torch.tensor([900.0], device="cuda"), context, condition


def runner(kind, model, inputs):
    latent, t, context, condition = inputs
    if kind == "diffusers":
        hidden = torch.cat([latent, condition], 1).to(torch.bfloat16)
        ctx = context.to(torch.bfloat16)
        return lambda: model(hidden, t, ctx, return_dict=False)[0]
    if kind == "official":
        seq_len = latent.shape[2] * latent.shape[3] * latent.shape[4] // 4
        real = int((context[0].abs().sum(-1) > 0).sum())

        def official_forward():
            # As wan/image2video.py calls it: bf16 autocast, unpadded text, the latent and condition as lists.
            with torch.amp.autocast("cuda", dtype=torch.bfloat16):
                return model([latent[0]], t=t, context=[context[0, :real].to(torch.bfloat16)], seq_len=seq_len, y=[condition[0]])[0][None]

        return official_forward
    return lambda: model(latent, t, context, condition)


@torch.no_grad()
def print_profile(fn, rows: int = 40):
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=110), flush=True)
    # Where the GPU waits: the time between consecutive kernels, by size of gap.
    kernels = sorted((e for e in prof.events() if e.device_type == DeviceType.CUDA), key=lambda e: e.time_range.start)
    busy = sum(e.time_range.elapsed_us() for e in kernels) / 1e6
    span = (kernels[-1].time_range.end - kernels[0].time_range.start) / 1e6
    gaps = sorted(((b.time_range.start - a.time_range.end, a.name, b.name) for a, b in zip(kernels, kernels[1:])), reverse=True)
    print(f"{len(kernels)} kernels, busy {busy:.3f} s of a {span:.3f} s span", flush=True)
    for low, high in ((0, 10), (10, 100), (100, 1e12)):
        sizes = [gap for gap, _, _ in gaps if low <= gap < high]
        print(f"  gaps of {low}-{high:.0f} us: {len(sizes)}, {sum(sizes) / 1e3:.1f} ms in all", flush=True)
    for gap, before, after in gaps[:8]:
        print(f"  {gap / 1e3:.2f} ms between {before[:70]} and {after[:70]}", flush=True)


def forward_flops(config: DiTConfig, tokens: int):
    d, layers, text = config.dim, config.num_layers, config.text_len
    linear = layers * (2 * tokens * (6 * d * d + 2 * d * config.ffn_dim) + 2 * text * 2 * d * d)
    attention = layers * (4 * tokens * tokens * d + 4 * tokens * text * d)
    return linear, attention


@torch.no_grad()
def machine_rates(config: DiTConfig, tokens: int):
    """Measured bf16 matmul TFLOP/s and cuDNN attention TFLOP/s at this sequence length."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    matmul_s, _ = measure(lambda: a @ a, 3, 10)
    q = torch.randn(1, config.num_heads, tokens, config.head_dim, device="cuda", dtype=torch.bfloat16)
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        attn_s, _ = measure(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q), 2, 5)
    return 2 * 8192**3 / matmul_s, 4 * tokens * tokens * config.dim / attn_s


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["480P", "720P"], choices=list(LATENT_GRIDS))
    parser.add_argument("--layers", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--error-frames", type=int, default=5, help="latent frames of the 480P input for the fp32 comparison (0: skip it)")
    parser.add_argument("--modes", nargs="+", default=["ours", "ours+compile", "diffusers"],
                        help="plan (the stack a one-GPU run executes: the default execution plan's transforms), plan-eager (the same with --no-compile), or any of ours, ours+compile, ours+fused-residual+compile, ours+fused+compile, ours+persistent+compile, ours+gelu-epilogue+compile, ours+fp8+compile, ours+fp8+sage+compile (in that order; the FP8 modes cannot follow the GELU one: FP8 goes first), diffusers")
    parser.add_argument("--official-repo", type=Path, default=None,
                        help="a Wan2.2 checkout: adds the official WanModel (mode 'official') to the comparison")
    parser.add_argument("--profile", action="store_true", help="print the top CUDA kernels of one forward per mode at the first size")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    config = DiTConfig(num_layers=args.layers)
    report = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "command": " ".join(sys.argv),
        "layers": args.layers,
        "results": [],
    }
    print(f"{report['device']}, torch {report['torch']}, {args.layers} layers", flush=True)

    ours = build_ours(config, torch.bfloat16)
    set_attention_kernel(ours, "cudnn")
    weights_gb = torch.cuda.memory_allocated() / GB
    print(f"our weights: {weights_gb:.1f} GiB", flush=True)
    models = {"ours": ours}
    if "plan" in args.modes:  # what a one-GPU run executes: the default execution plan, on weights of its own
        models["plan"] = build_ours(config, torch.bfloat16)
        apply_plan(models["plan"], ExecutionPlan.for_device("cuda"))
    if "plan-eager" in args.modes:  # the same with --no-compile: the planner's activation estimate for it
        models["plan-eager"] = build_ours(config, torch.bfloat16)
        apply_plan(models["plan-eager"], ExecutionPlan.for_device("cuda", RunOptions(compile=False)))
    if "diffusers" in args.modes:
        models["diffusers"] = build_diffusers(ours)
    if args.official_repo:
        models["official"] = load_official_model(args.official_repo, ours)
        args.modes = ["official", *args.modes]
    error_inputs = make_inputs(config, (args.error_frames, 60, 104)) if args.error_frames else None
    outputs = {}

    for mode in args.modes:
        # Modes change our model in place, in the order given: ours, ours+compile, ours+fp8+compile.
        if "fp8" in mode:
            apply_fp8(ours)
        if "fused" in mode:
            report["fused_norm_relative_difference"] = fused_norm_check()
            print(f"fused norms vs plain (sum, normed): {report['fused_norm_relative_difference']}", flush=True)
            apply_fused_norms(ours)
            if "fused-residual" in mode:  # the residual norms' kernel alone, to measure each kernel's gain
                for block in ours.blocks:
                    block.self_attn.norm_rope, block.cross_attn.norm_rope = NormRope(), NormRope()
        if "persistent" in mode:
            # Inductor's multi-kernel mode also generates single-pass (persistent) variants of the
            # row reductions over 5120 channels (norms) and keeps the faster at run time.
            torch._dynamo.reset()
            torch._inductor.config.triton.multi_kernel = 1
        if "gelu-epilogue" in mode:
            report["gelu_epilogue_max_difference"] = gelu_epilogue_check()
            print(f"GELU epilogue vs tanh / erf GELU (fp32): {report['gelu_epilogue_max_difference']}", flush=True)
            apply_fused_gelu(ours)
        if "sage" in mode:
            set_attention_kernel(ours, "sage")
        if "compile" in mode:
            apply_compile(ours)
        model = models["ours" if mode.startswith("ours") else mode]
        if error_inputs is not None:
            with torch.no_grad():
                outputs[mode] = runner(mode, model, error_inputs)().float().cpu()
        for size in args.sizes:
            grid = LATENT_GRIDS[size]
            tokens = grid[0] * grid[1] * grid[2] // 4
            run = runner(mode, model, make_inputs(config, grid))
            torch.cuda.synchronize()
            start = time.perf_counter()
            with torch.no_grad():
                run()  # the first call compiles
            torch.cuda.synchronize()
            first = time.perf_counter() - start
            seconds, peak = measure(run, warmup=0, repeats=args.repeats)
            row = {"mode": mode, "size": size, "tokens": tokens, "seconds": seconds, "first_call_seconds": first, "activation_peak_gb": peak}
            report["results"].append(row)
            print(f"{mode:>14} {size}: {seconds:7.3f} s/forward, activations {peak:5.1f} GiB, first call {first:.1f} s", flush=True)
            del run
        breaks = sum(counters["graph_break"].values())
        if "compile" in mode:  # a break splits a block into several compiled pieces
            print(f"{mode}: {breaks} torch.compile graph breaks so far in this process", flush=True)
        if args.profile:
            print_profile(runner(mode, model, make_inputs(config, LATENT_GRIDS[args.sizes[0]])))
    del model

    for size in args.sizes:
        grid = LATENT_GRIDS[size]
        tokens = grid[0] * grid[1] * grid[2] // 4
        linear, attention = forward_flops(config, tokens)
        matmul_rate, attention_rate = machine_rates(config, tokens)
        floor = linear / matmul_rate + attention / attention_rate
        report.setdefault("floor", {})[size] = {
            "flops": linear + attention,
            "matmul_tflops": matmul_rate / 1e12,
            "attention_tflops": attention_rate / 1e12,
            "floor_seconds": floor,
        }
        print(f"floor {size}: {(linear + attention) / 1e15:.2f} PFLOP, matmul {matmul_rate / 1e12:.0f} TFLOP/s, "
              f"cuDNN attention {attention_rate / 1e12:.0f} TFLOP/s -> {floor:.3f} s", flush=True)

    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    if error_inputs is None:
        return
    del models, ours
    free()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    reference = build_ours(config, torch.float32)
    set_attention_kernel(reference, "sdpa")
    with torch.no_grad():
        truth = reference(*error_inputs).float().cpu()
    for mode, out in outputs.items():
        error = ((out - truth).norm() / truth.norm()).item()
        report.setdefault("relative_error_vs_fp32", {})[mode] = error
        print(f"relative error vs fp32 ({mode}): {error:.2e}", flush=True)

    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
