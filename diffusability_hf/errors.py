"""Small helpers for the toolkit's error messages (imports nothing of the toolkit: the bottom of the import graph)."""


def error_summary(err: BaseException, limit: int = 200) -> str:
    """``"TypeName: first line of the message"`` (cut to ``limit`` characters), for a one-line error that names its
    cause (torch's and safetensors' messages run over many lines)."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:limit]}" if lines else type(err).__name__
