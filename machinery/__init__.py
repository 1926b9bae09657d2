"""The machinery beneath rpo.py and sdpo.py: nothing here is in either paper, and a reader of the papers never needs
to open it.

    config     `arg` (a config field with its --help text) and the run's own fields (seed, memory, trackers)
    cli        the command line: flags → the script's config, every value checked; bad input → one line
    rundir     the run directory and its stages: resumed, seeded, written atomically; `Stage`, what a step is given
    resume     what a stopped stage resumes from: finished parts, the chunked runner that keeps them (out-of-memory
               halving, each process's share), training's saved state
    memory     how many rows a stage runs at once, from the model's config and the memory it may use
    dist       several processes (`accelerate launch`, `torchrun`)
    trackers   --report-to: TensorBoard, Trackio, W&B
    results    the run's table (with the sign test), built once for both scripts, the report and the plots
    clock      the estimate of the time left
    files      atomic writes, JSON (Lines) files, seeding

It imports nothing from the files above it.
"""
