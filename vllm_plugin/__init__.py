"""vLLM plugin placeholder (filled in by the plugin work)."""
def register() -> None:
    return None
