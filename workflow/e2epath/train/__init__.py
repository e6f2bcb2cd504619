"""Training: one job skeleton (`job`: fold, seeds, oversampling, outputs) around one loop (`loop`:
optimiser, schedule, checkpoints, selection on validation), the task types (`tasks`), and the two
families — end to end (`e2e`) and two-stage on frozen features (`twostage`)."""
