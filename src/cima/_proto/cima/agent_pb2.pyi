from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("platform", "agent_version", "default_algorithm", "algorithms", "registers", "runtime_register", "runtime_algorithm", "scope", "isolated", "container_id", "pod_uid", "pid", "uid")
    PLATFORM_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    ALGORITHMS_FIELD_NUMBER: _ClassVar[int]
    REGISTERS_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_REGISTER_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    ISOLATED_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    POD_UID_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    UID_FIELD_NUMBER: _ClassVar[int]
    platform: str
    agent_version: str
    default_algorithm: str
    algorithms: _containers.RepeatedScalarFieldContainer[str]
    registers: _containers.RepeatedScalarFieldContainer[str]
    runtime_register: str
    runtime_algorithm: str
    scope: str
    isolated: bool
    container_id: str
    pod_uid: str
    pid: int
    uid: int
    def __init__(self, platform: _Optional[str] = ..., agent_version: _Optional[str] = ..., default_algorithm: _Optional[str] = ..., algorithms: _Optional[_Iterable[str]] = ..., registers: _Optional[_Iterable[str]] = ..., runtime_register: _Optional[str] = ..., runtime_algorithm: _Optional[str] = ..., scope: _Optional[str] = ..., isolated: _Optional[bool] = ..., container_id: _Optional[str] = ..., pod_uid: _Optional[str] = ..., pid: _Optional[int] = ..., uid: _Optional[int] = ...) -> None: ...

class Measurement(_message.Message):
    __slots__ = ("register", "algorithm", "digest")
    REGISTER_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    register: str
    algorithm: str
    digest: bytes
    def __init__(self, register: _Optional[str] = ..., algorithm: _Optional[str] = ..., digest: _Optional[bytes] = ...) -> None: ...

class GetMeasurementRequest(_message.Message):
    __slots__ = ("register", "algorithm")
    REGISTER_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    register: str
    algorithm: str
    def __init__(self, register: _Optional[str] = ..., algorithm: _Optional[str] = ...) -> None: ...

class GetMeasurementResponse(_message.Message):
    __slots__ = ("measurement",)
    MEASUREMENT_FIELD_NUMBER: _ClassVar[int]
    measurement: Measurement
    def __init__(self, measurement: _Optional[_Union[Measurement, _Mapping]] = ...) -> None: ...

class ListMeasurementsRequest(_message.Message):
    __slots__ = ("algorithm",)
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    algorithm: str
    def __init__(self, algorithm: _Optional[str] = ...) -> None: ...

class ListMeasurementsResponse(_message.Message):
    __slots__ = ("measurements",)
    MEASUREMENTS_FIELD_NUMBER: _ClassVar[int]
    measurements: _containers.RepeatedCompositeFieldContainer[Measurement]
    def __init__(self, measurements: _Optional[_Iterable[_Union[Measurement, _Mapping]]] = ...) -> None: ...

class GetEventLogRequest(_message.Message):
    __slots__ = ("log", "start", "count", "format")
    LOG_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    log: str
    start: int
    count: int
    format: str
    def __init__(self, log: _Optional[str] = ..., start: _Optional[int] = ..., count: _Optional[int] = ..., format: _Optional[str] = ...) -> None: ...

class GetEventLogResponse(_message.Message):
    __slots__ = ("log", "format", "start", "count", "total", "records")
    LOG_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    log: str
    format: str
    start: int
    count: int
    total: int
    records: bytes
    def __init__(self, log: _Optional[str] = ..., format: _Optional[str] = ..., start: _Optional[int] = ..., count: _Optional[int] = ..., total: _Optional[int] = ..., records: _Optional[bytes] = ...) -> None: ...

class BatchProof(_message.Message):
    __slots__ = ("algorithm", "leaf_index", "tree_size", "path", "root")
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    LEAF_INDEX_FIELD_NUMBER: _ClassVar[int]
    TREE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    ROOT_FIELD_NUMBER: _ClassVar[int]
    algorithm: str
    leaf_index: int
    tree_size: int
    path: _containers.RepeatedScalarFieldContainer[bytes]
    root: bytes
    def __init__(self, algorithm: _Optional[str] = ..., leaf_index: _Optional[int] = ..., tree_size: _Optional[int] = ..., path: _Optional[_Iterable[bytes]] = ..., root: _Optional[bytes] = ...) -> None: ...

class GetReportRequest(_message.Message):
    __slots__ = ("nonce", "user_data")
    NONCE_FIELD_NUMBER: _ClassVar[int]
    USER_DATA_FIELD_NUMBER: _ClassVar[int]
    nonce: bytes
    user_data: bytes
    def __init__(self, nonce: _Optional[bytes] = ..., user_data: _Optional[bytes] = ...) -> None: ...

class GetReportResponse(_message.Message):
    __slots__ = ("kind", "report", "signature", "verification_json", "scope", "binding", "batch", "platform")
    KIND_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    VERIFICATION_JSON_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    BINDING_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    PLATFORM_FIELD_NUMBER: _ClassVar[int]
    kind: str
    report: bytes
    signature: bytes
    verification_json: str
    scope: str
    binding: bytes
    batch: BatchProof
    platform: str
    def __init__(self, kind: _Optional[str] = ..., report: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., verification_json: _Optional[str] = ..., scope: _Optional[str] = ..., binding: _Optional[bytes] = ..., batch: _Optional[_Union[BatchProof, _Mapping]] = ..., platform: _Optional[str] = ...) -> None: ...

class GetEvidenceRequest(_message.Message):
    __slots__ = ("nonce", "user_data")
    NONCE_FIELD_NUMBER: _ClassVar[int]
    USER_DATA_FIELD_NUMBER: _ClassVar[int]
    nonce: bytes
    user_data: bytes
    def __init__(self, nonce: _Optional[bytes] = ..., user_data: _Optional[bytes] = ...) -> None: ...

class GetEvidenceResponse(_message.Message):
    __slots__ = ("bundle",)
    BUNDLE_FIELD_NUMBER: _ClassVar[int]
    bundle: bytes
    def __init__(self, bundle: _Optional[bytes] = ...) -> None: ...

class GetEnrollmentRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetEnrollmentResponse(_message.Message):
    __slots__ = ("ek_public", "ek_certificate", "ak_public", "ak_name", "platform")
    EK_PUBLIC_FIELD_NUMBER: _ClassVar[int]
    EK_CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    AK_PUBLIC_FIELD_NUMBER: _ClassVar[int]
    AK_NAME_FIELD_NUMBER: _ClassVar[int]
    PLATFORM_FIELD_NUMBER: _ClassVar[int]
    ek_public: bytes
    ek_certificate: bytes
    ak_public: bytes
    ak_name: bytes
    platform: str
    def __init__(self, ek_public: _Optional[bytes] = ..., ek_certificate: _Optional[bytes] = ..., ak_public: _Optional[bytes] = ..., ak_name: _Optional[bytes] = ..., platform: _Optional[str] = ...) -> None: ...

class ActivateCredentialRequest(_message.Message):
    __slots__ = ("credential_blob", "encrypted_secret")
    CREDENTIAL_BLOB_FIELD_NUMBER: _ClassVar[int]
    ENCRYPTED_SECRET_FIELD_NUMBER: _ClassVar[int]
    credential_blob: bytes
    encrypted_secret: bytes
    def __init__(self, credential_blob: _Optional[bytes] = ..., encrypted_secret: _Optional[bytes] = ...) -> None: ...

class ActivateCredentialResponse(_message.Message):
    __slots__ = ("secret",)
    SECRET_FIELD_NUMBER: _ClassVar[int]
    secret: bytes
    def __init__(self, secret: _Optional[bytes] = ...) -> None: ...
