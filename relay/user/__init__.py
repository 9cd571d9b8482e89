"""The user's end: ``labrelay connect`` and the ssh config snippet users paste."""
