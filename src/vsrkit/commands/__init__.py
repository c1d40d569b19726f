"""One module per ``vsrkit`` subcommand, each with ``register(subparsers)``."""
