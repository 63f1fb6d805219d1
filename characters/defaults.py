"""Starter content of the Character Service: change it here."""

# The character every new player starts with, active.
DEFAULT_CHARACTER_NAME = "Recruit"
