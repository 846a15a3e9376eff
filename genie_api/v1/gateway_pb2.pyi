from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FrameFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FRAME_FORMAT_UNSPECIFIED: _ClassVar[FrameFormat]
    FRAME_FORMAT_PNG: _ClassVar[FrameFormat]
    FRAME_FORMAT_RAW: _ClassVar[FrameFormat]
FRAME_FORMAT_UNSPECIFIED: FrameFormat
FRAME_FORMAT_PNG: FrameFormat
FRAME_FORMAT_RAW: FrameFormat

class Frame(_message.Message):
    __slots__ = ("height", "width", "channels", "format", "data")
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    height: int
    width: int
    channels: int
    format: FrameFormat
    data: bytes
    def __init__(self, height: _Optional[int] = ..., width: _Optional[int] = ..., channels: _Optional[int] = ..., format: _Optional[_Union[FrameFormat, str]] = ..., data: _Optional[bytes] = ...) -> None: ...

class RawFrames(_message.Message):
    __slots__ = ("count", "height", "width", "channels", "data")
    COUNT_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    count: int
    height: int
    width: int
    channels: int
    data: bytes
    def __init__(self, count: _Optional[int] = ..., height: _Optional[int] = ..., width: _Optional[int] = ..., channels: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class SamplingOptions(_message.Message):
    __slots__ = ("steps", "temperature", "seed")
    STEPS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    steps: int
    temperature: float
    seed: int
    def __init__(self, steps: _Optional[int] = ..., temperature: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class OpenSessionRequest(_message.Message):
    __slots__ = ("image", "frames", "options", "frame_format", "world")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    FRAME_FORMAT_FIELD_NUMBER: _ClassVar[int]
    WORLD_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    frames: RawFrames
    options: SamplingOptions
    frame_format: FrameFormat
    world: str
    def __init__(self, image: _Optional[bytes] = ..., frames: _Optional[_Union[RawFrames, _Mapping]] = ..., options: _Optional[_Union[SamplingOptions, _Mapping]] = ..., frame_format: _Optional[_Union[FrameFormat, str]] = ..., world: _Optional[str] = ...) -> None: ...

class OpenSessionResponse(_message.Message):
    __slots__ = ("session", "frame")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    FRAME_FIELD_NUMBER: _ClassVar[int]
    session: Session
    frame: Frame
    def __init__(self, session: _Optional[_Union[Session, _Mapping]] = ..., frame: _Optional[_Union[Frame, _Mapping]] = ...) -> None: ...

class StepRequest(_message.Message):
    __slots__ = ("session_id", "action", "frame_format")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    FRAME_FORMAT_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    action: int
    frame_format: FrameFormat
    def __init__(self, session_id: _Optional[str] = ..., action: _Optional[int] = ..., frame_format: _Optional[_Union[FrameFormat, str]] = ...) -> None: ...

class StepResponse(_message.Message):
    __slots__ = ("session_id", "step", "frame", "action")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    FRAME_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    step: int
    frame: Frame
    action: int
    def __init__(self, session_id: _Optional[str] = ..., step: _Optional[int] = ..., frame: _Optional[_Union[Frame, _Mapping]] = ..., action: _Optional[int] = ...) -> None: ...

class Session(_message.Message):
    __slots__ = ("session_id", "step", "version", "context_frames", "actions", "options", "created_unix", "expires_unix", "world", "world_digest")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FRAMES_FIELD_NUMBER: _ClassVar[int]
    ACTIONS_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_UNIX_FIELD_NUMBER: _ClassVar[int]
    WORLD_FIELD_NUMBER: _ClassVar[int]
    WORLD_DIGEST_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    step: int
    version: int
    context_frames: int
    actions: _containers.RepeatedScalarFieldContainer[int]
    options: SamplingOptions
    created_unix: float
    expires_unix: float
    world: str
    world_digest: str
    def __init__(self, session_id: _Optional[str] = ..., step: _Optional[int] = ..., version: _Optional[int] = ..., context_frames: _Optional[int] = ..., actions: _Optional[_Iterable[int]] = ..., options: _Optional[_Union[SamplingOptions, _Mapping]] = ..., created_unix: _Optional[float] = ..., expires_unix: _Optional[float] = ..., world: _Optional[str] = ..., world_digest: _Optional[str] = ...) -> None: ...

class GetSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class CloseSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class CloseSessionResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListActionsRequest(_message.Message):
    __slots__ = ("world", "session_id")
    WORLD_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    world: str
    session_id: str
    def __init__(self, world: _Optional[str] = ..., session_id: _Optional[str] = ...) -> None: ...

class Action(_message.Message):
    __slots__ = ("id", "name")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    id: int
    name: str
    def __init__(self, id: _Optional[int] = ..., name: _Optional[str] = ...) -> None: ...

class KeyBinding(_message.Message):
    __slots__ = ("key", "action", "share")
    KEY_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    key: str
    action: int
    share: float
    def __init__(self, key: _Optional[str] = ..., action: _Optional[int] = ..., share: _Optional[float] = ...) -> None: ...

class ListActionsResponse(_message.Message):
    __slots__ = ("actions", "height", "width", "channels", "window", "keys")
    ACTIONS_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    actions: _containers.RepeatedCompositeFieldContainer[Action]
    height: int
    width: int
    channels: int
    window: int
    keys: _containers.RepeatedCompositeFieldContainer[KeyBinding]
    def __init__(self, actions: _Optional[_Iterable[_Union[Action, _Mapping]]] = ..., height: _Optional[int] = ..., width: _Optional[int] = ..., channels: _Optional[int] = ..., window: _Optional[int] = ..., keys: _Optional[_Iterable[_Union[KeyBinding, _Mapping]]] = ...) -> None: ...

class InferActionsRequest(_message.Message):
    __slots__ = ("frames", "world")
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    WORLD_FIELD_NUMBER: _ClassVar[int]
    frames: RawFrames
    world: str
    def __init__(self, frames: _Optional[_Union[RawFrames, _Mapping]] = ..., world: _Optional[str] = ...) -> None: ...

class ListWorldsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorldInfo(_message.Message):
    __slots__ = ("name", "version", "ref", "digest", "retired", "published_unix")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REF_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    RETIRED_FIELD_NUMBER: _ClassVar[int]
    PUBLISHED_UNIX_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    ref: str
    digest: str
    retired: bool
    published_unix: float
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., ref: _Optional[str] = ..., digest: _Optional[str] = ..., retired: _Optional[bool] = ..., published_unix: _Optional[float] = ...) -> None: ...

class ListWorldsResponse(_message.Message):
    __slots__ = ("worlds", "default_world", "catalogue")
    WORLDS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_WORLD_FIELD_NUMBER: _ClassVar[int]
    CATALOGUE_FIELD_NUMBER: _ClassVar[int]
    worlds: _containers.RepeatedCompositeFieldContainer[WorldInfo]
    default_world: str
    catalogue: bool
    def __init__(self, worlds: _Optional[_Iterable[_Union[WorldInfo, _Mapping]]] = ..., default_world: _Optional[str] = ..., catalogue: _Optional[bool] = ...) -> None: ...

class InferActionsResponse(_message.Message):
    __slots__ = ("actions",)
    ACTIONS_FIELD_NUMBER: _ClassVar[int]
    actions: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, actions: _Optional[_Iterable[int]] = ...) -> None: ...
