"""MegaContext for code: a long history kept as a tree of learned gists, fed to a frozen base model."""
