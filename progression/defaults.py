"""Starter content of the Meta Progression Service: change it here."""

# Unlocked for every new player.
STARTER_WEAPONS = ("pistol",)
STARTER_SKILLS = ("dash", "first_aid")
