from strata.proto.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ConnectRequest(_message.Message):
    __slots__ = ("decode_worker", "kv_layout", "timeout_s")
    DECODE_WORKER_FIELD_NUMBER: _ClassVar[int]
    KV_LAYOUT_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    decode_worker: str
    kv_layout: str
    timeout_s: float
    def __init__(self, decode_worker: _Optional[str] = ..., kv_layout: _Optional[str] = ..., timeout_s: _Optional[float] = ...) -> None: ...

class ConnectResponse(_message.Message):
    __slots__ = ("channel_id", "port", "backend", "rank_ports")
    CHANNEL_ID_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    RANK_PORTS_FIELD_NUMBER: _ClassVar[int]
    channel_id: str
    port: int
    backend: str
    rank_ports: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, channel_id: _Optional[str] = ..., port: _Optional[int] = ..., backend: _Optional[str] = ..., rank_ports: _Optional[_Iterable[int]] = ...) -> None: ...

class WorkerGenerateRequest(_message.Message):
    __slots__ = ("request_id", "prompt_ids", "sampling_params", "prefill_worker", "resume_ids", "session_id", "session_replace")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_PARAMS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_WORKER_FIELD_NUMBER: _ClassVar[int]
    RESUME_IDS_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_REPLACE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling_params: _common_pb2.SamplingParams
    prefill_worker: str
    resume_ids: _containers.RepeatedScalarFieldContainer[int]
    session_id: str
    session_replace: bool
    def __init__(self, request_id: _Optional[str] = ..., prompt_ids: _Optional[_Iterable[int]] = ..., sampling_params: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., prefill_worker: _Optional[str] = ..., resume_ids: _Optional[_Iterable[int]] = ..., session_id: _Optional[str] = ..., session_replace: _Optional[bool] = ...) -> None: ...

class WorkerOpenSessionRequest(_message.Message):
    __slots__ = ("ttl_s", "capacity")
    TTL_S_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    ttl_s: float
    capacity: int
    def __init__(self, ttl_s: _Optional[float] = ..., capacity: _Optional[int] = ...) -> None: ...

class WorkerOpenSessionResponse(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class WorkerCloseSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class WorkerCloseSessionResponse(_message.Message):
    __slots__ = ("closed",)
    CLOSED_FIELD_NUMBER: _ClassVar[int]
    closed: bool
    def __init__(self, closed: _Optional[bool] = ...) -> None: ...

class SessionContextRequest(_message.Message):
    __slots__ = ("session_id", "rid", "offset", "new_tokens")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    RID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    rid: str
    offset: int
    new_tokens: int
    def __init__(self, session_id: _Optional[str] = ..., rid: _Optional[str] = ..., offset: _Optional[int] = ..., new_tokens: _Optional[int] = ...) -> None: ...

class SessionContextResponse(_message.Message):
    __slots__ = ("token_ids",)
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class PrefillRequest(_message.Message):
    __slots__ = ("request_id", "prompt_ids", "sampling_params", "num_pages")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_PARAMS_FIELD_NUMBER: _ClassVar[int]
    NUM_PAGES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling_params: _common_pb2.SamplingParams
    num_pages: int
    def __init__(self, request_id: _Optional[str] = ..., prompt_ids: _Optional[_Iterable[int]] = ..., sampling_params: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., num_pages: _Optional[int] = ...) -> None: ...

class PrefillResponse(_message.Message):
    __slots__ = ("first_token", "cached_tokens", "logprob", "top_logprobs", "l2_tokens", "l3_tokens")
    class TopLogprobsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: float
        def __init__(self, key: _Optional[int] = ..., value: _Optional[float] = ...) -> None: ...
    FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    L2_TOKENS_FIELD_NUMBER: _ClassVar[int]
    L3_TOKENS_FIELD_NUMBER: _ClassVar[int]
    first_token: int
    cached_tokens: int
    logprob: float
    top_logprobs: _containers.ScalarMap[int, float]
    l2_tokens: int
    l3_tokens: int
    def __init__(self, first_token: _Optional[int] = ..., cached_tokens: _Optional[int] = ..., logprob: _Optional[float] = ..., top_logprobs: _Optional[_Mapping[int, float]] = ..., l2_tokens: _Optional[int] = ..., l3_tokens: _Optional[int] = ...) -> None: ...

class PullRequest(_message.Message):
    __slots__ = ("request_id", "channel_id")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    channel_id: str
    def __init__(self, request_id: _Optional[str] = ..., channel_id: _Optional[str] = ...) -> None: ...

class PullResponse(_message.Message):
    __slots__ = ("transfer_bytes", "transfer_seconds")
    TRANSFER_BYTES_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    transfer_bytes: int
    transfer_seconds: float
    def __init__(self, transfer_bytes: _Optional[int] = ..., transfer_seconds: _Optional[float] = ...) -> None: ...

class LoadRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CacheStats(_message.Message):
    __slots__ = ("total_nodes", "cached_pages", "locked_pages", "shared_prefix_count", "avg_sharing_depth", "hit_rate", "prompt_tokens", "cached_tokens", "host_pages", "l2_tokens", "l3_tokens")
    TOTAL_NODES_FIELD_NUMBER: _ClassVar[int]
    CACHED_PAGES_FIELD_NUMBER: _ClassVar[int]
    LOCKED_PAGES_FIELD_NUMBER: _ClassVar[int]
    SHARED_PREFIX_COUNT_FIELD_NUMBER: _ClassVar[int]
    AVG_SHARING_DEPTH_FIELD_NUMBER: _ClassVar[int]
    HIT_RATE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    HOST_PAGES_FIELD_NUMBER: _ClassVar[int]
    L2_TOKENS_FIELD_NUMBER: _ClassVar[int]
    L3_TOKENS_FIELD_NUMBER: _ClassVar[int]
    total_nodes: int
    cached_pages: int
    locked_pages: int
    shared_prefix_count: int
    avg_sharing_depth: float
    hit_rate: float
    prompt_tokens: int
    cached_tokens: int
    host_pages: int
    l2_tokens: int
    l3_tokens: int
    def __init__(self, total_nodes: _Optional[int] = ..., cached_pages: _Optional[int] = ..., locked_pages: _Optional[int] = ..., shared_prefix_count: _Optional[int] = ..., avg_sharing_depth: _Optional[float] = ..., hit_rate: _Optional[float] = ..., prompt_tokens: _Optional[int] = ..., cached_tokens: _Optional[int] = ..., host_pages: _Optional[int] = ..., l2_tokens: _Optional[int] = ..., l3_tokens: _Optional[int] = ...) -> None: ...

class TierStats(_message.Message):
    __slots__ = ("l2_pages", "l2_used_pages", "l2_bytes", "l3", "l3_bad_files", "l3_skipped_writes", "bytes_moved", "write_policy", "page_bytes")
    class BytesMovedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    L2_PAGES_FIELD_NUMBER: _ClassVar[int]
    L2_USED_PAGES_FIELD_NUMBER: _ClassVar[int]
    L2_BYTES_FIELD_NUMBER: _ClassVar[int]
    L3_FIELD_NUMBER: _ClassVar[int]
    L3_BAD_FILES_FIELD_NUMBER: _ClassVar[int]
    L3_SKIPPED_WRITES_FIELD_NUMBER: _ClassVar[int]
    BYTES_MOVED_FIELD_NUMBER: _ClassVar[int]
    WRITE_POLICY_FIELD_NUMBER: _ClassVar[int]
    PAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    l2_pages: int
    l2_used_pages: int
    l2_bytes: int
    l3: bool
    l3_bad_files: int
    l3_skipped_writes: int
    bytes_moved: _containers.ScalarMap[str, int]
    write_policy: str
    page_bytes: int
    def __init__(self, l2_pages: _Optional[int] = ..., l2_used_pages: _Optional[int] = ..., l2_bytes: _Optional[int] = ..., l3: _Optional[bool] = ..., l3_bad_files: _Optional[int] = ..., l3_skipped_writes: _Optional[int] = ..., bytes_moved: _Optional[_Mapping[str, int]] = ..., write_policy: _Optional[str] = ..., page_bytes: _Optional[int] = ...) -> None: ...

class LoadResponse(_message.Message):
    __slots__ = ("worker", "running", "waiting", "pages_total", "pages_free", "transfers", "transfer_bytes", "transfer_seconds", "held_requests", "cache", "tiers", "memory")
    WORKER_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    PAGES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    PAGES_FREE_FIELD_NUMBER: _ClassVar[int]
    TRANSFERS_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_BYTES_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    HELD_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    CACHE_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    worker: str
    running: int
    waiting: int
    pages_total: int
    pages_free: int
    transfers: int
    transfer_bytes: int
    transfer_seconds: float
    held_requests: int
    cache: CacheStats
    tiers: TierStats
    memory: MemoryPlan
    def __init__(self, worker: _Optional[str] = ..., running: _Optional[int] = ..., waiting: _Optional[int] = ..., pages_total: _Optional[int] = ..., pages_free: _Optional[int] = ..., transfers: _Optional[int] = ..., transfer_bytes: _Optional[int] = ..., transfer_seconds: _Optional[float] = ..., held_requests: _Optional[int] = ..., cache: _Optional[_Union[CacheStats, _Mapping]] = ..., tiers: _Optional[_Union[TierStats, _Mapping]] = ..., memory: _Optional[_Union[MemoryPlan, _Mapping]] = ...) -> None: ...

class MemoryPlan(_message.Message):
    __slots__ = ("budget_bytes", "resident_bytes", "weight_bytes", "page_bytes", "l1_pages", "l2_pages", "sized_by")
    BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    PAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    L1_PAGES_FIELD_NUMBER: _ClassVar[int]
    L2_PAGES_FIELD_NUMBER: _ClassVar[int]
    SIZED_BY_FIELD_NUMBER: _ClassVar[int]
    budget_bytes: int
    resident_bytes: int
    weight_bytes: int
    page_bytes: int
    l1_pages: int
    l2_pages: int
    sized_by: str
    def __init__(self, budget_bytes: _Optional[int] = ..., resident_bytes: _Optional[int] = ..., weight_bytes: _Optional[int] = ..., page_bytes: _Optional[int] = ..., l1_pages: _Optional[int] = ..., l2_pages: _Optional[int] = ..., sized_by: _Optional[str] = ...) -> None: ...

class FlushRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class FlushResponse(_message.Message):
    __slots__ = ("flushed_pages",)
    FLUSHED_PAGES_FIELD_NUMBER: _ClassVar[int]
    flushed_pages: int
    def __init__(self, flushed_pages: _Optional[int] = ...) -> None: ...

class AbortRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class AbortResponse(_message.Message):
    __slots__ = ("found",)
    FOUND_FIELD_NUMBER: _ClassVar[int]
    found: bool
    def __init__(self, found: _Optional[bool] = ...) -> None: ...
