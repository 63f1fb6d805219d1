"""What people and probes read: the flow's health (``health``, ``manage.py onboarding_status``),
one user's story (``story``, ``--user`` and the admin's user page), each durable's figures
(``durables``) and where a report looked (``labels``). Only reads."""
