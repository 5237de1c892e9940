"""The API worker's FastAPI app, split by concern: request schemas, errors, the request
guards, the shared Service, generation and streaming, and one router per group of routes.

`production.server` is the process entry point; `production.api.app.create_app` builds the app.
"""
