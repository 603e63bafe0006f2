"""Weight streaming from the checkpoint's files: the same output, each block read once per forward
through a ring of a few slots, only the running block and the ``ahead`` after it on the device, and
a shard that goes missing or short mid-run is one line."""

import json
import os
from pathlib import Path

import pytest
import torch

from wan_i2v.errors import WanError
from wan_i2v.loading import checkpoint as ckpt
from wan_i2v.loading.checkpoint import load_strict
from wan_i2v.loading.staging import StagingRing
from wan_i2v.models.dit import build_dit, keeps_fp32
from wan_i2v.models.spec import WAN22_I2V_A14B as A14B, ExpertSpec
from wan_i2v.transforms.streaming import BlockOffload, BlockStream, ExpertSwap, load_outside_blocks

HIGH_DIR, LOW_DIR = (expert.folder for expert in A14B.experts)

DEPTH = 3


def resident(root, subdir):
    model, source = build_dit(root / subdir, dtype=torch.float32)
    ring = StagingRing(BlockStream.slot_bytes(model.blocks, source), DEPTH, "cpu")
    return load_strict(model, source, device="cpu", dtype=torch.float32, keep_fp32=keeps_fp32, ring=ring)


def streamed(root, subdir, ring=None):
    model, source = build_dit(root / subdir, dtype=torch.float32)
    ring = ring or StagingRing(BlockStream.slot_bytes(model.blocks, source), DEPTH, "cpu")
    load_outside_blocks(model, source, ring, torch.float32, keeps_fp32)
    return model, source, ring


def dit_inputs(config):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(1, config.out_dim, 2, 4, 4, generator=g), torch.tensor([500.0]), torch.randn(1, config.text_len, config.text_dim, generator=g),
            torch.randn(1, config.in_dim - config.out_dim, 2, 4, 4, generator=g))  # fmt: skip


@pytest.mark.parametrize("ahead", [1, 2])
def test_block_offload_reads_each_block_once_per_forward_and_changes_nothing(tiny_checkpoint, ahead):
    plain = resident(tiny_checkpoint, HIGH_DIR)
    model, source, ring = streamed(tiny_checkpoint, HIGH_DIR)
    offload = BlockOffload(model, source, ring, dtype=torch.float32, keep_fp32=keeps_fp32, ahead=ahead)
    blocks = len(model.blocks)
    seen = []
    for index, block in enumerate(model.blocks):
        # On a module inside the block: what is resident while the block computes.
        block.ffn.register_forward_hook(lambda module, args, output, index=index: seen.append((index, offload.resident_blocks())))
    inputs = dit_inputs(model.config)
    block_keys = [key for key in source.keys() if key.startswith("blocks.")]
    with torch.no_grad():
        expected = plain(*inputs)
        for forward in range(1, 4):
            seen.clear()
            assert torch.equal(model(*inputs), expected)
            assert [index for index, _ in seen] == list(range(blocks))
            for index, resident_now in seen:
                assert index in resident_now and len(resident_now) <= ahead + 1, (index, resident_now)
            # Each block read once per forward; the first ones also read ahead for the next forward.
            for key in block_keys:
                index = int(key.split(".")[1])
                assert ring.reads[key] in ((forward, forward + 1) if index < ahead + 2 else (forward,)), (key, ring.reads[key], forward)
    # The ring ran ahead of the copies, and never held more than its slots.
    assert 2 <= ring.in_use_peak <= DEPTH
    assert ring.arena.nbytes < (DEPTH + 1) * ring.slot_bytes
    offload.remove()
    assert offload.resident_blocks() == []
    assert all(not block._forward_pre_hooks and not block._forward_hooks for block in model.blocks)


def test_expert_swap_streams_one_expert_at_a_time_and_gives_the_plain_models_output(tiny_checkpoint):
    plain = {"high": resident(tiny_checkpoint, HIGH_DIR), "low": resident(tiny_checkpoint, LOW_DIR)}
    high, high_source, ring = streamed(tiny_checkpoint, HIGH_DIR)
    low, low_source, _ = streamed(tiny_checkpoint, LOW_DIR, ring)
    swap = ExpertSwap({"high": high, "low": low}, {"high": high_source, "low": low_source}, ring, [ExpertSpec("high", HIGH_DIR, 875), ExpertSpec("low", LOW_DIR, 0)], dtype=torch.float32, keep_fp32=keeps_fp32)
    inputs = dit_inputs(high.config)
    with torch.no_grad():
        for name in ("high", "low", "high"):
            expert = swap.activate(name)
            other = "low" if name == "high" else "high"
            assert swap.streams[other].resident_blocks() == []
            assert torch.equal(expert(*inputs), plain[name](*inputs))
            assert swap.streams[name].resident_blocks() == list(range(len(expert.blocks)))  # kept until released
    swap.release()
    assert swap.active is None and all(stream.resident_blocks() == [] for stream in swap.streams.values())
    swap.remove()


def test_a_shard_cut_short_or_gone_mid_run_is_one_line(tiny_checkpoint, tmp_path):
    import shutil

    root = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, root)
    model, source, ring = streamed(root, HIGH_DIR)
    offload = BlockOffload(model, source, ring, dtype=torch.float32, keep_fp32=keeps_fp32)
    inputs = dit_inputs(model.config)
    with torch.no_grad():
        model(*inputs)
        offload.release()
        shard = root / HIGH_DIR / ckpt.SAFETENSORS_FILE
        os.truncate(shard, shard.stat().st_size // 2)
        with pytest.raises(WanError) as error:
            model(*inputs)
    message = str(error.value)
    assert "\n" not in message and f"from {shard}: the file ends before byte" in message and "truncated" in message, message
    assert "cache status" in message  # the hint says what checks the checkpoint

    # A shard removed while the run goes on (a cache cleaned under it) is still read as it was.
    low, low_source, low_ring = streamed(root, LOW_DIR)
    BlockOffload(low, low_source, low_ring, dtype=torch.float32, keep_fp32=keeps_fp32)
    for shard in (root / LOW_DIR).glob("diffusion_pytorch_model-*.safetensors"):
        shard.unlink()
    with torch.no_grad():
        assert torch.equal(low(*inputs), resident(tiny_checkpoint, LOW_DIR)(*inputs))


def converted_pipeline(root, folder, **options):
    from wan_i2v.execution import ExecutionPlan
    from wan_i2v.options import RunOptions
    from wan_i2v.pipeline import I2VPipeline

    plan = ExecutionPlan.for_device("cpu", RunOptions(dtype="fp32", offload="blocks", fp8=True, **options), converted_dir=folder)
    return I2VPipeline.load(root, plan)


def streamed_files(pipe) -> set:
    return {fill.file.path for stream in pipe.experts.streams.values() for block in stream.fills for fill in block}


def test_fp8_blocks_stream_from_a_copy_converted_once_with_the_same_video(tiny_checkpoint, tmp_path, monkeypatch):
    from test_lora import expert_weights, lightx2v_lora

    from wan_i2v.pipeline import I2VPipeline
    from wan_i2v.video import demo_image

    run = dict(seed=3, progress=False, max_area=64 * 96, frame_num=5, steps=3)
    folder = tmp_path / "converted"
    # The reference: FP8 with every expert on the device, quantized as it loads.
    expected = I2VPipeline.from_pretrained(tiny_checkpoint, device="cpu", dtype=torch.float32, fp8=True).generate(demo_image(), "a boat", **run).latents

    first = converted_pipeline(tiny_checkpoint, folder)  # writes the copies
    copies = sorted(folder.glob(f"*/{ckpt.SAFETENSORS_FILE}"))
    written = [path.stat().st_mtime_ns for path in copies]
    assert len(copies) == 2  # one per expert
    assert streamed_files(first) == {str(path) for path in copies}
    # The copy holds 1 byte a block weight where the (fp32) checkpoint holds 4.
    stored = sum(path.stat().st_size for path in (tiny_checkpoint / HIGH_DIR).glob("*.safetensors"))
    assert copies[0].stat().st_size < 0.5 * stored
    assert torch.equal(first.generate(demo_image(), "a boat", **run).latents, expected)

    again = converted_pipeline(tiny_checkpoint, folder)  # reads them, writes nothing
    assert sorted(folder.glob(f"*/{ckpt.SAFETENSORS_FILE}")) == copies and [path.stat().st_mtime_ns for path in copies] == written
    assert torch.equal(again.generate(demo_image(), "a boat", **run).latents, expected)

    # A LoRA makes another copy of its expert, in place of the old one; the other expert's stays.
    lora = tmp_path / "lora.safetensors"
    lightx2v_lora(lora, expert_weights(tiny_checkpoint), seed=1)
    with_lora = converted_pipeline(tiny_checkpoint, folder, loras={"high": [(lora, 0.7)]})
    now = sorted(folder.glob(f"*/{ckpt.SAFETENSORS_FILE}"))
    assert len(now) == 2 and len(set(now) & set(copies)) == 1
    lora_reference = I2VPipeline.from_pretrained(tiny_checkpoint, device="cpu", dtype=torch.float32, fp8=True, loras={"high": [(lora, 0.7)]})
    assert torch.equal(with_lora.generate(demo_image(), "a boat", **run).latents, lora_reference.generate(demo_image(), "a boat", **run).latents)


def test_a_converted_copy_cut_short_is_written_again_and_one_that_does_not_fit_or_cannot_be_written_is_not(tiny_checkpoint, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    folder = tmp_path / "converted"
    converted_pipeline(tiny_checkpoint, folder)
    copy = next(folder.glob(f"*/{ckpt.SAFETENSORS_FILE}"))
    size = copy.stat().st_size
    os.truncate(copy, size // 2)
    (copy.parent / f"{copy.name}.partial-999999").write_bytes(b"left by a writer killed half-way")
    pipe = converted_pipeline(tiny_checkpoint, folder)
    assert copy.stat().st_size == size and str(copy) in streamed_files(pipe)
    assert not list(folder.glob("*/*.partial-*"))

    # No room on the disk: a warning, and the blocks convert as they stream from the checkpoint.
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2**40, 2**40 - 2**20, 2**20))
    with pytest.warns(UserWarning, match=r"converted copy of the high-noise expert \(.*\) does not fit in .* free\)"):
        pipe = converted_pipeline(tiny_checkpoint, tmp_path / "full")
    assert all(str(tiny_checkpoint) in path for path in streamed_files(pipe))
    assert not list((tmp_path / "full").glob("*/*.safetensors*"))

    # A folder that cannot be made (a file is in its place): a warning, and the run streams from the checkpoint.
    (tmp_path / "taken").write_text("a file, not a folder")
    with pytest.warns(UserWarning, match=r"cannot write the converted copy of the high-noise expert in .*taken .*: its blocks convert as they stream"):
        pipe = converted_pipeline(tiny_checkpoint, tmp_path / "taken")
    assert all(str(tiny_checkpoint) in path for path in streamed_files(pipe))


@pytest.fixture(scope="module")
def six_blocks(tmp_path_factory):
    """An expert of six blocks (the tiny model has two: too few to keep some and stream others)."""
    from dataclasses import replace

    from wan_i2v.models.dit import DiT
    from wan_i2v.tiny import TINY_DIT, randomize_, save_dit

    folder = tmp_path_factory.mktemp("six") / "expert"
    save_dit(randomize_(DiT(replace(TINY_DIT, num_layers=6)), 5), folder, shards=2)
    return folder


def test_kept_blocks_arrive_once_and_stay_while_the_others_stream_through(six_blocks):
    from wan_i2v.transforms.streaming import spread

    assert spread(2, 6) == [0, 3] and spread(3, 40) == [0, 13, 26] and spread(0, 6) == [] and spread(6, 6) == list(range(6))
    plain, source = build_dit(six_blocks, dtype=torch.float32)
    load_strict(plain, source, device="cpu", dtype=torch.float32, keep_fp32=keeps_fp32, ring=StagingRing(BlockStream.slot_bytes(plain.blocks, source), DEPTH, "cpu"))
    model, source = build_dit(six_blocks, dtype=torch.float32)
    ring = StagingRing(BlockStream.slot_bytes(model.blocks, source), DEPTH, "cpu")
    load_outside_blocks(model, source, ring, torch.float32, keeps_fp32)
    kept = [0, 3]
    offload = BlockOffload(model, source, ring, dtype=torch.float32, keep_fp32=keeps_fp32, ahead=1, keep=kept)
    seen = []
    for index, block in enumerate(model.blocks):
        block.ffn.register_forward_hook(lambda module, args, output, index=index: seen.append((index, offload.resident_blocks())))
    inputs = dit_inputs(model.config)
    with torch.no_grad():
        expected = plain(*inputs)
        for forward in range(1, 4):
            seen.clear()
            assert torch.equal(model(*inputs), expected)
            for index, resident_now in seen:
                passing = [block for block in resident_now if block not in kept]
                assert index in resident_now and len(passing) <= 2, (index, resident_now)
                if forward > 1:  # kept since the first forward
                    assert set(kept) <= set(resident_now), (forward, index, resident_now)
            for key in (key for key in source.keys() if key.startswith("blocks.")):
                index = int(key.split(".")[1])
                # A kept block is read once; a streamed one once a forward (some also ahead, for the next).
                expected_reads = (1,) if index in kept else (forward, forward + 1)
                assert ring.reads[key] in expected_reads, (key, ring.reads[key], forward)
    offload.release()
    assert offload.resident_blocks() == []


def test_kept_blocks_can_leave_the_page_cache_once_they_arrived(six_blocks, monkeypatch):
    """With ``forget_kept`` (a host whose page cache cannot hold what the run reads), each kept block's
    file ranges are let go (POSIX_FADV_DONTNEED) once, after its reads; the streamed blocks' are never,
    and the output is the same."""
    plain, source = build_dit(six_blocks, dtype=torch.float32)
    load_strict(plain, source, device="cpu", dtype=torch.float32, keep_fp32=keeps_fp32, ring=StagingRing(BlockStream.slot_bytes(plain.blocks, source), DEPTH, "cpu"))
    model, source = build_dit(six_blocks, dtype=torch.float32)
    ring = StagingRing(BlockStream.slot_bytes(model.blocks, source), DEPTH, "cpu")
    load_outside_blocks(model, source, ring, torch.float32, keeps_fp32)
    advised = []
    real_fadvise = os.posix_fadvise
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, offset, length, advice: advised.append((os.readlink(f"/proc/self/fd/{fd}"), offset, length, advice))
                        or real_fadvise(fd, offset, length, advice))  # fmt: skip
    offload = BlockOffload(model, source, ring, dtype=torch.float32, keep_fp32=keeps_fp32, ahead=1, keep=[0, 3], forget_kept=True)
    inputs = dit_inputs(model.config)
    with torch.no_grad():
        for _ in range(3):
            assert torch.equal(model(*inputs), plain(*inputs))
    kept_ranges = sorted((str(Path(fill.file.path).resolve()), fill.file.offset, fill.file.nbytes, os.POSIX_FADV_DONTNEED)
                         for index in (0, 3) for fill in offload.fills[index])  # fmt: skip
    assert sorted((str(Path(path).resolve()), *rest) for path, *rest in advised) == kept_ranges  # each once, over three forwards
    offload.release()


def test_a_text_encoder_that_streams_its_blocks_encodes_the_same_and_holds_two_of_them(tiny_checkpoint, tmp_path):
    from dataclasses import asdict, replace

    from wan_i2v.models.text_encoder import T5_CONFIG_FILE, TextEncoder, build_umt5
    from wan_i2v.tiny import TINY_T5, randomize_, save_text_encoder
    from wan_i2v.transforms.streaming import HostCopy

    config = replace(TINY_T5, encoder_layers=5)
    save_text_encoder(randomize_(build_umt5(config), 7), tmp_path / A14B.files.text_encoder)
    (tmp_path / T5_CONFIG_FILE).write_text(json.dumps(asdict(config)))

    def load():
        return TextEncoder.load(tmp_path / A14B.files.text_encoder, tiny_checkpoint / A14B.files.tokenizer_dir, text_len=32, device="cpu", dtype=torch.float32)

    prompts = ["a white cat on a surfboard", "色调艳丽，过曝"]
    expected = [load().encode([prompt])[0] for prompt in prompts]
    encoder = load()
    blocks = encoder.model.encoder.block
    held = {id(tensor): tensor.data.data_ptr() for tensor in encoder.model.parameters()}
    ring = StagingRing(4 * 2**20, DEPTH, "cpu")
    visit = HostCopy(encoder.model, ring, blocks_of=blocks)
    seen = []
    for index, block in enumerate(blocks):
        block.layer[-1].register_forward_hook(lambda module, args, output, index=index: seen.append((index, visit.blocks.resident_blocks())))
    for _ in range(2):  # two visits, as two videos
        visit.to_device()
        assert [torch.equal(encoder.encode([prompt])[0], value) for prompt, value in zip(prompts, expected)] == [True, True]
        visit.to_host()
        assert {id(tensor): tensor.data.data_ptr() for tensor in encoder.model.parameters()} == held  # back to the host's own tensors
    assert [index for index, _ in seen] == list(range(5)) * 4
    assert all(index in resident and len(resident) <= 2 for index, resident in seen), seen
    # The whole-model upload brought everything but the blocks; each block came through the ring once a forward (or ahead).
    block_reads = {key: count for key, count in ring.reads.items() if key.startswith("blocks.")}
    assert block_reads and all(count in (4, 5, 6) for count in block_reads.values()), block_reads
    assert not any(".block." in key or "SelfAttention" in key for key in ring.reads if not key.startswith("blocks.")), sorted(ring.reads)


def test_a_visit_done_marks_the_text_encoders_pages_cold_so_the_kernel_gives_them_up_first(tmp_path):
    """Touched pages of a mapped file are the last the kernel reclaims: the text encoder's, read once a
    video, then crowded out the streamed blocks' pages (read every step) on a 32 GiB machine."""
    import re

    from wan_i2v.loading.staging import mark_cold

    path = tmp_path / "weights.pth"
    torch.save({"weight": torch.randn(2048, 1024)}, path)
    weight = torch.load(path, mmap=True, weights_only=True)["weight"]

    def referenced_kb() -> int:
        total = 0
        for mapping in re.split(r"\n(?=[0-9a-f]+-[0-9a-f]+ )", open("/proc/self/smaps").read()):
            if mapping.splitlines()[0].endswith(str(path)):
                total += int(re.search(r"^Referenced:\s+(\d+) kB", mapping, re.M).group(1))
        return total

    assert float(weight.double().sum()) == pytest.approx(float(torch.load(path, weights_only=True)["weight"].double().sum()))
    touched = referenced_kb()
    assert touched >= 0.9 * weight.nbytes / 1024
    mark_cold([weight])
    assert touched - referenced_kb() >= 0.7 * weight.nbytes / 1024  # (a few pages around the file's header stay referenced)
    assert torch.equal(weight, torch.load(path, weights_only=True)["weight"])  # nothing lost


def test_a_streamed_run_reports_the_weights_it_streamed_and_its_wait_for_their_reads(tiny_checkpoint, monkeypatch, capsys):
    from safetensors import safe_open

    from wan_i2v.commands.common import _print_summary
    from wan_i2v.pipeline import I2VPipeline
    from wan_i2v.video import demo_image

    run = dict(seed=3, progress=False, max_area=64 * 96, frame_num=5, steps=3)
    assert I2VPipeline.from_pretrained(tiny_checkpoint, device="cpu", dtype=torch.float32).generate(demo_image(), "a boat", **run).streaming is None
    block_bytes = 0  # one expert's blocks as stored (the two experts have the same shapes)
    for shard in (tiny_checkpoint / HIGH_DIR).glob("*.safetensors"):
        with safe_open(shard, "pt") as handle:
            block_bytes += sum(handle.get_tensor(key).nbytes for key in handle.keys() if key.startswith("blocks."))

    pipe = I2VPipeline.from_pretrained(tiny_checkpoint, device="cpu", dtype=torch.float32, offload="blocks")
    forwards = []
    for model in pipe.experts.models.values():
        model.register_forward_hook(lambda *args: forwards.append(1))
    slow_read = StagingRing._read

    def read_slowly(ring, *args):
        import time

        time.sleep(0.05)
        slow_read(ring, *args)

    monkeypatch.setattr(StagingRing, "_read", read_slowly)
    result = pipe.generate(demo_image(), "a boat", **run)
    # Every block is copied up once a forward; each expert's last forward may also have copied the first
    # blocks of its next one (read ahead, dropped at the switch or the end).
    assert len(forwards) * block_bytes <= result.streaming["gb"] * 1e9 <= (len(forwards) + 2) * block_bytes
    # The tiny blocks compute in milliseconds and each read takes 50 ms: the compute waits for most of the run.
    assert 0.5 * result.timings["denoising"] < result.streaming["waited_s"] <= result.timings["denoising"]
    # The readers' side: each block is a slot's fill of reads that take 50 ms, one after the other; no GPU timeline to report.
    blocks = len(next(iter(pipe.experts.models.values())).block_stack())
    assert 0.05 * len(forwards) * blocks <= result.streaming["read_s"] <= result.timings["denoising"]
    assert result.streaming["slot_wait_s"] <= result.timings["denoising"]
    assert "computing_s" not in result.streaming and "allocator_retries" not in result.streaming
    _print_summary(result, Path("out.mp4"), 0.0)
    line = next(line for line in capsys.readouterr().err.splitlines() if line.startswith("streamed while denoising: "))
    assert line == (f"streamed while denoising: {result.streaming['gb']:.1f} GB of weights, read in {result.streaming['read_s']:.1f}s (the reads "
                    f"waited {result.streaming['slot_wait_s']:.1f}s for free slots); the host waited {result.streaming['waited_s']:.1f}s for them")


def test_device_spans_sum_what_the_gpu_has_passed_and_hold_no_more_events_than_pending():
    """The GPU's waits for copies and the blocks' compute are summed from event pairs once the GPU
    has passed them (a fake of CUDA's events here: this machine has no GPU)."""
    from wan_i2v.transforms.streaming import DeviceSpans

    class Event:
        def __init__(self, at_ms, done=True):
            self.at_ms, self.done = at_ms, done

        def query(self):
            return self.done

        def elapsed_time(self, end):
            return end.at_ms - self.at_ms

    spans = DeviceSpans()
    spans.add(Event(0), Event(250))
    later = Event(1000, done=False)
    spans.add(Event(900), later)
    assert spans.seconds() == 0.25 and len(spans.pending) == 1  # the second span is still ahead of the GPU
    later.done = True
    assert spans.seconds() == 0.35 and spans.pending == []
    for start in range(300):  # a long run: the passed spans are summed as they pile up
        spans.add(Event(start), Event(start + 1))
    assert len(spans.pending) < 256 and abs(spans.seconds() - 0.65) < 1e-9


@pytest.mark.parametrize("offload", [None, "blocks"])
def test_a_pipeline_let_go_of_lets_its_staging_ring_go_with_its_threads_files_and_memory(tiny_checkpoint, monkeypatch, offload):
    """A notebook that loads the pipeline again, or a server that plans again, must not keep the old
    ring's pinned slots (2.1 GB at full size), its reader threads and the checkpoint's open files."""
    import gc
    import threading
    import weakref

    from wan_i2v.pipeline import I2VPipeline
    from wan_i2v.video import demo_image

    rings, opened = [], set()
    made, open_file = StagingRing.__init__, StagingRing._fd

    def recorded(ring, *args, **kwargs):
        made(ring, *args, **kwargs)
        rings.append(weakref.ref(ring))

    monkeypatch.setattr(StagingRing, "__init__", recorded)
    monkeypatch.setattr(StagingRing, "_fd", lambda ring, path: (fd := open_file(ring, path), opened.add((fd, os.fstat(fd).st_ino)))[0])
    earlier = set(threading.enumerate())
    pipe = I2VPipeline.from_pretrained(tiny_checkpoint, device="cpu", dtype=torch.float32, offload=offload)
    pipe.generate(demo_image(), "a boat", seed=3, progress=False, max_area=64 * 96, frame_num=5, steps=2)
    (ring,) = rings
    threads = [thread for thread in set(threading.enumerate()) - earlier if thread.name.startswith("wan-i2v-")]
    assert opened  # it read the checkpoint through its own files
    if offload:  # the streamed experts read through it at every step: it lives as long as the pipeline
        assert ring() is not None and threads
    del pipe
    gc.collect()
    assert ring() is None
    for thread in threads:
        thread.join(timeout=10)
        assert not thread.is_alive(), thread.name
    for fd, inode in opened:  # closed (a descriptor opened since by another may have its number)
        try:
            assert os.fstat(fd).st_ino != inode
        except OSError:
            pass


def test_a_ring_whose_read_failed_is_let_go_of_too(tmp_path):
    """The failed read's error, kept for the caller, must not keep the ring (its traceback's frames hold it)."""
    import gc
    import weakref

    from wan_i2v.loading.staging import FileRange, Piece

    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(bytes(100))
    ring = StagingRing(4096, DEPTH, "cpu")
    ticket = ring.submit([Piece("weight", 0, 1000, FileRange(str(cut), 0, 1000))])
    with pytest.raises(WanError, match="the file ends before byte 1000"):
        ring.copy_out(ticket, [torch.empty(1000, dtype=torch.uint8)], None)
    ring.release(ticket)  # as a batch that failed gives its slots back
    dispatcher, gone = ring.dispatcher, weakref.ref(ring)
    del ring, ticket
    gc.collect()
    assert gone() is None
    dispatcher.join(timeout=10)
    assert not dispatcher.is_alive()


def test_out_of_memory_for_a_fills_tensors_gives_its_slots_back_and_the_ring_goes_on(tiny_checkpoint, monkeypatch):
    """A batch that fails before its copies (no device memory for the values) must release its
    tickets: a slot never released stops the ring's reads for good, and the next load would hang."""
    from wan_i2v.loading.staging import Fill

    model, source = build_dit(tiny_checkpoint / HIGH_DIR, dtype=torch.float32)
    ring = StagingRing(BlockStream.slot_bytes(model.blocks, source), DEPTH, "cpu")
    allocate = Fill.outputs

    def out_of_memory(fill, device):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (a fake)")

    monkeypatch.setattr(Fill, "outputs", out_of_memory)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        load_strict(model, source, device="cpu", dtype=torch.float32, keep_fp32=keeps_fp32, ring=ring)
    assert ring.count and all(ticket is None or ticket.released.is_set() for ticket in ring.submitted)
    monkeypatch.setattr(Fill, "outputs", allocate)
    loaded = load_strict(model, source, device="cpu", dtype=torch.float32, keep_fp32=keeps_fp32, ring=ring)
    assert torch.equal(loaded.blocks[0].ffn[0].weight, resident(tiny_checkpoint, HIGH_DIR).blocks[0].ffn[0].weight)
