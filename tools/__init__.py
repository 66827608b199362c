"""The ``engram-store`` command line: thin subcommands over library functions."""
