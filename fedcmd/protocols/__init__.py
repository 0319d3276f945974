"""One protocol module per algorithm: its declaration (`fedcmd.algorithms`) and the records its server
and clients exchange. Both sides import these modules; they import no server code."""
