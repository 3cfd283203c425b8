"""The `brainage` command line: one thin module per sub-command, in pipeline order.

Each module has `add_parser(subparsers) -> argparse.ArgumentParser` (which sets `func=run`) and
`run(args) -> int`. A command only parses its options, calls the library and prints one line;
everything it does is a function a user can call from Python (the stage modules under
jax_brainage/), and no library module imports argparse.
"""

from __future__ import annotations

from jax_brainage.commands import (analyze, batches, calibrate, demo, evaluate_explanations,
                                   explain, export, import_model, predict, prepare, report,
                                   simulate, train)

# `brainage --help` lists them in this order: data -> train -> predict -> explain -> analyse.
COMMANDS = (simulate, prepare, batches, train, import_model, export, calibrate, predict, explain,
            evaluate_explanations, analyze, report, demo)
