import datetime

from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ContentPart(_message.Message):
    __slots__ = ("text", "image")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    text: str
    image: Image
    def __init__(self, text: _Optional[str] = ..., image: _Optional[_Union[Image, _Mapping]] = ...) -> None: ...

class Image(_message.Message):
    __slots__ = ("data", "url", "mime_type")
    DATA_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    MIME_TYPE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    url: str
    mime_type: str
    def __init__(self, data: _Optional[bytes] = ..., url: _Optional[str] = ..., mime_type: _Optional[str] = ...) -> None: ...

class Message(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: _containers.RepeatedCompositeFieldContainer[ContentPart]
    def __init__(self, role: _Optional[str] = ..., content: _Optional[_Iterable[_Union[ContentPart, _Mapping]]] = ...) -> None: ...

class ChatRequest(_message.Message):
    __slots__ = ("model", "messages", "max_tokens", "temperature", "top_p", "stop", "logprobs", "top_logprobs", "seed", "session_id")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    model: str
    messages: _containers.RepeatedCompositeFieldContainer[Message]
    max_tokens: int
    temperature: float
    top_p: float
    stop: _containers.RepeatedScalarFieldContainer[str]
    logprobs: bool
    top_logprobs: int
    seed: int
    session_id: str
    def __init__(self, model: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[Message, _Mapping]]] = ..., max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., stop: _Optional[_Iterable[str]] = ..., logprobs: _Optional[bool] = ..., top_logprobs: _Optional[int] = ..., seed: _Optional[int] = ..., session_id: _Optional[str] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "completion_tokens", "total_tokens")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., total_tokens: _Optional[int] = ...) -> None: ...

class ChatResponse(_message.Message):
    __slots__ = ("request_id", "tier", "feedback_token", "model", "created", "content", "finish_reason", "usage", "logprobs")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    FEEDBACK_TOKEN_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    tier: str
    feedback_token: str
    model: str
    created: int
    content: str
    finish_reason: str
    usage: Usage
    logprobs: _struct_pb2.Struct
    def __init__(self, request_id: _Optional[str] = ..., tier: _Optional[str] = ..., feedback_token: _Optional[str] = ..., model: _Optional[str] = ..., created: _Optional[int] = ..., content: _Optional[str] = ..., finish_reason: _Optional[str] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., logprobs: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class ChatChunk(_message.Message):
    __slots__ = ("request_id", "tier", "feedback_token", "model", "delta", "finish_reason", "usage", "created", "logprobs")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    FEEDBACK_TOKEN_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    tier: str
    feedback_token: str
    model: str
    delta: str
    finish_reason: str
    usage: Usage
    created: int
    logprobs: _struct_pb2.Struct
    def __init__(self, request_id: _Optional[str] = ..., tier: _Optional[str] = ..., feedback_token: _Optional[str] = ..., model: _Optional[str] = ..., delta: _Optional[str] = ..., finish_reason: _Optional[str] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., created: _Optional[int] = ..., logprobs: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class FeedbackRequest(_message.Message):
    __slots__ = ("request_id", "token", "score")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token: str
    score: float
    def __init__(self, request_id: _Optional[str] = ..., token: _Optional[str] = ..., score: _Optional[float] = ...) -> None: ...

class FeedbackResponse(_message.Message):
    __slots__ = ("accepted",)
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    def __init__(self, accepted: _Optional[bool] = ...) -> None: ...

class ExplainRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class DecisionRecord(_message.Message):
    __slots__ = ("request_id", "tenant", "tier", "chosen_tier", "requested_model", "policy", "reason", "propensity", "features", "predicted", "outcome", "error", "latency_ms", "pool_latency_ms", "cost", "prompt_tokens", "completion_tokens", "edge", "created_at", "explanation")
    class PredictedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    CHOSEN_TIER_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_MODEL_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    PROPENSITY_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    POOL_LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    EDGE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPLANATION_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    tenant: str
    tier: str
    chosen_tier: str
    requested_model: str
    policy: str
    reason: str
    propensity: float
    features: _struct_pb2.Struct
    predicted: _containers.ScalarMap[str, float]
    outcome: str
    error: str
    latency_ms: float
    pool_latency_ms: float
    cost: float
    prompt_tokens: int
    completion_tokens: int
    edge: str
    created_at: _timestamp_pb2.Timestamp
    explanation: Explanation
    def __init__(self, request_id: _Optional[str] = ..., tenant: _Optional[str] = ..., tier: _Optional[str] = ..., chosen_tier: _Optional[str] = ..., requested_model: _Optional[str] = ..., policy: _Optional[str] = ..., reason: _Optional[str] = ..., propensity: _Optional[float] = ..., features: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., predicted: _Optional[_Mapping[str, float]] = ..., outcome: _Optional[str] = ..., error: _Optional[str] = ..., latency_ms: _Optional[float] = ..., pool_latency_ms: _Optional[float] = ..., cost: _Optional[float] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., edge: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., explanation: _Optional[_Union[Explanation, _Mapping]] = ...) -> None: ...

class Explanation(_message.Message):
    __slots__ = ("policy", "chosen_by", "chosen_tier", "answering_tier", "propensity", "quality_weight", "quality_floor", "predicted", "cheapest_meeting_floor", "features_summary", "session", "cascade", "fallback_excluded")
    class PredictedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class FallbackExcludedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    POLICY_FIELD_NUMBER: _ClassVar[int]
    CHOSEN_BY_FIELD_NUMBER: _ClassVar[int]
    CHOSEN_TIER_FIELD_NUMBER: _ClassVar[int]
    ANSWERING_TIER_FIELD_NUMBER: _ClassVar[int]
    PROPENSITY_FIELD_NUMBER: _ClassVar[int]
    QUALITY_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FLOOR_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_FIELD_NUMBER: _ClassVar[int]
    CHEAPEST_MEETING_FLOOR_FIELD_NUMBER: _ClassVar[int]
    FEATURES_SUMMARY_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    CASCADE_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_EXCLUDED_FIELD_NUMBER: _ClassVar[int]
    policy: str
    chosen_by: str
    chosen_tier: str
    answering_tier: str
    propensity: float
    quality_weight: float
    quality_floor: float
    predicted: _containers.ScalarMap[str, float]
    cheapest_meeting_floor: str
    features_summary: _struct_pb2.Struct
    session: SessionExplanation
    cascade: CascadeExplanation
    fallback_excluded: _containers.ScalarMap[str, str]
    def __init__(self, policy: _Optional[str] = ..., chosen_by: _Optional[str] = ..., chosen_tier: _Optional[str] = ..., answering_tier: _Optional[str] = ..., propensity: _Optional[float] = ..., quality_weight: _Optional[float] = ..., quality_floor: _Optional[float] = ..., predicted: _Optional[_Mapping[str, float]] = ..., cheapest_meeting_floor: _Optional[str] = ..., features_summary: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., session: _Optional[_Union[SessionExplanation, _Mapping]] = ..., cascade: _Optional[_Union[CascadeExplanation, _Mapping]] = ..., fallback_excluded: _Optional[_Mapping[str, str]] = ...) -> None: ...

class SessionExplanation(_message.Message):
    __slots__ = ("key", "previous_tier", "floor_tier", "floor_applied")
    KEY_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_TIER_FIELD_NUMBER: _ClassVar[int]
    FLOOR_TIER_FIELD_NUMBER: _ClassVar[int]
    FLOOR_APPLIED_FIELD_NUMBER: _ClassVar[int]
    key: str
    previous_tier: str
    floor_tier: str
    floor_applied: bool
    def __init__(self, key: _Optional[str] = ..., previous_tier: _Optional[str] = ..., floor_tier: _Optional[str] = ..., floor_applied: _Optional[bool] = ...) -> None: ...

class CascadeExplanation(_message.Message):
    __slots__ = ("threshold", "first_tier", "confidence", "escalated_to", "skipped", "error")
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    FIRST_TIER_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    ESCALATED_TO_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    threshold: float
    first_tier: str
    confidence: float
    escalated_to: str
    skipped: str
    error: str
    def __init__(self, threshold: _Optional[float] = ..., first_tier: _Optional[str] = ..., confidence: _Optional[float] = ..., escalated_to: _Optional[str] = ..., skipped: _Optional[str] = ..., error: _Optional[str] = ...) -> None: ...
