"""Starter content of the Building Service: change it here."""

# (kind, level) of every building a new player's base starts with.
STARTER_BUILDINGS = (
    ("hq", 1),
    ("warehouse", 1),
)
