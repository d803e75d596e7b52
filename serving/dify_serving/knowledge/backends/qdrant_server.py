"""An index as a collection of a Qdrant server, through `qdrant_client`.

Used when the index's spec names a server (`store.type: qdrant`) or the deployment sets
`qdrant_url`. It is the same engine as the embedded store, so answers agree; the
congruence tests run against qdrant_client's local mode, which stands in for the server.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from dify_serving.knowledge.backends.base import BackendBase, RawPoint, SearchArgs
from dify_serving.knowledge.errors import StoreError
from dify_serving.knowledge.filters import Condition, MatchAny, Range, StoreFilter, translate
from dify_serving.specs import DifyIndexSpec


def _client_condition(condition: Condition) -> Any:
    from qdrant_client import models

    if isinstance(condition, Range):
        return models.FieldCondition(key=condition.key, range=models.Range(**condition.bounds))
    if isinstance(condition, MatchAny):
        match: Any = models.MatchAny(any=list(condition.values))
    else:
        match = models.MatchValue(value=condition.value)
    return models.FieldCondition(key=condition.key, match=match)


def _client_filter(flt: StoreFilter | None) -> Any:
    from qdrant_client import models

    return translate(flt, _client_condition, models.Filter)


class QdrantServerBackend(BackendBase):
    """An index as a collection of a Qdrant server (the store owns `client`).

    qdrant_client's local mode (`QdrantClient(location=":memory:")` or `path=`) works too;
    it searches exactly and has no payload indexes, so those settings are not sent there.
    """

    #: Calls wait on the network with the GIL released: worth a thread off the event loop.
    blocking_io = True

    def __init__(self, client: Any, name: str, spec: DifyIndexSpec) -> None:
        super().__init__(name, spec)
        self.client = client
        options = getattr(client, "init_options", None) or {}
        self.local = options.get("location") == ":memory:" or options.get("path") is not None
        self._dimension = self._existing_dimension()

    def _existing_dimension(self) -> int | None:
        if not self.client.collection_exists(self.name):
            return None
        vectors = self.client.get_collection(self.name).config.params.vectors
        if vectors is None or isinstance(vectors, dict):
            raise StoreError(f"collection {self.name!r} does not have one unnamed dense vector")
        return int(vectors.size)

    def _create(self, dimension: int) -> None:
        from qdrant_client import models

        scalar = self._scalar_quantization()
        quantization = None
        if scalar is not None:
            quantization = models.ScalarQuantization(
                scalar=models.ScalarQuantizationConfig(
                    type=models.ScalarType.INT8, always_ram=scalar.always_ram
                )
            )
        self.client.create_collection(
            self.name,
            vectors_config=models.VectorParams(
                size=dimension, distance=models.Distance(self.spec.store.distance)
            ),
            hnsw_config=models.HnswConfigDiff(**self._hnsw()),
            quantization_config=quantization,
        )

    def ensure(self, dimension: int) -> None:
        """Create the collection, or check the existing one's dimension; add missing indexes."""
        from qdrant_client import models

        with self._writes:
            existing = self._existing_dimension()
            if existing is None:
                try:
                    self._create(dimension)
                except Exception:  # another replica may have created it meanwhile
                    existing = self._existing_dimension()
                    if existing is None:
                        raise
            self._adopt(existing, dimension)
            if self.local:
                return
            known = self.client.get_collection(self.name).payload_schema or {}
            for key in self._missing_indexes(known):
                self.client.create_payload_index(
                    self.name, key, models.PayloadSchemaType.KEYWORD, wait=True
                )
            for key in self._retired_indexes(known):
                self.client.delete_payload_index(self.name, key, wait=True)

    # engine calls ------------------------------------------------------------------------
    def _upsert(self, batch: list[RawPoint]) -> None:
        from qdrant_client import models

        points = [models.PointStruct(id=i, vector=v, payload=p) for i, v, p in batch]
        self.client.upsert(self.name, points=points, wait=True)

    def _count(self, flt: StoreFilter | None) -> int:
        result = self.client.count(self.name, count_filter=_client_filter(flt), exact=True)
        return int(result.count)

    def _delete(self, flt: StoreFilter) -> None:
        from qdrant_client import models

        selector = models.FilterSelector(filter=_client_filter(flt))
        self.client.delete(self.name, points_selector=selector, wait=True)

    def _facet(self, flt: StoreFilter, limit: int) -> Iterable[Any]:
        response = self.client.facet(
            self.name, "document_id", facet_filter=_client_filter(flt), limit=limit, exact=True
        )
        return response.hits

    def _query(self, rows: np.ndarray, args: SearchArgs) -> list[list[Any]]:
        from qdrant_client import models

        params = None if self.local else models.SearchParams(hnsw_ef=args.ef, exact=args.exact)
        requests = [
            models.QueryRequest(
                query=row.tolist(),
                filter=_client_filter(args.filter),
                limit=args.top_k,
                params=params,
                score_threshold=args.score_threshold,
                with_payload=True,
            )
            for row in rows
        ]
        responses = self.client.query_batch_points(self.name, requests=requests)
        return [response.points for response in responses]

    def _stats(self) -> Any:
        return None if self._dimension is None else self.client.get_collection(self.name)

    # interface ---------------------------------------------------------------------------
    def close(self) -> None:
        self.client.close()

    def drop(self) -> None:
        """Delete the collection."""
        with self._writes:
            self.client.delete_collection(self.name)
            self._dimension = None
