"""Engine defaults that the CLI and the server read without importing the engine."""

# Generations that `Engine.submit` (and `workbench serve`) runs together; more wait in a queue.
MAX_BATCH = 8
