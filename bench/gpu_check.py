"""The real pipeline on a GPU, on the tiny checkpoint: every single-GPU mode runs and agrees.

    python bench/gpu_check.py [--out DIR]

Runs generate() in fp32 without compile (the reference), then bf16 with the defaults
(compiled blocks, cuDNN attention, text encoder visiting the GPU), --offload experts,
--offload blocks and --fp8, and prints each one's relative difference from the reference
and its time (both offload modes must give the default's latents bit for bit); then block
offload on a DiT of its own, streaming two blocks ahead: the same output as the resident
model, and while a block computes only it and the two after it on the GPU, in allocated
memory too; a state's host copy queued on the stream, as it was when saved, into the same
page-locked buffer each save; then the CLI end to end, writing an mp4. CI has no GPU: this is the check of
the CUDA-only code paths (pinned copies, side streams, torch._scaled_mm, compile).
Exits 1 if any check failed.
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from wan_i2v import I2VPipeline  # noqa: E402
from wan_i2v.models.dit import DiT, DiTConfig  # noqa: E402
from wan_i2v.tiny import randomize_, write_tiny_checkpoint  # noqa: E402
from wan_i2v.transforms.streaming import BlockOffload, module_tensors  # noqa: E402
from wan_i2v.video import demo_image  # noqa: E402

SETTINGS = dict(max_area=160 * 96, frame_num=17, steps=8, shift=3.0, seed=3, progress=False)
MODES = {
    "bf16, compiled (default)": dict(dtype=torch.bfloat16),
    "bf16, --offload experts": dict(dtype=torch.bfloat16, offload="experts"),
    "bf16, --offload blocks": dict(dtype=torch.bfloat16, offload="blocks"),
    "bf16, --fp8": dict(dtype=torch.bfloat16, fp8=True),
    "bf16, batched CFG, no compile": dict(dtype=torch.bfloat16, batch_cfg=True, compile=False),
}


def check_block_streaming(ahead: int = 2) -> bool:
    """Block offload streaming ``ahead`` blocks ahead: the resident model's output, and while block i
    computes, blocks i..i+ahead (cyclically) on the GPU and no more than their weights allocated."""
    # Wide and short: the weights (~4 MB a block) dwarf the activations of 8 tokens.
    config = DiTConfig(dim=256, ffn_dim=1024, freq_dim=64, num_heads=4, num_layers=6, text_len=8, text_dim=16)
    model = randomize_(DiT(config), seed=0).eval()
    block_bytes = sum(t.numel() * t.element_size() for t in module_tensors(model.blocks[0]))
    inputs = [t.cuda() for t in (torch.randn(1, 16, 2, 4, 4), torch.tensor([500.0]), torch.randn(1, 8, 16), torch.randn(1, 20, 2, 4, 4))]
    with torch.no_grad():
        expected = copy.deepcopy(model).cuda()(*inputs)
    offload = BlockOffload(model, "cuda", ahead=ahead)
    seen = []

    def record(index: int) -> None:
        on_gpu = [i for i, block in enumerate(model.blocks) if any(t.is_cuda for t in module_tensors(block))]
        seen.append((index, on_gpu, offload.resident_blocks(), torch.cuda.memory_allocated()))

    for index, block in enumerate(model.blocks):  # on a module inside the block: while it computes
        block.ffn.register_forward_hook(lambda module, args, output, index=index: record(index))
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()  # embeddings, head, inputs; no block yet
    same = placed = True
    with torch.no_grad():
        for _ in range(2):  # the second forward starts with the first blocks prefetched
            seen.clear()
            same = torch.equal(model(*inputs), expected) and same
            for index, on_gpu, resident, allocated in seen:
                wanted = sorted({(index + step) % len(model.blocks) for step in range(ahead + 1)})
                placed = placed and on_gpu == resident == wanted and allocated - before < (ahead + 1.5) * block_bytes
    most = max(len(on_gpu) for _, on_gpu, _, _ in seen)
    peak = max(allocated for *_, allocated in seen) - before
    ok = same and placed and most <= ahead + 1
    print(f"block offload, {ahead} ahead: same output as resident: {same}, at most {most} blocks on the GPU, "
          f"{peak / block_bytes:.2f} blocks' worth allocated while one computes, {'ok' if ok else 'FAILED'}", flush=True)
    offload.remove()
    return ok


def check_state_host_copy() -> bool:
    """A run's state copied to the host (``HostBuffers``, behind the resumable state file): the copy is
    queued on the stream, so the next step changing the tensor in place changes neither the copy nor
    waits for it; the buffer is page-locked, and the same one at the next save; a page-lock that
    fails leaves no CUDA error for the next kernel.

    Page-locked is told by the copy returning before it is done: a copy into pageable memory returns
    only once it is. ``Tensor.is_pinned()`` cannot tell: torch 2.11 answers False for memory locked
    with cudaHostRegister (2026-12-04, an H200: such a buffer's copy queued in 0.09 ms and took 5.0 ms,
    as one into ``pin_memory()``'s did; a pageable one's returned after 25 ms)."""
    from wan_i2v.loading.staging import PinnedArena, page_lock
    from wan_i2v.sampling.resume import HostBuffers

    source = torch.randn(64, 2**20, device="cuda")  # 256 MiB
    kept = source.cpu()
    buffers = HostBuffers()
    buffers.copy({"latent": source})  # the first copy makes and page-locks the buffer
    buffers.wait()
    torch.cuda.synchronize()
    start = time.perf_counter()
    copied = buffers.copy({"latent": source})
    queued = time.perf_counter() - start
    source.mul_(2)  # the next step, on the same stream
    buffers.wait()
    waited = time.perf_counter() - start
    first = copied["latent"].data_ptr()
    same, pinned = torch.equal(copied["latent"], kept), queued < waited / 4
    again = buffers.copy({"latent": source})
    buffers.wait()
    reused = again["latent"].data_ptr() == first and torch.equal(again["latent"], source.cpu())
    buffers.release()
    # A page-lock that fails (this range is locked already) leaves no CUDA error for this thread's next kernel.
    arena = PinnedArena(2**20, pin_for=source.device)
    refused = page_lock(arena.data, source.device) != 0
    try:
        clean = (torch.ones(4, device=source.device) * 2).sum().item() == 8
    except RuntimeError:
        clean = False
    arena.close()
    ok = same and pinned and reused and refused and clean
    print(f"state host copy: 256 MiB queued in {queued * 1e3:.2f} ms, copied in {waited * 1e3:.1f} ms; as it was when saved: {same}, "
          f"page-locked: {pinned}, the same buffer at the next save: {reused}; a page-lock refused ({refused}) leaves no error behind: "
          f"{clean}, {'ok' if ok else 'FAILED'}", flush=True)
    return ok


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    ckpt = write_tiny_checkpoint(Path(tempfile.mkdtemp()) / "tiny")
    reference = I2VPipeline.from_pretrained(ckpt, device="cuda", dtype=torch.float32, compile=False)
    expected = reference.generate(demo_image(), "a boat", **SETTINGS).latents
    del reference
    failed = []
    default = None
    for name, options in MODES.items():
        pipe = I2VPipeline.from_pretrained(ckpt, device="cuda", **options)
        pipe.generate(demo_image(), "a boat", **SETTINGS)  # warm-up (compile)
        start = time.perf_counter()
        result = pipe.generate(demo_image(), "a boat", **SETTINGS)
        seconds = time.perf_counter() - start
        error = ((result.latents - expected).norm() / expected.norm()).item()
        ok = torch.isfinite(result.video).all().item() and error < (0.2 if options.get("fp8") else 0.05)
        same = ""
        if default is None:
            default = result.latents
        elif "offload" in options:  # moving weights around must not change a bit
            ok = ok and torch.equal(result.latents, default)
            same = f", same latents as the default: {torch.equal(result.latents, default)}"
        print(f"{name:32}: {seconds:6.2f} s, relative difference from fp32 {error:.2e}, "
              f"peak {result.peak_memory_gb:.2f} GiB{same}, {'ok' if ok else 'FAILED'}", flush=True)
        if not ok:
            failed.append(name)
        del pipe
    if not check_block_streaming():
        failed.append("block streaming")
    if not check_state_host_copy():
        failed.append("state host copy")
    image = args.out / "input.png"
    demo_image().save(image)
    cli = [sys.executable, "-m", "wan_i2v.cli", "generate", "--ckpt-dir", str(ckpt), "--image", str(image), "--prompt", "a boat",
           "--size", "160*96", "--frame-num", "17", "--steps", "8", "--seed", "3", "--quiet"]
    runs = {"CLI": [], "CLI --gpus 2": ["--gpus", "2"], "CLI --gpus 2 --ulysses 2 --fsdp": ["--gpus", "2", "--ulysses", "2", "--fsdp"]}
    latents = {}
    for name, extra in runs.items():
        if "--gpus" in extra and torch.cuda.device_count() < 2:
            continue
        out = args.out / f"{name.replace(' ', '').replace('-', '')}.mp4"
        proc = subprocess.run([*cli, *extra, "--save-file", str(out), "--save-latents", str(out.with_suffix(".pt"))], capture_output=True, text=True)
        print(f"{name}: exit {proc.returncode}", proc.stdout.strip(), proc.stderr.strip()[-600:], flush=True)
        if proc.returncode == 0:
            latents[name] = torch.load(out.with_suffix(".pt"))["latents"]
        else:
            failed.append(name)
    for name, value in latents.items():
        reference = latents["CLI"]
        print(f"{name}: latents relative difference from one GPU {((value - reference).norm() / reference.norm()).item():.2e}", flush=True)
    if failed:
        sys.exit(f"FAILED: {', '.join(failed)}")


if __name__ == "__main__":
    main()
