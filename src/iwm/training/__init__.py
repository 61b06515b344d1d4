"""iwm.training: loop, schedules, checkpoints, logging, distributed."""
