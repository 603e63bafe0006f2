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
import gc
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from wan_i2v.compile import apply_compile  # noqa: E402
from wan_i2v.models.attention import set_attention_kernel  # noqa: E402
from wan_i2v.models.diffusers_names import diffusers_transformer_kwargs, official_to_diffusers  # noqa: E402
from wan_i2v.models.dit import DiT, DiTConfig, keeps_fp32  # noqa: E402
from wan_i2v.tiny import randomize_  # noqa: E402

LATENT_GRIDS = {"480P": (21, 60, 104), "720P": (21, 90, 160)}
SEED = 1234
GB = 2**30


def build_ours(config: DiTConfig, dtype: torch.dtype) -> DiT:
    with torch.device("meta"):
        model = DiT(config)
    for module_name, module in model.named_modules():
        for name, param in list(module.named_parameters(recurse=False)):
            param_dtype = torch.float32 if keeps_fp32(f"{module_name}.{name}") else dtype
            module._parameters[name] = torch.nn.Parameter(torch.empty(param.shape, dtype=param_dtype, device="cuda"), requires_grad=False)
    return randomize_(model, SEED).eval()


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
    return lambda: model(latent, t, context, condition)


@torch.no_grad()
def measure(fn, warmup: int, repeats: int):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times), (torch.cuda.max_memory_allocated() - base) / GB


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
    parser.add_argument("--error-frames", type=int, default=5, help="latent frames of the 480P input for the fp32 comparison")
    parser.add_argument("--modes", nargs="+", default=["ours", "ours+compile", "diffusers"])
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
    if "diffusers" in args.modes:
        models["diffusers"] = build_diffusers(ours)
    error_inputs = make_inputs(config, (args.error_frames, 60, 104))
    outputs = {}

    for mode in args.modes:
        if mode == "ours+compile":
            apply_compile(ours)
        model = models["diffusers" if mode == "diffusers" else "ours"]
        with torch.no_grad():
            outputs[mode] = runner(mode, model, error_inputs)().float().cpu()
        for size in args.sizes:
            grid = LATENT_GRIDS[size]
            tokens = grid[0] * grid[1] * grid[2] // 4
            seconds, peak = measure(runner(mode, model, make_inputs(config, grid)), warmup=1, repeats=args.repeats)
            row = {"mode": mode, "size": size, "tokens": tokens, "seconds": seconds, "activation_peak_gb": peak}
            report["results"].append(row)
            print(f"{mode:>14} {size}: {seconds:7.3f} s/forward, activations {peak:5.1f} GiB", flush=True)
        torch._dynamo.reset() if mode == "ours+compile" else None

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

    del models, ours
    gc.collect()
    torch.cuda.empty_cache()
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
