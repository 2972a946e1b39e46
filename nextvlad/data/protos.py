"""The `tf.train` Example / SequenceExample messages, built at import time without TensorFlow.

The descriptors are assembled with `descriptor_pb2` in a *private* descriptor pool, so they never
clash with another copy of `example.proto` in the default pool (the `tfrecord` package registers
one under the same `tensorflow.*` names).

Besides the faithful messages, two wire-compatible "lazy" variants are defined:

* `LazySequenceExample`: identical to SequenceExample except that `FeatureLists.feature_list`
  is `map<string, bytes>`. A length-delimited message field and a bytes field share the same wire
  encoding, so parsing with it hands back each feature list (e.g. all 300 rgb frames) as one
  serialized `bytes` object instead of 300 Python message objects; the frames are then decoded
  with a strided numpy view (see `nextvlad.data.parsing`). This is what makes parsing fast.
* Nothing else is lazy: the context (`id`, `labels`) is parsed normally by upb.
"""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

_PACKAGE = "nextvlad_tf"  # private package name; the wire format does not contain names

_FDP = descriptor_pb2.FieldDescriptorProto


def _field(message, name: str, number: int, type_: int, label: int = _FDP.LABEL_OPTIONAL,
           type_name: str | None = None, packed: bool | None = None, oneof: int | None = None):
    field = message.field.add(name=name, number=number, type=type_, label=label)
    if type_name is not None:
        field.type_name = f".{_PACKAGE}.{type_name}"
    if packed is not None:
        field.options.packed = packed
    if oneof is not None:
        field.oneof_index = oneof
    return field


def _map_entry(parent, entry_name: str, value_type: int, value_type_name: str | None = None):
    entry = parent.nested_type.add(name=entry_name)
    entry.options.map_entry = True
    _field(entry, "key", 1, _FDP.TYPE_STRING)
    _field(entry, "value", 2, value_type, type_name=value_type_name)
    return entry


def _build_file() -> descriptor_pb2.FileDescriptorProto:
    """example.proto (tensorflow/core/example/{feature,example}.proto), proto3, plus lazy variants."""
    f = descriptor_pb2.FileDescriptorProto(name="nextvlad_example.proto", package=_PACKAGE,
                                           syntax="proto3")
    rep = _FDP.LABEL_REPEATED
    _field(f.message_type.add(name="BytesList"), "value", 1, _FDP.TYPE_BYTES, rep)
    _field(f.message_type.add(name="FloatList"), "value", 1, _FDP.TYPE_FLOAT, rep, packed=True)
    _field(f.message_type.add(name="Int64List"), "value", 1, _FDP.TYPE_INT64, rep, packed=True)

    feature = f.message_type.add(name="Feature")
    feature.oneof_decl.add(name="kind")
    _field(feature, "bytes_list", 1, _FDP.TYPE_MESSAGE, type_name="BytesList", oneof=0)
    _field(feature, "float_list", 2, _FDP.TYPE_MESSAGE, type_name="FloatList", oneof=0)
    _field(feature, "int64_list", 3, _FDP.TYPE_MESSAGE, type_name="Int64List", oneof=0)

    features = f.message_type.add(name="Features")
    _map_entry(features, "FeatureEntry", _FDP.TYPE_MESSAGE, "Feature")
    _field(features, "feature", 1, _FDP.TYPE_MESSAGE, rep, type_name="Features.FeatureEntry")

    feature_list = f.message_type.add(name="FeatureList")
    _field(feature_list, "feature", 1, _FDP.TYPE_MESSAGE, rep, type_name="Feature")

    feature_lists = f.message_type.add(name="FeatureLists")
    _map_entry(feature_lists, "FeatureListEntry", _FDP.TYPE_MESSAGE, "FeatureList")
    _field(feature_lists, "feature_list", 1, _FDP.TYPE_MESSAGE, rep,
           type_name="FeatureLists.FeatureListEntry")

    _field(f.message_type.add(name="Example"), "features", 1, _FDP.TYPE_MESSAGE,
           type_name="Features")
    sequence_example = f.message_type.add(name="SequenceExample")
    _field(sequence_example, "context", 1, _FDP.TYPE_MESSAGE, type_name="Features")
    _field(sequence_example, "feature_lists", 2, _FDP.TYPE_MESSAGE, type_name="FeatureLists")

    # Wire-compatible variants whose feature lists stay serialized bytes (see module docstring).
    lazy_lists = f.message_type.add(name="LazyFeatureLists")
    _map_entry(lazy_lists, "FeatureListEntry", _FDP.TYPE_BYTES)
    _field(lazy_lists, "feature_list", 1, _FDP.TYPE_MESSAGE, rep,
           type_name="LazyFeatureLists.FeatureListEntry")
    lazy_sequence_example = f.message_type.add(name="LazySequenceExample")
    _field(lazy_sequence_example, "context", 1, _FDP.TYPE_MESSAGE, type_name="Features")
    _field(lazy_sequence_example, "feature_lists", 2, _FDP.TYPE_MESSAGE,
           type_name="LazyFeatureLists")
    return f


_POOL = descriptor_pool.DescriptorPool()
_POOL.Add(_build_file())


def _message_class(name: str):
    return message_factory.GetMessageClass(_POOL.FindMessageTypeByName(f"{_PACKAGE}.{name}"))


BytesList = _message_class("BytesList")
FloatList = _message_class("FloatList")
Int64List = _message_class("Int64List")
Feature = _message_class("Feature")
Features = _message_class("Features")
FeatureList = _message_class("FeatureList")
FeatureLists = _message_class("FeatureLists")
Example = _message_class("Example")
SequenceExample = _message_class("SequenceExample")
LazySequenceExample = _message_class("LazySequenceExample")

__all__ = ["BytesList", "FloatList", "Int64List", "Feature", "Features", "FeatureList",
           "FeatureLists", "Example", "SequenceExample", "LazySequenceExample"]
