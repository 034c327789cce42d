"""Command line: ``python -m lora_jax <command> ...``.

Commands live with their concept and register here: each module offers
``add_<name>_command(subparsers)``, whose parser sets ``func`` (parsed args
-> exit status). To add a command, write that function and call it in
`build_parser`.

  plan      memory and storage of a LoRA run vs full fine-tuning (presets)
  inspect   a checkpoint's config, entries and the spectra of its adapters
"""

from __future__ import annotations

import argparse
import sys

from lora_jax._plan import add_plan_command


def add_inspect_command(subparsers) -> None:
    """Registers ``inspect``: checkpoint metadata, then the adapters' spectra."""
    p = subparsers.add_parser(
        "inspect", help="a checkpoint's config, entries and adapter spectra",
        description="Print a checkpoint's config and entries (lj.inspect) and, unless "
                    "--no-spectra, the singular-value summary of its adapters (lj.analyze).")
    p.add_argument("directory", help="the checkpoint root passed to lj.save")
    p.add_argument("--step", type=int, default=None, help="default: the latest")
    p.add_argument("--no-spectra", action="store_true",
                   help="metadata only (does not read the arrays)")
    p.set_defaults(func=_run_inspect)


def _run_inspect(args) -> int:
    from lora_jax._analysis import spectra_summary
    from lora_jax._checkpoint import inspect

    print(inspect(args.directory, step=args.step))
    if not args.no_spectra:
        print()
        print(spectra_summary(args.directory, step=args.step))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lora_jax",
                                     description="lora_jax command line tools.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_plan_command(sub)
    add_inspect_command(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:   # ours (CheckpointError included) say what and how to fix
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
