"""The `edge-runtime` command (and `python -m edge_runtime`): a command that loads a model starts again with its
weights in huge pages where that helps (edge_runtime/huge_pages.py), before anything heavy is imported, then the
CLI runs."""

import sys

from edge_runtime import huge_pages

LOADING_COMMANDS = ("run", "chat", "bench", "perplexity", "serve")


def main() -> None:
    if next((arg for arg in sys.argv[1:] if not arg.startswith("-")), None) in LOADING_COMMANDS:
        huge_pages.relaunch()
    from edge_runtime.cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
