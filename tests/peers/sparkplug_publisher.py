"""A Sparkplug B edge node for the tests: publishes a scripted sequence of messages to an MQTT broker.

An encoder independent of the agent's: the Sparkplug B payload messages are described here with
protobuf's own descriptor types (field numbers and types from sparkplug_b.proto of the Sparkplug 3.0
specification) and encoded by Google's protobuf runtime, so no protoc and no generated code. MQTT is
paho-mqtt.

    python sparkplug_publisher.py --port 1883 script.json

The script is JSON: a list of sessions, each one MQTT connection of the edge node:

    [{"client_id": "press-7",
      "will": {"topic": "spBv1.0/line3/NDEATH/press-7", "payload": PAYLOAD},
      "messages": [{"topic": "spBv1.0/line3/NBIRTH/press-7", "payload": PAYLOAD}, ...],
      "end": "die"}]

PAYLOAD is {"timestamp": ms, "seq": n, "uuid": text, "metrics": [METRIC, ...]} (every key optional),
or {"raw_hex": "..."} for bytes that are not a payload at all. METRIC has "name", "alias",
"timestamp", "datatype" (a name like "Int16"), "value", "is_null", "is_transient", "is_historical",
"properties" ({"engUnit": "degC"} as String properties), and "field" to force the value field
("int_value", "long_value", ...) instead of the one the specification names for the datatype.
Signed integers are written as Tahu's encoders write them: two's complement, sign-extended to 32
bits in int_value and to 64 bits in long_value.

A session may answer rebirth requests as a real edge node does: with "rebirth": [MESSAGE, ...] it
subscribes to its NCMD topic (spBv1.0/<group>/NCMD/<edge node>, taken from the will's or the first
message's topic), and a command whose metric "Node Control/Rebirth" is true (decoded with the same
descriptors) is answered with those messages (its fresh NBIRTH and DBIRTHs). Besides messages, the
list "messages" may hold steps:

    {"touch_file": PATH}      creates the file: the node's signal to the test that it got this far
    {"wait_file": PATH}       waits (up to 30 s) until the file exists, the test's signal to go on
    {"await_rebirth": N}      waits (up to 30 s) until N rebirth requests were answered in all

Requests are answered only at "await_rebirth" steps, so a test knows which messages went out
before the answer. At the end of a rebirth session the node waits half a second for further
requests, answers them, then prints "rebirth requests: N".

"end": "disconnect" sends DISCONNECT (the broker drops the will); "die" closes the socket without
it, so the broker publishes the will (the NDEATH) as it does when an edge node loses power.
Every message is published at QoS 1 and the script waits for the broker's PUBACK, so when this
process exits 0 the broker has every message. Prints one line per message published.
"""

import argparse
import json
import os
import queue
import sys
import time

import paho.mqtt.client as mqtt
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

PACKAGE = "org.eclipse.tahu.protobuf"
F = descriptor_pb2.FieldDescriptorProto

# DataType codes of the specification.
DATATYPES = {
    "Unknown": 0, "Int8": 1, "Int16": 2, "Int32": 3, "Int64": 4, "UInt8": 5, "UInt16": 6,
    "UInt32": 7, "UInt64": 8, "Float": 9, "Double": 10, "Boolean": 11, "String": 12,
    "DateTime": 13, "Text": 14, "UUID": 15, "DataSet": 16, "Bytes": 17, "File": 18,
    "Template": 19,
}
# The value field the specification names for each datatype.
VALUE_FIELD = {
    "Int8": "int_value", "Int16": "int_value", "Int32": "int_value", "UInt8": "int_value",
    "UInt16": "int_value", "UInt32": "int_value", "Int64": "long_value", "UInt64": "long_value",
    "DateTime": "long_value", "Float": "float_value", "Double": "double_value",
    "Boolean": "boolean_value", "String": "string_value", "Text": "string_value",
    "UUID": "string_value", "Bytes": "bytes_value", "File": "bytes_value",
}


def _field(message, name, number, kind, label=F.LABEL_OPTIONAL, type_name=None, oneof=None):
    field = message.field.add()
    field.name = name
    field.number = number
    field.type = kind
    field.label = label
    if type_name is not None:
        field.type_name = f".{PACKAGE}.{type_name}"
    if oneof is not None:
        field.oneof_index = oneof


def _scalar_oneof(message, first_number, names_kinds):
    message.oneof_decl.add().name = "value"
    oneof = len(message.oneof_decl) - 1
    for offset, (name, kind) in enumerate(names_kinds):
        _field(message, name, first_number + offset, kind, oneof=oneof)


def payload_class():
    """The Payload message class, built from descriptors at run time."""
    file = descriptor_pb2.FileDescriptorProto()
    file.name = "plantline_test_sparkplug_b.proto"
    file.package = PACKAGE
    file.syntax = "proto2"
    payload = file.message_type.add()
    payload.name = "Payload"

    property_value = payload.nested_type.add()
    property_value.name = "PropertyValue"
    _field(property_value, "type", 1, F.TYPE_UINT32)
    _field(property_value, "is_null", 2, F.TYPE_BOOL)
    _scalar_oneof(property_value, 3, [
        ("int_value", F.TYPE_UINT32), ("long_value", F.TYPE_UINT64), ("float_value", F.TYPE_FLOAT),
        ("double_value", F.TYPE_DOUBLE), ("boolean_value", F.TYPE_BOOL),
        ("string_value", F.TYPE_STRING),
    ])

    property_set = payload.nested_type.add()
    property_set.name = "PropertySet"
    _field(property_set, "keys", 1, F.TYPE_STRING, F.LABEL_REPEATED)
    _field(property_set, "values", 2, F.TYPE_MESSAGE, F.LABEL_REPEATED, "Payload.PropertyValue")

    metric = payload.nested_type.add()
    metric.name = "Metric"
    _field(metric, "name", 1, F.TYPE_STRING)
    _field(metric, "alias", 2, F.TYPE_UINT64)
    _field(metric, "timestamp", 3, F.TYPE_UINT64)
    _field(metric, "datatype", 4, F.TYPE_UINT32)
    _field(metric, "is_historical", 5, F.TYPE_BOOL)
    _field(metric, "is_transient", 6, F.TYPE_BOOL)
    _field(metric, "is_null", 7, F.TYPE_BOOL)
    _field(metric, "properties", 9, F.TYPE_MESSAGE, type_name="Payload.PropertySet")
    _scalar_oneof(metric, 10, [
        ("int_value", F.TYPE_UINT32), ("long_value", F.TYPE_UINT64), ("float_value", F.TYPE_FLOAT),
        ("double_value", F.TYPE_DOUBLE), ("boolean_value", F.TYPE_BOOL),
        ("string_value", F.TYPE_STRING), ("bytes_value", F.TYPE_BYTES),
    ])

    _field(payload, "timestamp", 1, F.TYPE_UINT64)
    _field(payload, "metrics", 2, F.TYPE_MESSAGE, F.LABEL_REPEATED, "Payload.Metric")
    _field(payload, "seq", 3, F.TYPE_UINT64)
    _field(payload, "uuid", 4, F.TYPE_STRING)
    _field(payload, "body", 5, F.TYPE_BYTES)

    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{PACKAGE}.Payload"))


Payload = payload_class()


def _wire_value(datatype, field, value):
    """The value as the field stores it: signed integers in two's complement, as Tahu does."""
    if field == "int_value" and isinstance(value, int) and value < 0:
        return value & 0xFFFFFFFF
    if field == "long_value" and isinstance(value, int) and value < 0:
        return value & 0xFFFFFFFFFFFFFFFF
    if field == "bytes_value":
        return bytes.fromhex(value)
    return value


def encode(spec):
    """The bytes of a PAYLOAD from the script."""
    if "raw_hex" in spec:
        return bytes.fromhex(spec["raw_hex"])
    payload = Payload()
    for key in ("timestamp", "seq", "uuid"):
        if key in spec:
            setattr(payload, key, spec[key])
    for item in spec.get("metrics", []):
        metric = payload.metrics.add()
        for key in ("name", "alias", "timestamp", "is_null", "is_transient", "is_historical"):
            if key in item:
                setattr(metric, key, item[key])
        datatype = item.get("datatype")
        if datatype is not None:
            metric.datatype = DATATYPES[datatype]
        for key, text in item.get("properties", {}).items():
            metric.properties.keys.append(key)
            value = metric.properties.values.add()
            value.type = DATATYPES["String"]
            value.string_value = text
        if "value" in item:
            field = item.get("field") or VALUE_FIELD[datatype]
            setattr(metric, field, _wire_value(datatype, field, item["value"]))
    return payload.SerializeToString()


def is_rebirth_request(data):
    """Whether an NCMD payload asks for a rebirth: metric "Node Control/Rebirth" set to true."""
    payload = Payload()
    payload.ParseFromString(data)
    return any(
        m.name == "Node Control/Rebirth" and m.WhichOneof("value") == "boolean_value"
        and m.boolean_value
        for m in payload.metrics
    )


def command_topic(session):
    """spBv1.0/<group>/NCMD/<edge node> of the session's edge node."""
    topic = (session.get("will") or session["messages"][0])["topic"]
    namespace, group, _kind, node = topic.split("/")[:4]
    return f"{namespace}/{group}/NCMD/{node}"


def publish(client, message):
    info = client.publish(message["topic"], encode(message["payload"]), qos=1)
    info.wait_for_publish(timeout=10)
    if not info.is_published():
        raise SystemExit(f"the broker did not acknowledge {message['topic']} within 10 s")
    print(f"published {message['topic']}", flush=True)


def wait_file(path):
    deadline = time.monotonic() + 30
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise SystemExit(f"{path} did not appear within 30 s")
        time.sleep(0.05)


def run_session(host, port, session):
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=session["client_id"],
        protocol=mqtt.MQTTv311,
        reconnect_on_failure=False,
    )
    will = session.get("will")
    if will is not None:
        client.will_set(will["topic"], encode(will["payload"]), qos=1)
    # Requests are answered from this thread, never from paho's network thread, where waiting
    # for a PUBACK would block the very loop that receives it.
    requests = queue.Queue()
    rebirth = session.get("rebirth")
    received = 0
    if rebirth is not None:
        subscribed = queue.Queue()
        command = command_topic(session)

        def on_message(_client, _userdata, message):
            if message.topic == command and is_rebirth_request(message.payload):
                requests.put(message.topic)

        client.on_message = on_message
        client.on_subscribe = lambda *_args: subscribed.put(True)
    client.connect(host, port, keepalive=10)
    client.loop_start()
    if rebirth is not None:
        client.subscribe(command, qos=0)
        subscribed.get(timeout=10)

    def answer(wait_s):
        nonlocal received
        requests.get(timeout=wait_s)
        received += 1
        print("rebirth requested", flush=True)
        for message in rebirth:
            publish(client, message)

    def answer_pending():
        while not requests.empty():
            answer(0)

    for step in session["messages"]:
        if "touch_file" in step:
            with open(step["touch_file"], "w", encoding="utf-8"):
                pass
        elif "wait_file" in step:
            wait_file(step["wait_file"])
        elif "await_rebirth" in step:
            while received < step["await_rebirth"]:
                try:
                    answer(30)
                except queue.Empty:
                    raise SystemExit("no rebirth request within 30 s") from None
        else:
            publish(client, step)
    if rebirth is not None:
        time.sleep(0.5)
        answer_pending()
        print(f"rebirth requests: {received}", flush=True)
    if session.get("end", "disconnect") == "die":
        # No DISCONNECT: the broker sees the connection drop and publishes the will.
        client.loop_stop()
        client.socket().close()
        print("died", flush=True)
    else:
        client.disconnect()
        client.loop_stop()
        print("disconnected", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("script", help="the JSON script: a list of sessions")
    args = parser.parse_args()
    with open(args.script, encoding="utf-8") as file:
        sessions = json.load(file)
    for session in sessions:
        run_session(args.host, args.port, session)
        # Lets the broker finish with one connection (and publish its will) before the next.
        time.sleep(0.2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
