"""evfsam-eval-video: region J, boundary F and J&F of an EVF-SAM2 checkpoint on referring video splits.

    evfsam-eval-video --checkpoint CHECKPOINT --data ref-davis17=data/ref-davis:valid \
        ref-youtube-vos=data/ref-youtube-vos:train mevis=data/mevis:valid_u [--devices 2] \
        [--max-expressions N] --out results.json

Each `--data` item is `[name=]ROOT[:SPLIT]` (split default `valid`) in one of two layouts, told apart by
where the meta file is. Ref-DAVIS17 (as converted by ReferFormer) and Ref-YouTube-VOS:

    ROOT/SPLIT/JPEGImages/<video>/<frame>.jpg
    ROOT/SPLIT/Annotations/<video>/<frame>.png        (palette PNG, value = object id)
    ROOT/meta_expressions/SPLIT/meta_expressions.json  {"videos": {<video>: {"frames": [...],
                                                        "expressions": {<id>: {"exp": ..., "obj_id": ...}}}}}

MeViS (an expression may refer to several objects: its target is the union of their masks):

    ROOT/SPLIT/JPEGImages/<video>/<frame>.jpg
    ROOT/SPLIT/meta_expressions.json   {"videos": {<video>: {"frames": [...], "expressions": {<id>:
                                        {"exp": ..., "obj_id": [...], "anno_id": [...]}}}}}
    ROOT/SPLIT/mask_dict.json          {<anno_id>: [COCO RLE or null, one per frame of sorted(frames)]}

Every expression is one sequence: the text is read on the first frame, the object tracked forward (the
reference's `inference_video.py`), J and F computed per frame against the object's mask (DAVIS
definitions, training/video_metrics.py), J&F of the split = mean over its sequences of (mean J + mean F)/2.
Ref-DAVIS17 / Ref-YouTube-VOS: frames without an annotation file are not scored. MeViS: every frame is
scored, those where no referred object is present against an empty mask (as MeViS's own evaluation).
With --devices N, N CPU/GPU processes share the sequences (gloo/nccl) and rank 0 gathers them: the
results do not depend on N.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from evfsam_lightning.cli.errors import ArgumentParser, checkpoint_input, console_script


def parse_data(items: list[str]) -> list[tuple[str, Path, str]]:
    from evfsam_lightning.config import ConfigError

    out = []
    for item in items:
        name, _, rest = item.rpartition("=")
        root, _, split = rest.partition(":")
        split = split or "valid"
        root = Path(root)
        out.append((name or f"{root.name}_{split}", root, split))
    names = [n for n, _, _ in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"--data: split names repeat: {names}; name them with name=ROOT:SPLIT")
    return out


def _read_meta(meta_file: Path) -> dict:
    from evfsam_lightning.config import ConfigError

    try:
        videos = json.loads(meta_file.read_text())["videos"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ConfigError(f"{meta_file}: not a meta_expressions file with a 'videos' object ({e})") from e
    if not isinstance(videos, dict):
        raise ConfigError(f"{meta_file}: 'videos' is not an object")
    return videos


def load_sequences(name: str, root: Path, split: str, max_expressions: int | None = None) -> list[dict]:
    """The (video, expression, object) sequences of one split, checked before any model work. The layout
    is MeViS when ROOT/SPLIT/meta_expressions.json exists, Ref-DAVIS17 / Ref-YouTube-VOS otherwise."""
    from evfsam_lightning.config import ConfigError

    mevis_meta = root / split / "meta_expressions.json"
    if mevis_meta.is_file():
        return _mevis_sequences(name, root, split, mevis_meta, max_expressions)
    meta_file = root / "meta_expressions" / split / "meta_expressions.json"
    if not meta_file.is_file():
        raise ConfigError(f"{name}: {meta_file} not found, nor {mevis_meta} (layout: "
                          "ROOT/meta_expressions/SPLIT/meta_expressions.json for Ref-DAVIS17 / Ref-YouTube-VOS, "
                          "ROOT/SPLIT/meta_expressions.json for MeViS)")
    sequences = [{"split": name, "video": video, "expression_id": exp_id, "text": exp["exp"],
                  "obj_id": int(exp["obj_id"]), "frames": list(entry["frames"]), "frames_dir": str(frames_dir),
                  "annotations": str(root / split / "Annotations" / video)}
                 for video, entry, frames_dir, exp_id, exp in _expressions(name, root, split, meta_file, _read_meta(meta_file),
                                                                           ("exp", "obj_id"), "'exp' or 'obj_id'")]
    return _limited(sequences, name, meta_file, max_expressions)


def _expressions(name: str, root: Path, split: str, meta_file: Path, videos: dict, keys: tuple[str, ...], named: str):
    """(video, its meta entry, its frame folder, expression id, expression) of every expression of a
    meta_expressions.json, videos sorted by name and expressions by id, each holding `keys`."""
    from evfsam_lightning.config import ConfigError

    for video in sorted(videos):
        entry = videos[video]
        frames_dir = root / split / "JPEGImages" / video
        if not frames_dir.is_dir():
            raise ConfigError(f"{name}: video {video}: {frames_dir} not found")
        for exp_id in sorted(entry.get("expressions", {}), key=lambda k: (len(k), k)):
            exp = entry["expressions"][exp_id]
            if not set(keys) <= set(exp):
                raise ConfigError(f"{meta_file}: video {video} expression {exp_id} lacks {named}")
            yield video, entry, frames_dir, exp_id, exp


def _limited(sequences: list[dict], name: str, meta_file: Path, max_expressions: int | None) -> list[dict]:
    from evfsam_lightning.config import ConfigError

    if max_expressions:
        sequences = sequences[:max_expressions]
    if not sequences:
        raise ConfigError(f"{name}: {meta_file} lists no expressions")
    return sequences


def _mevis_sequences(name: str, root: Path, split: str, meta_file: Path, max_expressions: int | None) -> list[dict]:
    from evfsam_lightning.config import ConfigError

    mask_file = root / split / "mask_dict.json"
    if not mask_file.is_file():
        raise ConfigError(f"{name}: {mask_file} not found (MeViS ships masks for train and valid_u only; "
                          "valid's are withheld for the evaluation server)")
    videos = _read_meta(meta_file)
    masks = _mask_dict(str(mask_file))
    sequences = []
    for video, entry, frames_dir, exp_id, exp in _expressions(name, root, split, meta_file, videos,
                                                              ("exp", "obj_id", "anno_id"), "'exp', 'obj_id' or 'anno_id'"):
        frames = sorted(entry.get("frames", []))  # mask_dict lists are indexed by the sorted frame names
        anno_ids = [str(a) for a in exp["anno_id"]]
        for a in anno_ids:
            if a not in masks:
                raise ConfigError(f"{mask_file}: anno_id {a} (video {video} expression {exp_id}) not found")
            if len(masks[a]) != len(frames):
                raise ConfigError(f"{mask_file}: anno_id {a} has {len(masks[a])} masks for the {len(frames)} "
                                  f"frames of video {video}")
        sequences.append({"split": name, "video": video, "expression_id": exp_id, "text": exp["exp"],
                          "obj_id": [int(o) for o in exp["obj_id"]], "anno_id": anno_ids, "frames": frames,
                          "frames_dir": str(frames_dir), "mask_dict": str(mask_file)})
    return _limited(sequences, name, meta_file, max_expressions)


_MASK_DICTS: dict[str, dict] = {}


def _mask_dict(path: str) -> dict:
    """A MeViS mask_dict.json, read once per process."""
    from evfsam_lightning.config import ConfigError

    if path not in _MASK_DICTS:
        try:
            masks = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not JSON ({e})") from e
        if not isinstance(masks, dict) or not all(isinstance(v, list) for v in masks.values()):
            raise ConfigError(f"{path}: not a mask_dict (anno_id -> list of per-frame RLE or null)")
        _MASK_DICTS[path] = masks
    return _MASK_DICTS[path]


def _ground_truth(seq: dict, index: int, name: str, hw: tuple[int, int]) -> np.ndarray | None:
    """The target of frame `name` (position `index` in the sequence's frames), or None when unscored."""
    if "mask_dict" in seq:  # MeViS: union of the referred objects; null = absent on that frame
        from evfsam_lightning.data.sources.common import decode_coco_segmentation

        masks = _mask_dict(seq["mask_dict"])
        target = np.zeros(hw, dtype=bool)
        for a in seq["anno_id"]:
            rle = masks[a][index]
            if rle is not None:
                try:
                    target |= decode_coco_segmentation(rle, *hw) > 0
                except ValueError as e:
                    raise ValueError(f"{seq['mask_dict']}: anno_id {a} frame {name}: {e}") from e
        return target
    ann = Path(seq["annotations"]) / f"{name}.png"
    if not ann.is_file():
        return None
    return np.asarray(Image.open(ann)) == seq["obj_id"]


def evaluate_sequence(video_model, seq: dict) -> dict:
    from evfsam_lightning.models.video_io import ArrayFrames, FolderFrames
    from evfsam_lightning.training.video_metrics import boundary_f, region_j

    folder = FolderFrames(seq["frames_dir"])
    by_stem = {p.stem: p for p in folder.files}
    listed = [(i, f) for i, f in enumerate(seq["frames"]) if f in by_stem]
    files = [by_stem[f] for _, f in listed]

    class _Listed(ArrayFrames):  # the meta file's frames, in its order, read one at a time
        def __init__(self):
            self.frames = files
            self.video_hw = folder.video_hw

        def pil(self, index):
            with Image.open(files[index]) as im:
                return im.convert("RGB")

    js, fs = [], []
    for t, logits in video_model.track(_Listed(), [seq["text"]], 0, direction="forward"):
        pred = (logits[1] > 0).cpu().numpy()
        gt = _ground_truth(seq, listed[t][0], listed[t][1], pred.shape)
        if gt is None:
            continue
        js.append(region_j(pred, gt))
        fs.append(boundary_f(pred, gt))
    j = float(np.mean(js)) if js else float("nan")
    f = float(np.mean(fs)) if fs else float("nan")
    return {**{k: seq[k] for k in ("split", "video", "expression_id", "obj_id")}, "J": j, "F": f,
            "JF": (j + f) / 2, "frames_scored": len(js)}


def summarise(results: list[dict], names: list[str]) -> dict:
    out = {}
    for name in names:
        rows = [r for r in results if r["split"] == name and r["frames_scored"] > 0]
        if rows:
            out[name] = {"J": float(np.mean([r["J"] for r in rows])), "F": float(np.mean([r["F"] for r in rows])),
                         "JF": float(np.mean([r["JF"] for r in rows])), "sequences": len(rows)}
        else:
            out[name] = {"J": float("nan"), "F": float("nan"), "JF": float("nan"), "sequences": 0}
    return out


def _worker(rank: int, world: int, port: int, args, sequences: list[dict], queue=None) -> list[dict]:
    import torch

    if world > 1:
        import torch.distributed as dist

        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(port)
        dist.init_process_group("gloo", rank=rank, world_size=world)
    from evfsam_lightning.models.sam2_video import EvfSam2Video
    from evfsam_lightning.training.loading import load_for_inference

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    model, tokenizer = load_for_inference(args.checkpoint, args.device)
    model.eval()
    video_model = EvfSam2Video(model, tokenizer)
    mine = [evaluate_sequence(video_model, s) for i, s in enumerate(sequences) if i % world == rank]
    if world > 1:
        import torch.distributed as dist

        gathered = [None] * world
        dist.all_gather_object(gathered, mine)
        dist.destroy_process_group()
        mine = [r for part in gathered for r in part]
        if rank == 0 and queue is not None:
            queue.put(mine)
    return mine


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@console_script("evfsam-eval-video")
def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="evfsam-eval-video", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="EVF-SAM2 training checkpoint or official-layout folder")
    p.add_argument("--data", nargs="+", required=True, help="[name=]ROOT[:SPLIT], one per split")
    p.add_argument("--devices", type=int, default=1, help="processes sharing the sequences")
    p.add_argument("--device", default="cpu", help="torch device of every process")
    p.add_argument("--max-expressions", type=int, default=None, help="only the first N sequences per split")
    p.add_argument("--out", help="write the per-sequence and per-split results as JSON")
    args = p.parse_args(argv)

    from evfsam_lightning.config import ConfigError

    if args.devices < 1:
        raise ConfigError(f"--devices must be >= 1 (got {args.devices})")
    splits = parse_data(args.data)
    sequences = [s for name, root, split in splits for s in load_sequences(name, root, split, args.max_expressions)]
    checkpoint_input(args.checkpoint)
    if args.devices == 1:
        results = _worker(0, 1, 0, args, sequences)
    else:
        import torch.multiprocessing as mp

        ctx = mp.get_context("spawn")
        queue = ctx.SimpleQueue()
        port = _free_port()
        procs = [ctx.Process(target=_worker, args=(r, args.devices, port, args, sequences, queue))
                 for r in range(args.devices)]
        for proc in procs:
            proc.start()
        results = None
        while results is None:  # rank 0 sends the gathered results; a failed rank ends the wait
            if not queue.empty():
                results = queue.get()
            elif any(proc.exitcode not in (None, 0) for proc in procs) or all(not proc.is_alive() for proc in procs):
                if queue.empty():
                    break
            else:
                time.sleep(0.2)
        for proc in procs:
            proc.join()
        if results is None or any(proc.exitcode for proc in procs):
            print("evfsam-eval-video: a rank failed (its traceback is above)", file=sys.stderr)
            return 1
    names = [n for n, _, _ in splits]
    summary = summarise(results, names)
    width = max(len(n) for n in names)
    print(f"{'split':<{width}}  {'J&F':>6}  {'J':>6}  {'F':>6}  sequences")
    for name, r in summary.items():
        print(f"{name:<{width}}  {100 * r['JF']:6.2f}  {100 * r['J']:6.2f}  {100 * r['F']:6.2f}  {r['sequences']}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"checkpoint": str(args.checkpoint), "splits": summary,
                                              "sequences": results}, indent=2))
        print(f"results written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
