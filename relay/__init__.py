"""labrelay: reach a lab's private hosts through a relay, over one resilient SSH link."""

#: PEP 440.  A labrelay client sends it in its SSH version line
#: (relay.ssh.peersoftware), so a relay's operator sees which agents are old: change it
#: whenever what is released changes (a ".devN" between releases).
__version__ = "0.2.0.dev0"
