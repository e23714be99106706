"""The `decmem` command: main.py dispatches, one module per subcommand group. Nothing imports this package."""
