"""Evaluation suites and apps; each module adds one `stochvit` subcommand via `add_parser`."""
