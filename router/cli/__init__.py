"""The `metrics-router` command: main (the console script), options, one module per subcommand."""
