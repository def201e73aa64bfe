"""The store's refusal: a gRPC status code, a message naming the field and the limit,
and trailing metadata for machine-readable details."""

from __future__ import annotations

import grpc

# Trailing metadata keys (lower case, as gRPC requires).
MD_ACTUAL_REVISION = "xdc-actual-last-revision"
MD_LEADER = "xdc-leader"
MD_RETRY_AFTER_MS = "xdc-retry-after-ms"
# A call shed by admission control (geo's degradation tiers) names the tier and why.
# It was refused before anything ran, so retrying after xdc-retry-after-ms is safe. A
# request names its own tier with MD_TIER too (a tier or service name).
MD_TIER = "xdc-tier"
MD_SHED_REASON = "xdc-shed-reason"
# Any other call refused before any of it ran (a voter waiting for its fence,
# geo/fence_wait.py): nothing of it was written, and a client may say so.
MD_NOT_RUN = "xdc-not-run"


class StoreError(Exception):
    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        metadata: tuple[tuple[str, str], ...] = (),
        actual_last_revision: int = 0,
        leader: str = "",
        retry_after_ms: int = 0,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        # The log position a refusal was read from (store.log.Log.sequence): a cluster
        # leader answers it only once that is committed (store.node.StoreNode.append).
        self.as_of = 0
        self.actual_last_revision = actual_last_revision
        self.leader = leader
        self.retry_after_ms = retry_after_ms
        md = list(metadata)
        if code == grpc.StatusCode.FAILED_PRECONDITION and actual_last_revision >= 0:
            md.append((MD_ACTUAL_REVISION, str(actual_last_revision)))
        if leader:
            md.append((MD_LEADER, leader))
        if retry_after_ms:
            md.append((MD_RETRY_AFTER_MS, str(retry_after_ms)))
        self.metadata = tuple(md)

    def __repr__(self) -> str:
        return f"StoreError({self.code.name}, {self.message!r})"


def show(value: object, limit: int = 80) -> str:
    """`value` as a refusal quotes it: repr, cut to `limit` characters. A status message
    travels in a trailer, which the client refuses past its metadata size limit: echoing
    a hostile value whole, the caller would see RESOURCE_EXHAUSTED "Stream removed"
    instead of the refusal."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def invalid(field: str, problem: str) -> StoreError:
    return StoreError(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {problem}")


def wrong_revision(stream: str, expected: str, actual: int) -> StoreError:
    return StoreError(
        grpc.StatusCode.FAILED_PRECONDITION,
        f"wrong expected revision for stream {stream!r}: expected {expected}, "
        f"actual last revision {actual}",
        actual_last_revision=actual,
    )


def shutting_down() -> StoreError:
    """A node that stops refuses new appends: nothing of them was written, so a retry
    (at another node, or at this one once back) is safe."""
    return StoreError(grpc.StatusCode.UNAVAILABLE, "node is shutting down; retry",
                      retry_after_ms=200)


def node_failed(exc: BaseException, node_id: str = "") -> StoreError:
    """The answer to appends a node's writer held when it died: written or not, it
    cannot say."""
    node = f"node {node_id}" if node_id else "node"
    return StoreError(grpc.StatusCode.UNAVAILABLE,
                      f"{node} failed ({type(exc).__name__}): the append's outcome is "
                      "unknown, retry with the same event ids", retry_after_ms=200)
