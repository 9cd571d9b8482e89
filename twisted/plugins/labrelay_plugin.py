"""twistd plugin: ``twistd -n labrelay --config node.toml``."""

from twisted.application.service import ServiceMaker

labrelay = ServiceMaker(
    "labrelay",
    "relay.ops.tap",
    "labrelay: lab link agent and relay (see `labrelay --help`)",
    "labrelay",
)
