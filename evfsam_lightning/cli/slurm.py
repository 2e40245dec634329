"""evfsam-slurm: render the SLURM batch script of a recipe, check it, and submit it.

    evfsam-slurm submit recipes/evfsam_refcoco.yaml --nodes 4 --gpus-per-node 8 --time 24:00:00 \\
        strategy.name=deepspeed strategy.zero_stage=3 --dry-run      # print the script only
    evfsam-slurm submit recipes/quickstart.yaml --nodes 2 --gpus-per-node 0 trainer.devices=2

The script comes from slurm/train.sbatch (or --template). `trainer.num_nodes` and `trainer.devices`
are set from --nodes and --gpus-per-node (from the recipe's trainer.devices on CPU, G=0), one task
per device; the recipe must agree (global batch divisible by micro-batch x devices x nodes, the
accelerator matching G). The job is named after the run and logs to <root_dir>/<name>/slurm/, and
a requeued job resumes from the run's newest complete checkpoint. Prints the job id on stdout.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from evfsam_lightning.cli.errors import ArgumentParser, UserError, console_script
from evfsam_lightning.config import ConfigError, RunConfig, load

DEFAULT_TEMPLATE = Path(__file__).resolve().parents[2] / "slurm" / "train.sbatch"
DEFAULT_SIGNAL_SECONDS = 180
_FIELD = re.compile(r"\{\{(\w+)\}\}")
_DERIVED_KEYS = ("trainer.num_nodes", "trainer.devices")


class LaunchError(ValueError):
    """The batch script and the recipe disagree, or the request cannot be rendered."""


@dataclass
class Job:
    """What a batch script asks SLURM for (None: the cluster's default)."""

    nodes: int
    gpus_per_node: int
    partition: str | None = None
    time: str | None = None
    account: str | None = None
    cpus_per_task: int | None = None
    signal_seconds: int = DEFAULT_SIGNAL_SECONDS


def slurm_time_seconds(text: str) -> int:
    """Seconds of a SLURM time limit: M, M:S, H:M:S, D-H, D-H:M or D-H:M:S."""
    days, _, clock = text.rpartition("-")  # no "-": days == ""
    parts = clock.split(":")
    if not all(p.isdigit() for p in parts) or (days and not days.isdigit()) or len(parts) > 3:
        raise LaunchError(f"--time {text!r} is not a SLURM time (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S)")
    values = [int(p) for p in parts]
    if days:  # D-H, D-H:M, D-H:M:S
        h, m, s = (values + [0, 0])[:3]
        return ((int(days) * 24 + h) * 60 + m) * 60 + s
    if len(values) == 1:
        return values[0] * 60
    if len(values) == 2:
        return values[0] * 60 + values[1]
    return (values[0] * 60 + values[1]) * 60 + values[2]


def _key(override: str) -> str:
    return override.split("=", 1)[0].strip()


def _recipe_devices(recipe: str | Path, given: dict[str, str]) -> int:
    """trainer.devices of the recipe with the user's overrides (before any validation)."""
    if "trainer.devices" in given:
        value = given["trainer.devices"]
    else:
        from evfsam_lightning.config import _load_recipe

        value = OmegaConf.select(_load_recipe(Path(recipe)), "trainer.devices", default=1)
    try:
        return int(value)
    except ValueError:
        raise LaunchError(f"trainer.devices={value!r} is not a number") from None


def plan_overrides(recipe: str | Path, job: Job, overrides: list[str]) -> tuple[RunConfig, list[str]]:
    """The run config the job will train and the overrides that give it: `trainer.num_nodes` and
    `trainer.devices` first (from the job), then the user's. Raises LaunchError on disagreement."""
    given = {_key(o): o.split("=", 1)[1].strip() for o in overrides if "=" in o}
    devices = job.gpus_per_node if job.gpus_per_node > 0 else _recipe_devices(recipe, given)
    for key, wanted in (("trainer.num_nodes", job.nodes), ("trainer.devices", devices)):
        if key in given and given[key] != str(wanted):
            raise LaunchError(f"{key}={given[key]} disagrees with the job ({wanted}): leave it out, "
                              "--nodes and --gpus-per-node set it")
    final = [f"trainer.num_nodes={job.nodes}", f"trainer.devices={devices}"]
    final += [o for o in overrides if _key(o) not in _DERIVED_KEYS]
    try:
        cfg = load(recipe, final)
    except ConfigError as e:  # e.g. the global batch does not divide over the job's ranks
        raise LaunchError(f"{e} (with --nodes {job.nodes}, {devices} tasks per node)") from None
    accelerator = cfg.trainer.accelerator
    if job.gpus_per_node > 0 and accelerator == "cpu":
        raise LaunchError(f"trainer.accelerator=cpu but --gpus-per-node {job.gpus_per_node}: use gpu or auto")
    if job.gpus_per_node == 0 and accelerator in ("gpu", "cuda"):
        raise LaunchError(f"trainer.accelerator={accelerator} but --gpus-per-node 0: use cpu, or ask for GPUs")
    if cfg.world_size != job.nodes * devices:
        raise LaunchError(f"the run would have {cfg.world_size} ranks, the job {job.nodes * devices} tasks")
    return cfg, final


def render_batch_script(recipe: str | Path, job: Job, overrides: list[str] = (), *,
                        template: str | Path = DEFAULT_TEMPLATE, python: str = sys.executable,
                        workdir: str | Path | None = None) -> tuple[str, RunConfig]:
    """The batch script of `recipe` run as `job` (and the run config it trains), after checking
    that the two agree. Relative paths of the recipe resolve against `workdir` (default: cwd)."""
    if job.nodes < 1:
        raise LaunchError(f"--nodes {job.nodes} must be at least 1")
    if job.gpus_per_node < 0:
        raise LaunchError(f"--gpus-per-node {job.gpus_per_node} must be 0 (CPU) or more")
    if job.time is not None and job.signal_seconds >= slurm_time_seconds(job.time):
        raise LaunchError(f"--signal-seconds {job.signal_seconds} is not shorter than --time {job.time}: "
                          "the run would be told to stop as it starts")
    workdir = Path(workdir or os.getcwd()).resolve()
    recipe_path = (workdir / recipe).resolve()
    if not recipe_path.is_file():
        load(recipe_path)  # the recipe loader's one-line error (missing, a directory)
    cfg, final = plan_overrides(recipe_path, job, list(overrides))
    run_dir = (workdir / cfg.run_dir).resolve()
    fields = {
        "job_name": cfg.name,
        "nodes": job.nodes,
        "tasks_per_node": cfg.trainer.devices,
        "gpus_per_node": job.gpus_per_node or None,
        "cpus_per_task": job.cpus_per_task or cfg.data.num_workers + 1,
        "partition": job.partition,
        "account": job.account,
        "time": job.time,
        "signal_seconds": job.signal_seconds,
        "log_dir": run_dir / "slurm",
        "workdir": workdir,
        "python": shlex.quote(python),
        "recipe": shlex.quote(str(recipe_path)),
        "overrides": " ".join(shlex.quote(o) for o in final),
    }
    try:
        text = Path(template).read_text()
    except OSError as e:
        raise LaunchError(f"cannot read the batch template {template}: {e}") from None
    return _fill(text, fields), cfg


def _fill(template: str, fields: dict) -> str:
    lines = []
    for line in template.splitlines():
        names = _FIELD.findall(line)
        unknown = [n for n in names if n not in fields]
        if unknown:
            raise LaunchError(f"the batch template has unknown fields: {', '.join(unknown)}")
        if any(fields[n] is None for n in names):
            if not line.startswith("#SBATCH"):
                raise LaunchError(f"a required field of the batch template is empty: {line.strip()}")
            line = "#" + line  # `##SBATCH` is ignored by sbatch: the cluster's default applies
        lines.append(_FIELD.sub(lambda m: "" if fields[m.group(1)] is None else str(fields[m.group(1)]), line))
    return "\n".join(lines) + "\n"


def submit(script: str, run_dir: Path) -> str:
    """Write the script to <run_dir>/slurm/train.sbatch, `sbatch` it and return the job id."""
    log_dir = run_dir / "slurm"
    log_dir.mkdir(parents=True, exist_ok=True)  # SLURM does not create the --output folder
    path = log_dir / "train.sbatch"
    path.write_text(script)
    try:
        result = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise LaunchError("sbatch not found: run this on a SLURM login node (or use --dry-run)") from None
    if result.returncode != 0:
        raise LaunchError(f"sbatch failed ({result.returncode}): {result.stderr.strip() or result.stdout.strip()}")
    return result.stdout.strip().split(";")[0]


def _submit_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="evfsam-slurm submit", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", help="recipe YAML (see recipes/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides for the recipe, e.g. optim.lr=1e-4")
    p.add_argument("--nodes", type=int, required=True, help="nodes (trainer.num_nodes)")
    p.add_argument("--gpus-per-node", type=int, required=True,
                   help="GPUs per node = tasks per node (trainer.devices); 0: CPU, tasks = the recipe's devices")
    p.add_argument("--partition", help="SLURM partition (default: the cluster's)")
    p.add_argument("--time", help="time limit, SLURM format (e.g. 24:00:00 or 2-00:00:00)")
    p.add_argument("--account", help="SLURM account to charge")
    p.add_argument("--cpus-per-task", type=int, help="CPUs per task (default: data.num_workers + 1)")
    p.add_argument("--signal-seconds", type=int, default=DEFAULT_SIGNAL_SECONDS,
                   help="USR1 this long before the time limit: save and requeue (default: %(default)s)")
    p.add_argument("--python", default=sys.executable, help="python on the nodes (default: this one)")
    p.add_argument("--template", default=str(DEFAULT_TEMPLATE), help="batch script template")
    p.add_argument("--dry-run", action="store_true", help="print the batch script, submit nothing")
    return p


@console_script("evfsam-slurm")
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: evfsam-slurm submit RECIPE --nodes N --gpus-per-node G [options] [key=value ...]\n")
        print(__doc__)
        return 0 if argv else 2
    if argv[0] != "submit":
        raise UserError(f"unknown command {argv[0]!r} (known: submit)")
    args = _submit_parser().parse_intermixed_args(argv[1:])
    job = Job(nodes=args.nodes, gpus_per_node=args.gpus_per_node, partition=args.partition, time=args.time,
              account=args.account, cpus_per_task=args.cpus_per_task, signal_seconds=args.signal_seconds)
    try:
        script, cfg = render_batch_script(args.recipe, job, args.overrides, template=args.template,
                                          python=args.python)
        if args.dry_run:
            print(script, end="")
            return 0
        run_dir = cfg.run_dir.resolve()
        job_id = submit(script, run_dir)
    except (LaunchError, ConfigError) as e:
        raise UserError(str(e)) from None
    print(f"submitted job {job_id} for run {cfg.name}: log {run_dir / 'slurm'}/{cfg.name}-{job_id}.out",
          file=sys.stderr)
    print(job_id)
    return 0


if __name__ == "__main__":
    sys.exit(main())
