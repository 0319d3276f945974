"""The fedcmd ClientApp: one app for every strategy; the server's config names the algorithm."""

from __future__ import annotations

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedcmd.algorithms import algorithm
from fedcmd.config import client_keys, resolve

app = ClientApp()


def partition_id(context: Context) -> int:
    if "partition-id" not in context.node_config:
        raise ValueError(
            "this SuperNode has no 'partition-id' in its node config "
            "(start it with --node-config 'partition-id=K num-partitions=N')"
        )
    return int(context.node_config["partition-id"])


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server which data partition this node holds."""
    return Message(RecordDict({"info": MetricRecord({"partition-id": partition_id(context)})}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    received = dict(msg.content["config"])
    config = resolve({key: received[key] for key in client_keys(str(received["strategy"]))})
    config["server-round"] = int(received["server-round"])
    # Where a client that keeps local-training state writes its copies for resumed runs (clients/common.py).
    config["run-token"] = str(received.get("run-token", ""))
    config["client-state-dir"] = str(received.get("client-state-dir", ""))
    content = algorithm(config["strategy"]).client_function()(msg.content, context, config, partition_id(context))
    return Message(content, reply_to=msg)
