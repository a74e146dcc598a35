"""``wsi-asmil <stage> [options]``: every pipeline stage from one command.

Each stage is also ``python -m wsi_asmil.<package>.<module>``; this command only finds that module
and hands it the remaining arguments. Modules are imported on demand, so ``wsi-asmil segment``
never pays for importing torch.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

#: Subcommand -> the module whose ``main(argv)`` runs it, in pipeline order.
STAGES: dict[str, str] = {
    "synthetic": "wsi_asmil.synthetic.cli",
    "inventory": "wsi_asmil.slides.inventory",
    "segment": "wsi_asmil.tissue.segment",
    "annotations": "wsi_asmil.tissue.annotations",
    "tile": "wsi_asmil.features.tile",
    "features": "wsi_asmil.features.extract",
    "feature-batch": "wsi_asmil.features.batch",
    "split": "wsi_asmil.mil.split",
    "train": "wsi_asmil.mil.train",
    "scoring": "wsi_asmil.maps.scoring",
    "heatmap": "wsi_asmil.maps.heatmap",
    "localisation": "wsi_asmil.maps.localisation",
    "viewer": "wsi_asmil.report.viewer",
    "report": "wsi_asmil.report.build",
    "predict": "wsi_asmil.report.predict",
    "provenance": "wsi_asmil.pipeline.provenance",
    "vendor": "wsi_asmil.report.vendor",
    "console": "wsi_asmil.pipeline.console",
}


def _usage() -> str:
    width = max(map(len, STAGES))
    rows = "\n".join(f"  {name:<{width}}  python -m {module}" for name, module in STAGES.items())
    return (f"usage: wsi-asmil <stage> [options]   (wsi-asmil <stage> --help for a stage's options)\n\n"
            f"stages:\n{rows}\n")


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in {"-h", "--help"}:
        print(_usage())
        return 0
    if args[0] in {"-V", "--version"}:
        from wsi_asmil import __version__

        print(f"wsi-asmil {__version__}")
        return 0
    stage, rest = args[0], args[1:]
    if stage not in STAGES:
        print(f"wsi-asmil: unknown stage {stage!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    result = importlib.import_module(STAGES[stage]).main(rest)
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    raise SystemExit(main())
