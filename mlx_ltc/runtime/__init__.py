"""What every training run shares, whichever system trains (`train`, `bk train`, `mc train`): the run
directory and its guards (`rundir`), checkpoints that a kill can't corrupt (`checkpoints`), the metrics
log that a resume cuts back (`metrics`), and Ctrl-C that saves before it stops (`interrupt`). Each
trainer supplies only its step, its evaluation and its state."""
