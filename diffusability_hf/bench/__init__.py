"""Experiment tools: running the toolkit's scripts as a user would, many at once, resumably (:mod:`.runner`)."""
