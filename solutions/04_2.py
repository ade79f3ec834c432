"""Solution 04.2: keep what was loaded when the session commits.

What was wrong: the factory uses SQLAlchemy's default ``expire_on_commit=True``, so the
commit marked every attribute of ``note`` as stale, to be reloaded on next access. By
then the session was closed, and reading ``note.text`` raised ``DetachedInstanceError``.
Opening the session with ``expire_on_commit=False`` (labkit's sessionmakers do) keeps
the values just written; the object stays readable after the session closes, at no
extra query.
"""

from sqlalchemy import String
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker


class ExerciseBase(DeclarativeBase):
    pass


class Note(ExerciseBase):
    __tablename__ = "notes"
    id: Mapped[int] = mapped_column(primary_key=True)
    text: Mapped[str] = mapped_column(String(200))


def create_note(factory: sessionmaker[Session], note_id: int, body: str) -> Note:
    """Store a note and return it, for the caller to read (to answer a request, say)."""
    with factory(expire_on_commit=False) as session:
        note = Note(id=note_id, text=body)
        session.add(note)
        session.commit()
    return note
