"""``labrelay check``: everything start-up would refuse, found without starting.

As ``sshd -t`` does for sshd: the config file is parsed (every problem of every entry
at once), then what it names on disk is checked the way start-up would — each link's
private key files, the relay's grant files (each bad line; who else may change them),
the revoked-keys list, the relay's host key if
there is one (readable by the relay's user only, a key), the admin token file — and
every problem is listed.  Nothing listens, connects or writes: a missing host key is
not a problem (start-up generates it).  A reload runs the same checks on the file
it read before it changes anything (:mod:`relay.ops.reload`).
"""

from __future__ import annotations

from relay.config.errors import ConfigError, ConfigErrors
from relay.config.schema import NodeConfig
from relay.ops.status import TokenError, read_token
from relay.ssh.identity import load_identities


def node_problems(config: NodeConfig) -> list[ConfigError]:
    """Every problem start-up would find in ``config`` beyond its syntax; empty if none."""
    problems: list[ConfigError] = []
    if not config.links and config.relay is None and not config.forwards:
        problems.append(ConfigError(
            config.source, "link", "nothing to run: no [[link]], [relay] or [[forward]] "
            "configured", "add a [[link]] table, or give [user@]host on the command line"))
    for index, link in enumerate(config.links):
        try:
            load_identities(config, link, index)
        except ConfigError as e:
            problems.append(e)
    if config.relay is not None:
        from relay.server.grants import grant_problems

        problems += grant_problems(config.relay, config.source)
        from relay.server.keytrust import revoked_keys_problems

        problems += revoked_keys_problems(config.relay.revoked_keys)
        from relay.server.hostkeyfile import host_key_problems

        problems += host_key_problems(config.relay.state_dir, config.relay.next_host_key)
    if config.admin is not None and config.admin.token_file is not None:
        try:
            read_token(config.admin.token_file)
        except TokenError as e:
            problems.append(ConfigError(config.source, "admin.token_file", str(e)))
    return problems


def check_config(load: object) -> list[ConfigError]:
    """Load (``load()`` returns a NodeConfig or raises) and check; every problem."""
    try:
        config = load()  # type: ignore[operator]
    except ConfigErrors as e:
        return list(e.errors)
    except ConfigError as e:
        return [e]
    return node_problems(config)
