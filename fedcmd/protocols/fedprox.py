"""FedProx's protocol (Li et al., MLSys 2020): FedAvg's records (fedcmd/protocols/fedavg.py); the
clients also read `fedprox-mu`, the weight of the proximal term, from the train message's config."""

from fedcmd.algorithms import Algorithm, Key, non_negative

ALGORITHMS = (
    Algorithm(
        "fedprox",
        server="strategies.fedprox:FedProx",
        client="clients.fedprox:train",
        doc="FedProx: FedAvg with the proximal term (mu/2)||w - w_global||^2 in every client's local objective",
        keys={
            "fedprox-mu": Key(
                float,
                0.1,
                non_negative,
                "non-negative",
                "mu, weight of the proximal term (0: FedAvg's local objective)",
            )
        },
        client_keys=("fedprox-mu",),
    ),
)
