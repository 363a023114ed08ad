"""Which errors are the user's (one line, exit 2, no traceback) and how they are worded."""

from __future__ import annotations


def user_errors() -> tuple[type, ...]:
    """Errors caused by the user's input or environment, reported without a traceback."""
    from tyr.artifacts import CorruptArtifactError, SettingsError, StaleArtifactError
    from tyr.coarse_to_fine import SearchStateError
    from tyr.data import DataSourceError, TextTooShortError
    from tyr.export.gguf_vocab import GGUFExportError
    from tyr.modeling.adapter import UnsupportedArchitectureError
    from tyr.models import ModelNotFoundError
    from tyr.supernet.store import SupernetError
    from tyr.tasks import TaskDataMissingError, UnknownTaskError

    return (
        ModelNotFoundError,
        UnsupportedArchitectureError,
        SupernetError,
        TextTooShortError,
        SearchStateError,
        DataSourceError,
        SettingsError,
        CorruptArtifactError,
        StaleArtifactError,
        TaskDataMissingError,
        UnknownTaskError,
        GGUFExportError,
    )


def user_message(e: Exception) -> str:
    """One line for a user error; a corrupt file names the command that remakes it."""
    from tyr.artifacts import CorruptArtifactError
    from tyr.pipeline.layout import repair_hint

    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return msg + (repair_hint(e.path) if isinstance(e, CorruptArtifactError) and "rerun" not in msg else "")
