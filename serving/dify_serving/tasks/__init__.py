"""Async tasks on Ray Serve task consumers (a broker, a durable store), and the result cache."""
