"""evfsam-demo: a local web demo (Gradio) of a checkpoint.

    evfsam-demo --checkpoint exported/quickstart [--port 7860] [--host 127.0.0.1]

Upload or pick an image, type one or more expressions (one per line), tick `[semantic]` for
semantic-level prompts, press Segment: the masks appear overlaid and as PNG downloads. Accepts every
checkpoint `evfsam-predict` does, and an ONNX export folder (`evfsam-export --format onnx`).
Nothing leaves the machine: Gradio analytics are off and no share link is made.
"""

from __future__ import annotations

import os
import sys
from argparse import RawDescriptionHelpFormatter
from pathlib import Path

from evfsam_lightning.cli.errors import ArgumentParser, checkpoint_input, console_script


@console_script("evfsam-demo")
def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="evfsam-demo", description=__doc__, formatter_class=RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint, exported folder, run directory or ONNX export")
    p.add_argument("--port", type=int, default=7860, help="port to serve on (default 7860)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 to serve the network)")
    args = p.parse_args(argv)
    if not 0 < args.port < 65536:
        p.error(f"--port {args.port} is not a TCP port (1-65535)")
    if not (Path(args.checkpoint) / "onnx_config.json").is_file():  # an ONNX export has no config.json
        checkpoint_input(args.checkpoint)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

    from evfsam_lightning.deploy.demo import build_demo, import_gradio, offline_theme, predictor_for

    import_gradio()  # a missing extra is a config error before the model is loaded
    predict, title = predictor_for(args.checkpoint)
    demo = build_demo(predict, title=title)
    demo.queue().launch(server_name=args.host, server_port=args.port, share=False, ssr_mode=False,
                        theme=offline_theme(), allowed_paths=[str(demo.evfsam_work_dir)], footer_links=[])
    return 0


if __name__ == "__main__":
    sys.exit(main())
