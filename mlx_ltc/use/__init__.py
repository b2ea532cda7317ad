"""Using a finished run: its model completes code of its repository (`complete`)."""
