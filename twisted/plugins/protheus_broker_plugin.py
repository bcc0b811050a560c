"""twistd plugins of protheus-broker: lazy, nothing heavy imported here."""

from twisted.application.service import ServiceMaker

protheusBroker = ServiceMaker(
    "protheus-broker",
    "protheus_broker.tap",
    "Load-balancing broker for TOTVS Protheus AppServers (SmartClient desktop).",
    "protheus-broker",
)
protheusAppServerSim = ServiceMaker(
    "protheus-appserver-sim",
    "protheus_broker.sim.tap",
    "Sample AppServer for demos, tests and benchmarks (greets, then echoes).",
    "protheus-appserver-sim",
)
protheusAgent = ServiceMaker(
    "protheus-agent",
    "protheus_broker.agent.tap",
    "Agent beside TOTVS AppServers: reports their memory, CPU, threads and users to the broker.",
    "protheus-agent",
)
protheusConnect = ServiceMaker(
    "protheus-connect",
    "protheus_broker.resume.tap",
    "Workstation connector: SmartClient sessions to the broker that survive network drops.",
    "protheus-connect",
)
protheusLicense = ServiceMaker(
    "protheus-license",
    "protheus_broker.license.tap",
    "License server for protheus-broker: leased, counted seats per license class, journalled.",
    "protheus-license",
)
