"""A throwaway fifth bounded context, installed only by ``tests.stash.settings``.

The shape the README's "add an inventory service" guide builds (under another label, so that a
developer who follows the guide does not collide with it), kept to the minimum: a model, a
migration, a service, a selector and ``consumers.py``. ``tests/test_new_context.py`` runs real
processes with it installed, to prove that adding a service takes the app and its one
INSTALLED_APPS line.
"""
