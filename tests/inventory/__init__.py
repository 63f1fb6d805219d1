"""A throwaway fifth bounded context, installed only by ``tests.inventory.settings``.

It is what the README's "add an inventory service" guide builds, kept to the minimum: a model,
a migration, a service, a selector and ``consumers.py``. ``tests/test_new_context.py`` runs the
real processes with it installed, to prove that adding a service takes the app and its one
INSTALLED_APPS line.
"""
