"""Entry point of ``mosa-retrofit``: builds the parser from the subcommand modules and dispatches."""

from __future__ import annotations

import argparse
import signal
import sys

from safetensors import SafetensorError

from . import (
    bench,
    convert,
    evaluate,
    generate,
    inspect_model,
    long_context,
    study,
    train,
)

# name -> module with add_parser(subparsers) and run(args)
COMMANDS = {"convert": convert, "inspect": inspect_model, "train": train, "eval": evaluate, "long": long_context,
            "generate": generate, "bench": bench, "study": study}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mosa-retrofit",
        description="Convert pretrained causal LMs to Mixture of Sparse Attention (MoSA), adapt and measure them.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in dict.fromkeys(COMMANDS.values()):
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) > 1 and argv[0] == "bench" and not argv[1].startswith("-") and argv[1] not in bench.WHAT:
        argv.insert(1, "model")  # `bench MODEL` is `bench model MODEL`
    args, extra = parser.parse_known_args(argv)
    if extra:  # recipe overrides may come after options too: train RECIPE --check key=value
        if getattr(args, "overrides", None) is not None and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    previous = _terminate_as_interrupt()
    try:
        return int(args.run(args) or 0)
    except (ValueError, OSError) as e:  # bad input, missing files, unreachable hub: one clear line
        print(f"mosa-retrofit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except SafetensorError as e:  # a truncated or foreign weights file
        print(f"mosa-retrofit {args.command}: error: a model.safetensors file is damaged or not safetensors ({e}); "
              "write it again (convert / train) or download it again", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the finally blocks below removed what was half-written
        print(f"\nmosa-retrofit {args.command}: interrupted; nothing half-written was left"
              f"{AFTER_INTERRUPT.get(args.command, '')}", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


AFTER_INTERRUPT = {"train": " (checkpoints are whole: the same command with --resume continues from the last one)",
                   "convert": " (OUT is as it was before; run the command again)",
                   "study": " (finished points are kept: the same command continues)"}


def _terminate_as_interrupt():
    """SIGTERM raises KeyboardInterrupt in the main thread, so that cleanup runs as for Ctrl-C (temporary
    folders removed, checkpoints never half-written). Returns the handler it replaced (None off the main thread)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, interrupt)


if __name__ == "__main__":
    sys.exit(main())
