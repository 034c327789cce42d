"""Command line: ``python -m lora_jax <command> ...``.

Commands live with their concept and register here: each module offers
``add_<name>_command(subparsers)``, whose parser sets ``func`` (parsed args
-> exit status). To add a command, write that function and call it in
`build_parser`.

  plan         memory and storage of a LoRA run vs full fine-tuning (presets)
  inspect      a checkpoint's config, entries and the spectra of its adapters
  merge        fold a checkpoint's adapter into base params: W + s*A@B
  export-peft  write a checkpoint's adapter as a PEFT adapter (safetensors)
  import-peft  read a PEFT adapter into a lora_jax checkpoint

Base params (BASE arguments) are files of one array per '/'-path, as
``lj.interop.save_params`` writes them: ``.safetensors`` or ``.npz`` with keys
like ``params/block_0/attn/q/kernel``, or an Orbax ``StandardCheckpointer``
directory holding the params tree.

A user error (a bad argument or file: lora_jax's ValueError / TypeError /
CheckpointError, or an OSError such as a missing folder) prints one line,
``error: <what>. Fix: <how>.``, on stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

import jax.numpy as jnp

import lora_jax as lj
from lora_jax._analysis.analyze import spectra_summary
from lora_jax._analysis.plan import add_plan_command
from lora_jax._checkpoint.api import checkpoint_info
from lora_jax._core.errors import error
from lora_jax.interop import KEY_MAPS


def add_inspect_command(subparsers) -> None:
    """Registers ``inspect``: checkpoint metadata, then the adapters' spectra."""
    p = subparsers.add_parser(
        "inspect", help="a checkpoint's config, entries and adapter spectra",
        description="Print a checkpoint's config and entries (lj.checkpoint_info) and, unless "
                    "--no-spectra, the singular-value summary of its adapters (lj.analyze).")
    p.add_argument("directory", help="the checkpoint root passed to lj.save")
    p.add_argument("--step", type=int, default=None, help="default: the latest")
    p.add_argument("--no-spectra", action="store_true",
                   help="metadata only (does not read the arrays)")
    p.set_defaults(func=_run_inspect)


def _run_inspect(args) -> int:
    print(checkpoint_info(args.directory, step=args.step))
    if not args.no_spectra:
        print()
        print(spectra_summary(args.directory, step=args.step))
    return 0


_BASE_HELP = ("base params: a .safetensors/.npz file keyed by '/'-paths "
              "(lj.interop.save_params) or an Orbax StandardCheckpointer directory")
_KEY_MAP_HELP = ("our paths -> Hugging Face names: a preset (llama, gpt2, bert) or "
                 "'module:ATTRIBUTE' naming a lj.interop.KeyMap")


def _key_map(spec: str, command: str):
    """``--key-map``: a preset name, or ``module:ATTRIBUTE`` naming a KeyMap."""
    where = f"{command} --key-map"
    if spec in KEY_MAPS:
        return spec
    if ":" in spec:
        module, _, attr = spec.partition(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise error(where, f"{spec}: can't load it ({e})",
                        f"use a preset {sorted(KEY_MAPS)} or an importable "
                        f"'module:ATTRIBUTE'") from e
    raise error(where, f"{spec}: not a preset {sorted(KEY_MAPS)} and not 'module:ATTRIBUTE'",
                "pass a preset name, or 'module:ATTRIBUTE' naming a lj.interop.KeyMap")


def add_merge_command(subparsers) -> None:
    """Registers ``merge``: restore (checking the base fingerprint), merge, write."""
    p = subparsers.add_parser(
        "merge", help="fold a checkpoint's adapter into base params",
        description="Restore the adapter onto BASE (shapes and base fingerprint checked), "
                    "compute W + s*A@B in float32 (lj.merge) and write the merged params to "
                    "OUT (.safetensors or .npz, keyed by '/'-paths).")
    p.add_argument("checkpoint", help="the checkpoint root passed to lj.save")
    p.add_argument("--base", required=True, help=_BASE_HELP)
    p.add_argument("--out", required=True, help="output params file (.safetensors or .npz)")
    p.add_argument("--step", type=int, default=None, help="default: the latest")
    p.add_argument("--on-base-mismatch", choices=("error", "warn", "ignore"), default="error",
                   help="when BASE is not the base the adapter was trained on")
    p.set_defaults(func=_run_merge)


def _run_merge(args) -> int:
    base = lj.interop.load_params(args.base)
    adapters, config = lj.restore(args.checkpoint, params=base, step=args.step,
                                  on_base_mismatch=args.on_base_mismatch)
    lj.interop.save_params(args.out, lj.merge(base, adapters, config))
    print(f"merged {len(lj.describe(base, config).specs)} adapted weights into {args.out}")
    return 0


def add_export_peft_command(subparsers) -> None:
    """Registers ``export-peft``: a checkpoint step as a PEFT adapter folder."""
    p = subparsers.add_parser(
        "export-peft", help="write a checkpoint's adapter in PEFT's format",
        description="Write adapter_config.json + adapter_model.safetensors that "
                    "peft.PeftModel.from_pretrained loads (lj.export_peft).")
    p.add_argument("checkpoint", help="the checkpoint root passed to lj.save")
    p.add_argument("out", help="output folder")
    p.add_argument("--key-map", required=True, help=_KEY_MAP_HELP)
    p.add_argument("--base", default=None,
                   help=_BASE_HELP + "; optional: checks the adapter against it, records the "
                                     "base fingerprint, needed for fully-trained leaves")
    p.add_argument("--step", type=int, default=None, help="default: the latest")
    p.add_argument("--adapter-name", default="default",
                   help="a name other than 'default' writes into OUT/<name>")
    p.add_argument("--task-type", default=None, help="PEFT task_type, e.g. CAUSAL_LM")
    p.add_argument("--base-model-name-or-path", default=None,
                   help="recorded in adapter_config.json")
    p.add_argument("--overwrite", action="store_true", help="replace existing adapter files")
    p.set_defaults(func=_run_export_peft)


def _run_export_peft(args) -> int:
    base = lj.interop.load_params(args.base) if args.base else None
    adapters, config = lj.restore(args.checkpoint, params=base, step=args.step)
    key_map = _key_map(args.key_map, "export-peft")
    folder = lj.export_peft(args.out, adapters, config, key_map=key_map,
                            params=base, adapter_name=args.adapter_name,
                            task_type=args.task_type,
                            base_model_name_or_path=args.base_model_name_or_path,
                            overwrite=args.overwrite)
    print(f"wrote a PEFT adapter to {folder}")
    return 0


def add_import_peft_command(subparsers) -> None:
    """Registers ``import-peft``: a PEFT adapter folder as a lora_jax checkpoint."""
    p = subparsers.add_parser(
        "import-peft", help="read a PEFT adapter into a lora_jax checkpoint",
        description="Read a PEFT LoRA adapter (safetensors only) for BASE (lj.import_peft) "
                    "and save it, with BASE's fingerprint, as a checkpoint step (lj.save).")
    p.add_argument("peft_dir", help="the folder PEFT's save_pretrained wrote")
    p.add_argument("checkpoint", help="the checkpoint root to write")
    p.add_argument("--base", required=True, help=_BASE_HELP)
    p.add_argument("--key-map", required=True, help=_KEY_MAP_HELP)
    p.add_argument("--adapter-name", default="default",
                   help="read PEFT_DIR/<name> for an adapter other than 'default'")
    p.add_argument("--step", type=int, default=None,
                   help="the step to write (default: after the latest, or 0)")
    p.add_argument("--dtype", default=None, help="convert A and B, e.g. float32 or bfloat16")
    p.set_defaults(func=_run_import_peft)


def _run_import_peft(args) -> int:
    base = lj.interop.load_params(args.base)
    key_map = _key_map(args.key_map, "import-peft")
    adapters, config = lj.import_peft(args.peft_dir, base, key_map=key_map,
                                      adapter_name=args.adapter_name,
                                      dtype=jnp.dtype(args.dtype) if args.dtype else None)
    step = lj.save(args.checkpoint, adapters, config, step=args.step, params=base)
    print(f"imported {len(lj.describe(base, config).specs)} adapted weights into "
          f"{args.checkpoint} step {step}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lora_jax",
                                     description="lora_jax command line tools.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_plan_command(sub)
    add_inspect_command(sub)
    add_merge_command(sub)
    add_export_peft_command(sub)
    add_import_peft_command(sub)
    return parser


# What a user's input or files can cause; lora_jax's messages say what and how to
# fix it, so the command prints that one line instead of a traceback. Anything
# else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, TypeError, lj.CheckpointError, OSError)


def main(argv=None) -> int:
    """Runs one command; a user error prints ``error: <message>`` (one line) on
    stderr and returns 2."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as e:
        text = " ".join(str(e).split()) or type(e).__name__
        print(f"error: {text}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
