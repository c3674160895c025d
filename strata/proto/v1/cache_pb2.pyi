from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class KVEvent(_message.Message):
    __slots__ = ("kind", "tier", "keys", "priority", "ttl_s")
    KIND_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    TTL_S_FIELD_NUMBER: _ClassVar[int]
    kind: str
    tier: str
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    priority: int
    ttl_s: float
    def __init__(self, kind: _Optional[str] = ..., tier: _Optional[str] = ..., keys: _Optional[_Iterable[bytes]] = ..., priority: _Optional[int] = ..., ttl_s: _Optional[float] = ...) -> None: ...

class LoadCosts(_message.Message):
    __slots__ = ("compute_token", "l2_page", "l3_page")
    COMPUTE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    L2_PAGE_FIELD_NUMBER: _ClassVar[int]
    L3_PAGE_FIELD_NUMBER: _ClassVar[int]
    compute_token: float
    l2_page: float
    l3_page: float
    def __init__(self, compute_token: _Optional[float] = ..., l2_page: _Optional[float] = ..., l3_page: _Optional[float] = ...) -> None: ...

class EventBatch(_message.Message):
    __slots__ = ("worker", "seed", "page_size", "first_seq", "snapshot", "events", "costs", "page_file_bytes")
    WORKER_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    FIRST_SEQ_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    COSTS_FIELD_NUMBER: _ClassVar[int]
    PAGE_FILE_BYTES_FIELD_NUMBER: _ClassVar[int]
    worker: str
    seed: bytes
    page_size: int
    first_seq: int
    snapshot: bool
    events: _containers.RepeatedCompositeFieldContainer[KVEvent]
    costs: LoadCosts
    page_file_bytes: int
    def __init__(self, worker: _Optional[str] = ..., seed: _Optional[bytes] = ..., page_size: _Optional[int] = ..., first_seq: _Optional[int] = ..., snapshot: _Optional[bool] = ..., events: _Optional[_Iterable[_Union[KVEvent, _Mapping]]] = ..., costs: _Optional[_Union[LoadCosts, _Mapping]] = ..., page_file_bytes: _Optional[int] = ...) -> None: ...

class PublishResponse(_message.Message):
    __slots__ = ("need_snapshot",)
    NEED_SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    need_snapshot: bool
    def __init__(self, need_snapshot: _Optional[bool] = ...) -> None: ...

class RouteRequest(_message.Message):
    __slots__ = ("token_ids",)
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class WorkerRoute(_message.Message):
    __slots__ = ("l1_tokens", "l2_tokens", "costs", "page_size")
    L1_TOKENS_FIELD_NUMBER: _ClassVar[int]
    L2_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COSTS_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    l1_tokens: int
    l2_tokens: int
    costs: LoadCosts
    page_size: int
    def __init__(self, l1_tokens: _Optional[int] = ..., l2_tokens: _Optional[int] = ..., costs: _Optional[_Union[LoadCosts, _Mapping]] = ..., page_size: _Optional[int] = ...) -> None: ...

class RouteResponse(_message.Message):
    __slots__ = ("workers", "l3_tokens")
    class WorkersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: WorkerRoute
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[WorkerRoute, _Mapping]] = ...) -> None: ...
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    L3_TOKENS_FIELD_NUMBER: _ClassVar[int]
    workers: _containers.MessageMap[str, WorkerRoute]
    l3_tokens: int
    def __init__(self, workers: _Optional[_Mapping[str, WorkerRoute]] = ..., l3_tokens: _Optional[int] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerMirror(_message.Message):
    __slots__ = ("l1_pages", "l2_pages", "next_seq", "seconds_since_seen")
    L1_PAGES_FIELD_NUMBER: _ClassVar[int]
    L2_PAGES_FIELD_NUMBER: _ClassVar[int]
    NEXT_SEQ_FIELD_NUMBER: _ClassVar[int]
    SECONDS_SINCE_SEEN_FIELD_NUMBER: _ClassVar[int]
    l1_pages: int
    l2_pages: int
    next_seq: int
    seconds_since_seen: float
    def __init__(self, l1_pages: _Optional[int] = ..., l2_pages: _Optional[int] = ..., next_seq: _Optional[int] = ..., seconds_since_seen: _Optional[float] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("workers", "l3_pages", "l3_bytes", "l3_budget_bytes", "l3_evicted")
    class WorkersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: WorkerMirror
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[WorkerMirror, _Mapping]] = ...) -> None: ...
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    L3_PAGES_FIELD_NUMBER: _ClassVar[int]
    L3_BYTES_FIELD_NUMBER: _ClassVar[int]
    L3_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    L3_EVICTED_FIELD_NUMBER: _ClassVar[int]
    workers: _containers.MessageMap[str, WorkerMirror]
    l3_pages: int
    l3_bytes: int
    l3_budget_bytes: int
    l3_evicted: int
    def __init__(self, workers: _Optional[_Mapping[str, WorkerMirror]] = ..., l3_pages: _Optional[int] = ..., l3_bytes: _Optional[int] = ..., l3_budget_bytes: _Optional[int] = ..., l3_evicted: _Optional[int] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("address", "role", "ttl_s")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    TTL_S_FIELD_NUMBER: _ClassVar[int]
    address: str
    role: str
    ttl_s: float
    def __init__(self, address: _Optional[str] = ..., role: _Optional[str] = ..., ttl_s: _Optional[float] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RegisteredWorker(_message.Message):
    __slots__ = ("address", "role", "age_s")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    AGE_S_FIELD_NUMBER: _ClassVar[int]
    address: str
    role: str
    age_s: float
    def __init__(self, address: _Optional[str] = ..., role: _Optional[str] = ..., age_s: _Optional[float] = ...) -> None: ...

class WorkersResponse(_message.Message):
    __slots__ = ("workers", "settling", "gone")
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    SETTLING_FIELD_NUMBER: _ClassVar[int]
    GONE_FIELD_NUMBER: _ClassVar[int]
    workers: _containers.RepeatedCompositeFieldContainer[RegisteredWorker]
    settling: bool
    gone: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, workers: _Optional[_Iterable[_Union[RegisteredWorker, _Mapping]]] = ..., settling: _Optional[bool] = ..., gone: _Optional[_Iterable[str]] = ...) -> None: ...
