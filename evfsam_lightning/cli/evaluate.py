"""evfsam-eval: gIoU and cIoU of a checkpoint on shard splits (the reference's protocol).

    evfsam-eval --checkpoint runs/quickstart/checkpoints/step-00002000.ckpt --data data/synthetic/val
    evfsam-eval --checkpoint checkpoints/evf-sam --data refcoco_val=data/shards/refcoco_unc/val \
        refcocog_test=data/shards/refcocog_umd/test --devices 2 --out results.json
    evfsam-eval --checkpoint checkpoints/evf-sam --benchmark refcoco --shards data/shards

Each `--data` item is `[name=]shards` (a folder of tars with sizes.json, a brace pattern, a glob).
`--benchmark refcoco` evaluates the paper's 8 splits (RefCOCO and RefCOCO+ val/testA/testB,
RefCOCOg val/test) that it finds under `--shards` (`<dataset>_<split_by>/<split>`, the folders of
`evfsam-shards refer --out <shards>/<dataset>_<split_by>`, or `<dataset>/<split>`), lists the
missing ones, and prints and writes (`--out`, JSON, and the same name with .md) gIoU and cIoU
beside the published EVF-SAM cIoU.
Every sentence of every object is scored, referring text `strip().lower()`-ed as the reference's
evaluation does; splits holding no-target expressions (gRefCOCO) also get N-acc and T-acc.
The checkpoint is an evfsam-train checkpoint (file, or DeepSpeed/FSDP directory) or an official
EVF-SAM folder. `--shuffle-expressions` gives each object the expression of another object of
the same image: a model that reads the text scores much lower that way.

With a presence head the head decides "no target" (`--presence-threshold`, default the
checkpoint's), and a threshold sweep is printed and written (`presence_sweep` in the JSON) for every
split holding no-target expressions: N-acc, T-acc, gIoU and cIoU at each threshold of
`--presence-sweep` (default 0, 0.1, ..., 1), from the same pass over the data. Undefined numbers
(T-acc of a split without target expressions) are "n/a" in the tables and null in the JSON.
"""

from __future__ import annotations

import json
import math
import sys
from argparse import RawDescriptionHelpFormatter
from pathlib import Path

from evfsam_lightning.cli.errors import (
    ArgumentParser,
    UserError,
    checkpoint_input,
    console_script,
    output_path,
)

#: The paper's table: (split name, dataset, split_by, split, published EVF-SAM cIoU; SPEC section 5).
BENCHMARKS: dict[str, list[tuple[str, str, str, str, float]]] = {
    "refcoco": [
        ("refcoco_val", "refcoco", "unc", "val", 82.4),
        ("refcoco_testA", "refcoco", "unc", "testA", 84.2),
        ("refcoco_testB", "refcoco", "unc", "testB", 80.2),
        ("refcoco+_val", "refcoco+", "unc", "val", 76.5),
        ("refcoco+_testA", "refcoco+", "unc", "testA", 80.0),
        ("refcoco+_testB", "refcoco+", "unc", "testB", 71.9),
        ("refcocog_val", "refcocog", "umd", "val", 78.2),
        ("refcocog_test", "refcocog", "umd", "test", 78.3),
    ],
}


def parse_data(items: list[str]) -> list[tuple[str, str]]:
    out = []
    for item in items:
        name, _, urls = item.rpartition("=")
        if not name:
            urls = item
            p = Path(item.rstrip("/"))
            name = p.name if p.name not in ("val", "test", "train") else f"{p.parent.name}_{p.name}"
        out.append((name, urls))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise UserError(f"--data: split names repeat: {names}; name them with name=shards")
    return out


def check_splits(splits: list[tuple[str, str]]) -> None:
    """Every split names shards that exist (before the model is loaded)."""
    for name, urls in splits:
        if not urls.startswith("pipe:") and not any(c in urls for c in "*?[{") and not Path(urls).exists():
            raise UserError(f"--data {name}={urls}: no such file or directory (check the path)")
        if Path(urls).is_dir() and not (any(Path(urls).glob("*.tar")) or any(Path(urls).glob("*.tar.gz"))):
            raise UserError(f"--data {name}={urls}: the folder holds no *.tar or *.tar.gz shard")
    from evfsam_lightning.data.stream import expand_urls

    for name, urls in splits:
        try:
            found = expand_urls(urls)
        except (OSError, ValueError) as e:
            raise UserError(f"--data {name}={urls}: {str(e).splitlines()[0]}") from None
        if not found:
            raise UserError(f"--data {name}={urls}: no shards match (give a folder of .tar shards, a glob or a "
                            "brace pattern)")


def _has_shards(folder: Path) -> bool:
    return folder.is_dir() and ((folder / "sizes.json").is_file() or any(folder.glob("*.tar")))


def find_benchmark_splits(benchmark: str, shards: str | Path) -> tuple[list[tuple[str, str]], list[str]]:
    """([(split name, shard folder)] found under `shards`, [names of the missing splits]), in the
    paper's order. Raises UserError when none is found."""
    root = Path(shards)
    found, missing, looked = [], [], []
    for name, dataset, split_by, split, _ in BENCHMARKS[benchmark]:
        candidates = [root / f"{dataset}_{split_by}" / split, root / dataset / split]
        looked.append(str(candidates[0]))
        hit = next((c for c in candidates if _has_shards(c)), None)
        if hit is None:
            missing.append(name)
        else:
            found.append((name, str(hit)))
    if not found:
        raise UserError(f"--benchmark {benchmark}: no split found under --shards {root} (looked for shard "
                          f"folders such as {looked[0]}, {looked[-1]}; write them with `evfsam-shards refer "
                          f"--out {root}/<dataset>_<split_by>`)")
    return found, missing


#: `--presence-sweep` without values: these thresholds.
DEFAULT_SWEEP = [round(0.1 * i, 1) for i in range(11)]


def _pct(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}"


def json_safe(value):
    """`value` with every NaN or infinite float replaced by None (JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def sweep_table(name: str, rows: list[dict], threshold: float) -> list[str]:
    """The console lines of one split's threshold sweep; the checkpoint's threshold marked *."""
    first = rows[0]
    lines = [f"presence threshold sweep, {name} ({first['expressions']} expressions, {first['no_target']} "
             f"no-target; * = the threshold in use, {threshold:.2f}):",
             f"  {'threshold':>9}  {'N-acc':>7}  {'T-acc':>7}  {'gIoU':>7}  {'cIoU':>7}"]
    for r in rows:
        mark = "*" if abs(r["threshold"] - threshold) < 1e-6 else " "
        lines.append(f"  {r['threshold']:>8.2f}{mark}  {_pct(r['n_acc']):>7}  {_pct(r['t_acc']):>7}  "
                     f"{_pct(r['giou']):>7}  {_pct(r['ciou']):>7}")
    return lines


def benchmark_table(results: dict) -> tuple[list[str], str]:
    """The benchmark results as console lines and as a Markdown document."""
    rows = [("split", "expressions", "gIoU", "cIoU", "EVF-SAM cIoU", "diff")]
    for name, r in results["splits"].items():
        if r is None:
            rows.append((name, "missing", "-", "-", f"{results['published_ciou'][name]:.1f}", "-"))
            continue
        published = results["published_ciou"][name]
        rows.append((name, str(r["expressions"]), _pct(r["giou"]), _pct(r["ciou"]), f"{published:.1f}",
                     f"{100 * r['ciou'] - published:+.2f}"))
    mean = results["mean"]
    if mean["splits"]:
        rows.append((f"mean ({mean['splits']} splits)", "", _pct(mean["giou"]), _pct(mean["ciou"]),
                     f"{mean['published_ciou']:.1f}", f"{100 * mean['ciou'] - mean['published_ciou']:+.2f}"))
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if c == 0 else cell.rjust(w)
                       for c, (cell, w) in enumerate(zip(row, widths, strict=True))) for row in rows]
    md = [f"# EVF-SAM benchmark `{results['benchmark']}`", "",
          f"Checkpoint `{results['checkpoint']}`, shards `{results['shards']}`. gIoU and cIoU in %, every "
          "sentence of every object scored; EVF-SAM cIoU: the published numbers.", "",
          "| " + " | ".join(rows[0]) + " |", "|" + "|".join("---" if c == 0 else "---:" for c in range(len(rows[0]))) + "|"]
    md += ["| " + " | ".join(row) + " |" for row in rows[1:]]
    if results["missing"]:
        md += ["", "Missing splits (no shards found): " + ", ".join(results["missing"]) + "."]
    return lines, "\n".join(md) + "\n"


@console_script("evfsam-eval")
def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="evfsam-eval", description=__doc__, formatter_class=RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--data", nargs="+", help="[name=]shards, one per split")
    what.add_argument("--benchmark", choices=sorted(BENCHMARKS),
                      help="the paper's splits found under --shards, beside the published numbers")
    p.add_argument("--shards", default="data/shards", help="with --benchmark: the folder holding the converted "
                                                           "datasets (default %(default)s)")
    p.add_argument("--devices", type=int, default=1, help="processes (GPUs, or CPU ranks)")
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--batch-size", type=int, default=4, help="images per loader batch per rank")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--precision", default="32", help="32 or bf16-mixed")
    p.add_argument("--shuffle-expressions", action="store_true", help="text-blind control (see above)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--out", help="write the results as JSON (--benchmark: default <benchmark>-benchmark.json, "
                                 "and a Markdown table beside it)")
    p.add_argument("--presence-threshold", type=float, default=None,
                   help="with a presence head: 'no target' below this probability (default: the checkpoint's)")
    p.add_argument("--presence-sweep", type=float, nargs="*", metavar="T", default=None,
                   help="with a presence head: the thresholds of the sweep (default 0, 0.1, ..., 1)")
    args = p.parse_args(argv)
    if args.presence_threshold is not None and not 0 <= args.presence_threshold <= 1:
        p.error(f"--presence-threshold {args.presence_threshold} must be in [0, 1]")
    if args.presence_sweep is not None:
        for t in args.presence_sweep:
            if not 0 <= t <= 1:
                p.error(f"--presence-sweep {t} must be in [0, 1]")
    for option in ("devices", "batch_size"):
        if getattr(args, option) < 1:
            p.error(f"--{option.replace('_', '-')} {getattr(args, option)} must be at least 1")
    if args.workers < 0:
        p.error(f"--workers {args.workers} must be 0 or more")
    if args.precision not in ("32", "bf16-mixed", "16-mixed"):
        p.error(f"--precision {args.precision!r} is not allowed (allowed: 32, bf16-mixed, 16-mixed)")
    checkpoint_input(args.checkpoint)
    missing: list[str] = []
    if args.benchmark:
        splits, missing = find_benchmark_splits(args.benchmark, args.shards)
    else:
        splits = parse_data(args.data)
    check_splits(splits)
    out = args.out or (f"{args.benchmark}-benchmark.json" if args.benchmark else None)
    if out:
        output_path(out)
        if args.benchmark:
            output_path(Path(out).with_suffix(".md"))
    if missing:
        print(f"evfsam-eval: {args.benchmark}: {len(splits)} of {len(splits) + len(missing)} splits found; "
              f"missing: {', '.join(missing)}", file=sys.stderr)

    import lightning as L

    from evfsam_lightning.config import DataConfig, SourceConfig
    from evfsam_lightning.data.datamodule import EvfDataModule
    from evfsam_lightning.data.settings import PipelineSettings
    from evfsam_lightning.training.evaluation import EvalModule
    from evfsam_lightning.training.loading import load_for_inference, tokenizer_folder

    model, tokenizer = load_for_inference(args.checkpoint)
    if args.presence_threshold is not None:
        if model.presence_head is None:
            p.error(f"--presence-threshold: {args.checkpoint} has no presence head")
        model.presence_head.threshold.fill_(args.presence_threshold)
    if args.presence_sweep is not None and model.presence_head is None:
        p.error(f"--presence-sweep: {args.checkpoint} has no presence head")
    sweep = (sorted(set(args.presence_sweep or DEFAULT_SWEEP)) if model.presence_head is not None else None)
    cfg = model.config
    with tokenizer_folder(tokenizer.evfsam_files) as tok_dir:
        data = DataConfig(num_workers=args.workers, val_batch_size=args.batch_size, sam_resize="worker")
        settings = PipelineSettings(tokenizer=str(tok_dir), batch_size=args.batch_size,
                                    sam_image_size=cfg.sam.image_size, sam_variant=cfg.family,
                                    beit_image_size=cfg.beit3.image_size)
        module = EvalModule(model, [n for n, _ in splits], args.shuffle_expressions, sweep_thresholds=sweep)
        trainer = L.Trainer(accelerator=args.accelerator, devices=args.devices, precision=args.precision,
                            logger=False, enable_checkpointing=False, enable_progress_bar=not args.no_progress,
                            enable_model_summary=False, use_distributed_sampler=False,
                            strategy="ddp" if args.devices > 1 else "auto")
        datamodule = EvfDataModule(data, settings, test_sources=[SourceConfig(n, [u]) for n, u in splits])
        trainer.test(module, datamodule=datamodule, verbose=False)
    if not trainer.is_global_zero:
        return 0
    results = {"checkpoint": str(args.checkpoint), "shuffled_expressions": args.shuffle_expressions,
               "splits": {n: module.results[n] for n, _ in splits}, "all": module.results["all"]}
    if args.benchmark:
        results = benchmark_results(args.benchmark, args.shards, dict(splits), results)
        lines, markdown = benchmark_table(results)
        print("\n".join(lines))
    else:
        width = max(len(n) for n, _ in splits)
        generalized = any("no_target" in r for r in results["splits"].values())
        extra = "  N-acc    T-acc" if generalized else ""
        print(f"{'split':<{width}}  {'gIoU':>7}  {'cIoU':>7}{extra}  expressions")
        for name, r in results["splits"].items():
            accs = f"  {_pct(r.get('n_acc')):>7}  {_pct(r.get('t_acc')):>7}" if generalized else ""
            print(f"{name:<{width}}  {_pct(r['giou']):>7}  {_pct(r['ciou']):>7}{accs}  {r['expressions']}")
    if module.sweep is not None:
        threshold = float(model.presence_head.threshold)
        results["presence_threshold"] = threshold
        # Only splits holding no-target expressions: elsewhere the sweep says nothing about "no target".
        results["presence_sweep"] = {n: module.sweep[n] for n, _ in splits if module.sweep[n][0]["no_target"]}
        if len(results["presence_sweep"]) > 1:
            results["presence_sweep"]["all"] = module.sweep["all"]
        for name, rows in results["presence_sweep"].items():
            print("\n".join(sweep_table(name, rows, threshold)))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(json_safe(results), indent=2, allow_nan=False))
        written = [out]
        if args.benchmark:
            Path(out).with_suffix(".md").write_text(markdown)
            written.append(str(Path(out).with_suffix(".md")))
        print(f"results written to {' and '.join(written)}")
    return 0


def benchmark_results(benchmark: str, shards: str, found: dict[str, str], results: dict) -> dict:
    """The JSON of a benchmark run: every split of the benchmark (None where missing), the
    published cIoU, and the means over the splits found (the published mean over the same ones)."""
    published = {name: ciou for name, *_, ciou in BENCHMARKS[benchmark]}
    splits = {name: ({**results["splits"][name], "shards": found[name]} if name in found else None)
              for name in published}
    done = [name for name in published if name in found]
    mean = {"splits": len(done),
            "giou": sum(splits[n]["giou"] for n in done) / len(done),
            "ciou": sum(splits[n]["ciou"] for n in done) / len(done),
            "published_ciou": sum(published[n] for n in done) / len(done)}
    return {"checkpoint": results["checkpoint"], "benchmark": benchmark, "shards": str(shards),
            "shuffled_expressions": results["shuffled_expressions"], "splits": splits,
            "missing": [n for n in published if n not in found], "published_ciou": published, "mean": mean,
            "all": results["all"]}


if __name__ == "__main__":
    sys.exit(main())
