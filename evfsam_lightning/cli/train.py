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

import sys
from argparse import RawDescriptionHelpFormatter

from evfsam_lightning.cli.errors import ArgumentParser, console_script
from evfsam_lightning.config import ConfigError, help_text, load
from evfsam_lightning.training.signals import install_signal_handlers


@console_script("evfsam-train")
def main(argv: list[str] | None = None) -> int:
    # First thing: a preemption signal during start-up must not kill the process (saved at step 1).
    install_signal_handlers()
    p = ArgumentParser(prog="evfsam-train", description=__doc__, formatter_class=RawDescriptionHelpFormatter)
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
    cfg = load(args.recipe, args.overrides)  # a ConfigError is one line, exit 2 (cli/errors.py)
    if args.print_config:
        from evfsam_lightning.config import to_yaml

        print(to_yaml(cfg))
        return 0
    from evfsam_lightning.training.preflight import preflight

    # Every file the run needs, before Lightning is imported or the model built (train() checks again);
    # before the device check too, so that a recipe's missing files show on any machine.
    preflight(cfg)
    if cfg.trainer.accelerator in ("gpu", "cuda"):
        import torch

        if not torch.cuda.is_available():
            why = "this torch is a CPU-only build" if torch.version.cuda is None else "torch sees no CUDA device"
            raise ConfigError(f"trainer.accelerator={cfg.trainer.accelerator}: {why} (use trainer.accelerator=cpu "
                              "or auto)")
    from evfsam_lightning.training.preemption import preemption_exit_code
    from evfsam_lightning.training.run import train

    try:
        code = preemption_exit_code(train(cfg))
    except Exception as e:  # a collective failing because another rank died: name it, in one line
        from evfsam_lightning.cli.errors import debug_requested
        from evfsam_lightning.training.peers import is_peer_loss, lost_peer_message

        if not is_peer_loss(e) or debug_requested(argv or []):
            raise
        print(f"evfsam-train: error: {lost_peer_message(e)}", file=sys.stderr, flush=True)
        return 1
    return 0 if code is None else code


if __name__ == "__main__":
    sys.exit(main())
