"""evfsam-train: train EVF-SAM from a recipe.

    evfsam-train recipes/quickstart.yaml                       # tiny model, synthetic data, CPU
    evfsam-train recipes/evfsam_refcoco.yaml trainer.devices=8 optim.lr=1e-4
    evfsam-train --help-config                                 # every key with its meaning

Runs resume automatically from the newest complete checkpoint in <root_dir>/<name>/checkpoints
(`checkpoint.resume=false` to start over, or a path).

On SIGUSR1 or SIGTERM the run saves a complete checkpoint at the next optimizer step and exits:
code 0 once it requeued its SLURM job, 75 (EX_TEMPFAIL) otherwise (run the same command to resume).
"""

from __future__ import annotations

import argparse
import sys

from evfsam_lightning.config import ConfigError, help_text, load
from evfsam_lightning.training.signals import install_signal_handlers


def main(argv: list[str] | None = None) -> int:
    # First thing: a preemption signal during start-up must not kill the process (saved at step 1).
    install_signal_handlers()
    p = argparse.ArgumentParser(prog="evfsam-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", nargs="?", help="recipe YAML (see recipes/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. trainer.max_steps=100")
    p.add_argument("--help-config", action="store_true", help="print every config key with its help and exit")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args = p.parse_args(argv)
    if args.help_config:
        print(help_text())
        return 0
    if not args.recipe:
        p.error("a recipe is required (e.g. recipes/quickstart.yaml)")
    try:
        cfg = load(args.recipe, args.overrides)
    except ConfigError as e:
        print(f"evfsam-train: config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        from evfsam_lightning.config import to_yaml

        print(to_yaml(cfg))
        return 0
    from evfsam_lightning.training.callbacks import CheckpointWriteError
    from evfsam_lightning.training.preemption import preemption_exit_code
    from evfsam_lightning.training.run import launch_rank, train

    try:
        code = preemption_exit_code(train(cfg))
    except ConfigError as e:  # found once the run looks at its files (pretrained folder, shard sizes)
        print(f"evfsam-train: config error: {e}", file=sys.stderr)
        return 2
    except CheckpointWriteError as e:  # disk full, quota, I/O error: every rank raises it, rank 0 says it
        if launch_rank(cfg.trainer.devices) == 0:
            print(f"evfsam-train: error: {e}", file=sys.stderr)
        return 1
    return 0 if code is None else code


if __name__ == "__main__":
    sys.exit(main())
