#!/usr/bin/env python3
"""Checks walbridge's schema registry and topics with Confluent's own Python client.

A client nobody here wrote: confluent-kafka's SchemaRegistryClient, AvroSerializer and
AvroDeserializer (installed by tests/install-prereqs.sh). Two parts:

1. Registry: register, latest version, schema by id, compatibility levels and dry runs, an
   incompatible registration refused with 409, serializer/deserializer round trip, soft and
   hard subject deletes, and the schema id still answering afterwards.
2. Topic (with --bootstrap and --topic): reads the topic from offset 0 of every partition and
   decodes each message's key and value through the registry, printing one JSON line per
   message: {"topic", "partition", "offset", "key", "value"}.

Every check prints one JSON line {"check": name, "ok": true}; the first failure prints the
reason to stderr and exits 1. Usage:

    confluent_client.py --registry http://127.0.0.1:8081 [--prefix NAME]
                        [--bootstrap HOST:PORT --topic TOPIC --expect N [--timeout S]]
"""

import argparse
import base64
import datetime
import decimal
import json
import sys
import time
import uuid

from confluent_kafka import Consumer, KafkaException, TopicPartition
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.schema_registry.error import SchemaRegistryError
from confluent_kafka.serialization import MessageField, SerializationContext


def fail(message):
    print(f"confluent_client: {message}", file=sys.stderr)
    sys.exit(1)


def check(name, condition, detail=""):
    if not condition:
        fail(f"check {name} failed: {detail}")
    print(json.dumps({"check": name, "ok": True}), flush=True)


def record(fields):
    return json.dumps({"type": "record", "name": "Greeting", "namespace": "walbridge.test",
                       "fields": fields})


V1 = record([{"name": "id", "type": "long"}, {"name": "text", "type": "string"}])
V2 = record([{"name": "id", "type": "long"}, {"name": "text", "type": "string"},
             {"name": "lang", "type": "string", "default": "en"}])
BAD = record([{"name": "id", "type": "long"}, {"name": "text", "type": "int"}])


def registry_checks(url, prefix):
    client = SchemaRegistryClient({"url": url})
    topic = f"{prefix}-pyclient"
    subject = f"{topic}-value"

    id1 = client.register_schema(subject, Schema(V1, "AVRO"))
    check("register", isinstance(id1, int) and id1 > 0, id1)
    latest = client.get_latest_version(subject)
    check("get_latest_version", latest.schema_id == id1 and latest.version == 1,
          f"{latest.schema_id} {latest.version}")
    fetched = client.get_schema(id1)
    check("get_schema", json.loads(fetched.schema_str) == json.loads(V1), fetched.schema_str)
    check("get_schema_types", "AVRO" in client.get_schema_types())

    check("set_compatibility", client.set_compatibility(subject, "FULL") ==
          {"compatibility": "FULL"})
    check("get_compatibility", client.get_compatibility(subject) == "FULL")
    check("test_compatibility_ok", client.test_compatibility(subject, Schema(V2, "AVRO")) is True)
    check("test_compatibility_bad", client.test_compatibility(subject, Schema(BAD, "AVRO"))
          is False)
    try:
        client.register_schema(subject, Schema(BAD, "AVRO"))
        fail("an incompatible schema was registered")
    except SchemaRegistryError as e:
        check("register_incompatible_409", e.http_status_code == 409 and e.error_code == 409,
              f"{e.http_status_code} {e.error_code} {e.error_message}")

    # The serializer registers V2 itself (TopicNameStrategy: <topic>-value).
    serializer = AvroSerializer(client, V2, conf={"auto.register.schemas": True})
    deserializer = AvroDeserializer(client)
    ctx = SerializationContext(topic, MessageField.VALUE)
    value = {"id": 7, "text": "hello", "lang": "nl"}
    framed = serializer(value, ctx)
    id2 = int.from_bytes(framed[1:5], "big")
    check("serialize_frames_with_magic_and_id", framed[0] == 0 and id2 != id1, framed[:5])
    check("deserialize_round_trip", deserializer(framed, ctx) == value)
    check("get_versions", client.get_versions(subject) == [1, 2], client.get_versions(subject))

    check("delete_subject_soft", client.delete_subject(subject) == [1, 2])
    check("subject_gone", subject not in client.get_subjects())
    check("delete_subject_permanent", client.delete_subject(subject, permanent=True) == [1, 2])
    # A new client has no cache: the ids must still answer from the registry.
    fresh = SchemaRegistryClient({"url": url})
    check("ids_answer_after_delete",
          json.loads(fresh.get_schema(id2).schema_str) == json.loads(V2))
    check("deserialize_after_delete", AvroDeserializer(fresh)(framed, ctx) == value)


def to_json(value):
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(value).decode()
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    raise TypeError(f"cannot print {type(value)}")


def consume(url, bootstrap, topic, expect, timeout):
    client = SchemaRegistryClient({"url": url})
    decode = AvroDeserializer(client)
    consumer = Consumer({
        "bootstrap.servers": bootstrap,
        "group.id": f"confluent-client-{uuid.uuid4()}",
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
    })
    try:
        metadata = consumer.list_topics(topic, timeout=10)
        partitions = metadata.topics[topic].partitions if topic in metadata.topics else {}
        if not partitions:
            fail(f"topic {topic} has no partitions at {bootstrap}")
        # Offset 0 explicitly: no ListOffsets round trip needed to find the beginning.
        consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
        seen = 0
        deadline = time.monotonic() + timeout
        while seen < expect and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            if msg.error():
                raise KafkaException(msg.error())
            key_ctx = SerializationContext(topic, MessageField.KEY)
            value_ctx = SerializationContext(topic, MessageField.VALUE)
            key = decode(msg.key(), key_ctx) if msg.key() else None
            value = decode(msg.value(), value_ctx) if msg.value() else None
            print(json.dumps({"topic": msg.topic(), "partition": msg.partition(),
                              "offset": msg.offset(), "key": key, "value": value},
                             default=to_json), flush=True)
            seen += 1
        if seen < expect:
            fail(f"read {seen} of {expect} messages from {topic} in {timeout} s")
    finally:
        consumer.close()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--registry", required=True)
    p.add_argument("--prefix", default=f"py{uuid.uuid4().hex[:8]}")
    p.add_argument("--bootstrap")
    p.add_argument("--topic")
    p.add_argument("--expect", type=int, default=1)
    p.add_argument("--timeout", type=float, default=60.0)
    args = p.parse_args()
    try:
        registry_checks(args.registry, args.prefix)
        if args.bootstrap and args.topic:
            consume(args.registry, args.bootstrap, args.topic, args.expect, args.timeout)
    except SystemExit:
        raise
    except Exception as e:  # any client error is a failed check, with its reason
        fail(f"{type(e).__name__}: {e}")


if __name__ == "__main__":
    main()
