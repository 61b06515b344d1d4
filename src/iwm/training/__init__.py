"""iwm.training: pretraining, one file per job.

    step.py         one optimisation step (Trainer) and the non-finite step counter
    loop.py         the outer loop: pretrain()
    state.py        what a checkpoint holds, assembled and restored in one place each
    checkpoint.py   atomic checkpoint files, weights-only loading, global RNG states
    run_dir.py      a run's directory and config
    schedules.py, metrics.py, signals.py, distributed.py, fsdp.py, slurm.py
"""
