"""The tiny procedural world: shape scenes, GenEval-format prompts and their metadata."""
