"""The operations behind every transport: REST routers now, the gRPC servicer and the
async task worker later. Each takes the gateway state and typed arguments, checks the
limits and rights that do not depend on the wire, and calls the replica clients
(`replicas.py`); none of them knows about HTTP.

- `inference`: generation (whole or streamed), embeddings, prediction
- `data`: cleaning, chunking, upserts, searches, erasure, the index list
- `models`: the model list and status, load and unload
- `retrieval`: knowledge-augmented prompts and their citations
"""
