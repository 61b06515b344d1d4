"""iwm.cli: the iwm command."""
