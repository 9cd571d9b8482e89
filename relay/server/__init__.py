"""The relay: the SSH server shell, public listeners, the data port, grants."""
