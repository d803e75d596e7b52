"""Knowledge: cleaning, chunking, vector backends and the index deployment (docs/knowledge.md)."""
