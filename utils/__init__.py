"""Small shared helpers: atomic file writes, YAML->dataclass configs, optional extras.

Nothing here imports torch; ``deepinsert.utils.devices`` (which does) is imported explicitly.
"""
