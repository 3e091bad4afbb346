"""
Draw the report's "MegaContext curves" section (mc/ops/report_curves.py: baseline vs MC loss, LOD mix, ΔNLL
over training) for this run, optionally with other runs overlaid, then stitch the report as usual.

    python -m scripts.mc_curves --compare ~/runs/vanilla     # another run's NANOCHAT_BASE_DIR, report dir or curve file
    python -m nanochat.report generate

MC base training logs the section by itself at its end; this command redraws it (e.g. with a vanilla run
to compare against).
"""

import argparse

from mc.ops.report_curves import log_curves_section
from nanochat.common import die
from nanochat.report import get_report


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0], allow_abbrev=False)
    p.add_argument("--compare", action="append", default=[], metavar="PATH",
                   help="another run to overlay (its NANOCHAT_BASE_DIR, report folder or curve .jsonl; repeatable)")
    args = p.parse_args(argv)
    try:
        path = log_curves_section(get_report(), args.compare)
    except FileNotFoundError as e:
        die(str(e))
    print(f"MegaContext curves: {path}" if path else "MegaContext curves: nothing to draw (a vanilla run, nothing "
          "compared): pass --compare PATH with an MC run")
    return path


if __name__ == "__main__":
    main()
