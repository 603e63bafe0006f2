"""The server's routers, which ``server.app.create_app`` assembles: the videos API, the service's
endpoints (models, health, metrics) and the web page."""
