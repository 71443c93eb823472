"""`workbench kernels report`: per-kernel evidence for one decode token of a model."""

from __future__ import annotations

import argparse
import json

REPORT_HELP = """\
Run one decode token of a model (default: smollm2, its real shapes and weights) through the
device backend on the CPU emulator with memory counters modelled on a GPU target, and print one
row per backend operation (role: "linear attn_q", "attention", ...) with the kernels it
launched: launches per token, bytes moved (whole memory segments of the target), the ideal
(each operation's inputs read once and outputs written once: weights, the KV positions
attended, activations), moved/ideal, global efficiency (bytes requested / moved), shared-memory
bank-conflict ways (1.00: none), VGPRs and occupancy in waves per SIMD on gfx90a (hipcc's
resource report; "n/a" with the reason when hipcc is missing), and the time floor: bytes moved
/ the target's peak bandwidth (MI300X for gfx942). A floor, not a prediction.

Method: the model is reduced to one layer of each kind (layers with the same tensor types and
shapes launch the same kernels at the same shapes; the first layer, which also normalizes the
embedding, is a kind of its own: SmolLM2's 30 layers are two kinds, 1 + 29), one
decode step and the greedy pick are run with counters, and a layer's rows are its counters
times the number of layers of its kind. Every figure comes from that emulator run.

--rev REV reports the kernels of a git revision driven by that revision's own launch code (its
workbench/ and kernels/ are exported to a temporary directory and run there), e.g. the kernels
before a change; --kernels-dir DIR reports the kernels in DIR with the running package's launch
code. The roles are the same names whatever kernels implement them, so tables line up.
"""


def register(actions: argparse._SubParsersAction) -> None:
    from workbench import store
    from workbench.engine.decode_report import DEFAULT_POSITION
    from workbench.kernels.instrument import TARGETS

    p = actions.add_parser(
        "report",
        help="bytes moved vs ideal, efficiency, VGPRs and time floor per kernel of a decode token",
        description=REPORT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model",
        default=store.DEFAULT_MODEL,
        help=f"known model name or .gguf path (default {store.DEFAULT_MODEL})",
    )
    p.add_argument(
        "--target",
        choices=tuple(TARGETS),
        default="gfx942",
        help="GPU whose segment size, banks and bandwidth are modelled (default gfx942, MI300X)",
    )
    p.add_argument("--warp", type=int, choices=(32, 64), help="warp width (default: the target's)")
    p.add_argument(
        "--position",
        type=_position,
        default=DEFAULT_POSITION,
        metavar="N",
        help=f"tokens already in the KV cache (default {DEFAULT_POSITION})",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--rev", metavar="GITREV", help="report the kernels of this git revision")
    src.add_argument(
        "--kernels-dir", metavar="DIR", help="report the kernels in DIR (a copy of kernels/)"
    )
    p.add_argument(
        "--no-resources", action="store_true", help="skip hipcc's VGPR and occupancy report"
    )
    p.add_argument(
        "--every-layer",
        action="store_true",
        help="run every layer, not one of each kind (slower; checks that the scaling holds)",
    )
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print one JSON object")
    out.add_argument("--markdown", action="store_true", help="print a markdown table")
    p.set_defaults(func=_report)


def _position(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a position is a whole number, not {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"a position is >= 0, not {value}")
    return value


def _report(args: argparse.Namespace) -> int:
    from workbench import store
    from workbench.cli.progress import phase_progress, pull_progress
    from workbench.engine import decode_report as dr
    from workbench.kernels.sanitize_report import text_table

    with pull_progress() as pulled:
        path = store.resolve(args.model, store.default_home(), progress=pulled)
    with phase_progress() as progress:
        report = dr.decode_report(
            path,
            target=args.target,
            warp_size=args.warp,
            position=args.position,
            resources=not args.no_resources,
            every_layer=args.every_layer,
            rev=args.rev,
            kernels=args.kernels_dir,
            progress=progress,
        )
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    elif args.markdown:
        print(dr.markdown(report))
    else:
        for line in dr.summary_lines(report):
            print(line)
        print()
        print(text_table(dr.COLUMNS, dr.table_rows(report)))
    return 0
