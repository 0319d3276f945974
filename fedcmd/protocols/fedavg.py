"""FedAvg's protocol: the dense model down (`weights`, `buffers`; a `sync` record under a lossy
`codec-down`), the trained model (or its encoded change) up, with `metrics`. Every record and
helper it uses is the shared wire vocabulary (`fedcmd.wire`)."""

from fedcmd.algorithms import Algorithm

ALGORITHMS = (
    Algorithm(
        "fedavg",
        server="strategies.fedavg:FedAvg",
        client="clients.fedavg:train",
        doc="FedAvg (McMahan et al., 2017): the sample-weighted mean of the clients' models",
    ),
)
