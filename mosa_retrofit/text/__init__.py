"""Text the tools read: the embedded model and corpora (``assets``), documents split and packed into blocks
(``data``), the held-out evaluation protocol (``protocol``) and passkey prompts (``prompts``)."""
