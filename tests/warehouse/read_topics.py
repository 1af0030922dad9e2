"""Reads Herald's decision and dispatch topics the way a warehouse team would: Confluent's
Python client, read_committed, values decoded by AvroDeserializer through the registry's
Confluent-compatible API. Prints one JSON line per record (topic, partition, offset, key and
the decoded value; a union of records shows as [record name, fields]), so a test can hold it
against Herald's own reading of the same offsets. It is also the README's example consumer.

    python read_topics.py --bootstrap HOST:PORT --registry URL [--user-info USER:PASSWORD]
                          [--ca-file CA.pem] TOPIC...
"""

import argparse
import datetime
import decimal
import json
import sys

from confluent_kafka import Consumer, KafkaError, TopicPartition
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer
from confluent_kafka.serialization import MessageField, SerializationContext


def plain(value):
    """JSON for what fastavro returns: timestamps as epoch milliseconds, decimals as their
    exact text, bytes as hex."""
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, datetime.datetime):
        return int(value.timestamp() * 1000)
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, tuple):
        return [value[0], plain(value[1])]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def main():
    args = argparse.ArgumentParser()
    args.add_argument("--bootstrap", required=True)
    args.add_argument("--registry", required=True)
    args.add_argument("--user-info")
    args.add_argument("--ca-file")
    args.add_argument("topics", nargs="+")
    a = args.parse_args()

    # Without a timeout the client waits for ever on a request the registry never answers;
    # with one, it retries (max.retries) like any other transport error.
    registry_conf = {"url": a.registry, "timeout": 10, "max.retries": 5}
    if a.user_info:
        registry_conf["basic.auth.user.info"] = a.user_info
    if a.ca_file:
        registry_conf["ssl.ca.location"] = a.ca_file
    registry = SchemaRegistryClient(registry_conf)
    # With the writer's schema from the registry; record names kept so a union's branch shows.
    values = AvroDeserializer(registry, return_record_name=True)

    consumer = Consumer(
        {
            "bootstrap.servers": a.bootstrap,
            "group.id": "warehouse-example",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "enable.partition.eof": True,
        }
    )
    assignment = []
    for topic in a.topics:
        metadata = consumer.list_topics(topic, timeout=30).topics[topic]
        if metadata.error is not None:
            sys.exit(f"{topic}: {metadata.error}")
        for p in metadata.partitions:
            assignment.append(TopicPartition(topic, p, 0))
    consumer.assign(assignment)
    open_partitions = {(tp.topic, tp.partition) for tp in assignment}
    while open_partitions:
        msg = consumer.poll(30)
        if msg is None:
            sys.exit(f"no record and no end of partition within 30 s: {sorted(open_partitions)}")
        if msg.error():
            if msg.error().code() == KafkaError._PARTITION_EOF:
                open_partitions.discard((msg.topic(), msg.partition()))
                continue
            sys.exit(f"{msg.topic()}[{msg.partition()}]: {msg.error()}")
        context = SerializationContext(msg.topic(), MessageField.VALUE)
        value = values(msg.value(), context)
        key = msg.key().decode("utf-8") if msg.key() is not None else None
        print(
            json.dumps(
                {
                    "topic": msg.topic(),
                    "partition": msg.partition(),
                    "offset": msg.offset(),
                    "key": key,
                    "value": plain(value),
                },
                sort_keys=True,
            )
        )
    consumer.close()


if __name__ == "__main__":
    main()
