from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TokenSeq(_message.Message):
    __slots__ = ("worker", "tier", "token_ids")
    WORKER_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    worker: str
    tier: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, worker: _Optional[str] = ..., tier: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class MatchResponse(_message.Message):
    __slots__ = ("pages", "length", "node")
    PAGES_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    pages: _containers.RepeatedScalarFieldContainer[int]
    length: int
    node: int
    def __init__(self, pages: _Optional[_Iterable[int]] = ..., length: _Optional[int] = ..., node: _Optional[int] = ...) -> None: ...

class InsertRequest(_message.Message):
    __slots__ = ("seq", "pages")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    PAGES_FIELD_NUMBER: _ClassVar[int]
    seq: TokenSeq
    pages: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, seq: _Optional[_Union[TokenSeq, _Mapping]] = ..., pages: _Optional[_Iterable[int]] = ...) -> None: ...

class InsertResponse(_message.Message):
    __slots__ = ("existing",)
    EXISTING_FIELD_NUMBER: _ClassVar[int]
    existing: int
    def __init__(self, existing: _Optional[int] = ...) -> None: ...

class NodeRequest(_message.Message):
    __slots__ = ("worker", "tier", "node")
    WORKER_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    worker: str
    tier: str
    node: int
    def __init__(self, worker: _Optional[str] = ..., tier: _Optional[str] = ..., node: _Optional[int] = ...) -> None: ...

class EvictRequest(_message.Message):
    __slots__ = ("worker", "tier", "num_pages")
    WORKER_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    NUM_PAGES_FIELD_NUMBER: _ClassVar[int]
    worker: str
    tier: str
    num_pages: int
    def __init__(self, worker: _Optional[str] = ..., tier: _Optional[str] = ..., num_pages: _Optional[int] = ...) -> None: ...

class PageList(_message.Message):
    __slots__ = ("pages",)
    PAGES_FIELD_NUMBER: _ClassVar[int]
    pages: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, pages: _Optional[_Iterable[int]] = ...) -> None: ...

class LookupRecord(_message.Message):
    __slots__ = ("worker", "tier", "prompt_tokens", "cached_tokens")
    WORKER_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    worker: str
    tier: str
    prompt_tokens: int
    cached_tokens: int
    def __init__(self, worker: _Optional[str] = ..., tier: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., cached_tokens: _Optional[int] = ...) -> None: ...

class RouteRequest(_message.Message):
    __slots__ = ("token_ids",)
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class RouteResponse(_message.Message):
    __slots__ = ("cached_tokens",)
    class CachedTokensEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    cached_tokens: _containers.ScalarMap[str, int]
    def __init__(self, cached_tokens: _Optional[_Mapping[str, int]] = ...) -> None: ...

class WorkerRequest(_message.Message):
    __slots__ = ("worker", "tier")
    WORKER_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    worker: str
    tier: str
    def __init__(self, worker: _Optional[str] = ..., tier: _Optional[str] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("total_nodes", "cached_pages", "locked_pages", "shared_prefix_count", "avg_sharing_depth", "hit_rate", "prompt_tokens", "cached_tokens")
    TOTAL_NODES_FIELD_NUMBER: _ClassVar[int]
    CACHED_PAGES_FIELD_NUMBER: _ClassVar[int]
    LOCKED_PAGES_FIELD_NUMBER: _ClassVar[int]
    SHARED_PREFIX_COUNT_FIELD_NUMBER: _ClassVar[int]
    AVG_SHARING_DEPTH_FIELD_NUMBER: _ClassVar[int]
    HIT_RATE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    total_nodes: int
    cached_pages: int
    locked_pages: int
    shared_prefix_count: int
    avg_sharing_depth: float
    hit_rate: float
    prompt_tokens: int
    cached_tokens: int
    def __init__(self, total_nodes: _Optional[int] = ..., cached_pages: _Optional[int] = ..., locked_pages: _Optional[int] = ..., shared_prefix_count: _Optional[int] = ..., avg_sharing_depth: _Optional[float] = ..., hit_rate: _Optional[float] = ..., prompt_tokens: _Optional[int] = ..., cached_tokens: _Optional[int] = ...) -> None: ...

class Empty(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
