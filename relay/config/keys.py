"""The file's vocabulary: every key each TOML section accepts, with an example.

The examples are the hints of the errors (``e.g. keepalive_count = 3``, "did you
mean 'host'?"), so they are written as an operator would write the key.  A key
missing here is refused as unknown by :class:`relay.config.section.Section`.
"""

from __future__ import annotations

from relay.config.grammar import EXAMPLE_FINGERPRINT

TOP_KEYS = {
    "admin": '[admin] listen = "127.0.0.1:7022"',
    "link": '[[link]] host = "cloud.example.org"',
    "relay": '[relay] listen = "0.0.0.0:2222"',
    "forward": '[[forward]] listen = "0.0.0.0:2201", connect = "localhost:22"',
}
ADMIN_KEYS = {"listen": 'listen = "127.0.0.1:7022"',
              "token_file": 'token_file = "/etc/labrelay/admin.token"',
              "max_connections": "max_connections = 32",
              "max_connections_per_source": "max_connections_per_source = 8",
              "connection_lifetime": "connection_lifetime = 30",
              "max_body": "max_body = 65536"}
LINK_KEYS = {
    "name": 'name = "cloud"',
    "host": 'host = "cloud.example.org"',
    "port": "port = 22",
    "user": 'user = "lab"',
    "identity": 'identity = "~/.ssh/id_ed25519"',
    "known_hosts": 'known_hosts = "~/.ssh/known_hosts"',
    "global_known_hosts": 'global_known_hosts = "/etc/ssh/ssh_known_hosts"',
    "host_key": f'host_key = "{EXAMPLE_FINGERPRINT}"',
    "strict_host_key_checking": 'strict_host_key_checking = "accept-new"',
    "keepalive_interval": "keepalive_interval = 15",
    "keepalive_count": "keepalive_count = 3",
    "backoff_initial": "backoff_initial = 1.0",
    "backoff_max": "backoff_max = 60.0",
    "backoff_factor": "backoff_factor = 1.5",
    "backoff_jitter": "backoff_jitter = 0.2",
    "connect_timeout": "connect_timeout = 15",
    "local_wait": "local_wait = 10",
    "fast_path_pool": "fast_path_pool = 4",
    "transport": 'transport = "tls"',
    "tls_port": "tls_port = 443",
    "tls_server_name": 'tls_server_name = "relay.example.org"',
    "tls_ca_file": 'tls_ca_file = "/etc/labrelay/relay-ca.pem"',
    "tls_pin": 'tls_pin = "sha256//YLh1dUR9y6Kja30RrAn7JKnbQG/uEtLMkBgFF2Fuihg="',
    "proxy": 'proxy = "http://proxy.example.org:3128"',
    "resume_grace": "resume_grace = 60",
    "max_sessions": "max_sessions = 1024",
    "max_connecting": "max_connecting = 128",
    "max_sessions_per_target": "max_sessions_per_target = 512",
    "window": "window = 2097152",
    "max_packet": "max_packet = 32768",
    "remote": '[[link.remote]] listen = "2201", connect = "localhost:22"',
    "local": '[[link.local]] listen = "127.0.0.1:8888", connect = "localhost:8888"',
}
REMOTE_KEYS = {
    "listen": 'listen = "2201"',
    "connect": 'connect = "10.0.0.5:22"',
    "service": 'service = "gpu-cluster:22"',
    "name": 'name = "gpu-ssh"',
}
LOCAL_KEYS = {
    "listen": 'listen = "127.0.0.1:8888"',
    "connect": 'connect = "localhost:8888"',
    "name": 'name = "jupyter"',
}
RELAY_KEYS = {
    "listen": 'listen = "0.0.0.0:2222"',
    "state_dir": 'state_dir = "/var/lib/labrelay"',
    "next_host_key": 'next_host_key = "/var/lib/labrelay/next/ssh_host_ed25519_key"',
    "public_bind": 'public_bind = "0.0.0.0"',
    "agents_file": 'agents_file = "agents"',
    "users_file": 'users_file = "users"',
    "revoked_keys": 'revoked_keys = "revoked.krl"',
    "trusted_user_ca": 'trusted_user_ca = ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA... lab_ca"]',
    "login_grace": "login_grace = 30",
    "max_auth_tries": "max_auth_tries = 6",
    "kex_timeout": "kex_timeout = 30",
    "max_unauthenticated": "max_unauthenticated = 64",
    "per_source_max_unauthenticated": "per_source_max_unauthenticated = 10",
    "per_source_netblock4": "per_source_netblock4 = 32",
    "per_source_netblock6": "per_source_netblock6 = 64",
    "penalties": "[relay.penalties] authfail = 5, noauth = 1, grace_exceeded = 20",
    "penalty_exempt": 'penalty_exempt = ["192.0.2.0/24", "2001:db8::/48"]',
    "crowding": "[relay.crowding] silent = 2, handshake = 10, auth = 20, netblock4 = 24, "
                "netblock6 = 48",
    "max_channels": "max_channels = 1024",
    "max_sessions_per_user": "max_sessions_per_user = 64",
    "max_connections_per_user": "max_connections_per_user = 64",
    "idle_timeout": "idle_timeout = 0",
    "public_wait": "public_wait = 10",
    "public_max_connections": "public_max_connections = 512",
    "public_max_per_source": "public_max_per_source = 128",
    "public_per_source_exempt": 'public_per_source_exempt = ["198.51.100.7", "2001:db8:5::/48"]',
    "early_confirm": "early_confirm = true",
    "resume_grace": "resume_grace = 60",
    "resume_max_sessions": "resume_max_sessions = 512",
    "resume_max_sessions_per_agent": "resume_max_sessions_per_agent = 128",
    "keepalive_interval": "keepalive_interval = 15",
    "keepalive_count": "keepalive_count = 3",
    "window": "window = 2097152",
    "max_packet": "max_packet = 32768",
    "data_port": "data_port = 2223",
    "data_bind": 'data_bind = "0.0.0.0"',
    "e2e_services": 'e2e_services = ["gpu-cluster:22", "*:22"]',
    "token_lifetime": "token_lifetime = 10",
    "data_hello_timeout": "data_hello_timeout = 5",
    "grants_poll_interval": "grants_poll_interval = 0.25",
    "max_tokens_per_session": "max_tokens_per_session = 64",
    "max_tokens_per_user": "max_tokens_per_user = 256",
    "tls_cert": 'tls_cert = "/etc/letsencrypt/live/relay.example.org/fullchain.pem"',
    "tls_key": 'tls_key = "/etc/letsencrypt/live/relay.example.org/privkey.pem"',
    "tls_listen": 'tls_listen = "0.0.0.0:443"',
    "tls_names": 'tls_names = ["relay.example.org"]',
    "tls_handshake_timeout": "tls_handshake_timeout = 10",
    "agent": '[[relay.agent]] name = "lab_pc", keys = ["ssh-ed25519 AAAA... lab_pc"], '
    'services = ["gpu-cluster:22"]',
    "user": '[[relay.user]] name = "alice", keys = ["ssh-ed25519 AAAA... alice"], '
    'services = ["gpu-cluster:22"]',
}
PENALTY_KEYS = {
    "enabled": "enabled = true",
    "authfail": "authfail = 5",
    "noauth": "noauth = 1",
    "grace_exceeded": "grace_exceeded = 20",
    "protocol": "protocol = 10",
    "max": "max = 600",
    "min": "min = 15",
    "max_sources": "max_sources = 65536",
    "overflow": 'overflow = "permissive"',
}
CROWDING_KEYS = {
    "enabled": "enabled = true",
    "silent": "silent = 2",
    "handshake": "handshake = 10",
    "auth": "auth = 20",
    "netblock4": "netblock4 = 24",
    "netblock6": "netblock6 = 48",
}
LIFECYCLE_KEYS = {
    "expiry": 'expiry = "20270131Z" (YYYYMMDD[HHMM[SS]][Z]) or a TOML date-time: '
              'expiry = 2027-01-31T00:00:00Z',
    "from": 'from = "10.0.0.0/8,!10.0.0.66"',
    "cert_authorities": 'cert_authorities = ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA... lab_ca"]',
    "principals": 'principals = ["alice"]',
}
"""Keys of every ``[[relay.user]]``/``[[relay.agent]]`` table (relay/config/lifecycle.py)."""
RELAY_AGENT_KEYS = {
    "name": 'name = "lab_pc"',
    "keys": 'keys = ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA... lab_pc"]',
    "services": 'services = ["gpu-cluster:22", "jupyter:8888", "tensorboard:*"]',
    "public_ports": "public_ports = [2201]",
    **LIFECYCLE_KEYS,
}
RELAY_USER_KEYS = {
    "name": 'name = "alice"',
    "keys": 'keys = ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA... alice"]',
    "services": 'services = ["gpu-cluster:22", "jupyter:*"]',
    "max_sessions": "max_sessions = 10",
    "share": "share = 2",
    "rate_limit": 'rate_limit = "20MB"',
    "rate_burst": 'rate_burst = "4MB"',
    **LIFECYCLE_KEYS,
}
FORWARD_KEYS = {
    "listen": 'listen = "0.0.0.0:2201"',
    "connect": 'connect = "10.0.0.5:22"',
    "name": 'name = "gpu-ssh-hop"',
}
