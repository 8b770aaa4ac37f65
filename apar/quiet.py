"""Keep library chatter (progress bars, load reports) off a command's output."""
from __future__ import annotations


def quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
