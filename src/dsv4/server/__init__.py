"""OpenAI-compatible HTTP server: ``create_app(ServerSettings(...))`` or ``dsv4 serve``."""
