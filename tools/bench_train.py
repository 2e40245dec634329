"""Training-step throughput of the real `EvfSamModule` in a real Lightning Trainer: samples/s,
achieved TFLOP/s, MFU and peak memory; and, with `--compare-plain`, Lightning's overhead against a
minimal hand-written PyTorch loop on the same model and data.

    PYTHONPATH=. python tools/bench_train.py [--size tiny] [--mode frozen|full|cached]
        [--activation-checkpointing] [--compile] [--precision 32|bf16-mixed] [--micro-batch 8] [--steps 30]
        [--warmup 5] [--repeats 3] [--compare-plain] [--json OUT]

Weights are random (nothing is downloaded). Batches are synthetic and in memory, in the batch-dict
format of `data/collate.py` as the model receives it (SAM image already finished), with a fixed
number of expressions per image; the same few batches cycle through a DataLoader.
Modes: `frozen` = the reference trainable set (SAM image encoder frozen, run under no-grad),
`full` = every weight trains (add `--activation-checkpointing` for BEiT-3 and SAM),
`cached` = frozen, with the image features precomputed (bf16, as `evfsam-cache-embeddings` stores
them) and the encoder skipped.

FLOPs per step are counted once with `torch.utils.flop_counter.FlopCounterMode` on the meta device
(forward + loss + backward of the module's own `forward_losses`, model FLOPs: recomputation by
activation checkpointing is not counted). MFU = achieved FLOP/s over the matmul peak measured here
(a `torch.mm` loop in the compute dtype: bf16 for bf16-mixed, fp32 for 32). Peak memory is
`torch.cuda.max_memory_allocated` on a GPU and the process's peak RSS on the CPU.
Defaults: `tiny` on the CPU, `evf-sam` on a GPU. Each configuration runs `--repeats` times (with
`--compare-plain`, Lightning and the plain loop alternate) and reports median and range.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch.utils.flop_counter import FlopCounterMode

from evfsam_lightning.config import load
from evfsam_lightning.models.builders import model_config
from evfsam_lightning.models.from_config import build_configured_model
from evfsam_lightning.training.losses import mask_loss
from evfsam_lightning.training.module import EvfSamModule
from evfsam_lightning.training.optim import build_optimizer, lr_lambda, parameter_groups
from evfsam_lightning.training.trainable import apply_trainable, fully_frozen_modules

MODES = {"frozen": "frozen_image_encoder", "full": "full", "cached": "frozen_image_encoder"}


def run_config(args) -> dict:
    """The run config (as the module receives it) of one benchmark configuration."""
    from omegaconf import OmegaConf

    cfg = load(None, [
        "data.synthetic.dir=unused", f"model.size={args.size}", f"model.mode={MODES[args.mode]}",
        f"model.activation_checkpointing={str(args.activation_checkpointing).lower()}",
        f"model.compile={str(args.compile).lower()}",
        f"trainer.precision={args.precision}", f"trainer.micro_batch_size={args.micro_batch}",
        f"trainer.global_batch_size={args.micro_batch}", f"trainer.max_steps={args.warmup + args.steps}",
        "trainer.log_every_n_steps=10", "optim.lr=1e-5", "optim.warmup_steps=0", "optim.grad_clip=1.0",
        "data.num_workers=0",
    ])
    return OmegaConf.to_container(OmegaConf.structured(cfg))


def make_batches(args, device: str, n: int = 4) -> list[dict]:
    """`n` distinct synthetic batches (CPU tensors): B images of the SAM input size, E expressions
    each of `--text-length` tokens (the last image's expressions padded by 2), masks at `original_hw`."""
    size = model_config(args.size)
    s, t = size.sam.image_size, size.beit3.image_size
    b, e, length = args.micro_batch, args.expressions_per_image, args.text_length
    h, w = args.original_hw or (3 * s // 4, s)
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(n):
        ids = torch.randint(3, min(size.beit3.vocab_size, 250), (b * e, length), generator=g)
        ids[:, 0], ids[:, -1] = 0, 2
        ids[-e:, -2:] = 1  # some padding, as in real batches
        resize = (s * h // max(h, w), s * w // max(h, w)) if size.family == "sam" else (s, s)
        pixels = torch.randn(b, 3, s, s, generator=g)
        if size.family == "sam":
            pixels[:, :, resize[0]:, :] = 0
            pixels[:, :, :, resize[1]:] = 0
        batches.append({
            "sam_pixel_values": pixels, "beit_pixel_values": torch.randn(b, 3, t, t, generator=g),
            "input_ids": ids, "attention_mask": ids != 1,
            "image_index": torch.arange(b).repeat_interleave(e), "offsets": torch.arange(0, b * e + 1, e),
            "resize_hw": torch.tensor([resize] * b), "original_hw": torch.tensor([[h, w]] * b),
            "masks": [torch.randint(0, 2, (e, h, w), generator=g, dtype=torch.uint8) for _ in range(b)],
            "sources": ["bench"] * b, "keys": [f"k{i}" for i in range(b)], "expressions": ["x"] * (b * e),
        })
    if args.mode == "cached":  # features as the embedding cache stores them; no SAM image in the batch
        torch.manual_seed(args.seed)
        model = build_configured_model(_config_object(run_config(args))).to(device).eval()
        with torch.no_grad():
            for batch in batches:
                feats = model.encode_images(batch.pop("sam_pixel_values").to(device))
                batch["image_features"] = {k: v.to("cpu", torch.bfloat16) for k, v in feats.items()}
        del model
    return batches


def _config_object(cfg: dict):
    from evfsam_lightning.config import config_from_dict

    return config_from_dict(cfg)


class _Cycle(torch.utils.data.IterableDataset):
    def __init__(self, batches: list[dict], total: int):
        self.batches, self.total = batches, total

    def __iter__(self):
        return (self.batches[i % len(self.batches)] for i in range(self.total))


def loader(batches: list[dict], total: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(_Cycle(batches, total), batch_size=None, collate_fn=lambda b: b)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux


class _Timer(L.Callback):
    """Timestamps at the start of every step after `warmup` and at the end of the last one,
    synchronised with the device at the first and the last."""

    def __init__(self, warmup: int, total: int, device: str):
        self.warmup, self.total, self.device = warmup, total, device
        self.stamps: list[tuple[float, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.warmup:
            synchronize(self.device)
        if batch_idx >= self.warmup:
            self.stamps.append(stamp())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == self.total - 1:
            synchronize(self.device)
            self.stamps.append(stamp())


def stamp() -> tuple[float, float]:
    """(wall clock, this process's CPU time): on a shared CPU the second is what the loop itself
    costs, whatever other processes take from the cores."""
    return time.perf_counter(), time.process_time()


def intervals(stamps: list[tuple[float, float]]) -> dict[str, list[float]]:
    pairs = list(zip(stamps, stamps[1:], strict=False))
    return {"wall": [b[0] - a[0] for a, b in pairs], "cpu": [b[1] - a[1] for a, b in pairs]}


def run_lightning(args, cfg: dict, batches: list[dict], device: str) -> dict[str, list[float]]:
    """Seconds of each timed step of the real module in a real Trainer (on a GPU only their sum is
    the device's time: steps are synchronised at both ends only)."""
    torch.manual_seed(args.seed)
    module = EvfSamModule(cfg)
    timer = _Timer(args.warmup, args.warmup + args.steps, device)
    trainer = L.Trainer(accelerator="gpu" if device == "cuda" else "cpu", devices=1, precision=args.precision,
                        max_steps=args.warmup + args.steps, gradient_clip_val=1.0, log_every_n_steps=10,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                        callbacks=[timer])
    reset_peak(device)
    trainer.fit(module, train_dataloaders=loader(batches, args.warmup + args.steps))
    return intervals(timer.stamps)


def run_plain(args, cfg: dict, batches: list[dict], device: str) -> dict[str, list[float]]:
    """Seconds of each timed step of a minimal hand-written loop: forward, mask loss, backward,
    clip, AdamW, LR schedule."""
    c = _config_object(cfg)
    torch.manual_seed(args.seed)
    model = build_configured_model(c)
    apply_trainable(model, model.config.family, c.model.mode, c.model.freeze, c.model.unfreeze)
    model.to(device).train()
    frozen = fully_frozen_modules(model)
    for m in frozen:
        m.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(parameter_groups(model.named_parameters(), c.optim.weight_decay), c.optim.lr,
                                tuple(c.optim.betas), c.optim.eps)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(c.optim.schedule, c.optim.warmup_steps,
                                                                      c.trainer.max_steps))
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=args.precision == "bf16-mixed")
    reset_peak(device)
    stamps = []
    for step, batch in enumerate(loader(batches, args.warmup + args.steps)):
        if step == args.warmup:
            synchronize(device)
        if step >= args.warmup:
            stamps.append(stamp())
        batch = move_data_to_device(batch, device)
        with autocast:
            if "image_features" in batch:
                feats = {k: v.float() for k, v in batch["image_features"].items()}
            elif frozen:
                with torch.no_grad():
                    feats = model.encode_images(batch["sam_pixel_values"])
            else:
                feats = model.encode_images(batch["sam_pixel_values"])
            out = model(batch, image_features=feats, full_resolution=False)
            masks = batch["masks"]
            logits = model.full_resolution_logits(out.low_res_logits, [m.shape[0] for m in masks],
                                                  [tuple(m.shape[-2:]) for m in masks])
            loss = mask_loss(logits, masks, c.optim.bce_weight, c.optim.dice_weight)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, c.optim.grad_clip)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    stamps.append(stamp())
    return intervals(stamps)


def count_flops(args, cfg: dict, batch: dict) -> int:
    """Model FLOPs of one training step (forward, loss, backward) on the meta device."""
    cfg = json.loads(json.dumps(cfg))
    cfg["model"]["activation_checkpointing"] = False  # model FLOPs, not recomputation
    with torch.device("meta"):
        module = EvfSamModule(cfg)
    meta = move_data_to_device(batch, "meta")
    with FlopCounterMode(display=False) as counter:
        _, _, losses = module.forward_losses(meta, module.image_features(meta))
        losses["loss"].backward()
    return counter.get_total_flops()


def matmul_peak(device: str, dtype: torch.dtype, seconds: float = 2.0) -> float:
    """FLOP/s of a square `torch.mm` loop (n = 8192 on a GPU, 1024 on the CPU)."""
    n = 8192 if device == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    for _ in range(3):
        torch.mm(a, b, out=out)
    synchronize(device)
    iters, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(10):
            torch.mm(a, b, out=out)
        iters += 10
        synchronize(device)
    return 2 * n ** 3 * iters / (time.perf_counter() - start)


def mean_steps(runs: list[dict[str, list[float]]], clock: str) -> list[float]:
    return [sum(r[clock]) / len(r[clock]) for r in runs]


def summary(runs: list[dict[str, list[float]]], clock: str) -> tuple[float, str]:
    """Mean step time of each run on `clock` -> (median over runs, text with the range)."""
    means = mean_steps(runs, clock)
    return statistics.median(means), (f"{statistics.median(means) * 1e3:.1f} ms (median of {len(runs)} runs, "
                                      f"range {min(means) * 1e3:.1f}-{max(means) * 1e3:.1f})")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--size", help="named model size (default: tiny on the CPU, evf-sam on a GPU)")
    p.add_argument("--mode", choices=sorted(MODES), default="frozen")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--compile", action="store_true", help="model.compile=true (torch.compile; warm-up steps compile)")
    p.add_argument("--precision", choices=("32", "bf16-mixed"), default=None,
                   help="default: 32 on the CPU, bf16-mixed on a GPU")
    p.add_argument("--micro-batch", type=int, default=8, help="images per step")
    p.add_argument("--expressions-per-image", type=int, default=3)
    p.add_argument("--text-length", type=int, default=16, help="tokens per expression")
    p.add_argument("--original-hw", type=int, nargs=2, help="original image size of the masks (default 3S/4 x S)")
    p.add_argument("--steps", type=int, default=30, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compare-plain", action="store_true", help="also time a hand-written loop, alternating")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch CPU threads (1 is steadier on a shared machine)")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    args.size = args.size or ("evf-sam" if device == "cuda" else "tiny")
    args.precision = args.precision or ("bf16-mixed" if device == "cuda" else "32")
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 runs are compared with an fp32 peak

    cfg = run_config(args)
    batches = make_batches(args, device)
    flops = count_flops(args, cfg, batches[0])
    peak = matmul_peak(device, torch.bfloat16 if args.precision == "bf16-mixed" else torch.float32)
    runs: dict[str, list[dict[str, list[float]]]] = {"lightning": [], "plain": []}
    memory: dict[str, float] = {}
    for _ in range(args.repeats):
        runs["lightning"].append(run_lightning(args, cfg, batches, device))
        memory["lightning"] = peak_memory_gib(device)
        if args.compare_plain:
            runs["plain"].append(run_plain(args, cfg, batches, device))
            memory["plain"] = peak_memory_gib(device)
    step, lightning_text = summary(runs["lightning"], "wall")
    # On the CPU the loop's own cost is its CPU time (one thread: no waiting on other processes).
    clock = "cpu" if device == "cpu" else "wall"
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    result = {
        "device": name, "size": args.size, "mode": args.mode, "activation_checkpointing": args.activation_checkpointing,
        "compile": args.compile,
        "precision": args.precision, "micro_batch": args.micro_batch, "expressions_per_image": args.expressions_per_image,
        "step_s": runs["lightning"], "samples_per_s": args.micro_batch / step, "flops_per_step": flops,
        "achieved_tflops": flops / step / 1e12, "matmul_peak_tflops": peak / 1e12, "mfu": flops / step / peak,
        "peak_memory_gib": memory["lightning"], "memory_kind": "max_memory_allocated" if device == "cuda" else "peak RSS",
    }
    print(f"{name}: {args.size}, mode {args.mode}{' + activation checkpointing' if args.activation_checkpointing else ''}"
          f"{' + torch.compile' if args.compile else ''}, "
          f"{args.precision}, micro-batch {args.micro_batch} x {args.expressions_per_image} expressions")
    print(f"  Lightning step     wall {lightning_text}; CPU {summary(runs['lightning'], 'cpu')[1]}  "
          f"({args.repeats} runs of {args.steps} steps)")
    print(f"  samples/s          {result['samples_per_s']:.2f}")
    print(f"  FLOPs per step     {flops / 1e9:.2f} GFLOP (meta-device count, model FLOPs)")
    print(f"  achieved           {result['achieved_tflops']:.4f} TFLOP/s; matmul peak {peak / 1e12:.4f} TFLOP/s; "
          f"MFU {100 * result['mfu']:.1f}%")
    print(f"  peak memory        {memory['lightning']:.2f} GiB ({result['memory_kind']})")
    if args.compare_plain:
        pairs = [a / b - 1 for a, b in zip(mean_steps(runs["lightning"], clock), mean_steps(runs["plain"], clock),
                                           strict=True)]
        overhead = summary(runs["lightning"], clock)[0] / summary(runs["plain"], clock)[0] - 1
        result.update(plain_step_s=runs["plain"], overhead_clock=clock, lightning_overhead=overhead,
                      overhead_per_pair=pairs)
        print(f"  plain loop step    wall {summary(runs['plain'], 'wall')[1]}; CPU {summary(runs['plain'], 'cpu')[1]}")
        print(f"  Lightning overhead {100 * overhead:+.1f}% of the plain step ({clock} time, medians of runs); "
              f"per A/B pair {', '.join(f'{100 * x:+.1f}%' for x in pairs)}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
