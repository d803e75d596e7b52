"""The HTTP gateway: one FastAPI ingress on Ray Serve, one router per area."""
