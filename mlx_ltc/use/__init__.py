"""Using a finished run: its model completes code of its repository (`complete`); its adapters fused into a
standalone model (`export`)."""
