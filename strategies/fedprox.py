"""FedProx (Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020), server side.

The server is FedAvg's: it sends the global model and takes the sample-weighted mean of the
replies. What changes is each client's local objective, F_k(w) + (mu/2)||w - w_global||^2 with
mu = `fedprox-mu` (clients/fedprox.py), which keeps local models near the global one when client
data differ (non-IID). The paper's other part, tolerating partial work from stragglers, is not
modelled: every fedcmd client does the configured local work (`local-epochs` or `local-steps`).
Like Flower's `FedProx`, only the clients' objective differs; the wire codecs apply as for FedAvg.
"""

from __future__ import annotations

from typing import Any

from strategies.fedavg import FedAvg


class FedProx(FedAvg):
    """FedAvg on the server; clients add the proximal term (module docstring)."""

    name = "fedprox"

    def summary_extra(self) -> dict[str, Any]:
        return {"fedprox_mu": self.config["fedprox-mu"]}
