"""labrelay: reach a lab's private hosts through a relay, over one resilient SSH link."""

__version__ = "0.1.0"
